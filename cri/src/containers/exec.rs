//! ExecSync as containerd 1.6 does it (`reference/containerd-shim-v2.md` 19): FIFOs read
//! from before the shim's Exec, Start, Wait; on timeout SIGKILL to the exec in the guest,
//! then the output drained to EOF (bounded: a shim that keeps a FIFO open must not hang
//! the call) and the exec Deleted.

use std::time::Duration;

use tracing::warn;

use super::{io_err, new_id, Container, ContainerError, ContainerState, Containers};
use crate::logs;
use crate::shim_client::Shim;

/// Output kept per stream (CRI-O's and containerd's bound).
const OUTPUT_LIMIT: usize = 16 << 20;
/// After the process is gone, how long its output may take to reach EOF.
const DRAIN: Duration = Duration::from_secs(10);
/// How long a SIGKILLed exec may take to be reported exited.
const KILL_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl Containers {
    /// The running container `id` that `call` may run `cmd` in: NotFound, a state error or
    /// an empty command otherwise.
    pub(super) fn runnable(
        &self,
        id: &str,
        cmd: &[String],
        call: &'static str,
    ) -> Result<Container, ContainerError> {
        let c = self
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.into()))?;
        if c.state != ContainerState::Running {
            return Err(ContainerError::State {
                id: id.into(),
                state: c.state,
                call,
                want: "running",
            });
        }
        if cmd.is_empty() {
            return Err(ContainerError::InvalidConfig(format!(
                "{call}: cmd is empty"
            )));
        }
        Ok(c)
    }

    /// Runs `cmd` in container `id` with the container's env, cwd and user; `timeout`
    /// None waits as long as it runs.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, ContainerError> {
        let c = self.runnable(id, &cmd, "ExecSync")?;
        let mut process = c.process.clone();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = false.into();
        let exec_id = format!("exec-{}", &new_id()[..16]);
        let fifos = logs::make_fifos(&c.bundle, &exec_id).map_err(io_err("make exec FIFOs"))?;
        let paths = [fifos.stdout_path.clone(), fifos.stderr_path.clone()];
        let out = tokio::spawn(logs::read_all(fifos.stdout, OUTPUT_LIMIT));
        let err = tokio::spawn(logs::read_all(fifos.stderr, OUTPUT_LIMIT));
        let shim = match Shim::connect(&c.shim_address).await {
            Ok(s) => s,
            Err(e) => {
                out.abort();
                err.abort();
                for p in &paths {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e.into());
            }
        };
        let ran = run(&shim, id, &exec_id, &process, &paths, timeout).await;
        let (stdout, stderr) = if ran.is_ok() || matches!(ran, Err(ContainerError::ExecTimeout(_)))
        {
            let drained = tokio::time::timeout(DRAIN, async { (out.await, err.await) }).await;
            match drained {
                Ok((Ok(o), Ok(e))) => (o, e),
                _ => {
                    warn!(container = %id, %exec_id, "exec output did not reach EOF");
                    (Vec::new(), Vec::new())
                }
            }
        } else {
            // Never started: no writer will come to end the reads.
            out.abort();
            err.abort();
            (Vec::new(), Vec::new())
        };
        if let Err(e) = shim.delete_exec(id, &exec_id).await {
            warn!(container = %id, %exec_id, error = %e, "delete the exec");
        }
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
        let exit_code = ran?;
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code,
        })
    }
}

/// Exec, Start and Wait (killing the exec at the deadline); the exit code.
pub(super) async fn run(
    shim: &Shim,
    id: &str,
    exec_id: &str,
    process: &serde_json::Value,
    paths: &[std::path::PathBuf; 2],
    timeout: Option<Duration>,
) -> Result<i32, ContainerError> {
    shim.exec(id, exec_id, process, &paths[0], &paths[1])
        .await?;
    shim.start_exec(id, exec_id).await?;
    let waited = match timeout {
        None => Some(shim.wait(id, exec_id).await),
        Some(t) => tokio::time::timeout(t, shim.wait(id, exec_id)).await.ok(),
    };
    if let Some(code) = waited {
        return Ok(code? as i32);
    }
    if let Err(e) = shim.signal(id, exec_id, libc::SIGKILL as u32, false).await {
        warn!(container = %id, %exec_id, error = %e, "SIGKILL a timed-out exec");
    }
    if tokio::time::timeout(KILL_GRACE, shim.wait(id, exec_id))
        .await
        .is_err()
    {
        warn!(container = %id, %exec_id, "a killed exec was not reported exited");
    }
    Err(ContainerError::ExecTimeout(
        timeout.expect("only a deadline times out"),
    ))
}
