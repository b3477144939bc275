//! The busybox image the pod VM's initramfs carries (at `/usr/share/husk/images/busybox`,
//! the image `husk run` uses), imported into the store at huskd's start as
//! [`BUILTIN_IMAGE`], so a pod runs on a node with no registry at all. The import is
//! reproducible (entries in archive order, mtime 0), so a restart with the same initramfs
//! finds the image already there and a new initramfs moves the tag to a new image.

use std::io::Read;
use std::path::Path;

use tracing::info;

use super::pull::lookup_key;
use super::unpack::unpack_tar;
use super::{sha256_digest, ImageError, ImageRecord, Store};

/// The name the built-in image has in the store (ImageStatus, ListImages, CreateContainer).
pub const BUILTIN_IMAGE: &str = "husk.local/busybox:latest";
/// The registry host of built-in images: never contacted.
pub const BUILTIN_REGISTRY: &str = "husk.local";
/// Where the image's root is in the initramfs.
const ROOT_IN_INITRAMFS: &str = "usr/share/husk/images/busybox";
/// The initramfs is ours and ~10 MiB; a bound still keeps a wrong path from being slurped.
const MAX_INITRAMFS: u64 = 512 << 20;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Imports the built-in image from `initramfs` unless the store already has it as is.
pub fn import(store: &Store, initramfs: &Path) -> Result<ImageRecord, ImageError> {
    let started = std::time::Instant::now();
    let what = initramfs.display().to_string();
    let meta = std::fs::metadata(initramfs).map_err(ImageError::io(format!("stat {what}")))?;
    let stamp = Stamp::of(initramfs, &meta);
    let stamp_path = store.root().join("builtin.json");
    // The same file as last time and its image still there: nothing to read (under TCG,
    // hashing the image again costs seconds of huskd's start).
    let previous: Option<Stamp> = std::fs::read(&stamp_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(prev) = previous.filter(|p| p.same_file(&stamp)) {
        if let Some(rec) = store.find(&lookup_key(BUILTIN_IMAGE)) {
            if rec.id == prev.id
                && rec
                    .layers
                    .iter()
                    .all(|l| store.has_layer(l).unwrap_or(false))
            {
                return Ok(rec);
            }
        }
    }
    let mut data = Vec::new();
    std::fs::File::open(initramfs)
        .and_then(|f| f.take(MAX_INITRAMFS + 1).read_to_end(&mut data))
        .map_err(ImageError::io(format!("read {what}")))?;
    if data.len() as u64 > MAX_INITRAMFS {
        return Err(malformed(&what, "larger than 512 MiB"));
    }
    let layer = layer_tar(&data, &what)?;
    let diff_id = sha256_digest(&layer);
    if let Some(rec) = store.find(&lookup_key(BUILTIN_IMAGE)) {
        if rec.layers == [diff_id.clone()] && store.has_layer(&diff_id)? {
            return Ok(rec);
        }
    }
    let usage = if store.has_layer(&diff_id)? {
        store.layer_usage(&diff_id)?
    } else {
        let stage = store.staging()?;
        let rootfs = stage.path().join("rootfs");
        std::fs::create_dir(&rootfs).map_err(ImageError::io("create a layer rootfs"))?;
        let usage = unpack_tar(&layer[..], &rootfs)?;
        store.commit_layer(&diff_id, stage, usage)?;
        usage
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "husk guest image (guest-image/busybox-image)"}],
    }))
    .expect("serialize an image config");
    let config_digest = sha256_digest(&config);
    store.put_blob(&config_digest, &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": diff_id,
            "size": layer.len(),
        }],
    }))
    .expect("serialize a manifest");
    let manifest_digest = sha256_digest(&manifest);
    store.put_blob(&manifest_digest, &manifest)?;
    let rec = store.add_image(ImageRecord {
        id: config_digest,
        repo_tags: vec![BUILTIN_IMAGE.into()],
        repo_digests: vec![format!("{BUILTIN_REGISTRY}/busybox@{manifest_digest}")],
        manifest_digest,
        layers: vec![diff_id],
        size: usage.bytes,
        uid: None,
        username: String::new(),
    })?;
    let stamp = Stamp {
        id: rec.id.clone(),
        ..stamp
    };
    let _ = std::fs::write(
        &stamp_path,
        serde_json::to_vec(&stamp).expect("serialize a stamp"),
    );
    info!(image = BUILTIN_IMAGE, id = %rec.id, from = %what,
          ms = started.elapsed().as_millis() as u64, "built-in image imported");
    Ok(rec)
}

