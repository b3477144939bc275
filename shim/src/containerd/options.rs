//! `runtimeoptions.v1.Options`, the runtime options containerd's CRI plugin sends a
//! non-runc shim: `type_url` (field 1) and `config_path` (field 2), from the
//! `options = { ConfigPath = ... }` of the runtime handler. containerd passes it as a
//! protobuf `Any` on `start`'s stdin and in `CreateTaskRequest.options`. The
//! `containerd-shim` crate does not carry this message, so it is decoded here by hand: two
//! string fields do not warrant generated code.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};

use super::error::{Error, Result};

/// The message's full name, as containerd's typeurl writes it in `Any.type_url`.
pub const TYPE_NAME: &str = "runtimeoptions.v1.Options";

/// The decoded options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub type_url: String,
    pub config_path: String,
}

impl RuntimeOptions {
    /// Decodes the message body (`Any.value`).
    pub fn decode(bytes: &[u8]) -> Result<RuntimeOptions> {
        let mut o = RuntimeOptions::default();
        let mut s = CodedInputStream::from_bytes(bytes);
        let bad = |e: containerd_shim::protos::protobuf::Error| Error::Options(e.to_string());
        while let Some(tag) = s.read_raw_tag_or_eof().map_err(bad)? {
            match (tag >> 3, tag & 7) {
                (1, 2) => o.type_url = s.read_string().map_err(bad)?,
                (2, 2) => o.config_path = s.read_string().map_err(bad)?,
                // Fields a newer containerd may add are skipped, as protobuf does.
                (_, wire) => {
                    let wire = containerd_shim::protos::protobuf::rt::WireType::new(wire)
                        .ok_or_else(|| Error::Options(format!("bad wire type {wire}")))?;
                    s.skip_field(wire).map_err(bad)?;
                }
            }
        }
        Ok(o)
    }

    /// The options from an `Any`; `None` for an empty one or one of another type (e.g. runc's
    /// options, when a handler is misconfigured: said in the log, not fatal).
    pub fn from_any(any: &Any) -> Result<Option<RuntimeOptions>> {
        if any.type_url.is_empty() && any.value.is_empty() {
            return Ok(None);
        }
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name != TYPE_NAME {
            tracing::warn!(type_url = %any.type_url, "ignoring runtime options of another type");
            return Ok(None);
        }
        RuntimeOptions::decode(&any.value).map(Some)
    }

    /// The options from `start`'s stdin: a marshalled `Any`, or nothing.
    pub fn from_stdin_bytes(bytes: &[u8]) -> Result<Option<RuntimeOptions>> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let any = Any::parse_from_bytes(bytes).map_err(|e| Error::Options(e.to_string()))?;
        RuntimeOptions::from_any(&any)
    }

    /// Encodes the message body (tests, and the harness's expectations).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (field, v) in [(1u8, &self.type_url), (2u8, &self.config_path)] {
            if v.is_empty() {
                continue;
            }
            out.push((field << 3) | 2);
            let mut n = v.len();
            while n >= 0x80 {
                out.push((n as u8 & 0x7f) | 0x80);
                n >>= 7;
            }
            out.push(n as u8);
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_unknown_fields() {
        let o = RuntimeOptions {
            type_url: "io.containerd.husk.v2".into(),
            config_path: "/etc/husk/".to_string() + &"x".repeat(200) + ".toml",
        };
        let mut bytes = o.encode();
        // field 7, varint 5: unknown, skipped
        bytes.extend_from_slice(&[7 << 3, 5]);
        assert_eq!(RuntimeOptions::decode(&bytes).unwrap(), o);
    }

    #[test]
    fn decodes_from_start_stdin_any() {
        let o = RuntimeOptions {
            type_url: String::new(),
            config_path: "/tmp/husk.toml".into(),
        };
        let mut any = Any::new();
        any.type_url = TYPE_NAME.into();
        any.value = o.encode();
        let bytes = any.write_to_bytes().unwrap();
        assert_eq!(RuntimeOptions::from_stdin_bytes(&bytes).unwrap(), Some(o));
        assert_eq!(RuntimeOptions::from_stdin_bytes(&[]).unwrap(), None);
        any.type_url = "containerd.runc.v1.Options".into();
        assert_eq!(RuntimeOptions::from_any(&any).unwrap(), None);
    }

    #[test]
    fn truncated_message_is_an_error() {
        let bytes = RuntimeOptions {
            type_url: "abc".into(),
            config_path: String::new(),
        }
        .encode();
        assert!(RuntimeOptions::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
