//! `guest_warn!`: the one way devices log what a guest made them see (bad descriptors,
//! out-of-range addresses, protocol errors). A guest can provoke such a warning in a loop, so
//! each call site logs only its 1st, 2nd, 4th, 8th, ... occurrence, with the count: the
//! host's log grows with the logarithm of the guest's effort, and nothing is hidden for good.

/// Like `tracing::warn!`, rate-limited per call site (see the module docs).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static SEEN: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        let times = SEEN
            .fetch_add(1, ::std::sync::atomic::Ordering::Relaxed)
            .saturating_add(1);
        if times.is_power_of_two() {
            ::tracing::warn!(times, $($arg)+);
        }
    }};
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_million_warnings_log_twenty_lines_with_their_count() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1_000_000u32 {
                guest_warn!(index = i, "the guest did a bad thing");
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20, "{text}");
        assert!(lines[19].contains("times=524288"), "{}", lines[19]);
        assert!(lines[19].contains("the guest did a bad thing"));
    }
}
