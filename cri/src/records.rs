//! huskd's records of its pods and containers on disk, one JSON file per object under the
//! state dir, so a restarted huskd (after a crash or SIGKILL) knows what it runs: the
//! shims, VMs and netns outlive huskd, and only these records lead back to them. Each
//! write is a temp file renamed over the record, so a record is always whole: a crash
//! mid-write leaves the previous version (and a stray `.tmp` that `load` ignores).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One directory of records of one kind (`<state>/pods`, `<state>/containers`).
#[derive(Clone, Debug)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(dir: PathBuf) -> Records {
        Records { dir }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the record of `id` atomically (temp file, fsync, rename).
    pub fn save<T: Serialize>(&self, id: &str, value: &T) -> Result<(), RecordError> {
        let path = self.path(id);
        let err = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!("{id}.json.tmp"));
        let data = serde_json::to_vec_pretty(value).expect("serialize a record");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&data).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Forgets `id`; a record that is not there is not an error.
    pub fn remove(&self, id: &str) -> Result<(), RecordError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }

    /// Every record of the directory. One that cannot be read or parsed is logged and
    /// skipped: huskd must come up, and the objects it leads to stay for an operator.
    pub fn load<T: DeserializeOwned>(&self) -> Vec<T> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match read(&p) {
                Ok(v) => out.push(v),
                Err(e) => warn!(record = %p.display(), error = %e, "unreadable record skipped"),
            }
        }
        out
    }
}

fn read<T: DeserializeOwned>(p: &Path) -> Result<T, String> {
    let data = std::fs::read(p).map_err(|e| e.to_string())?;
    serde_json::from_slice(&data).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct R {
        id: String,
        n: u32,
    }

    #[test]
    fn records_are_saved_replaced_loaded_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::new(dir.path().join("pods"));
        assert!(r.load::<R>().is_empty(), "no directory yet: no records");
        r.save(
            "a",
            &R {
                id: "a".into(),
                n: 1,
            },
        )
        .unwrap();
        r.save(
            "a",
            &R {
                id: "a".into(),
                n: 2,
            },
        )
        .unwrap();
        r.save(
            "b",
            &R {
                id: "b".into(),
                n: 3,
            },
        )
        .unwrap();
        // A torn temp file and a corrupt record are skipped, not fatal.
        std::fs::write(dir.path().join("pods/c.json.tmp"), b"{\"id\":").unwrap();
        std::fs::write(dir.path().join("pods/d.json"), b"not json").unwrap();
        let mut got: Vec<R> = r.load();
        got.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(
            got,
            [
                R {
                    id: "a".into(),
                    n: 2
                },
                R {
                    id: "b".into(),
                    n: 3
                }
            ]
        );
        r.remove("a").unwrap();
        r.remove("a").unwrap();
        assert_eq!(r.load::<R>().len(), 1);
    }
}
