//! PullImage: resolves a reference with `oci-client` (an index to its linux/amd64 manifest;
//! Docker v2 schema 2 and OCI manifests), checks every blob's digest before using it, and
//! unpacks each layer not already in the store. What is already there is not downloaded
//! again: configs and manifests are looked up by digest, layers by diff id.

use std::collections::HashMap;
use std::io::Read;
use std::str::FromStr;
use std::sync::Arc;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::store::{ImageRecord, Store};
use super::unpack::{unpack_blob, Compression};
use super::{sha256_digest, ImageError};
use crate::config::{Mirror, Registry, RegistryPolicy};

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Registry credentials from a PullImage request.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// A bearer token (`registry_token` / `identity_token`).
    pub token: String,
}

impl Credentials {
    fn auth(&self) -> RegistryAuth {
        if !self.username.is_empty() {
            RegistryAuth::Basic(self.username.clone(), self.password.clone())
        } else if !self.token.is_empty() {
            RegistryAuth::Bearer(self.token.clone())
        } else {
            RegistryAuth::Anonymous
        }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

/// An index or a manifest: which one is told by which fields are present.
#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RunConfig {
    #[serde(rename = "User", default)]
    user: String,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// Parses an image name as kubelet and crictl send it: `busybox` is
/// `docker.io/library/busybox:latest`.
pub fn parse_reference(image: &str) -> Result<Reference, ImageError> {
    Reference::from_str(image).map_err(|e| ImageError::InvalidReference {
        reference: image.into(),
        message: e.to_string(),
    })
}

/// The names by which a pulled reference is recorded: a tag reference as
/// `registry/repo:tag`, a digest reference as `registry/repo@digest`.
pub fn tag_name(r: &Reference) -> Option<String> {
    match (r.tag(), r.digest()) {
        (_, Some(_)) => None,
        (Some(t), None) => Some(format!("{}/{}:{t}", r.registry(), r.repository())),
        (None, None) => Some(format!("{}/{}:latest", r.registry(), r.repository())),
    }
}

fn digest_name(r: &Reference, digest: &str) -> String {
    format!("{}/{}@{digest}", r.registry(), r.repository())
}

/// The keys under which the store can find `image` (an id, a tag or a digest reference).
pub fn lookup_key(image: &str) -> String {
    if image.starts_with("sha256:")
        || (image.len() == 64 && image.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return image.into();
    }
    match parse_reference(image) {
        Ok(r) => match r.digest() {
            Some(d) => digest_name(&r, d),
            None => tag_name(&r).unwrap_or_default(),
        },
        Err(_) => image.into(),
    }
}

pub struct Puller {
    client: Client,
    registries: Vec<Registry>,
    default_policy: RegistryPolicy,
    mirrors: Vec<Mirror>,
    /// One lock per layer being fetched: a second pull needing the same layer waits for
    /// the first and then finds it in the store, so concurrent pulls download it once.
    fetching: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn registry_error(reference: &Reference, e: OciDistributionError) -> ImageError {
    if let OciDistributionError::DigestError(d) = &e {
        return ImageError::Verification {
            what: format!("a blob of {}", reference.whole()),
            message: d.to_string(),
        };
    }
    let not_found = match &e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code: 404, .. } => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
            )
        }),
        _ => false,
    };
    if not_found {
        return ImageError::NotFound(format!("{} (registry: {e})", reference.whole()));
    }
    ImageError::Registry {
        reference: reference.whole(),
        message: e.to_string(),
    }
}

