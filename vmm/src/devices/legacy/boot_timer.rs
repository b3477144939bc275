//! The boot timer: the guest writes BOOT_MARKER_VALUE to BOOT_MARKER_PORT once its
//! userspace is up (the test init and the agent both do). The time from VMM process start
//! to that write is the boot-time figure every benchmark uses.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::devices::bus::BusDevice;

pub const BOOT_MARKER_PORT: u64 = 0x3f0;
pub const BOOT_MARKER_VALUE: u8 = 123;
const NOT_BOOTED: u64 = u64::MAX;

pub struct BootTimer {
    start: Instant,
    boot_us: Arc<AtomicU64>,
}

impl BootTimer {
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            boot_us: Arc::new(AtomicU64::new(NOT_BOOTED)),
        }
    }

    /// Shared view of the result: microseconds from process start, once the marker came.
    pub fn handle(&self) -> BootTime {
        BootTime(self.boot_us.clone())
    }
}

#[derive(Clone)]
pub struct BootTime(Arc<AtomicU64>);

impl BootTime {
    pub fn micros(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|v| *v != NOT_BOOTED)
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&BOOT_MARKER_VALUE) {
            return;
        }
        let us = self.start.elapsed().as_micros() as u64;
        // Only the first marker counts; a guest that writes again can't move the figure.
        if self
            .boot_us
            .compare_exchange(NOT_BOOTED, us, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::info!(
                boot_ms = us as f64 / 1000.0,
                "guest userspace started {:.1} ms after VMM start",
                us as f64 / 1000.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_marker_counts() {
        let mut t = BootTimer::new(Instant::now());
        let h = t.handle();
        t.write(0, &[1]);
        assert_eq!(h.micros(), None);
        t.write(0, &[BOOT_MARKER_VALUE]);
        let first = h.micros().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.write(0, &[BOOT_MARKER_VALUE]);
        assert_eq!(h.micros(), Some(first));
    }
}
