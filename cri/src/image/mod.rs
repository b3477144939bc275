//! The image layer: a content-addressed store (`store`), pulling from OCI registries
//! (`pull`), unpacking layers (`unpack`) and the built-in image (`builtin`). Its types are its own; the CRI server maps them
//! to and from the protocol.

pub mod builtin;
pub mod pull;
pub mod store;
pub mod unpack;

use std::path::Path;

pub use pull::{Credentials, Puller};
pub use store::{ImageRecord, Store};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error("pulls from registry {0:?} are rejected by huskd's registry policy")]
    RegistryRejected(String),
    #[error("pull {reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("pull {reference}: no linux/amd64 image in the index")]
    NoPlatform { reference: String },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} failed verification: {message}")]
    Verification { what: String, message: String },
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("malformed {what}: {message}")]
    Malformed { what: String, message: String },
    #[error("layer entry {path:?} is unsafe: {reason}")]
    UnsafePath { path: String, reason: String },
    #[error("unpack into {dir}: {message}")]
    Unpack { dir: String, message: String },
    #[error("image store: {context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn unpack(dir: &Path, message: impl std::fmt::Display) -> ImageError {
        ImageError::Unpack {
            dir: dir.display().to_string(),
            message: message.to_string(),
        }
    }

    pub(crate) fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = context.to_string();
        move |source| ImageError::Io { context, source }
    }
}

/// Lower-case hex of a digest's bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex(&sha2::Sha256::digest(data)))
}

/// The hex part of a `sha256:` digest, checked to be one (it becomes a file name).
pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(h)
        }
        _ => Err(ImageError::Malformed {
            what: "digest".into(),
            message: format!("{digest:?} is not a sha256 digest"),
        }),
    }
}