/// Which initramfs the built-in image came from, and as which image.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stamp {
    path: std::path::PathBuf,
    len: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
    id: String,
}

impl Stamp {
    fn of(path: &Path, m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            path: path.to_path_buf(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ino: m.ino(),
            dev: m.dev(),
            id: String::new(),
        }
    }

    fn same_file(&self, o: &Stamp) -> bool {
        (&self.path, self.len, self.mtime_ns, self.ino, self.dev)
            == (&o.path, o.len, o.mtime_ns, o.ino, o.dev)
    }
}

/// One entry of a newc cpio archive.
struct CpioEntry<'a> {
    name: &'a str,
    mode: u32,
    uid: u64,
    gid: u64,
    data: &'a [u8],
}

/// The entries of an uncompressed newc ("070701") cpio archive, up to its trailer.
fn cpio_entries<'a>(mut rest: &'a [u8], what: &str) -> Result<Vec<CpioEntry<'a>>, ImageError> {
    const HEADER: usize = 110;
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        let header = rest
            .get(..HEADER)
            .ok_or_else(|| malformed(what, "cpio archive ends without a trailer"))?;
        if &header[..6] != b"070701" {
            return Err(malformed(
                what,
                format!("not an uncompressed newc cpio entry at byte {offset}"),
            ));
        }
        let field = |i: usize| -> Result<u64, ImageError> {
            let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok());
            hex.ok_or_else(|| malformed(what, format!("bad cpio header at byte {offset}")))
        };
        let (mode, uid, gid) = (field(1)? as u32, field(2)?, field(3)?);
        let (size, name_size) = (field(6)? as usize, field(11)? as usize);
        let name_end = HEADER
            .checked_add(name_size)
            .filter(|&e| e <= rest.len() && name_size > 0)
            .ok_or_else(|| malformed(what, "cpio name runs past the end"))?;
        let name = std::str::from_utf8(&rest[HEADER..name_end - 1])
            .map_err(|_| malformed(what, "cpio name is not UTF-8"))?;
        let data_start = align4(name_end);
        let data_end = data_start
            .checked_add(size)
            .filter(|&e| e <= rest.len())
            .ok_or_else(|| malformed(what, format!("cpio entry {name:?} runs past the end")))?;
        if name == "TRAILER!!!" {
            return Ok(out);
        }
        out.push(CpioEntry {
            name,
            mode,
            uid,
            gid,
            data: &rest[data_start..data_end],
        });
        let next = align4(data_end).min(rest.len());
        offset += next;
        rest = &rest[next..];
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// The image's root from the archive as an uncompressed layer tar, paths relative to it.
fn layer_tar(initramfs: &[u8], what: &str) -> Result<Vec<u8>, ImageError> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut files = 0;
    for e in cpio_entries(initramfs, what)? {
        let name = e.name.trim_start_matches("./").trim_start_matches('/');
        let Some(rel) = name
            .strip_prefix(ROOT_IN_INITRAMFS)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let mut h = tar::Header::new_ustar();
        h.set_mode(e.mode & 0o7777);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(0);
        let add = |tar: &mut tar::Builder<Vec<u8>>, h: &mut tar::Header, data: &[u8]| {
            tar.append_data(h, rel, data)
                .map_err(|e| malformed(what, format!("{rel}: {e}")))
        };
        match e.mode & S_IFMT {
            S_IFDIR => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                add(&mut tar, &mut h, &[])?;
            }
            S_IFREG => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.data.len() as u64);
                add(&mut tar, &mut h, e.data)?;
                files += 1;
            }
            S_IFLNK => {
                // gen_init_cpio stores the target with its terminating NUL.
                let target = e.data.strip_suffix(b"\0").unwrap_or(e.data);
                let target = std::str::from_utf8(target)
                    .map_err(|_| malformed(what, format!("{rel}: link target not UTF-8")))?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, rel, target)
                    .map_err(|e| malformed(what, format!("{rel}: {e}")))?;
            }
            _ => {} // device nodes: the container runtime provides /dev
        }
    }
    if files == 0 {
        return Err(malformed(
            what,
            format!("no files under /{ROOT_IN_INITRAMFS}: not a husk pod initramfs"),
        ));
    }
    tar.into_inner()
        .map_err(|e| malformed(what, format!("finish the layer: {e}")))
}

