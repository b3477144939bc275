//! The guest console as a file of bounded size: the guest can print forever, the host keeps
//! at most `cap` bytes, and the newest half of that is always there to read.
//!
//! When a write would take the file past `cap`, the newest `cap / 2` bytes are read back,
//! the file is truncated and they are written again at its start. No ring is held in memory
//! (a VMM's memory outside guest RAM is a few MiB), and the only extra syscalls are `pread`
//! and `ftruncate` on the file we already own, rarely.
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// The default cap of a console log file: a whole verbose boot fits many times over.
pub const DEFAULT_CONSOLE_CAP: u64 = 1 << 20;

pub struct CappedLog {
    file: File,
    cap: u64,
    len: u64,
}

impl CappedLog {
    /// `file` must be opened for append and read. `cap` below 2 bytes keeps nothing.
    pub fn new(file: File, cap: u64) -> io::Result<Self> {
        let len = file.metadata()?.len();
        let mut log = CappedLog { file, cap, len };
        if len > cap {
            log.keep_newest_half()?;
        }
        Ok(log)
    }

    fn keep_newest_half(&mut self) -> io::Result<()> {
        let keep = (self.cap / 2).min(self.len);
        let mut tail = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut tail, self.len - keep)?;
        self.file.set_len(0)?;
        // O_APPEND: the write lands at the new end, offset 0.
        self.file.write_all(&tail)?;
        self.len = keep;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let taken = buf.len();
        // Of a single write larger than half the cap only the last half-cap is worth keeping;
        // then, after keeping the newest half, it always fits.
        let buf = &buf[buf.len().saturating_sub((self.cap / 2) as usize)..];
        if self.len + buf.len() as u64 > self.cap {
            self.keep_newest_half()?;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_flood_stays_under_the_cap_and_keeps_the_newest_bytes() {
        let dir = tempdir("flood");
        let path = dir.join("console.log");
        let mut log = CappedLog::new(open(&path), 4096).unwrap();
        for i in 0..10_000u32 {
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("line 9999\n"),
            "{}",
            &text[text.len() - 40..]
        );
        assert!(text.len() >= 2048, "only {} bytes kept", text.len());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_oversized_existing_file_is_cut_at_open_and_big_writes_are_bounded() {
        let dir = tempdir("big");
        let path = dir.join("console.log");
        std::fs::write(&path, vec![b'x'; 10_000]).unwrap();
        let mut log = CappedLog::new(open(&path), 1000).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 500);
        log.write_all(&[b'y'; 5000]).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data.len() <= 1000);
        assert!(data.ends_with(&[b'y'; 500]));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("husk-capped-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
