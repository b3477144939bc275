//! PVH boot: load an uncompressed ELF `vmlinux` that carries a PVH entry note, and write
//! the `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h) the entry expects.
use std::fs::File;
use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;
use crate::devices::virtio::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("cannot load the kernel ELF: {0}")]
    Load(linux_loader::loader::Error),
    #[error("the kernel has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry,
    #[error("the initramfs ({size} bytes) does not fit in guest memory below the kernel's reach")]
    InitrdTooBig { size: u64 },
    #[error("the kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("cannot write boot data to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
    #[error("cannot read the initramfs: {0}")]
    ReadInitrd(std::io::Error),
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// Where the kernel was loaded and where to jump.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    pub kernel_end: u64,
}

pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut f = File::open(path).map_err(|err| BootError::Open {
        path: path.display().to_string(),
        err,
    })?;
    let res =
        Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(BootError::Load)?;
    match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry,
            kernel_end: res.kernel_end,
        }),
        _ => Err(BootError::NoPvhEntry),
    }
}

/// Places the initramfs page-aligned at the top of low RAM (below the 32-bit hole), where
/// the kernel can reach it early. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let mut f = File::open(path).map_err(|err| BootError::Open {
        path: path.display().to_string(),
        err,
    })?;
    let size = f.metadata().map_err(BootError::ReadInitrd)?.len();
    let low_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(BootError::Write)?;
    Ok((GuestAddress(addr), size))
}

pub fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::Write)
}

/// The e820-style map: low RAM up to the EBDA, then everything from 1 MiB.
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    for &(start, len) in ram {
        let start_at = start.max(HIMEM_START);
        let end = start + len;
        if end > start_at {
            map.push((start_at, end - start_at, E820_RAM));
        }
    }
    map
}

pub fn write_start_info(
    mem: &GuestMemory,
    ram: &[(u64, u64)],
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let map = memory_map(ram);
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for (addr, size, kind) in &map {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_ADDR))
        .map_err(BootError::Write)?;

    let nr_modules = u32::from(initrd.is_some());
    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.raw_value().to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&[0; 16]); // module cmdline, reserved
        mem.write_slice(&m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(BootError::Write)?;
    }

    let mut si = Vec::with_capacity(56);
    si.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    si.extend_from_slice(&1u32.to_le_bytes()); // version 1: has the memory map
    si.extend_from_slice(&0u32.to_le_bytes()); // flags
    si.extend_from_slice(&nr_modules.to_le_bytes());
    si.extend_from_slice(&PVH_MODLIST_ADDR.to_le_bytes());
    si.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    si.extend_from_slice(&0u64.to_le_bytes()); // no RSDP: no ACPI
    si.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    si.extend_from_slice(&(map.len() as u32).to_le_bytes());
    si.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&si, GuestAddress(PVH_INFO_ADDR))
        .map_err(BootError::Write)
}

/// The flat GDT the PVH entry needs: null, 32-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008b_0000_0000_ffff,
];

pub fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(BootError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;

    #[test]
    fn memory_map_skips_the_bios_hole() {
        let map = memory_map(&[(0, 128 << 20)]);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
        let map = memory_map(&super::super::layout::ram_ranges(4 << 30));
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].0, 1 << 32);
    }

    #[test]
    fn start_info_layout() {
        let mem = guest_memory(16 << 20);
        write_start_info(
            &mem,
            &[(0, 16 << 20)],
            Some((GuestAddress(0x80_0000), 1234)),
        )
        .unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let nr_mod: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 12)).unwrap();
        assert_eq!(nr_mod, 1);
        let entries: u32 = mem.read_obj(GuestAddress(PVH_INFO_ADDR + 48)).unwrap();
        assert_eq!(entries, 2);
        let size: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR + 8)).unwrap();
        assert_eq!(size, 1234);
    }

    #[test]
    fn cmdline_limits() {
        let mem = guest_memory(1 << 20);
        write_cmdline(&mem, "console=ttyS0").unwrap();
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(CMDLINE_MAX)),
            Err(BootError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn initrd_must_fit_above_the_kernel() {
        let mem = guest_memory(4 << 20);
        let dir = std::env::temp_dir().join(format!("husk-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 8192]).unwrap();
        let (addr, size) = load_initrd(&mem, &dir, 2 << 20).unwrap();
        assert_eq!(size, 8192);
        assert_eq!(addr.raw_value() & 0xfff, 0);
        assert!(addr.raw_value() + size <= 4 << 20);
        assert!(matches!(
            load_initrd(&mem, &dir, 4 << 20),
            Err(BootError::InitrdTooBig { .. })
        ));
        std::fs::remove_file(dir).unwrap();
    }
}
