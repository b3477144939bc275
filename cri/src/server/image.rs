//! The CRI ImageService on the image layer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};

use super::image_status;
use crate::image::pull::lookup_key;
use crate::image::{Credentials, ImageRecord, Puller, Store};
use crate::metrics;

pub struct Images {
    store: Arc<Store>,
    puller: Puller,
}

impl Images {
    pub fn new(store: Arc<Store>, puller: Puller) -> Images {
        Images { store, puller }
    }

    fn find(&self, spec: Option<&cri::ImageSpec>) -> Option<ImageRecord> {
        let image = spec.map(|s| s.image.as_str()).unwrap_or_default();
        if image.is_empty() {
            return None;
        }
        self.store
            .find(&lookup_key(image))
            .or_else(|| self.store.find(image))
    }
}

fn to_cri(r: ImageRecord) -> cri::Image {
    cri::Image {
        spec: Some(cri::ImageSpec {
            image: r.id.clone(),
            ..Default::default()
        }),
        id: r.id,
        repo_tags: r.repo_tags,
        repo_digests: r.repo_digests,
        size: r.size,
        uid: r.uid.map(|value| cri::Int64Value { value }),
        username: r.username,
        pinned: false,
    }
}

/// How much before the client's deadline PullImage gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// The request's `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn credentials(auth: Option<cri::AuthConfig>) -> Result<Credentials, Status> {
    let Some(a) = auth else {
        return Ok(Credentials::default());
    };
    let (mut username, mut password) = (a.username, a.password);
    if username.is_empty() && !a.auth.is_empty() {
        // `auth` is base64("user:password"), as in a docker config.json.
        let decoded = decode_base64(&a.auth)
            .ok_or_else(|| Status::invalid_argument("auth: not base64 of \"user:password\""))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth: not base64 of \"user:password\""))?;
        (username, password) = (u.to_string(), p.to_string());
    }
    let token = if a.registry_token.is_empty() {
        a.identity_token
    } else {
        a.registry_token
    };
    Ok(Credentials {
        username,
        password,
        token,
    })
}

/// Standard base64 with padding, as docker's config.json holds it.
fn decode_base64(s: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.trim_end_matches('=').bytes() {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        bits = bits << 6 | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).ok()
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request.into_inner().filter.and_then(|f| f.image);
        let images = match filter.filter(|s| !s.image.is_empty()) {
            Some(spec) => self.find(Some(&spec)).into_iter().collect(),
            None => self.store.list(),
        };
        Ok(Response::new(cri::ListImagesResponse {
            images: images.into_iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = request.into_inner();
        // An unknown image is not an error: the answer has no image.
        Ok(Response::new(cri::ImageStatusResponse {
            image: self.find(req.image.as_ref()).map(to_cri),
            info: Default::default(),
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let image = req.image.map(|s| s.image).unwrap_or_default();
        if image.is_empty() {
            return Err(Status::invalid_argument("PullImage: no image named"));
        }
        let creds = credentials(req.auth)?;
        let pull = self.puller.pull(&self.store, &image, &creds);
        let pulled = match deadline {
            // Answer a little before the deadline, so the client hears why rather than
            // tonic's generic "Timeout expired". Dropping the pull drops its staging dirs (an unpack already under way may still
            // commit its layer, which a retry then finds).
            Some(d) => tokio::time::timeout(d.saturating_sub(DEADLINE_MARGIN), pull)
                .await
                .map_err(|_| {
                    metrics::inc(&metrics::METRICS.pull_failures);
                    Status::deadline_exceeded(format!(
                        "PullImage {image}: not done within the request's deadline ({:.1} s); the pull was \
                         abandoned",
                        d.as_secs_f64()
                    ))
                })?,
            None => pull.await,
        };
        let rec = pulled
            .inspect_err(|_| metrics::inc(&metrics::METRICS.pull_failures))
            .map_err(image_status)?;
        metrics::inc(&metrics::METRICS.pulls);
        Ok(Response::new(cri::PullImageResponse { image_ref: rec.id }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = request.into_inner();
        // Removing what is not there succeeds, as kubelet's image GC expects.
        if let Some(rec) = self.find(req.image.as_ref()) {
            self.store.remove(&rec.id).map_err(image_status)?;
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let usage = self.store.usage().map_err(image_status)?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        let fs = cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.store.root().display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: usage.bytes }),
            inodes_used: Some(cri::UInt64Value {
                value: usage.inodes,
            }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs.clone()],
            container_filesystems: vec![],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_decodes_to_basic_credentials() {
        let c = credentials(Some(cri::AuthConfig {
            auth: "dXNlcjpwYXNz".into(), // user:pass
            ..Default::default()
        }))
        .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pass"));
        assert!(credentials(Some(cri::AuthConfig {
            auth: "!!".into(),
            ..Default::default()
        }))
        .is_err());
    }

    #[test]
    fn grpc_timeout_units_and_bad_values() {
        let t = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("7n"), Some(Duration::from_nanos(7)));
        for bad in ["S", "2", "123456789S", "2x", "-1S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
