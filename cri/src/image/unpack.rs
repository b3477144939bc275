//! Unpacking one layer tar into a directory an overlay mount can stack: OCI whiteouts become
//! overlayfs whiteouts (`.wh.NAME` → a 0:0 character device, `.wh..wh..opq` → the
//! `trusted.overlay.opaque` xattr), ownership, modes, times, xattrs, hard links and device
//! nodes are kept. No entry can escape the root: every parent directory is opened with
//! `openat2(RESOLVE_IN_ROOT)` (a symlink in the layer resolves as if the root were `/`, as
//! containerd's in-root resolution does), the last component is only ever created or
//! replaced with `*at` calls that do not follow it, and `..` components reject the layer.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmodat, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use sha2::{Digest, Sha256};

use super::ImageError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What an unpacked layer holds, for ImageFsInfo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerUsage {
    pub bytes: u64,
    pub inodes: u64,
}

/// How a layer blob is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(mt: &str) -> Result<Compression, ImageError> {
        match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(ImageError::UnsupportedMediaType(other.into())),
        }
    }
}

/// A reader that hashes what passes through it: the layer's diff id is the sha256 of the
/// uncompressed tar, checked against the image config before the layer is committed.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the (compressed) layer in `blob` into `root` (an existing empty directory) and
/// returns the uncompressed stream's digest (`sha256:<hex>`) and the layer's usage.
pub fn unpack_blob(
    blob: File,
    compression: Compression,
    root: &Path,
) -> Result<(String, LayerUsage), ImageError> {
    let buffered = io::BufReader::new(blob);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(buffered)
                .map_err(|e| ImageError::unpack(root, format!("zstd: {e}")))?,
        ),
    };
    let mut hashing = Hashing {
        inner: reader,
        hash: Sha256::new(),
    };
    let usage = unpack_tar(&mut hashing, root)?;
    // The digest covers the whole stream, including the padding after the end marker.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| ImageError::unpack(root, e))?;
    Ok((
        format!("sha256:{}", super::hex(&hashing.hash.finalize())),
        usage,
    ))
}

/// Unpacks a plain tar stream into `root`.
pub fn unpack_tar(reader: impl Read, root: &Path) -> Result<LayerUsage, ImageError> {
    let root_fd = open_dir(root).map_err(|e| ImageError::unpack(root, e))?;
    let mut archive = tar::Archive::new(reader);
    let mut usage = LayerUsage::default();
    let entries = archive.entries().map_err(|e| ImageError::unpack(root, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ImageError::unpack(root, e))?;
        let raw = entry.path_bytes().into_owned();
        let comps = components(&raw)?;
        apply_entry(&root_fd, &comps, &mut entry, &mut usage).map_err(|e| match e {
            EntryError::Unsafe(m) => ImageError::UnsafePath {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason: m,
            },
            EntryError::Io(err) => {
                ImageError::unpack(root, format!("{}: {err}", String::from_utf8_lossy(&raw)))
            }
        })?;
    }
    Ok(usage)
}

enum EntryError {
    Unsafe(String),
    Io(io::Error),
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        EntryError::Io(e)
    }
}

impl From<Errno> for EntryError {
    fn from(e: Errno) -> Self {
        EntryError::Io(e.into())
    }
}

