//! How the host kernel treats guest memory: never shared with a child, never in a core dump,
//! and in transparent huge pages where the host allows them.
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::devices::virtio::GuestMemory;

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
