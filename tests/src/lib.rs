//! Shared support for husk's tests: finding built artifacts and insisting on KVM.
use std::path::PathBuf;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where `guest-image/build` puts the guest kernel and initramfs images.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"))
}

/// A KVM test calls this first: it fails the test loudly, with the reason, where this
/// host cannot run microVMs. Deselecting KVM tests is done by not building them
/// (the `kvm` feature), never by skipping here.
pub fn require_kvm() {
    if let Err(e) = vmm::check::check_host() {
        panic!("this test needs a usable KVM and cannot run here: {e}");
    }
}
