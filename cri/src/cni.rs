//! Runs CNI plugins per the CNI spec (libcni's behaviour, which containerd and CRI-O use):
//! the network is the conf dir's first configuration (`*.conflist`, `*.conf`, `*.json` by
//! name); ADD runs its plugins in order, each given the previous one's result as
//! `prevResult`; DEL runs them in reverse; CHECK in order with the cached result. A plugin
//! declaring `capabilities.portMappings` gets `runtimeConfig.portMappings`.
//!
//! Before ADD starts, the network config and the attachment are cached on disk, and the
//! result after it: DEL (also after a huskd restart) replays exactly what was added. An ADD
//! that fails part-way is undone by a DEL of the whole list, so nothing (veth, IPAM
//! allocation, port mapping) stays behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {0}")]
    NoConfig(PathBuf),
    #[error("CNI config {path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("CNI {command} of plugin {plugin:?} failed: {message}")]
    Plugin {
        command: &'static str,
        plugin: String,
        message: String,
    },
    #[error("CNI cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
}

/// One network configuration list, as loaded from the conf dir.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub source: PathBuf,
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub plugins: Vec<Map<String, Value>>,
}

impl Network {
    /// The conf dir's first network config, by file name.
    pub fn load(conf_dir: &Path) -> Result<Network, CniError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
            .map_err(|_| CniError::NoConfig(conf_dir.to_path_buf()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let first = files
            .first()
            .ok_or_else(|| CniError::NoConfig(conf_dir.to_path_buf()))?;
        let text = std::fs::read(first).map_err(|e| CniError::BadConfig {
            path: first.clone(),
            message: e.to_string(),
        })?;
        Network::parse(&text, first)
    }

    /// Parses a conflist (or a single-plugin `.conf`, wrapped into a list as libcni does).
    pub fn parse(text: &[u8], source: &Path) -> Result<Network, CniError> {
        let bad = |message: String| CniError::BadConfig {
            path: source.to_path_buf(),
            message,
        };
        let v: Map<String, Value> =
            serde_json::from_slice(text).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no \"name\"".into()))?
            .to_string();
        let cni_version = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.4.0")
            .to_string();
        let plugins: Vec<Map<String, Value>> = match v.get("plugins") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|p| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad("a plugin is not an object".into()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            None if v.contains_key("type") => vec![v.clone()],
            None => return Err(bad("no \"plugins\"".into())),
        };
        if plugins.is_empty() {
            return Err(bad("\"plugins\" is empty".into()));
        }
        for p in &plugins {
            let t = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if t.is_empty() || t.contains('/') {
                return Err(bad(format!("a plugin has no valid \"type\": {t:?}")));
            }
        }
        Ok(Network {
            source: source.to_path_buf(),
            name,
            cni_version,
            disable_check: v
                .get("disableCheck")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            plugins,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A host port forwarded to the pod (`runtimeConfig.portMappings`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    #[serde(rename = "hostIP", skip_serializing_if = "String::is_empty", default)]
    pub host_ip: String,
}

/// What one pod's attachment to the network is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// CNI_CONTAINERID: the pod sandbox id.
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS, e.g. K8S_POD_NAMESPACE, K8S_POD_NAME (kubelet's names).
    pub args: BTreeMap<String, String>,
    pub port_mappings: Vec<PortMapping>,
}

/// What is cached per attachment.
#[derive(Serialize, Deserialize)]
struct Cached {
    network: Network,
    attachment: Attachment,
    result: Option<Value>,
}

/// The result of ADD, as the pod layer needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct AddResult {
    /// The IPs of the pod's interface, without prefix length, in result order.
    pub ips: Vec<String>,
    pub raw: Value,
}

pub struct Cni {
    bin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
}

impl Cni {
    pub fn new(bin_dirs: Vec<PathBuf>, cache_dir: PathBuf) -> Cni {
        Cni {
            bin_dirs,
            cache_dir,
        }
    }

    fn cache_path(&self, container_id: &str) -> PathBuf {
        self.cache_dir.join(format!("{container_id}.json"))
    }

    fn write_cache(&self, c: &Cached) -> Result<(), CniError> {
        let path = self.cache_path(&c.attachment.container_id);
        let err = |message: String| CniError::Cache {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(&self.cache_dir).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(c).expect("serialize a CNI cache entry"),
        )
        .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
    }

    fn read_cache(&self, container_id: &str) -> Result<Option<Cached>, CniError> {
        let path = self.cache_path(container_id);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CniError::Cache {
                    path,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CniError::Cache {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Whether an attachment is recorded (ADD ran, or started, and DEL has not finished).
    pub fn is_attached(&self, container_id: &str) -> bool {
        self.cache_path(container_id).exists()
    }

    /// ADD: every plugin in order. On failure the attachment is deleted again before the
    /// error is returned.
    pub async fn add(&self, net: &Network, att: &Attachment) -> Result<AddResult, CniError> {
        let mut cached = Cached {
            network: net.clone(),
            attachment: att.clone(),
            result: None,
        };
        // Recorded first: if huskd dies during ADD, DEL after the restart still finds it.
        self.write_cache(&cached)?;
        let mut prev: Option<Value> = None;
        for (i, plugin) in net.plugins.iter().enumerate() {
            match self.exec("ADD", net, plugin, att, prev.as_ref()).await {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    // Undo what ran (this plugin may have done part of its work), newest
                    // first, then forget the attachment: no pod will ever exist to retry
                    // a DEL that fails here (a plugin whose config it rejects on ADD
                    // rejects it on DEL too), so it is logged, and the ADD error returned.
                    let ran = &net.plugins[..=i];
                    if let Err(undo) = self.del_plugins(net, ran, att, prev.as_ref()).await {
                        warn!(error = %undo, "CNI DEL after a failed ADD");
                    }
                    self.remove_cache(&att.container_id)?;
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        cached.result = Some(result.clone());
        self.write_cache(&cached)?;
        Ok(AddResult {
            ips: result_ips(&result),
            raw: result,
        })
    }

    /// CHECK with the cached result (CNI 0.4.0 and later; skipped when the list says
    /// `disableCheck`).
    pub async fn check(&self, container_id: &str) -> Result<(), CniError> {
        let c = self
            .read_cache(container_id)?
            .ok_or_else(|| CniError::Cache {
                path: self.cache_path(container_id),
                message: "no cached ADD result to check".into(),
            })?;
        if c.network.disable_check || c.network.cni_version.starts_with("0.3") {
            return Ok(());
        }
        for plugin in &c.network.plugins {
            self.exec(
                "CHECK",
                &c.network,
                plugin,
                &c.attachment,
                c.result.as_ref(),
            )
            .await?;
        }
        Ok(())
    }

    /// DEL of what the cache says was added, plugins in reverse; the cache entry goes when
    /// every plugin succeeded (else a later DEL retries). No cache entry: nothing to delete.
    pub async fn del(&self, container_id: &str) -> Result<(), CniError> {
        let Some(c) = self.read_cache(container_id)? else {
            return Ok(());
        };
        self.del_plugins(
            &c.network,
            &c.network.plugins,
            &c.attachment,
            c.result.as_ref(),
        )
        .await?;
        self.remove_cache(container_id)
    }

    /// DEL of `plugins` in reverse order. Every plugin is run even when one fails (each
    /// releases its own resources); the first error is returned. A plugin that is not
    /// installed cannot have added anything and is skipped.
    async fn del_plugins(
        &self,
        net: &Network,
        plugins: &[Map<String, Value>],
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first = None;
        for plugin in plugins.iter().rev() {
            match self.exec("DEL", net, plugin, att, prev).await {
                Ok(_) | Err(CniError::PluginNotFound { .. }) => {}
                Err(e) => {
                    warn!(error = %e, "CNI DEL");
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn remove_cache(&self, container_id: &str) -> Result<(), CniError> {
        let path = self.cache_path(container_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::Cache {
                path,
                message: e.to_string(),
            }),
        }
    }

    fn find_plugin(&self, t: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(t))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::PluginNotFound {
                plugin: t.into(),
                dirs: self
                    .bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Runs one plugin with one command; returns its result (ADD) or Null.
    async fn exec(
        &self,
        command: &'static str,
        net: &Network,
        plugin: &Map<String, Value>,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Value, CniError> {
        let t = plugin["type"].as_str().unwrap_or_default().to_string();
        let fail = |message: String| CniError::Plugin {
            command,
            plugin: t.clone(),
            message,
        };
        let bin = self.find_plugin(&t)?;
        let stdin = plugin_config(net, plugin, att, prev);
        let cni_path = std::env::join_paths(&self.bin_dirs).map_err(|e| fail(e.to_string()))?;
        let args: Vec<String> = att.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        debug!(command, plugin = %t, container = %att.container_id, "CNI");
        let mut child = tokio::process::Command::new(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", args.join(";"))
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("run {}: {e}", bin.display())))?;
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(&serde_json::to_vec(&stdin).expect("serialize a plugin config"))
            .await
            .map_err(|e| fail(format!("write its config: {e}")))?;
        drop(input);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(format!("wait: {e}")))?;
        if !out.status.success() {
            // Errors come as JSON on stdout ({code, msg, details}); fall back to stderr.
            let msg = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| {
                    let m = v.get("msg")?.as_str()?.to_string();
                    let d = v.get("details").and_then(Value::as_str).unwrap_or_default();
                    Some(if d.is_empty() { m } else { format!("{m}: {d}") })
                })
                .unwrap_or_else(|| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                });
            return Err(fail(format!("{} ({})", msg, out.status)));
        }
        if command != "ADD" {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| fail(format!("its result is not JSON: {e}")))
    }
}

/// The JSON a plugin gets on stdin: its own config plus the list's name and cniVersion, the
/// previous result, and the runtime config its capabilities ask for.
fn plugin_config(
    net: &Network,
    plugin: &Map<String, Value>,
    att: &Attachment,
    prev: Option<&Value>,
) -> Value {
    let mut conf = plugin.clone();
    conf.insert("name".into(), json!(net.name));
    conf.insert("cniVersion".into(), json!(net.cni_version));
    conf.remove("capabilities");
    if let Some(p) = prev {
        conf.insert("prevResult".into(), p.clone());
    }
    let caps = plugin.get("capabilities").and_then(Value::as_object);
    let wants = |cap: &str| caps.and_then(|c| c.get(cap)).and_then(Value::as_bool) == Some(true);
    if wants("portMappings") && !att.port_mappings.is_empty() {
        conf.insert(
            "runtimeConfig".into(),
            json!({ "portMappings": att.port_mappings }),
        );
    }
    Value::Object(conf)
}

/// The IPs in a CNI result (0.3.0 and later: `ips[].address` as CIDR).
fn result_ips(result: &Value) -> Vec<String> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str())
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_errors_name_the_file_and_the_problem() {
        let p = Path::new("/etc/cni/net.d/10-x.conflist");
        let e = Network::parse(b"{\"name\":\"x\",\"plugins\":[]}", p).unwrap_err();
        assert!(
            e.to_string().contains("10-x.conflist") && e.to_string().contains("empty"),
            "{e}"
        );
        let e = Network::parse(b"{\"plugins\":[{\"type\":\"bridge\"}]}", p).unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        let e = Network::parse(b"{not json", p).unwrap_err();
        assert!(e.to_string().contains("JSON"), "{e}");
        let e =
            Network::parse(b"{\"name\":\"x\",\"plugins\":[{\"type\":\"../x\"}]}", p).unwrap_err();
        assert!(e.to_string().contains("type"), "{e}");
    }

    #[test]
    fn plugin_config_chains_and_passes_port_mappings_by_capability() {
        let net = Network::parse(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},
               {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
            Path::new("x"),
        )
        .unwrap();
        let att = Attachment {
            container_id: "c".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            args: BTreeMap::new(),
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        };
        let prev = json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]});
        let bridge = plugin_config(&net, &net.plugins[0], &att, None);
        assert_eq!(bridge["name"], "n");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("runtimeConfig").is_none() && bridge.get("prevResult").is_none());
        let pm = plugin_config(&net, &net.plugins[1], &att, Some(&prev));
        assert_eq!(pm["prevResult"], prev);
        assert_eq!(pm["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert_eq!(pm["runtimeConfig"]["portMappings"][0]["containerPort"], 80);
        assert!(pm.get("capabilities").is_none());
        assert_eq!(result_ips(&prev), ["10.1.0.5"]);
    }
}
