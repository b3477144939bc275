//! The 8250 UART (vm-superio) at 0x3f8, IRQ 4: the guest console. Output goes to a
//! writer (stdout, a file, or nowhere); the stream is also watched for the kernel's
//! panic banner, since with `panic=-1` a panic otherwise looks like a plain reboot.
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

pub const SERIAL_BASE: u64 = 0x3f8;
pub const SERIAL_LEN: u64 = 8;
const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

/// Raises the serial IRQ through an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that passes bytes on and remembers whether a panic banner went past.
pub struct PanicWatch<W: Write> {
    inner: W,
    matched: usize,
    panicked: Arc<AtomicBool>,
}

impl<W: Write> PanicWatch<W> {
    pub fn new(inner: W, panicked: Arc<AtomicBool>) -> Self {
        PanicWatch {
            inner,
            matched: 0,
            panicked,
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == PANIC_BANNER[self.matched] {
                self.matched += 1;
                if self.matched == PANIC_BANNER.len() {
                    self.panicked.store(true, Ordering::SeqCst);
                    self.matched = 0;
                }
            } else {
                self.matched = usize::from(b == PANIC_BANNER[0]);
            }
        }
        // A console that can't be written (closed pipe) must not stop the guest.
        let _ = self.inner.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub type SerialOut = PanicWatch<Box<dyn Write + Send>>;

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), PanicWatch::new(out, panicked)),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.serial.write(off, v) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_banner_is_noticed_across_writes() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = PanicWatch::new(Vec::new(), flag.clone());
        w.write_all(b"[ 1.0] Kernel pa").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        w.write_all(b"nic - not syncing: VFS").unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert!(String::from_utf8_lossy(&w.inner).contains("not syncing: VFS"));
    }

    #[test]
    fn near_misses_do_not_count() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = PanicWatch::new(std::io::sink(), flag.clone());
        w.write_all(b"KKernel panic - not syncinKernel panic - not synci")
            .unwrap();
        assert!(!flag.load(Ordering::SeqCst));
    }

    #[test]
    fn bytes_reach_the_writer() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut dev = SerialDevice::new(irq, Box::new(Shared(buf.clone())), flag);
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi");
    }
}
