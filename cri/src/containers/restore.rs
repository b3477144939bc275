//! A restarted huskd takes its containers back from their records: the shim kept running
//! (and kept the task, its exit status and the write ends of the stdio FIFOs), so huskd
//! opens the FIFOs' read ends again and appends to the same CRI log, and waits again for
//! each running container's exit. A container that exited while huskd was down is reported
//! by that Wait at once; one whose shim is gone is recorded exited (255) with the reason.
//! Attach works again for output (the new log writer fans it out); a container's stdin
//! does not survive a restart (see `STDIN_LOST`), and an attach asking for it says why.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Container, ContainerState, ContainerStdin, Containers, Slot};
use crate::fanout::Fanout;
use crate::logs;

const STDIN_LOST: &str =
    "its stdin was closed when huskd restarted (the FIFO's writer went with the old huskd)";

impl Containers {
    /// Restores every recorded container. Runs once, before huskd serves.
    pub async fn restore(&self) {
        for c in self.records.load::<Container>() {
            let live = c.state != ContainerState::Exited;
            let (mut log_writer, mut log_file) = (None, None);
            let output = Arc::new(Fanout::default());
            // The shim read EOF on the container's stdin FIFO when the old huskd (its only
            // writer) died, and closed the process's stdin, as a containerd restart does:
            // there is no stdin to give back, and an attach asking for it is told why.
            let stdin = c
                .config
                .stdin
                .then(|| Arc::new(ContainerStdin::closed(STDIN_LOST)));
            if live {
                match logs::open_fifos(&c.bundle, "init") {
                    Ok(fifos) => {
                        let file = c.log_path.as_deref().and_then(|p| match logs::open_log(p) {
                            Ok(f) => Some(Arc::new(Mutex::new(f))),
                            Err(e) => {
                                warn!(container = %c.id, error = %e, "reopen the log");
                                None
                            }
                        });
                        log_writer = Some(logs::spawn_writer(
                            file.clone(),
                            fifos.stdout,
                            fifos.stderr,
                            output.clone(),
                        ));
                        log_file = file;
                    }
                    Err(e) => warn!(container = %c.id, error = %e, "reopen the stdio FIFOs"),
                }
            }
            let (exited, _) = watch::channel(!live);
            let (id, address, state) = (c.id.clone(), c.shim_address.clone(), c.state);
            info!(container = %id, pod = %c.pod_id, state = ?state, "container restored");
            self.table.lock().expect("containers lock").insert(
                id.clone(),
                Slot {
                    c,
                    log_writer,
                    log_file,
                    output,
                    stdin,
                    exited,
                },
            );
            if state == ContainerState::Running {
                self.spawn_waiter(&id, &address);
            }
        }
    }
}
