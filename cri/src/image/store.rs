//! The content-addressed image store under `<data_dir>/images`:
//!
//! ```text
//! blobs/sha256/<hex>          manifests, indexes and configs, exactly as pulled
//! layers/sha256/<diff id>/    rootfs/ (the unpacked layer) + usage.json
//! images/<config hex>.json    one record per image: tags, digests, layers
//! tmp/                        staging; swept at open (what a crash left)
//! ```
//!
//! Everything enters by being written under `tmp/` and renamed into place, so a crash at
//! any point leaves either the old state or the new one, never half a file or layer; a
//! layer is unpacked at most once (keyed by its diff id, whatever its compression).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::unpack::LayerUsage;
use super::{digest_hex, ImageError};

/// One image as huskd knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config digest (`sha256:...`): CRI's image id.
    pub id: String,
    /// `registry/repository:tag`.
    pub repo_tags: Vec<String>,
    /// `registry/repository@sha256:...` of what was pulled (an index or a manifest).
    pub repo_digests: Vec<String>,
    /// The manifest used (linux/amd64 when the reference named an index).
    pub manifest_digest: String,
    /// Diff ids, bottom layer first.
    pub layers: Vec<String>,
    /// Sum of the layers' unpacked bytes.
    pub size: u64,
    /// The config's `User`: numeric → uid, else a user name.
    pub uid: Option<i64>,
    pub username: String,
}

pub struct Store {
    root: PathBuf,
    images: Mutex<BTreeMap<String, ImageRecord>>,
}

