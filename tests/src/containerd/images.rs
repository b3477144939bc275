//! The OCI images the containerd tests run, built here without any registry: a busybox image
//! (Debian's static `/bin/busybox`, one symlink per applet) and a pause image (`husk-pause`,
//! compiled static). Each is written as an OCI image-layout tarball that
//! `ctr images import` takes, and cached under `target/containerd-images/` by a hash of its
//! inputs, so a rebuilt busybox or pause source gives a new archive.
//!
//! Layers are uncompressed tars (`application/vnd.oci.image.layer.v1.tar`): containerd
//! accepts them, their digest is their diff id, and there is nothing to gain from gzip for
//! a local import.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

/// The busybox image's reference, as CRI and `ctr` name it.
pub const BUSYBOX: &str = "husk.test/busybox:1";
/// The pause image's reference (containerd's `sandbox_image`).
pub const PAUSE: &str = "husk.test/pause:1";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One entry of a layer, owned by root.
enum Entry {
    Dir(&'static str, u32),
    File(String, Vec<u8>, u32),
    Symlink(String, String),
}

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// A reproducible tar of `entries` (mtime 0, uid/gid 0), so equal inputs give equal digests.
fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Entry::Dir(path, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
            }
            Entry::File(path, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())
            }
            Entry::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)
            }
        }
        .expect("append to an in-memory tar");
    }
    b.into_inner().expect("finish an in-memory tar")
}

/// An OCI image-layout archive of a one-layer image named `name` (`repo:tag`).
fn oci_archive(name: &str, layer: &[u8], entrypoint: &[&str], cmd: &[&str]) -> Vec<u8> {
    let layer_digest = format!("sha256:{}", sha256_hex(layer));
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "WorkingDir": "/"
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "husk-tests containerd::images"}]
    }))
    .expect("encode the image config");
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len()
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len()
        }]
    }))
    .expect("encode the manifest");
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            // containerd 1.6's importer names the image from its own annotation (a full
            // reference); the OCI one holds only the tag.
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag
            }
        }]
    }))
    .expect("encode the index");

    let mut files = vec![
        Entry::Dir("blobs", 0o755),
        Entry::Dir("blobs/sha256", 0o755),
        Entry::File(
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            0o644,
        ),
        Entry::File("index.json".into(), index, 0o644),
    ];
    for blob in [manifest, config, layer.to_vec()] {
        files.push(Entry::File(
            format!("blobs/sha256/{}", sha256_hex(&blob)),
            blob,
            0o644,
        ));
    }
    layer_tar(&files)
}

/// Where built archives are cached.
fn cache_dir() -> PathBuf {
    let d = crate::repo_root().join("target/containerd-images");
    std::fs::create_dir_all(&d).expect("create target/containerd-images");
    d
}

/// `<cache>/<stem>-<key>.tar`, built by `build` unless already there.
fn cached(stem: &str, key: &[u8], build: impl FnOnce() -> Vec<u8>) -> PathBuf {
    let path = cache_dir().join(format!("{stem}-{}.tar", &sha256_hex(key)[..16]));
    if !path.is_file() {
        let data = build();
        // Written aside and renamed: tests building the same image at once never see half.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, data).expect("write the image archive");
        std::fs::rename(&tmp, &path).expect("move the image archive into place");
    }
    path
}

/// The busybox image archive: `/bin/busybox` (Debian's busybox-static) with every applet,
/// the `/etc` files of the guest's embedded image, default command `sh`.
pub fn busybox_archive() -> PathBuf {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian busybox-static, installed by scripts/setup)");
    let etc = crate::repo_root().join("guest-image/image-etc");
    let etc_files = ["passwd", "group", "hosts", "hostname", "resolv.conf"].map(|f| {
        let data = std::fs::read(etc.join(f)).expect("guest-image/image-etc file");
        (f, data)
    });
    // The cache key covers everything the archive is made of: an edited /etc file must
    // give a new archive.
    let mut key = busybox.clone();
    for (f, data) in &etc_files {
        key.extend_from_slice(f.as_bytes());
        key.extend_from_slice(data);
    }
    cached("busybox", &key, || {
        let mut entries = Vec::new();
        for d in [
            "bin", "dev", "etc", "proc", "sys", "root", "run", "var", "home",
        ] {
            entries.push(Entry::Dir(d, 0o755));
        }
        entries.push(Entry::Dir("tmp", 0o1777));
        entries.push(Entry::File("bin/busybox".into(), busybox.clone(), 0o755));
        let list = Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .expect("run busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.is_empty() {
                entries.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
            }
        }
        for (f, data) in &etc_files {
            entries.push(Entry::File(format!("etc/{f}"), data.clone(), 0o644));
        }
        oci_archive(BUSYBOX, &layer_tar(&entries), &[], &["sh"])
    })
}

/// `husk-pause` compiled static with `rustc` (see `src/bin/pause.rs` for why not cargo).
fn build_pause(out: &Path) {
    let src = crate::repo_root().join("tests/src/bin/pause.rs");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let st = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
        ])
        .args(["-C", "strip=symbols", "--crate-name", "husk_pause", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .expect("run rustc to build husk-pause");
    assert!(st.success(), "rustc failed to build {}", src.display());
}

/// The pause image archive: `/pause` only, its entrypoint.
pub fn pause_archive() -> PathBuf {
    let src = std::fs::read(crate::repo_root().join("tests/src/bin/pause.rs"))
        .expect("read tests/src/bin/pause.rs");
    cached("pause", &src, || {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("pause");
        build_pause(&bin);
        let pause = std::fs::read(&bin).expect("read the built pause binary");
        let mut entries = vec![];
        for d in ["dev", "etc", "proc", "sys"] {
            entries.push(Entry::Dir(d, 0o755));
        }
        entries.push(Entry::File("pause".into(), pause, 0o755));
        oci_archive(PAUSE, &layer_tar(&entries), &["/pause"], &[])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_an_oci_layout_with_matching_digests() {
        let layer = layer_tar(&[Entry::File("hello".into(), b"hi\n".to_vec(), 0o644)]);
        let archive = oci_archive("husk.test/x:2", &layer, &["/hello"], &[]);
        let mut files = std::collections::BTreeMap::new();
        let mut ar = tar::Archive::new(archive.as_slice());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(path, data);
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "husk.test/x:2"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "2");
        // Every blob is stored under its own digest.
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                if !hex.is_empty() {
                    assert_eq!(hex, sha256_hex(data), "{path}");
                }
            }
        }
        let digest = m["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{digest}")]).unwrap();
        assert_eq!(
            manifest["layers"][0]["digest"],
            format!("sha256:{}", sha256_hex(&layer))
        );
    }
}
