//! Unpacking hostile and ordinary layers.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// A raw tar entry: the name is written into the header as is (the `tar` crate's builder
/// refuses `..` and absolute names, which is exactly what a hostile layer has).
fn raw_entry(b: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_mtime(1_000_000);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    b.extend(std::iter::repeat_n(0u8, pad));
}

fn finish(mut b: Vec<u8>) -> Vec<u8> {
    b.extend(std::iter::repeat_n(0u8, 1024));
    b
}

struct Dirs {
    _t: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn dirs() -> Dirs {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("a/b/root");
    let outside = t.path().join("a/b/outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    Dirs {
        root,
        outside,
        _t: t,
    }
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn dotdot_entries_are_refused_and_write_nothing_outside() {
    let d = dirs();
    let mut b = Vec::new();
    raw_entry(
        &mut b,
        "../outside/pwned",
        tar::EntryType::Regular,
        "",
        b"x",
    );
    let e = unpack_tar(finish(b).as_slice(), &d.root).unwrap_err();
    assert!(matches!(e, ImageError::UnsafePath { .. }), "{e}");
    assert!(e.to_string().contains("../outside/pwned"), "{e}");
    assert!(empty(&d.outside));
}

#[test]
fn absolute_names_land_inside_the_root() {
    let d = dirs();
    let abs = format!("{}/abs", d.outside.display());
    let mut b = Vec::new();
    raw_entry(&mut b, &abs, tar::EntryType::Regular, "", b"in");
    unpack_tar(finish(b).as_slice(), &d.root).unwrap();
    assert!(empty(&d.outside));
    let inside = d.root.join(abs.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside).unwrap(), b"in");
}

#[test]
fn a_write_through_a_symlink_stays_in_the_root() {
    for target in ["../outside", "/", "../../../../../../.."] {
        let d = dirs();
        let mut b = Vec::new();
        raw_entry(&mut b, "link", tar::EntryType::Symlink, target, b"");
        raw_entry(&mut b, "link/pwned", tar::EntryType::Regular, "", b"x");
        // Either refused or written inside the root: never outside.
        let r = unpack_tar(finish(b).as_slice(), &d.root);
        assert!(
            empty(&d.outside),
            "{target}: wrote outside the root ({r:?})"
        );
        if r.is_ok() {
            assert!(d.root.join("pwned").is_file() || d.root.join("outside/pwned").is_file());
        }
    }
    // An absolute symlink to the outside dir, then a file through it.
    let d = dirs();
    let mut b = Vec::new();
    raw_entry(
        &mut b,
        "l2",
        tar::EntryType::Symlink,
        d.outside.to_str().unwrap(),
        b"",
    );
    raw_entry(&mut b, "l2/pwned", tar::EntryType::Regular, "", b"x");
    let _ = unpack_tar(finish(b).as_slice(), &d.root);
    assert!(empty(&d.outside));
}

#[test]
fn a_file_over_a_symlink_replaces_the_link_not_its_target() {
    let d = dirs();
    let victim = d.outside.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let mut b = Vec::new();
    raw_entry(
        &mut b,
        "f",
        tar::EntryType::Symlink,
        victim.to_str().unwrap(),
        b"",
    );
    raw_entry(&mut b, "f", tar::EntryType::Regular, "", b"new");
    unpack_tar(finish(b).as_slice(), &d.root).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert_eq!(std::fs::read(d.root.join("f")).unwrap(), b"new");
}

#[test]
fn hard_links_outside_the_root_are_refused() {
    let d = dirs();
    std::fs::write(d.outside.join("secret"), "s").unwrap();
    let mut b = Vec::new();
    raw_entry(&mut b, "h", tar::EntryType::Link, "../outside/secret", b"");
    assert!(unpack_tar(finish(b).as_slice(), &d.root).is_err());
    assert!(!d.root.join("h").exists());
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_attributes_are_kept() {
    let d = dirs();
    let mut b = Vec::new();
    raw_entry(&mut b, "dir/", tar::EntryType::Directory, "", b"");
    raw_entry(&mut b, "dir/.wh..wh..opq", tar::EntryType::Regular, "", b"");
    raw_entry(&mut b, ".wh.gone", tar::EntryType::Regular, "", b"");
    raw_entry(&mut b, "dir/file", tar::EntryType::Regular, "", b"data");
    raw_entry(&mut b, "dir/hard", tar::EntryType::Link, "dir/file", b"");
    raw_entry(
        &mut b,
        "implicit/parent/f",
        tar::EntryType::Regular,
        "",
        b"p",
    );
    let usage = unpack_tar(finish(b).as_slice(), &d.root).unwrap();
    let gone = std::fs::symlink_metadata(d.root.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert!(!d.root.join(".wh.gone").exists());
    let mut buf = [0u8; 8];
    let p = std::ffi::CString::new(d.root.join("dir").to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            8,
        )
    };
    assert_eq!(&buf[..n.max(0) as usize], b"y");
    let f = std::fs::metadata(d.root.join("dir/file")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mtime()), (1234, 5678, 1_000_000));
    assert_eq!(f.permissions().mode() & 0o7777, 0o644);
    assert_eq!(
        f.ino(),
        std::fs::metadata(d.root.join("dir/hard")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read(d.root.join("implicit/parent/f")).unwrap(),
        b"p"
    );
    assert_eq!(usage.bytes, 5);
}

#[test]
fn gzip_and_zstd_layers_report_their_diff_id() {
    let mut b = Vec::new();
    raw_entry(&mut b, "hello", tar::EntryType::Regular, "", b"hi\n");
    let tar = finish(b);
    let diff_id = crate::image::sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    for (data, c) in [(tar.clone(), Compression::None), (gz, Compression::Gzip)] {
        let d = dirs();
        let blob = d.root.parent().unwrap().join("blob");
        std::fs::write(&blob, &data).unwrap();
        let (got, _) = unpack_blob(std::fs::File::open(&blob).unwrap(), c, &d.root).unwrap();
        assert_eq!(got, diff_id, "{c:?}");
        assert_eq!(std::fs::read(d.root.join("hello")).unwrap(), b"hi\n");
    }
    assert_eq!(
        Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
        Compression::Zstd
    );
    assert!(Compression::from_media_type("application/x-foo").is_err());
}