/// The path's components below the root: leading `/` and `.` dropped (an absolute name is
/// taken relative to the layer root, as tar and containerd do), `..` refused.
fn components(raw: &[u8]) -> Result<Vec<OsString>, ImageError> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(ImageError::UnsafePath {
                    path: String::from_utf8_lossy(raw).into_owned(),
                    reason: "a `..` component".into(),
                })
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens directory `comps` under the root, resolving symlinks inside the root only.
fn open_in_root(root: &OwnedFd, comps: &[OsString]) -> Result<OwnedFd, Errno> {
    if comps.is_empty() {
        return root
            .try_clone()
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    }
    let path: OsString = comps.join(OsStr::new("/"));
    let how = OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(root.as_raw_fd(), path.as_os_str(), how)?;
    // SAFETY: `openat2` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The parent directory of an entry, creating missing directories (tars may omit them).
fn parent_dir(root: &OwnedFd, parent: &[OsString]) -> Result<OwnedFd, EntryError> {
    match open_in_root(root, parent) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOENT) => {
            let (last, up) = parent.split_last().expect("the root always exists");
            let up_fd = parent_dir(root, up)?;
            match mkdirat(
                Some(up_fd.as_raw_fd()),
                last.as_os_str(),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(open_in_root(root, parent)?)
        }
        Err(Errno::ENOTDIR) => Err(EntryError::Unsafe(
            "a parent is not a directory inside the layer".into(),
        )),
        Err(Errno::EXDEV) => Err(EntryError::Unsafe(
            "a parent resolves outside the layer".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Removes whatever is at `name` (not following it); a non-empty directory stays, and the
/// create that follows reports it.
fn remove_existing(dir: &OwnedFd, name: &OsStr) -> Result<(), EntryError> {
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => {
            match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn is_dir_at(dir: &OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .unwrap_or(false)
}

fn apply_entry<R: Read>(
    root: &OwnedFd,
    comps: &[OsString],
    entry: &mut tar::Entry<'_, R>,
    usage: &mut LayerUsage,
) -> Result<(), EntryError> {
    let Some((name, parent)) = comps.split_last() else {
        return Ok(()); // the root itself: its attributes belong to the image's root
    };
    let dir = parent_dir(root, parent)?;
    let dirfd = Some(dir.as_raw_fd());
    let name = name.as_os_str();
    let name_bytes = name.as_bytes();

    if name_bytes == OPAQUE.as_bytes() {
        set_xattr(&dir, None, "trusted.overlay.opaque", b"y")?;
        return Ok(());
    }
    if let Some(target) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        let target = OsStr::from_bytes(target);
        remove_existing(&dir, target)?;
        mknodat(dirfd, target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))?;
        usage.inodes += 1;
        return Ok(());
    }

    let h = entry.header();
    let mode = Mode::from_bits_truncate(h.mode()? & 0o7777);
    let (uid, gid) = (h.uid()? as u32, h.gid()? as u32);
    let mtime = h.mtime().unwrap_or(0) as i64;
    let kind = h.entry_type();
    match kind {
        tar::EntryType::Directory => {
            if !is_dir_at(&dir, name) {
                remove_existing(&dir, name)?;
                mkdirat(dirfd, name, mode)?;
            }
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            remove_existing(&dir, name)?;
            let fd = nix::fcntl::openat(
                dirfd,
                name,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            // SAFETY: `openat` just returned this fd and nothing else owns it.
            let mut f = unsafe { File::from_raw_fd(fd) };
            usage.bytes += io::copy(entry, &mut f)?;
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| EntryError::Unsafe("a symlink without a target".into()))?
                .into_owned();
            remove_existing(&dir, name)?;
            symlinkat(OsStr::from_bytes(&target), dirfd, name)?;
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| EntryError::Unsafe("a hard link without a target".into()))?
                .into_owned();
            let tcomps = components(&target).map_err(|e| EntryError::Unsafe(e.to_string()))?;
            let Some((tname, tparent)) = tcomps.split_last() else {
                return Err(EntryError::Unsafe("a hard link to the root".into()));
            };
            let tdir = open_in_root(root, tparent).map_err(|e| match e {
                Errno::EXDEV => EntryError::Unsafe("a link target outside the layer".into()),
                e => e.into(),
            })?;
            remove_existing(&dir, name)?;
            linkat(
                Some(tdir.as_raw_fd()),
                tname.as_os_str(),
                dirfd,
                name,
                AtFlags::empty(),
            )?;
            usage.inodes += 1;
            return Ok(()); // a hard link shares its target's attributes
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let sflag = match kind {
                tar::EntryType::Char => SFlag::S_IFCHR,
                tar::EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            let dev = makedev(
                h.device_major()?.unwrap_or(0) as u64,
                h.device_minor()?.unwrap_or(0) as u64,
            );
            remove_existing(&dir, name)?;
            mknodat(dirfd, name, sflag, mode, dev)?;
        }
        // Global PAX headers and GNU extensions carry no file of their own.
        _ => return Ok(()),
    }
    usage.inodes += 1;

    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Some(attr) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                let attr = String::from_utf8_lossy(attr).into_owned();
                set_xattr(&dir, Some(name), &attr, ext.value_bytes())?;
            }
        }
    }
    fchownat(
        dirfd,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    if kind != tar::EntryType::Symlink {
        // After chown, which clears set-id bits.
        fchmodat(dirfd, name, mode, FchmodatFlags::NoFollowSymlink)?;
    }
    let t = TimeSpec::new(mtime, 0);
    utimensat(dirfd, name, &t, &t, UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

/// Sets an xattr on `name` in `dir` (or on `dir` itself), never following a symlink: a
/// name goes through `/proc/self/fd` of the already-resolved parent, and `lsetxattr` does
/// not follow its last component.
fn set_xattr(
    dir: &OwnedFd,
    name: Option<&OsStr>,
    attr: &str,
    value: &[u8],
) -> Result<(), EntryError> {
    let attr =
        std::ffi::CString::new(attr).map_err(|_| EntryError::Unsafe("NUL in an xattr".into()))?;
    let r = match name {
        // SAFETY: a valid fd, a NUL-terminated name, and value's pointer and length
        // describe one slice.
        None => unsafe {
            libc::fsetxattr(
                dir.as_raw_fd(),
                attr.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        },
        Some(n) => {
            let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            path.extend_from_slice(n.as_bytes());
            let path = std::ffi::CString::new(path)
                .map_err(|_| EntryError::Unsafe("NUL in a name".into()))?;
            // SAFETY: as above; the path is NUL-terminated and lives across the call.
            unsafe {
                libc::lsetxattr(
                    path.as_ptr(),
                    attr.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        }
    };
    if r != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
