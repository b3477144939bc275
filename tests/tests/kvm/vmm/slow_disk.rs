//! A disk whose every read takes seconds stalls only its own queue: the disk has an I/O thread
//! of its own, so vsock (and the control API) on the VMM's main loop go on answering.
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{connect_guest, tmpdir};

/// Every I/O to the disk waits this long (device-mapper's `delay` target).
const DELAY_MS: u64 = 3000;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A 1 GiB sparse file behind a loop device behind dm-delay, fast until [`Self::slow_down`]
/// (the guest kernel reads the partition table at boot); all removed on drop.
struct SlowDisk {
    name: String,
    loop_dev: String,
}

impl SlowDisk {
    fn new(dir: &Path) -> SlowDisk {
        run("modprobe", &["loop"]);
        run("modprobe", &["dm-delay"]);
        let file = dir.join("slow.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(1 << 30))
            .unwrap();
        let loop_dev = run("losetup", &["--find", "--show", file.to_str().unwrap()]);
        let name = format!("husk-slow-{}", std::process::id());
        let disk = SlowDisk { name, loop_dev };
        run(
            "dmsetup",
            &[
                "create",
                "--noudevsync",
                &disk.name,
                "--table",
                &disk.table(0),
            ],
        );
        disk
    }

    fn table(&self, delay_ms: u64) -> String {
        let sectors = (1u64 << 30) / 512;
        format!("0 {sectors} delay {} 0 {delay_ms}", self.loop_dev)
    }

    /// From now on every I/O waits [`DELAY_MS`].
    fn slow_down(&self) {
        let table = self.table(DELAY_MS);
        run("dmsetup", &["reload", &self.name, "--table", &table]);
        run("dmsetup", &["resume", "--noudevsync", &self.name]);
    }

    /// The kernel's node (devtmpfs), not /dev/mapper's: the lab runs no udev to make that.
    fn path(&self) -> PathBuf {
        let dev = run(
            "dmsetup",
            &["info", "-c", "--noheadings", "-o", "blkdevname", &self.name],
        );
        Path::new("/dev").join(dev)
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        // A killed VMM's last read may still be waiting out its delay.
        let deadline = Instant::now() + Duration::from_secs(3 * DELAY_MS / 1000 + 10);
        while Command::new("dmsetup")
            .args(["remove", "--noudevsync", &self.name])
            .status()
            .is_ok_and(|s| !s.success())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
    }
}

#[test]
fn a_stalled_disk_does_not_delay_vsock() {
    husk_tests::require_kvm();
    let d = tmpdir("slowdisk");
    let disk = SlowDisk::new(&d);
    let uds = d.join("vsock.sock");
    let mut child = husk_tests::vmm_proc::command("slowdisk", "")
        .arg("--block")
        .arg(disk.path())
        .arg("--vsock-uds")
        .arg(&uds)
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut wait_for = |what: &str| loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(what) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let mut log = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut log);
                panic!("the guest never printed {what:?} ({e}); the VMM's log:\n{log}");
            }
        }
    };
    wait_for("vsock listening on 1024");
    disk.slow_down();
    let s = connect_guest(&uds, 1024, deadline);
    // The guest's disk reader has started: from here on a read is always waiting on the disk.
    wait_for("slowdisk: reading");
    let mut w = s.try_clone().unwrap();
    let mut r = s;
    let mut rtts = Vec::new();
    // About three disk delays' worth of round trips.
    let until = Instant::now() + Duration::from_millis(3 * DELAY_MS);
    while Instant::now() < until {
        let t = Instant::now();
        w.write_all(b"x").unwrap();
        let mut b = [0u8];
        r.read_exact(&mut b).unwrap();
        rtts.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let worst = rtts.iter().max().copied().unwrap();
    eprintln!("{} vsock round trips, worst {worst:?}", rtts.len());
    // On the main loop, a round trip waited for the disk's read: up to the whole delay.
    assert!(
        worst < Duration::from_millis(DELAY_MS / 2),
        "a vsock round trip waited {worst:?} behind a {DELAY_MS} ms disk; all: {rtts:?}"
    );
    assert!(rtts.len() >= 5, "only {} round trips", rtts.len());
    drop(disk);
    std::fs::remove_dir_all(d).unwrap();
}
