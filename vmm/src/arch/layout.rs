//! Guest physical memory layout (the same shape as Firecracker's).

/// GDT and IDT used to enter the kernel in 32-bit protected mode (PVH).
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, its module list (the initramfs) and its e820-style memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: RAM below it is usable; the MP table lives here,
/// where the kernel scans for it (639 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// The kernel is loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM stops below this 32-bit hole (MMIO devices, IOAPIC, LAPIC) and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio device windows, one 4 KiB page each, from here up.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// TSS for KVM's real-mode emulation on Intel; it must be out of RAM's way.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// IRQs: 4 is the serial port; virtio devices take 5 and up, to the IOAPIC's last pin.
pub const SERIAL_IRQ: u32 = 4;
pub const FIRST_DEVICE_IRQ: u32 = 5;
pub const LAST_IRQ: u32 = 23;

/// The guest RAM ranges for `mem_size` bytes: below the 32-bit hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }
}