fn malformed(what: &str, message: impl std::fmt::Display) -> ImageError {
    ImageError::Malformed {
        what: what.into(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc entry as gen_init_cpio writes it.
    fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
        let fields = [1, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(format!("{:08X}{:08X}", name.len() + 1, 0).as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    fn initramfs() -> Vec<u8> {
        let mut a = Vec::new();
        entry(&mut a, "init", S_IFREG | 0o755, b"agent");
        entry(
            &mut a,
            "usr/share/husk/images/busybox",
            S_IFDIR | 0o755,
            b"",
        );
        entry(
            &mut a,
            "usr/share/husk/images/busybox/bin",
            S_IFDIR | 0o755,
            b"",
        );
        let bb = "usr/share/husk/images/busybox/bin/busybox";
        entry(&mut a, bb, S_IFREG | 0o755, b"#!busybox");
        let sh = "usr/share/husk/images/busybox/bin/sh";
        entry(&mut a, sh, S_IFLNK | 0o777, b"busybox\0");
        entry(&mut a, "TRAILER!!!", 0, b"");
        a
    }

    #[test]
    fn imports_the_image_root_once_and_finds_it_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("images")).unwrap();
        let path = dir.path().join("init.cpio");
        std::fs::write(&path, initramfs()).unwrap();
        let rec = import(&store, &path).unwrap();
        assert_eq!(rec.repo_tags, [BUILTIN_IMAGE]);
        let root = store.layer_rootfs(&rec.layers[0]).unwrap();
        assert_eq!(
            std::fs::read(root.join("bin/busybox")).unwrap(),
            b"#!busybox"
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(!root.join("init").exists(), "only the image's root");
        let config: serde_json::Value =
            serde_json::from_slice(&store.blob(&rec.id).unwrap().unwrap()).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], rec.layers[0]);
        assert_eq!(
            store.find(&lookup_key("husk.local/busybox")),
            Some(rec.clone())
        );
        // Again, as at the next start: the same image, nothing re-imported.
        assert_eq!(import(&store, &path).unwrap(), rec);
        assert_eq!(store.list().len(), 1);
        // A rebuilt initramfs: the tag moves to the new image.
        let mut rebuilt = initramfs();
        let at = rebuilt.windows(9).position(|w| w == b"#!busybox").unwrap();
        rebuilt[at + 1] = b'?';
        std::fs::write(&path, rebuilt).unwrap();
        let new = import(&store, &path).unwrap();
        assert_ne!(new.id, rec.id);
        assert_eq!(store.find(&lookup_key(BUILTIN_IMAGE)).unwrap().id, new.id);
        let root = store.layer_rootfs(&new.layers[0]).unwrap();
        assert_eq!(
            std::fs::read(root.join("bin/busybox")).unwrap(),
            b"#?busybox"
        );
    }

    #[test]
    fn a_file_that_is_not_a_pod_initramfs_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("images")).unwrap();
        let cases: [(&str, Vec<u8>); 3] = [
            ("gzip", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0]),
            ("truncated", initramfs()[..200].to_vec()),
            ("no image", {
                let mut a = Vec::new();
                entry(&mut a, "init", S_IFREG | 0o755, b"x");
                entry(&mut a, "TRAILER!!!", 0, b"");
                a
            }),
        ];
        for (name, bytes) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let e = import(&store, &path).unwrap_err().to_string();
            assert!(e.contains(name), "{name}: {e}");
        }
        assert!(store.list().is_empty());
    }
}
