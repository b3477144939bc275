//! A minimal i8042 keyboard controller: just enough for the guest's `reboot=k`, which
//! pulses the CPU reset line by writing 0xFE to the command port. That ends the VM.
use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::vstate::{ExitReason, VmExit};

/// Ports 0x60 (data) through 0x64 (command/status).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<VmExit>,
}

impl I8042 {
    pub fn new(exit: Arc<VmExit>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data waiting, input buffer empty, so the kernel's wait loops end.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.signal(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xd1]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
        let mut d = [0xffu8];
        dev.read(4, &mut d);
        assert_eq!(d, [0]);
    }
}
