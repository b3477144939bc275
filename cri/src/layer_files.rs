//! Reading a file of an image as its container would see it, from the unpacked layers
//! (bottom first) that the overlay rootfs stacks, without mounting them: huskd resolves
//! `/etc/passwd` and `/etc/group` of the image for the security context this way.
//!
//! Resolution is overlayfs' own: a name is looked up top layer first; a whiteout (a 0:0
//! character device) hides it in the layers below; an opaque directory (xattr
//! `trusted.overlay.opaque`) hides the lower layers' contents of that directory. Symlinks
//! are followed as inside the container: an absolute target starts again at the image's
//! root and `..` stops at it, so no name in an image can reach a host file.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// The most symlinks one resolution follows (Linux's limit).
const MAX_LINKS: usize = 40;
/// Files larger than this are refused: `/etc/passwd` of a real image is a few KiB.
const MAX_SIZE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LayerFileError {
    #[error("{path}: more than {MAX_LINKS} symlinks")]
    Loop { path: String },
    #[error("{path}: larger than {MAX_SIZE} bytes")]
    TooLarge { path: String },
    #[error("read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// One directory of the merged view: its path inside the image and the layers (indices,
/// top first) whose copies of it are merged.
#[derive(Clone)]
struct Dir {
    rel: PathBuf,
    layers: Vec<usize>,
}

enum Entry {
    Missing,
    Dir(Vec<usize>),
    File(PathBuf),
    Link(PathBuf),
}

/// The image's file at `path` (absolute, inside the image), None when it does not exist
/// (or is not a regular file). `lowers` is bottom layer first, as the store lists them.
pub fn read(lowers: &[PathBuf], path: &str) -> Result<Option<Vec<u8>>, LayerFileError> {
    let top_first: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    let Some(file) = resolve(&top_first, path)? else {
        return Ok(None);
    };
    let io = |source| LayerFileError::Io {
        path: path.to_string(),
        source,
    };
    // O_NOFOLLOW: what was resolved is what is read, even if the layer changed since.
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut buf = Vec::new();
    f.by_ref()
        .take(MAX_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > MAX_SIZE {
        return Err(LayerFileError::TooLarge { path: path.into() });
    }
    Ok(Some(buf))
}

fn root(top_first: &[&Path]) -> Vec<Dir> {
    let mut layers = Vec::new();
    for (i, l) in top_first.iter().enumerate() {
        layers.push(i);
        if is_opaque(l) {
            break;
        }
    }
    vec![Dir {
        rel: PathBuf::new(),
        layers,
    }]
}

/// The host path of the regular file `path` resolves to in the merged view.
fn resolve(top_first: &[&Path], path: &str) -> Result<Option<PathBuf>, LayerFileError> {
    let mut todo: Vec<OsString> = components(Path::new(path));
    todo.reverse();
    // The directories walked so far, root first; the last is the current one.
    let mut stack = root(top_first);
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let cur = stack.last().expect("the root stays").clone();
        let rel = cur.rel.join(&name);
        match lookup(top_first, &cur.layers, &rel) {
            Entry::Missing => return Ok(None),
            Entry::Dir(layers) => stack.push(Dir { rel, layers }),
            Entry::File(p) => {
                return Ok(todo.is_empty().then_some(p));
            }
            Entry::Link(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(LayerFileError::Loop { path: path.into() });
                }
                if target.is_absolute() {
                    stack = root(top_first);
                }
                let mut parts = components(&target);
                parts.reverse();
                todo.extend(parts);
            }
        }
    }
    Ok(None)
}