impl Puller {
    pub fn new(
        registries: &[Registry],
        default_policy: RegistryPolicy,
        mirrors: &[Mirror],
    ) -> Puller {
        // Plain HTTP only for the registries the config marks so.
        let insecure: Vec<String> = registries
            .iter()
            .filter(|r| r.policy == RegistryPolicy::AllowInsecure)
            .map(|r| r.host.clone())
            .collect();
        let protocol = if default_policy == RegistryPolicy::AllowInsecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::HttpsExcept(insecure)
        };
        let client = Client::new(ClientConfig {
            protocol,
            ..Default::default()
        });
        Puller {
            client,
            registries: registries.to_vec(),
            default_policy,
            mirrors: mirrors.to_vec(),
            fetching: Default::default(),
        }
    }

    fn policy(&self, host: &str) -> RegistryPolicy {
        self.registries
            .iter()
            .find(|r| r.host == host)
            .map(|r| r.policy)
            .unwrap_or(self.default_policy)
    }

    /// Fetches a manifest or index and checks its digest (against the reference's digest
    /// when it has one, else against what the registry says it is).
    async fn manifest(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (bytes, registry_digest) = self
            .client
            .pull_manifest_raw(r, auth, MANIFEST_TYPES)
            .await
            .map_err(|e| registry_error(r, e))?;
        let actual = sha256_digest(&bytes);
        let expected = r.digest().map(str::to_string).unwrap_or(registry_digest);
        if actual != expected {
            return Err(ImageError::Digest {
                what: format!("manifest of {}", r.whole()),
                expected,
                actual,
            });
        }
        Ok((bytes.to_vec(), actual))
    }

    /// Where the pull comes from: the first of the registry's mirrors (in order) that serves
    /// the top manifest, else the registry itself. That reference and its credentials, the
    /// manifest and its digest.
    async fn source(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<(Reference, RegistryAuth, Vec<u8>, String), ImageError> {
        let endpoints = self
            .mirrors
            .iter()
            .filter(|m| m.registry == reference.registry())
            .flat_map(|m| &m.endpoints);
        for host in endpoints {
            if self.policy(host) == RegistryPolicy::Reject {
                continue;
            }
            let mirrored = match reference.digest() {
                Some(d) => {
                    Reference::with_digest(host.clone(), reference.repository().into(), d.into())
                }
                None => Reference::with_tag(
                    host.clone(),
                    reference.repository().into(),
                    reference.tag().unwrap_or("latest").into(),
                ),
            };
            match self.manifest(&mirrored, &RegistryAuth::Anonymous).await {
                Ok((m, d)) => return Ok((mirrored, RegistryAuth::Anonymous, m, d)),
                Err(e) => warn!(mirror = %host, image = %reference.whole(), error = %e,
                                "a mirror did not serve the image; trying the next"),
            }
        }
        let (m, d) = self.manifest(reference, auth).await?;
        Ok((reference.clone(), auth.clone(), m, d))
    }

    /// Pulls `image` into `store` and records it.
    pub async fn pull(
        &self,
        store: &Arc<Store>,
        image: &str,
        creds: &Credentials,
    ) -> Result<ImageRecord, ImageError> {
        let reference = parse_reference(image)?;
        let registry = reference.registry().to_string();
        if registry == super::builtin::BUILTIN_REGISTRY {
            // Built-in images come from the guest image at start; kubelet's "Always" pull
            // policy must still find them.
            return store.find(&lookup_key(image)).ok_or_else(|| {
                ImageError::NotFound(format!(
                    "{image} ({registry} images are built in, never pulled; huskd has {})",
                    super::builtin::BUILTIN_IMAGE
                ))
            });
        }
        if self.policy(&registry) == RegistryPolicy::Reject {
            return Err(ImageError::RegistryRejected(registry));
        }
        let (source, auth, top, top_digest) = self.source(&reference, &creds.auth()).await?;
        let mut doc: ManifestDoc = parse_json(&top, "manifest")?;
        let mut blobs = vec![(top_digest.clone(), top)];
        if let Some(list) = &doc.manifests {
            let entry = list
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .ok_or_else(|| ImageError::NoPlatform {
                    reference: reference.whole(),
                })?;
            let by_digest = source.clone_with_digest(entry.digest.clone());
            let (m, d) = self.manifest(&by_digest, &auth).await?;
            doc = parse_json(&m, "manifest")?;
            blobs.push((d, m));
        }
        if doc.schema_version != 2 || doc.manifests.is_some() {
            return Err(ImageError::Malformed {
                what: format!("manifest of {}", reference.whole()),
                message: "not a schema 2 image manifest".into(),
            });
        }
        let manifest_digest = blobs.last().expect("a manifest").0.clone();
        let config_desc = doc.config.as_ref().ok_or_else(|| ImageError::Malformed {
            what: "manifest".into(),
            message: "no config".into(),
        })?;
        let config_bytes = match store.blob(&config_desc.digest)? {
            Some(b) => b,
            None => {
                let mut b = Vec::new();
                self.client
                    .pull_blob(&source, config_desc.digest.as_str(), &mut b)
                    .await
                    .map_err(|e| registry_error(&source, e))?;
                b
            }
        };
        // put_blob checks the digest again: the config is used (diff ids, user) only after.
        store.put_blob(&config_desc.digest, &config_bytes)?;
        let config: ImageConfig = parse_json(&config_bytes, "image config")?;
        if config.rootfs.diff_ids.len() != doc.layers.len() {
            return Err(ImageError::Malformed {
                what: "image config".into(),
                message: format!(
                    "{} diff ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    doc.layers.len()
                ),
            });
        }
        for (layer, diff_id) in doc.layers.iter().zip(&config.rootfs.diff_ids) {
            if store.has_layer(diff_id)? {
                continue;
            }
            let lock = self
                .fetching
                .lock()
                .expect("fetch table lock")
                .entry(diff_id.clone())
                .or_default()
                .clone();
            let guard = lock.lock().await;
            let r = if store.has_layer(diff_id)? {
                Ok(())
            } else {
                self.fetch_layer(store, &source, layer, diff_id).await
            };
            drop(guard);
            let mut table = self.fetching.lock().expect("fetch table lock");
            // The last one out removes the entry (the table holds one reference).
            if Arc::strong_count(&lock) == 2 {
                table.remove(diff_id);
            }
            drop(table);
            r?;
        }
        for (d, b) in &blobs {
            store.put_blob(d, b)?;
        }
        let mut size = 0;
        for l in &config.rootfs.diff_ids {
            size += store.layer_usage(l)?.bytes;
        }
        let user = config.config.map(|c| c.user).unwrap_or_default();
        let user = user.split(':').next().unwrap_or_default();
        let (uid, username) = match user.parse::<i64>() {
            Ok(n) => (Some(n), String::new()),
            Err(_) => (None, user.to_string()),
        };
        let rec = ImageRecord {
            id: config_desc.digest.clone(),
            repo_tags: tag_name(&reference).into_iter().collect(),
            repo_digests: vec![digest_name(&reference, &top_digest)],
            manifest_digest,
            layers: config.rootfs.diff_ids.clone(),
            size,
            uid,
            username,
        };
        info!(image, id = %rec.id, from = %source.registry(), "pulled");
        store.add_image(rec)
    }

    /// Downloads one layer into a staging dir, checks its digest, unpacks it, checks the
    /// diff id, and commits it. Any failure (or a cancelled pull) drops the staging dir.
    async fn fetch_layer(
        &self,
        store: &Arc<Store>,
        reference: &Reference,
        layer: &Descriptor,
        diff_id: &str,
    ) -> Result<(), ImageError> {
        let compression = Compression::from_media_type(&layer.media_type)?;
        let stage = store.staging()?;
        let blob_path = stage.path().join("blob");
        let file = tokio::fs::File::create(&blob_path)
            .await
            .map_err(ImageError::io("create a layer download"))?;
        self.client
            .pull_blob(reference, layer.digest.as_str(), file)
            .await
            .map_err(|e| registry_error(reference, e))?;
        let (digest, diff_id) = (layer.digest.clone(), diff_id.to_string());
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            if let Ok(m) = std::fs::metadata(&blob_path) {
                crate::metrics::METRICS
                    .pull_bytes
                    .fetch_add(m.len(), std::sync::atomic::Ordering::Relaxed);
            }
            let actual = file_digest(&blob_path)?;
            if actual != digest {
                return Err(ImageError::Digest {
                    what: "layer".into(),
                    expected: digest,
                    actual,
                });
            }
            let rootfs = stage.path().join("rootfs");
            std::fs::create_dir(&rootfs).map_err(ImageError::io("create a layer rootfs"))?;
            let blob = std::fs::File::open(&blob_path).map_err(ImageError::io("open a layer"))?;
            let (unpacked, usage) = unpack_blob(blob, compression, &rootfs)?;
            if unpacked != diff_id {
                return Err(ImageError::Digest {
                    what: format!("uncompressed layer {digest}"),
                    expected: diff_id,
                    actual: unpacked,
                });
            }
            std::fs::remove_file(&blob_path).map_err(ImageError::io("remove a layer download"))?;
            store.commit_layer(&diff_id, stage, usage)
        })
        .await
        .map_err(|e| ImageError::Unpack {
            dir: "a staging dir".into(),
            message: format!("unpack task: {e}"),
        })?
    }
}

fn file_digest(path: &std::path::Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(ImageError::io("open a layer"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(ImageError::io("read a layer"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", super::hex(&h.finalize())))
}

fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::Malformed {
        what: what.into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_as_kubelet_sends_them() {
        assert_eq!(lookup_key("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(lookup_key("127.0.0.1:5000/t/bb:1"), "127.0.0.1:5000/t/bb:1");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            lookup_key(&format!("127.0.0.1:5000/t/bb@{d}")),
            format!("127.0.0.1:5000/t/bb@{d}")
        );
        assert_eq!(lookup_key(&d), d);
    }
}
