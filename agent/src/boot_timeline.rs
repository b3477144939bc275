//! When, in the guest's own clock, the agent started and began serving: with the VMM's
//! start-up log and the host's view of the first answer, this splits a pod VM's boot into
//! kernel, agent start-up and the first round trip (the boot benchmark prints it).
use std::sync::atomic::{AtomicU64, Ordering};

static INIT_MS: AtomicU64 = AtomicU64::new(0);
static SERVING_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the kernel started (CLOCK_BOOTTIME), or 0 if the clock is unreadable.
fn boot_clock_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Called first thing as PID 1.
pub fn mark_init() {
    INIT_MS.store(boot_clock_ms(), Ordering::Relaxed);
}

/// Called once the API listens.
pub fn mark_serving() {
    SERVING_MS.store(boot_clock_ms(), Ordering::Relaxed);
}

/// (init, serving) in ms of boot clock; zeros where not marked.
pub fn get() -> (u64, u64) {
    (
        INIT_MS.load(Ordering::Relaxed),
        SERVING_MS.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_follow_the_boot_clock() {
        super::mark_init();
        std::thread::sleep(std::time::Duration::from_millis(20));
        super::mark_serving();
        let (init, serving) = super::get();
        assert!(init > 0, "CLOCK_BOOTTIME read as 0");
        assert!(serving >= init + 20, "init {init} ms, serving {serving} ms");
    }
}
