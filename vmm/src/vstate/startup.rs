//! Where the VMM's own start-up time goes: the builder marks each phase, the first vCPU
//! marks its first KVM_RUN, and one log line says it all (benchmarks parse it).
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Start-up phases as (name, time since VMM start at the phase's end), and phases that ran
/// on another thread beside them, as (name, own duration).
pub struct StartupProfile {
    origin: Instant,
    marks: Vec<(&'static str, Duration)>,
    beside: Vec<(&'static str, Duration)>,
}

impl StartupProfile {
    pub fn new(origin: Instant) -> Self {
        StartupProfile {
            origin,
            marks: Vec::with_capacity(8),
            beside: Vec::new(),
        }
    }

    /// Records a phase that ran on another thread, overlapping the marked ones.
    pub fn beside(&mut self, name: &'static str, took: Duration) {
        self.beside.push((name, took));
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        self.marks.push((name, self.origin.elapsed()));
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }
}

/// "kvm 0.41 ms, memory 0.12 ms, ..., beside: slots 0.30 ms": each phase's own duration,
/// in order, then the overlapping ones, each prefixed "beside: ".
impl fmt::Display for StartupProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut prev = Duration::ZERO;
        for (i, (name, at)) in self.marks.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let ms = at.saturating_sub(prev).as_secs_f64() * 1000.0;
            write!(f, "{sep}{name} {ms:.2} ms")?;
            prev = *at;
        }
        for (name, took) in &self.beside {
            let ms = took.as_secs_f64() * 1000.0;
            write!(f, ", beside: {name} {ms:.2} ms")?;
        }
        Ok(())
    }
}

/// Logs the first KVM_RUN of the VM, once, whichever vCPU gets there first.
pub struct FirstRun {
    origin: Instant,
    done: AtomicBool,
}

/// The log line's fixed text; `husk-bench-vmm --startup` looks for it.
pub const FIRST_RUN_LOG: &str = "first KVM_RUN";

impl FirstRun {
    pub fn new(origin: Instant) -> Self {
        FirstRun {
            origin,
            done: AtomicBool::new(false),
        }
    }

    pub fn entering(&self) {
        if !self.done.swap(true, Ordering::SeqCst) {
            let ms = self.origin.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(
                startup_ms = ms,
                "{FIRST_RUN_LOG} {ms:.2} ms after VMM start"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_print_their_own_durations() {
        let origin = Instant::now();
        let mut p = StartupProfile::new(origin);
        p.marks = vec![
            ("kvm", Duration::from_micros(1500)),
            ("memory", Duration::from_micros(2000)),
        ];
        assert_eq!(p.to_string(), "kvm 1.50 ms, memory 0.50 ms");
        p.beside("slots", Duration::from_micros(300));
        assert_eq!(
            p.to_string(),
            "kvm 1.50 ms, memory 0.50 ms, beside: slots 0.30 ms"
        );
    }
}
