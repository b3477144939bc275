//! Guest RAM's host mappings, and how the host kernel treats them: placed so KVM can map
//! them with huge pages, never shared with a child, never in a core dump, and in transparent
//! huge pages where the host allows them.
use std::os::fd::AsRawFd;

use vm_memory::{
    mmap::MmapRegionBuilder, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::devices::virtio::GuestMemory;

/// The huge page size KVM's two-dimensional paging can use on x86 (below 1 GiB pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `size` bytes of guest RAM for guest-physical `gpa`: private anonymous memory, or the
/// file `shared` (a memfd that a vhost-user back end maps too) `MAP_SHARED`.
///
/// The host address is congruent to `gpa` modulo 2 MiB. KVM maps a guest page with a huge
/// page of its nested page table only where host virtual and guest physical addresses agree
/// in their low 21 bits (and the host backs it with a huge page); a plain `mmap` of guest RAM
/// lands anywhere 4 KiB-aligned, and then every guest access walks 4 KiB nested entries.
/// QEMU aligns its RAM for the same reason.
///
/// The mapping is never unmapped (the region does not own it): guest RAM lives as long as
/// the VMM process, which ends with its VM.
pub fn map_guest_ram(
    gpa: GuestAddress,
    size: usize,
    shared: Option<FileOffset>,
) -> std::io::Result<GuestRegionMmap<()>> {
    let err = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    let total = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| err("guest RAM size overflows"))?;
    // SAFETY: a fresh, inaccessible reservation at an address of the kernel's choice; no
    // existing mapping is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let want = (gpa.0 as usize) & (HUGE_PAGE - 1);
    let mut addr = (base & !(HUGE_PAGE - 1)) + want;
    if addr < base {
        addr += HUGE_PAGE;
    }
    // base <= addr < base + HUGE_PAGE, so [addr, addr + size) lies inside the reservation.
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let (flags, fd, offset) = match &shared {
        Some(f) => (libc::MAP_SHARED, f.file().as_raw_fd(), f.start()),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        ),
    };
    // SAFETY: MAP_FIXED replaces only pages of our own reservation (see above).
    let mapped = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            size,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            offset as libc::off_t,
        )
    };
    let mapped_err = (mapped == libc::MAP_FAILED).then(std::io::Error::last_os_error);
    // SAFETY: unmapping the parts of our reservation around the guest RAM mapping (or all of
    // it if that failed); nothing else lives there.
    unsafe {
        if let Some(e) = mapped_err {
            libc::munmap(base as *mut libc::c_void, total);
            return Err(e);
        }
        if addr > base {
            libc::munmap(base as *mut libc::c_void, addr - base);
        }
        libc::munmap(
            (addr + size) as *mut libc::c_void,
            base + total - (addr + size),
        );
    }
    let mut builder = MmapRegionBuilder::new(size)
        .with_mmap_prot(prot)
        .with_mmap_flags(flags);
    if let Some(f) = shared {
        builder = builder.with_file_offset(f);
    }
    // SAFETY: [addr, addr + size) is the live mapping made above, which nothing unmaps.
    let region = unsafe { builder.with_raw_mmap_pointer(addr as *mut u8) }
        .build()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    GuestRegionMmap::new(region, gpa).ok_or_else(|| err("guest RAM region overflows"))
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryAdviceError {
    #[error("guest memory region at {0:#x} has no host mapping")]
    NoMapping(u64),
    #[error("madvise({advice}) on guest memory failed: {source}")]
    Madvise {
        advice: &'static str,
        source: std::io::Error,
    },
}

/// Applies the advice to every region. Call it before the first byte is written, so that
/// huge pages are used from the first fault on.
///
/// - `MADV_DONTFORK`: a child (any fork, ours or a library's) would otherwise share every
///   page copy-on-write, split the huge pages and keep them shared after the VMM writes.
/// - `MADV_DONTDUMP`: a VMM crash must not write the guest's RAM into a core file.
/// - `MADV_HUGEPAGE`: with THP in `madvise` mode (a common default) guest RAM would
///   otherwise be backed by 4 KiB pages, costing TLB misses and EPT/NPT walks.
pub fn advise(mem: &GuestMemory) -> Result<(), MemoryAdviceError> {
    for region in mem.iter() {
        let start = region.start_addr().0;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryAdviceError::NoMapping(start))?;
        let len = region.len() as usize;
        madvise(host, len, libc::MADV_DONTFORK, "MADV_DONTFORK")?;
        madvise(host, len, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        // EINVAL: a kernel without THP. The VM works on small pages there.
        if let Err(e) = madvise(host, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE") {
            tracing::debug!("{e}");
        }
    }
    Ok(())
}

fn madvise(
    addr: *mut u8,
    len: usize,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), MemoryAdviceError> {
    // SAFETY: [addr, addr + len) is one live mapping owned by the guest memory object;
    // these advices change how the kernel backs it, never its contents.
    if unsafe { libc::madvise(addr.cast(), len, advice) } != 0 {
        return Err(MemoryAdviceError::Madvise {
            advice: name,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// The advice must hold: a forked child does not see guest memory at all.
    #[test]
    fn guest_ram_is_placed_for_huge_pages() {
        for gpa in [0u64, 4 << 30, (1 << 20) + 0x3000] {
            let r = map_guest_ram(GuestAddress(gpa), 8 << 20, None).unwrap();
            let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, gpa as usize % HUGE_PAGE, "gpa {gpa:#x}");
            let mem = GuestMemoryMmap::from_regions(vec![r]).unwrap();
            mem.write_obj(0xa5u8, GuestAddress(gpa + (8 << 20) - 1))
                .unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(gpa)).unwrap(), 0);
        }
    }

    #[test]
    fn shared_guest_ram_is_the_files_pages() {
        // SAFETY: a fresh memfd, owned by the File right away.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: as above.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(4 << 20).unwrap();
        let r = map_guest_ram(
            GuestAddress(0),
            4 << 20,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )
        .unwrap();
        let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0);
        let mem = GuestMemoryMmap::from_regions(vec![r]).unwrap();
        mem.write_obj(0x5au8, GuestAddress(0x1234)).unwrap();
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&file, &mut b, 0x1234).unwrap();
        assert_eq!(b[0], 0x5a, "the mapping is not the file's pages");
    }

    #[test]
    fn guest_memory_is_not_inherited_by_a_child() {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        advise(&mem).unwrap();
        mem.write_obj(0x5au8, GuestAddress(0x1000)).unwrap();
        let host = mem.get_host_address(GuestAddress(0x1000)).unwrap() as usize;
        let mut status = 0;
        // SAFETY: the child only reads /proc through raw syscalls and exits; the test
        // process is not touched.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // A DONTFORK range is unmapped in the child: mincore fails with ENOMEM there.
            let mut vec = 0u8;
            // SAFETY: mincore only inspects the page table for the given page.
            let r = unsafe { libc::mincore((host & !0xfff) as *mut _, 4096, &mut vec) };
            // SAFETY: exiting the forked child without running the parent's destructors.
            unsafe { libc::_exit(if r != 0 { 0 } else { 1 }) };
        }
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the child still maps guest memory"
        );
    }
}
