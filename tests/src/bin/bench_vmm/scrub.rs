//! Hands the next measured VM host RAM that no earlier guest ran code from.
//!
//! Under the lab's TCG, a VM whose RAM reuses the host pages an earlier VM ran its kernel
//! from boots 1.1-1.4 s slower than one on fresh pages, under any VMM: QEMU (the lab's
//! emulator) tracks those pages as holding translated code, and the new guest's first
//! writes to them (the host kernel zeroing a huge page at a nested page fault: one fault
//! took 731 ms against 11 ms) go through its self-modifying-code path. Which boot lands on
//! such pages varies, so lab medians varied by a second between lab boots. Hardware KVM has
//! no such cost.
//!
//! The scrub faults in and frees a block of anonymous memory larger than any VM of the
//! bench: the host kernel hands out the pages freed last (the last VM's) first, so the
//! scrub pays that cost outside the measured boot, and the next VM gets pages whose
//! translations are gone. It runs before every measured boot, whichever the VMM, so each
//! gets the same. Measured in one lab boot: boots after a 512 MiB scrub 1211-1245 ms,
//! without it 2497-2655 ms (the first boot of the lab, on fresh pages: 1397 ms).

/// More than the guest RAM (256 MiB at most here) plus QEMU's own heap.
const SCRUB_MIB: usize = 512;

/// Whether boots are scrubbed: yes unless `--no-scrub` (to see the effect itself).
pub fn enabled() -> bool {
    !std::env::args().any(|a| a == "--no-scrub")
}

/// Faults in `SCRUB_MIB` of anonymous memory (huge pages where the host gives them, as VMs
/// get) and frees it.
fn host_ram() {
    let len = SCRUB_MIB << 20;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        addr,
        libc::MAP_FAILED,
        "scrub: mmap of {SCRUB_MIB} MiB failed"
    );
    // SAFETY: [addr, addr + len) is the mapping made above. A kernel without THP refuses
    // the advice; small pages scrub as well.
    unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
    let base = addr.cast::<u8>();
    for off in (0..len).step_by(4096) {
        // SAFETY: off < len, inside the writable mapping; volatile so the write happens.
        unsafe { base.add(off).write_volatile(1) };
    }
    // SAFETY: unmaps exactly the mapping made above; no reference into it outlives this.
    unsafe { libc::munmap(addr, len) };
}

/// Scrubs, unless `--no-scrub`.
pub fn before_boot() {
    if enabled() {
        host_ram();
    }
}
