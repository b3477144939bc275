//! x86_64 guest layout and boot structures: where things live in guest memory, the
//! MP table that announces CPUs and the IOAPIC (the guest kernel has no ACPI), and the
//! PVH start info that hands the kernel its memory map, command line and initramfs.
pub mod layout;
pub mod mptable;
pub mod pvh;