impl Store {
    /// Opens (creating) the store at `root`, sweeping what an interrupted pull left.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        for d in ["blobs/sha256", "layers/sha256", "images"] {
            fs::create_dir_all(root.join(d)).map_err(ImageError::io(format!("create {d}")))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(ImageError::io("sweep tmp"))?;
        }
        fs::create_dir_all(&tmp).map_err(ImageError::io("create tmp"))?;
        let mut images = BTreeMap::new();
        for e in fs::read_dir(root.join("images")).map_err(ImageError::io("list images"))? {
            let path = e.map_err(ImageError::io("list images"))?.path();
            let text = fs::read(&path).map_err(ImageError::io(path.display()))?;
            let rec: ImageRecord =
                serde_json::from_slice(&text).map_err(|e| ImageError::Malformed {
                    what: path.display().to_string(),
                    message: e.to_string(),
                })?;
            images.insert(rec.id.clone(), rec);
        }
        Ok(Store {
            root: root.to_path_buf(),
            images: Mutex::new(images),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh staging directory, removed when dropped unless renamed away first.
    pub fn staging(&self) -> Result<tempfile::TempDir, ImageError> {
        tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(ImageError::io("create a staging dir"))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, ImageError> {
        match fs::read(self.blob_path(digest)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io(format!("read blob {digest}"))(e)),
        }
    }

    /// Stores a small blob after checking its digest.
    pub fn put_blob(&self, digest: &str, data: &[u8]) -> Result<(), ImageError> {
        let actual = super::sha256_digest(data);
        if actual != digest {
            return Err(ImageError::Digest {
                what: "blob".into(),
                expected: digest.into(),
                actual,
            });
        }
        let path = self.blob_path(digest)?;
        write_atomic(&self.root.join("tmp"), &path, data)
    }

    fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers/sha256").join(digest_hex(diff_id)?))
    }

    /// The unpacked layer's root directory (to stack in an overlay).
    pub fn layer_rootfs(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.layer_dir(diff_id)?.join("rootfs"))
    }

    pub fn has_layer(&self, diff_id: &str) -> Result<bool, ImageError> {
        Ok(self.layer_dir(diff_id)?.join("usage.json").is_file())
    }

    pub fn layer_usage(&self, diff_id: &str) -> Result<LayerUsage, ImageError> {
        let p = self.layer_dir(diff_id)?.join("usage.json");
        let text = fs::read(&p).map_err(ImageError::io(p.display()))?;
        serde_json::from_slice(&text).map_err(|e| ImageError::Malformed {
            what: p.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Moves a staged layer (`<stage>/rootfs`) into place under its diff id. Another pull
    /// that committed the same layer first wins; this copy is dropped.
    pub fn commit_layer(
        &self,
        diff_id: &str,
        stage: tempfile::TempDir,
        usage: LayerUsage,
    ) -> Result<(), ImageError> {
        let usage_json = serde_json::to_vec(&usage).expect("serialize layer usage");
        fs::write(stage.path().join("usage.json"), usage_json)
            .map_err(ImageError::io("write layer usage"))?;
        let dest = self.layer_dir(diff_id)?;
        match fs::rename(stage.path(), &dest) {
            Ok(()) => {
                // Renamed away: nothing left for the TempDir to remove.
                let _ = stage.keep();
                Ok(())
            }
            Err(_) if self.has_layer(diff_id)? => Ok(()),
            Err(e) => Err(ImageError::io(format!("commit layer {diff_id}"))(e)),
        }
    }

    /// Records an image; its tags move off any other image that had them.
    pub fn add_image(&self, rec: ImageRecord) -> Result<ImageRecord, ImageError> {
        let mut images = self.images.lock().expect("image store lock");
        let mut changed = Vec::new();
        for other in images.values_mut().filter(|o| o.id != rec.id) {
            let before = other.repo_tags.len();
            other.repo_tags.retain(|t| !rec.repo_tags.contains(t));
            if other.repo_tags.len() != before {
                changed.push(other.clone());
            }
        }
        let mut merged = images.get(&rec.id).cloned().unwrap_or_else(|| rec.clone());
        for t in &rec.repo_tags {
            if !merged.repo_tags.contains(t) {
                merged.repo_tags.push(t.clone());
            }
        }
        for d in &rec.repo_digests {
            if !merged.repo_digests.contains(d) {
                merged.repo_digests.push(d.clone());
            }
        }
        changed.push(merged.clone());
        for r in &changed {
            self.write_record(r)?;
        }
        images.insert(merged.id.clone(), merged.clone());
        for r in changed {
            images.insert(r.id.clone(), r);
        }
        Ok(merged)
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&rec.id)?;
        let data = serde_json::to_vec_pretty(rec).expect("serialize an image record");
        write_atomic(&self.root.join("tmp"), &path, &data)
    }

    fn record_path(&self, id: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", digest_hex(id)?)))
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.images
            .lock()
            .expect("image store lock")
            .values()
            .cloned()
            .collect()
    }

    /// Finds an image by id (`sha256:<hex>`, or the bare hex), by a normalized tag
    /// reference, or by a normalized digest reference (`repo@sha256:...`).
    pub fn find(&self, id_or_ref: &str) -> Option<ImageRecord> {
        let images = self.images.lock().expect("image store lock");
        let as_id = if id_or_ref.starts_with("sha256:") {
            id_or_ref.to_string()
        } else {
            format!("sha256:{id_or_ref}")
        };
        if let Some(r) = images.get(&as_id) {
            return Some(r.clone());
        }
        images
            .values()
            .find(|r| {
                r.repo_tags.iter().any(|t| t == id_or_ref)
                    || r.repo_digests.iter().any(|d| d == id_or_ref)
            })
            .cloned()
    }

    /// Removes an image (all its tags) and every layer and blob no other image uses.
    /// Returns false when there was no such image.
    pub fn remove(&self, id: &str) -> Result<bool, ImageError> {
        let mut images = self.images.lock().expect("image store lock");
        let Some(rec) = images.remove(id) else {
            return Ok(false);
        };
        // The record goes first: a crash after it leaves only unreferenced content.
        fs::remove_file(self.record_path(id)?).map_err(ImageError::io("remove an image record"))?;
        let used = |f: &dyn Fn(&ImageRecord) -> bool| images.values().any(f);
        for l in &rec.layers {
            if !used(&|o| o.layers.contains(l)) {
                self.remove_tree(&self.layer_dir(l)?)?;
            }
        }
        for b in [&rec.id, &rec.manifest_digest] {
            if !used(&|o| &o.id == b || &o.manifest_digest == b) {
                remove_if_present(&self.blob_path(b)?)?;
            }
        }
        for d in &rec.repo_digests {
            let Some((_, digest)) = d.rsplit_once('@') else {
                continue;
            };
            if !used(&|o| o.repo_digests.iter().any(|x| x.ends_with(digest))) {
                remove_if_present(&self.blob_path(digest)?)?;
            }
        }
        Ok(true)
    }

    /// Renames a tree into tmp/ first (atomic), then deletes it there.
    fn remove_tree(&self, dir: &Path) -> Result<(), ImageError> {
        let stage = self.staging()?;
        let doomed = stage.path().join("doomed");
        match fs::rename(dir, &doomed) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io(format!("remove {}", dir.display()))(e)),
        }
        // `stage` drops here and deletes the tree.
    }

    /// Bytes and inodes of every unpacked layer.
    pub fn usage(&self) -> Result<LayerUsage, ImageError> {
        let mut total = LayerUsage::default();
        for e in
            fs::read_dir(self.root.join("layers/sha256")).map_err(ImageError::io("list layers"))?
        {
            let name = e.map_err(ImageError::io("list layers"))?.file_name();
            let diff_id = format!("sha256:{}", name.to_string_lossy());
            if let Ok(u) = self.layer_usage(&diff_id) {
                total.bytes += u.bytes;
                total.inodes += u.inodes;
            }
        }
        Ok(total)
    }
}

fn remove_if_present(p: &Path) -> Result<(), ImageError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io(format!("remove {}", p.display()))(e)),
    }
}

/// Writes `data` to `dest` through a file in `tmp` and a rename.
fn write_atomic(tmp: &Path, dest: &Path, data: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let mut f =
        tempfile::NamedTempFile::new_in(tmp).map_err(ImageError::io("create a temp file"))?;
    f.write_all(data)
        .map_err(ImageError::io("write a temp file"))?;
    f.as_file()
        .sync_all()
        .map_err(ImageError::io("sync a temp file"))?;
    f.persist(dest)
        .map_err(|e| ImageError::io(format!("move into {}", dest.display()))(e.error))?;
    Ok(())
}
