//! Port I/O and MMIO buses: dispatch a guest access to the device whose range holds it.
use std::sync::{Arc, Mutex};

use crate::devices::virtio::mmio::MmioTransport;

/// A device on a bus; `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(Entry { base, len, dev });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        let off = addr - e.base;
        (off < e.len).then_some((e, off))
    }

    /// Returns false when nothing lives at `addr` (the caller decides what that means).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                if let Ok(mut d) = e.dev.lock() {
                    d.read(off, data);
                }
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                if let Ok(mut d) = e.dev.lock() {
                    d.write(off, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(a.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(a.clone(), 0xf8, 0x9).is_err());
        assert!(bus.insert(a.clone(), u64::MAX, 2).is_err());
        bus.insert(a.clone(), 0x110, 0x10).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [5]);
        assert!(!bus.read(0x120, &mut d));
        assert!(!bus.read(0xff, &mut d));
        assert!(bus.write(0x112, &[9]));
        assert_eq!(a.lock().unwrap().0, vec![(2, vec![9])]);
    }
}
