//! One config type per device, shared by every way of describing a VM: the VMM's command
//! line parses into them ([`std::str::FromStr`]), the control API carries them as JSON, and
//! the VMM's builder builds devices from them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::rate_limit::RateLimiterConfig;

/// `configure`: the machine and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Appended to the VMM's default command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub serial: SerialConfig,
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.mem_mib == 0 {
            return Err("mem_mib must be at least 1".into());
        }
        if self.vcpus == 0 {
            return Err("vcpus must be at least 1".into());
        }
        Ok(())
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialConfig {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Discarded.
    #[serde(rename = "none")]
    Disabled,
    /// Appended to a file.
    File(PathBuf),
}

/// The command line's form: `stdout`, `none`, or a file path.
impl FromStr for SerialConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "stdout" => SerialConfig::Stdout,
            "none" => SerialConfig::Disabled,
            "" => return Err("--serial wants stdout, none or a file path".into()),
            path => SerialConfig::File(path.into()),
        })
    }
}

/// Longest virtio-blk serial: the GET_ID buffer (virtio spec 5.2.6).
pub const BLOCK_ID_LEN: usize = 20;

/// `add_block`: a virtio-blk disk backed by a host file or block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// The disk's serial as the guest reads it (GET_ID); `None`: derived from the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Limits the guest's requests (bytes read and written, requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl BlockConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = &self.rate_limiter {
            r.validate().map_err(|e| format!("rate_limiter: {e}"))?;
        }
        match &self.id {
            Some(id)
                if id.is_empty()
                    || id.len() > BLOCK_ID_LEN
                    || !id.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Err(format!(
                    "id {id:?} must be 1 to {BLOCK_ID_LEN} printable ASCII bytes \
                     (the guest reads it as the disk's serial)"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The command line's form: `PATH[,ro][,id=SERIAL]`.
impl FromStr for BlockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!("--block wants PATH[,ro][,id=SERIAL], got {s:?}"));
        }
        let mut cfg = BlockConfig {
            path: path.into(),
            read_only: false,
            id: None,
            rate_limiter: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => cfg.read_only = true,
                Some(("id", id)) => cfg.id = Some(id.into()),
                _ => return Err(format!("unknown --block option {opt:?} (ro, id=SERIAL)")),
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `add_net`: a virtio-net interface on a tap, by name or by fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// A tap the VMM opens itself ([`crate::tap::open`]), in its own network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    /// Index into the fds passed with the request: a tap opened by the VMM's parent, which
    /// may live in another network namespace than the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Limits frames from the host to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits frames from the guest to the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// `num_fds`: how many fds came with the config (the API request's).
    pub fn validate(&self, num_fds: usize) -> Result<(), String> {
        for (name, r) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if let Some(r) = r {
                r.validate().map_err(|e| format!("{name}: {e}"))?;
            }
        }
        match (&self.tap_name, self.tap_fd) {
            (Some(_), Some(_)) => Err("give either tap_name or tap_fd, not both".into()),
            (None, None) => Err(
                "give tap_name (a tap the VMM opens) or tap_fd (the index of \
                                 a tap fd passed with the request)"
                    .into(),
            ),
            (Some(name), None) if name.is_empty() || name.len() >= libc::IFNAMSIZ => Err(format!(
                "tap_name {name:?} must be 1 to {} bytes long",
                libc::IFNAMSIZ - 1
            )),
            (None, Some(i)) if i >= num_fds => Err(format!(
                "tap_fd is {i} but {num_fds} fd(s) came with the request; send the tap fd as \
                 SCM_RIGHTS data on the same message"
            )),
            _ => Ok(()),
        }
    }
}

/// The command line's form: `NAME[,mac=xx:xx:xx:xx:xx:xx]` (a tap by name).
impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let mut cfg = NetConfig {
            tap_name: parts.next().map(str::to_string),
            tap_fd: None,
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        for opt in parts {
            match opt.strip_prefix("mac=") {
                Some(m) => cfg.mac = Some(MacAddr::parse(m)?),
                None => return Err(format!("unknown --net-tap option {opt:?} (mac=MAC)")),
            }
        }
        cfg.validate(0)?;
        Ok(cfg)
    }
}

/// `add_fs`: a virtio-fs share served by virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// virtiofsd's vhost-user socket.
    pub socket_path: PathBuf,
    /// The guest mounts the file system by this tag.
    pub tag: String,
}

/// The command line's form: `SOCKET,tag=TAG`.
impl FromStr for FsConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(",tag=") {
            Some((sock, tag)) if !sock.is_empty() && !tag.is_empty() => Ok(FsConfig {
                socket_path: sock.into(),
                tag: tag.into(),
            }),
            _ => Err(format!("--fs-socket wants SOCKET,tag=TAG, got {s:?}")),
        }
    }
}

/// `add_vsock`: the hybrid virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Host clients connect here and send `CONNECT <port>\n`; guest connections to host
    /// port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// A unicast Ethernet address, written `xx:xx:xx:xx:xx:xx` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `xx:xx:xx:xx:xx:xx` (hex, either case); multicast addresses are refused because
    /// a NIC cannot have one.
    pub fn parse(s: &str) -> Result<MacAddr, String> {
        let bad =
            || format!("invalid MAC address {s:?}: expected six hex bytes like 02:00:00:00:00:01");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would take "+1".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 != 0 {
            return Err(format!(
                "MAC address {s} is a multicast address: the first byte must be even (e.g. 02:…)"
            ));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_forms() {
        let b: BlockConfig = "/d.img,ro,id=husk-disk".parse().unwrap();
        assert_eq!(
            b,
            BlockConfig {
                path: "/d.img".into(),
                read_only: true,
                id: Some("husk-disk".into()),
                rate_limiter: None,
            }
        );
        let b: BlockConfig = "/d.img".parse().unwrap();
        assert!(!b.read_only && b.id.is_none());
        assert!("/d.img,rw".parse::<BlockConfig>().is_err());
        assert!(",ro".parse::<BlockConfig>().is_err());
        assert!("/d.img,id=".parse::<BlockConfig>().is_err());
        // Rate limits are API only; a zero bucket is refused.
        let json = r#"{"path":"/d","read_only":false,"rate_limiter":{"ops":{"size":0,"refill_time_ms":5}}}"#;
        let b: BlockConfig = serde_json::from_str(json).unwrap();
        assert!(b.validate().unwrap_err().contains("rate_limiter: ops"));
        assert!(format!("/d.img,id={}", "x".repeat(21))
            .parse::<BlockConfig>()
            .unwrap_err()
            .contains("20"));
        assert!("/d.img,id=two words".parse::<BlockConfig>().is_err());

        let n: NetConfig = "tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap_name.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert!("tap0,mtu=9000".parse::<NetConfig>().is_err());
        assert!(",mac=02:00:00:00:00:01".parse::<NetConfig>().is_err());

        let f: FsConfig = "/run/v.sock,tag=shared".parse().unwrap();
        assert_eq!(f.socket_path, PathBuf::from("/run/v.sock"));
        assert_eq!(f.tag, "shared");
        assert!("/run/v.sock".parse::<FsConfig>().is_err());

        assert_eq!("none".parse::<SerialConfig>(), Ok(SerialConfig::Disabled));
        assert_eq!(
            "/l".parse::<SerialConfig>(),
            Ok(SerialConfig::File("/l".into()))
        );
    }
}
