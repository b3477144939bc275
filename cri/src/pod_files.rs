//! The files a pod's containers see at `/etc/resolv.conf` and `/etc/hostname`, written into
//! the pod's bundle as containerd writes them into its sandbox dir, and bind-mounted into
//! every container (the shim shares host binds into the VM). resolv.conf comes from the
//! pod's DNS config (servers, searches, options), or is the host's when the pod has none.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// CRI's DNSConfig.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// resolv.conf's text for a DNS config (containerd's format: search, nameservers, options).
pub fn resolv_conf(dns: &DnsConfig) -> String {
    let mut s = String::new();
    if !dns.searches.is_empty() {
        s += &format!("search {}\n", dns.searches.join(" "));
    }
    for server in &dns.servers {
        s += &format!("nameserver {server}\n");
    }
    if !dns.options.is_empty() {
        s += &format!("options {}\n", dns.options.join(" "));
    }
    s
}

/// Where the files of a pod whose bundle is `bundle` are.
pub fn resolv_conf_path(bundle: &Path) -> PathBuf {
    bundle.join("resolv.conf")
}

pub fn hostname_path(bundle: &Path) -> PathBuf {
    bundle.join("hostname")
}

/// Writes the pod's resolv.conf and hostname into `bundle`. An empty hostname is the node's
/// (as containerd does).
pub fn write(bundle: &Path, dns: Option<&DnsConfig>, hostname: &str) -> std::io::Result<()> {
    let resolv = match dns {
        Some(dns) => resolv_conf(dns),
        None => std::fs::read_to_string(HOST_RESOLV_CONF).unwrap_or_default(),
    };
    std::fs::write(resolv_conf_path(bundle), resolv)?;
    let host = if hostname.is_empty() {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        hostname.to_string()
    };
    std::fs::write(hostname_path(bundle), format!("{host}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_has_searches_servers_and_options() {
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into(), "8.8.8.8".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into(), "edns0".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "search default.svc.cluster.local svc.cluster.local\n\
             nameserver 10.96.0.10\nnameserver 8.8.8.8\noptions ndots:5 edns0\n"
        );
        assert_eq!(resolv_conf(&DnsConfig::default()), "");
    }

    #[test]
    fn the_files_are_written_into_the_bundle() {
        let d = tempfile::tempdir().unwrap();
        let dns = DnsConfig {
            servers: vec!["1.1.1.1".into()],
            ..Default::default()
        };
        write(d.path(), Some(&dns), "web-0").unwrap();
        assert_eq!(
            std::fs::read_to_string(resolv_conf_path(d.path())).unwrap(),
            "nameserver 1.1.1.1\n"
        );
        assert_eq!(
            std::fs::read_to_string(hostname_path(d.path())).unwrap(),
            "web-0\n"
        );
        // No DNS config: the host's resolv.conf; no hostname: the node's.
        write(d.path(), None, "").unwrap();
        assert_eq!(
            std::fs::read_to_string(resolv_conf_path(d.path())).unwrap(),
            std::fs::read_to_string(HOST_RESOLV_CONF).unwrap_or_default()
        );
        assert!(
            std::fs::read_to_string(hostname_path(d.path()))
                .unwrap()
                .len()
                > 1
        );
    }
}
