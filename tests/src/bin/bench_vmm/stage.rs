//! Copies what the bench boots (husk-vmm, the kernel, the initramfs) to local storage first,
//! as a node has them, and boots every VMM from there.
//!
//! In the lab the repository is a 9p share without a page cache: each exec of husk-vmm from
//! it took 167-196 ms against 69 ms from L1's tmpfs, and reading the kernel and initramfs
//! 88 ms, on every boot. QEMU's binary comes from the lab's cached root. Staging puts both
//! VMMs' binaries on cached storage and gives both the same copies of the guest's files.
use std::path::{Path, PathBuf};

/// A staged copy of one build's files, removed when dropped.
pub struct Stage {
    dir: PathBuf,
}

impl Stage {
    /// Copies `bin_dir/husk-vmm` and the named files of `guest_dir` into a fresh directory
    /// under the temporary directory (L1's tmpfs in the lab).
    pub fn new(name: &str, bin_dir: &Path, guest_dir: &Path, guest_files: &[&str]) -> Stage {
        let dir = std::env::temp_dir().join(format!("husk-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the bench's stage directory");
        let copy = |from: PathBuf| {
            let to = dir.join(from.file_name().unwrap());
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("stage {}: {e}", from.display()));
        };
        copy(bin_dir.join("husk-vmm"));
        guest_files.iter().for_each(|f| copy(guest_dir.join(f)));
        Stage { dir }
    }

    /// Where husk-vmm and the guest's files now are (one directory for both).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