/// Normal and `..` components of `p` (`.` and the root dropped).
fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// `rel` in the layers `layers` (top first) of its parent directory.
fn lookup(top_first: &[&Path], layers: &[usize], rel: &Path) -> Entry {
    let mut found: Option<Entry> = None;
    let mut dirs = Vec::new();
    for &i in layers {
        let p = top_first[i].join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = meta.file_type();
        let whiteout = ft.is_char_device() && meta.rdev() == 0;
        match &found {
            // The topmost copy decides what the name is.
            None if whiteout => return Entry::Missing,
            None if ft.is_symlink() => {
                return std::fs::read_link(&p).map_or(Entry::Missing, Entry::Link);
            }
            None if ft.is_file() => return Entry::File(p),
            None if ft.is_dir() => {
                found = Some(Entry::Dir(Vec::new()));
                dirs.push(i);
            }
            None => return Entry::Missing,
            // Below the topmost directory: lower directories merge until one is not a
            // directory or one above is opaque.
            Some(_) if ft.is_dir() => dirs.push(i),
            Some(_) => break,
        }
        if is_opaque(&p) {
            break;
        }
    }
    match found {
        Some(_) => Entry::Dir(dirs),
        None => Entry::Missing,
    }
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut v = [0u8; 4];
    // SAFETY: both pointers are valid NUL-terminated strings and `v` a writable buffer of
    // the given length; lgetxattr does not follow a final symlink.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    n == 1 && v[0] == b'y'
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn layers(n: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let ls = (0..n)
            .map(|i| {
                let p = d.path().join(format!("l{i}"));
                std::fs::create_dir_all(p.join("etc")).unwrap();
                p
            })
            .collect();
        (d, ls)
    }

    fn text(l: &[PathBuf], p: &str) -> Option<String> {
        read(l, p).unwrap().map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn the_top_layer_wins_and_lower_files_show_through() {
        let (_d, l) = layers(2);
        std::fs::write(l[0].join("etc/passwd"), "bottom").unwrap();
        std::fs::write(l[0].join("etc/group"), "g").unwrap();
        assert_eq!(text(&l, "/etc/passwd").as_deref(), Some("bottom"));
        std::fs::write(l[1].join("etc/passwd"), "top").unwrap();
        assert_eq!(text(&l, "/etc/passwd").as_deref(), Some("top"));
        assert_eq!(text(&l, "/etc/group").as_deref(), Some("g"));
        assert_eq!(text(&l, "/etc/shadow"), None);
    }

    #[test]
    fn symlinks_stay_inside_the_image() {
        let (d, l) = layers(1);
        // Host-looking targets: absolute and climbing; both resolve inside the layer.
        std::fs::write(d.path().join("secret"), "host file").unwrap();
        // From <d>/l0/etc, "../../secret" is <d>/secret on the host: found only by a
        // lookup that escapes the layer.
        symlink("../../secret", l[0].join("etc/passwd")).unwrap();
        assert_eq!(text(&l, "/etc/passwd"), None);
        symlink("../..", l[0].join("etc2")).unwrap();
        assert_eq!(text(&l, "/etc2/secret"), None);
        std::fs::create_dir_all(l[0].join("data")).unwrap();
        std::fs::write(l[0].join("data/passwd"), "image").unwrap();
        std::fs::remove_file(l[0].join("etc/passwd")).unwrap();
        symlink("/data/passwd", l[0].join("etc/passwd")).unwrap();
        assert_eq!(text(&l, "/etc/passwd").as_deref(), Some("image"));
        symlink("/../../etc/loop", l[0].join("etc/loop")).unwrap();
        assert!(matches!(
            read(&l, "/etc/loop"),
            Err(LayerFileError::Loop { .. })
        ));
        assert_eq!(
            text(&l, "/../../../etc/../data/passwd").as_deref(),
            Some("image")
        );
    }

    #[test]
    fn a_non_directory_on_top_hides_the_lower_directory() {
        let (_d, l) = layers(2);
        std::fs::write(l[0].join("etc/passwd"), "bottom").unwrap();
        std::fs::remove_dir(l[1].join("etc")).unwrap();
        std::fs::write(l[1].join("etc"), "a file").unwrap();
        assert_eq!(text(&l, "/etc/passwd"), None);
    }
}
