//! The pod network: the node's CNI configuration ([`config`]) run through
//! its plugins ([`chain`], [`plugin`]) on a network namespace made for the
//! pod ([`netns`]); a tap in that namespace joined to the CNI interface with
//! tc ([`tap`]) becomes the VM's NIC, and the addresses and routes the
//! plugins gave the interface ([`inspect`]) are given to the guest's.
//!
//! What a pod's attachment needs for its DEL (the configuration as it was
//! at ADD, the CNI parameters, the result) is cached in the pod's directory
//! as `network.json` before ADD runs, so DEL works after a daemon restart
//! and after a crash in the middle of ADD.

pub mod chain;
pub mod config;
pub mod inspect;
pub mod netns;
pub mod plugin;
pub mod tap;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1 as cri;
use serde_json::{Map, Value};

use crate::runtime::state;
use config::{ConfigSource, NetworkConfig};
use plugin::{Attachment, Plugins};

/// The interface name CNI plugins create in the pod's namespace.
pub const POD_IFNAME: &str = "eth0";
/// The tap that carries the CNI interface's traffic to the VM.
const TAP_NAME: &str = "tap0";
/// Pod annotations for the `ips` and `mac` capabilities: "10.1.0.5/24,fd00::5/64"
/// and "0a:58:0a:01:00:05".
pub const IPS_ANNOTATION: &str = "cni.frakti.io/ips";
pub const MAC_ANNOTATION: &str = "cni.frakti.io/mac";
/// The cache file in the pod's directory.
const CACHE_FILE: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the pod network is not ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Plugin(#[from] plugin::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(transparent)]
    Tap(#[from] tap::Error),
    #[error(transparent)]
    Inspect(#[from] inspect::Error),
    #[error("network {network}: the CNI result has no IP address for {POD_IFNAME}")]
    NoAddress { network: String },
    #[error(transparent)]
    Cache(#[from] state::Error),
    #[error("the cached network of {}: {message}", path.display())]
    BadCache { path: PathBuf, message: String },
    #[error("a network task failed: {0}")]
    Task(String),
}

/// How the daemon networks its pods (flags / config file).
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// `--network`: "cni", or "none" (pods get a loopback only).
    pub enabled: bool,
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub plugin_timeout: Duration,
    /// Where pod namespaces are bind-mounted (`/run/frakti/netns`).
    pub netns_dir: PathBuf,
}

/// What `network.json` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PodNetwork {
    /// The configuration list as ADD ran it.
    pub network: Value,
    pub attachment: Attachment,
    pub runtime_config: Map<String, Value>,
    /// The final ADD result; `None` while ADD runs.
    pub result: Option<Value>,
}

impl PodNetwork {
    /// The pod's IPs for PodSandboxStatus, IPv4 first (kubelet takes the
    /// first as the pod's primary IP).
    pub fn ips(&self) -> Vec<String> {
        let Some(result) = &self.result else {
            return Vec::new();
        };
        let mut ips: Vec<IpAddr> = result
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.get("address")?.as_str())
            .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
            .collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips.iter().map(IpAddr::to_string).collect()
    }
}

/// The VM's side of an attachment.
#[derive(Debug)]
pub struct Attached {
    pub record: PodNetwork,
    /// The tap's descriptor, for the VMM.
    pub tap: tap::Tap,
    /// What the guest's interface gets.
    pub guest: inspect::Interface,
}

pub struct Network {
    settings: NetworkSettings,
    source: Option<ConfigSource>,
    plugins: Plugins,
}

impl Network {
    pub fn new(settings: NetworkSettings) -> Network {
        let source = settings
            .enabled
            .then(|| ConfigSource::watch(&settings.conf_dir));
        let plugins = Plugins {
            dirs: settings.bin_dirs.clone(),
            timeout: settings.plugin_timeout,
        };
        Network {
            settings,
            source,
            plugins,
        }
    }

    pub fn enabled(&self) -> bool {
        self.source.is_some()
    }

    /// Whether a pod can be networked now (runtime Status' NetworkReady),
    /// with the reason when not: a valid configuration whose plugins exist
    /// and, for 1.1.0 lists, answer STATUS.
    pub async fn ready(&self) -> Result<(), String> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let config = source.current()?;
        for kind in config.plugin_types() {
            self.plugins.find(kind).map_err(|e| e.to_string())?;
        }
        chain::status(&self.plugins, &config)
            .await
            .map_err(|e| e.to_string())
    }

    /// Networks a new pod: namespace, CNI ADD, tap, guest settings. On
    /// failure whatever was set up is undone.
    pub async fn setup(
        &self,
        pod_id: &str,
        pod_dir: &Path,
        config: &cri::PodSandboxConfig,
    ) -> Result<Option<Attached>, Error> {
        let Some(source) = &self.source else {
            return Ok(None);
        };
        let network = source.current().map_err(Error::NotReady)?;
        let netns_path = self.settings.netns_dir.join(pod_id);
        let mut record = PodNetwork {
            network: network.to_list_json(),
            attachment: attachment(pod_id, &netns_path, config),
            runtime_config: runtime_config(config),
            result: None,
        };
        // Cached first: a crash from here on is undone by DEL.
        state::write_json(&pod_dir.join(CACHE_FILE), &record)?;
        let attached = self.attach(&network, &mut record, pod_dir).await;
        if attached.is_err() {
            if let Err(e) = self.teardown(pod_id, pod_dir).await {
                tracing::warn!(pod = %pod_id, "undoing the pod network: {}", crate::error_chain(&e));
            }
        }
        attached.map(Some)
    }

    async fn attach(
        &self,
        network: &NetworkConfig,
        record: &mut PodNetwork,
        pod_dir: &Path,
    ) -> Result<Attached, Error> {
        let netns_path = record.attachment.netns.clone();
        blocking({
            let path = netns_path.clone();
            move || netns::NetNs::create(&path).map(drop).map_err(Error::from)
        })
        .await?;
        let added = chain::add(
            &self.plugins,
            network,
            &record.attachment,
            &record.runtime_config,
        )
        .await?;
        record.result = Some(added.raw);
        state::write_json(&pod_dir.join(CACHE_FILE), &*record)?;
        let guest = blocking({
            let path = netns_path.clone();
            move || inspect::interface(&path, POD_IFNAME).map_err(Error::from)
        })
        .await?;
        if guest.addresses.is_empty() {
            return Err(Error::NoAddress {
                network: network.name.clone(),
            });
        }
        let tap = blocking(move || {
            tap::attach_tap(&netns_path, POD_IFNAME, TAP_NAME).map_err(Error::from)
        })
        .await?;
        Ok(Attached {
            record: record.clone(),
            tap,
            guest,
        })
    }

    /// The cached attachment of a pod, if it has one.
    pub fn cached(pod_dir: &Path) -> Result<Option<PodNetwork>, Error> {
        let path = pod_dir.join(CACHE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(state::read_json(&path)?))
    }

    /// Undoes a pod's network: CNI DEL with what ADD had, tc, namespace,
    /// cache. Idempotent; when DEL fails the cache and namespace stay for
    /// the next try (StopPodSandbox and RemovePodSandbox retry it).
    pub async fn teardown(&self, pod_id: &str, pod_dir: &Path) -> Result<(), Error> {
        let cache_path = pod_dir.join(CACHE_FILE);
        let Some(record) = Network::cached(pod_dir)? else {
            return Ok(());
        };
        let bad_cache = |message: String| Error::BadCache {
            path: cache_path.clone(),
            message,
        };
        let list = serde_json::to_vec(&record.network).map_err(|e| bad_cache(e.to_string()))?;
        let network = NetworkConfig::parse(&cache_path, &list, false)
            .map_err(|e| bad_cache(e.to_string()))?;
        let netns_path = record.attachment.netns.clone();
        if netns_path.exists() {
            let path = netns_path.clone();
            if let Err(e) =
                blocking(move || tap::detach(&path, POD_IFNAME).map_err(Error::from)).await
            {
                tracing::debug!(pod = %pod_id, "{}", crate::error_chain(&e));
            }
        }
        chain::del(
            &self.plugins,
            &network,
            &record.attachment,
            &record.runtime_config,
            record.result.as_ref(),
        )
        .await?;
        blocking(move || netns::remove(&netns_path).map_err(Error::from)).await?;
        if let Err(e) = std::fs::remove_file(&cache_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(pod = %pod_id, "cannot remove {}: {e}", cache_path.display());
            }
        }
        tracing::info!(pod = %pod_id, network = %network.name, "pod network removed");
        Ok(())
    }

    /// Unmounts a pod's namespace whatever its DEL did (the pod is going
    /// away for good).
    pub async fn release_namespace(&self, pod_dir: &Path) {
        let Ok(Some(record)) = Network::cached(pod_dir) else {
            return;
        };
        let path = record.attachment.netns;
        if let Err(e) = blocking(move || netns::remove(&path).map_err(Error::from)).await {
            tracing::warn!("{}", crate::error_chain(&e));
        }
    }

    /// GC for 1.1.0 lists at start: plugins release what belongs to none
    /// of the pods the daemon knows.
    pub async fn collect_garbage(&self, known: &[Attachment]) {
        let Some(Ok(config)) = self.source.as_ref().map(ConfigSource::current) else {
            return;
        };
        if let Err(e) = chain::gc(&self.plugins, &config, known).await {
            tracing::warn!("CNI GC: {e}");
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// The CNI parameters of a pod's attachment (CNI_ARGS as kubelet's
/// runtimes pass them; IgnoreUnknown lets plugins skip what they do not
/// know).
fn attachment(pod_id: &str, netns: &Path, config: &cri::PodSandboxConfig) -> Attachment {
    let metadata = config.metadata.clone().unwrap_or_default();
    Attachment {
        container_id: pod_id.to_string(),
        netns: netns.to_path_buf(),
        ifname: POD_IFNAME.to_string(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), metadata.namespace),
            ("K8S_POD_NAME".into(), metadata.name),
            ("K8S_POD_INFRA_CONTAINER_ID".into(), pod_id.to_string()),
            ("K8S_POD_UID".into(), metadata.uid),
        ],
    }
}

/// `runtimeConfig` by capability: portMappings from the sandbox config,
/// dns from its DNS config, bandwidth from kubelet's annotations.
fn runtime_config(config: &cri::PodSandboxConfig) -> Map<String, Value> {
    let mut runtime = Map::new();
    let mappings: Vec<Value> = config
        .port_mappings
        .iter()
        .filter(|m| m.host_port > 0)
        .map(|m| {
            let protocol = match cri::Protocol::try_from(m.protocol) {
                Ok(cri::Protocol::Udp) => "udp",
                Ok(cri::Protocol::Sctp) => "sctp",
                _ => "tcp",
            };
            let mut mapping = serde_json::json!({
                "hostPort": m.host_port,
                "containerPort": m.container_port,
                "protocol": protocol,
            });
            if !m.host_ip.is_empty() {
                mapping["hostIP"] = Value::String(m.host_ip.clone());
            }
            mapping
        })
        .collect();
    if !mappings.is_empty() {
        runtime.insert("portMappings".into(), Value::Array(mappings));
    }
    if let Some(dns) = &config.dns_config {
        runtime.insert(
            "dns".into(),
            serde_json::json!({
                "servers": dns.servers,
                "searches": dns.searches,
                "options": dns.options,
            }),
        );
    }
    // No CRI field asks for a pod's IPs or MAC: pods (or an admission
    // webhook) ask through annotations, for plugins declaring `ips`/`mac`.
    if let Some(ips) = config.annotations.get(IPS_ANNOTATION) {
        let ips: Vec<Value> = ips
            .split(',')
            .map(str::trim)
            .filter(|ip| !ip.is_empty())
            .map(|ip| Value::String(ip.to_string()))
            .collect();
        runtime.insert("ips".into(), Value::Array(ips));
    }
    if let Some(mac) = config.annotations.get(MAC_ANNOTATION) {
        runtime.insert("mac".into(), Value::String(mac.trim().to_string()));
    }
    let rate = |key: &str| config.annotations.get(key).and_then(|q| quantity_bits(q));
    let ingress = rate("kubernetes.io/ingress-bandwidth");
    let egress = rate("kubernetes.io/egress-bandwidth");
    if ingress.is_some() || egress.is_some() {
        let mut bandwidth = Map::new();
        // No burst limit beyond what tc takes (as containerd sets it).
        for (prefix, rate) in [("ingress", ingress), ("egress", egress)] {
            if let Some(rate) = rate {
                bandwidth.insert(format!("{prefix}Rate"), rate.into());
                bandwidth.insert(format!("{prefix}Burst"), i64::from(i32::MAX).into());
            }
        }
        runtime.insert("bandwidth".into(), Value::Object(bandwidth));
    }
    runtime
}

/// A Kubernetes quantity of bits per second ("10M", "1Gi", "500k").
fn quantity_bits(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let factor: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "u-1".into(),
                namespace: "prod".into(),
                attempt: 0,
            }),
            port_mappings: vec![
                cri::PortMapping {
                    protocol: cri::Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                // No host port: nothing to map.
                cri::PortMapping {
                    container_port: 80,
                    ..Default::default()
                },
            ],
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["prod.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            annotations: [
                (
                    "kubernetes.io/ingress-bandwidth".to_string(),
                    "10M".to_string(),
                ),
                (
                    IPS_ANNOTATION.to_string(),
                    "10.1.0.5/24, fd00::5/64".to_string(),
                ),
                (MAC_ANNOTATION.to_string(), "0a:58:0a:01:00:05".to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn cni_args_name_the_pod() {
        let a = attachment("abc", Path::new("/run/frakti/netns/abc"), &pod());
        assert_eq!(a.container_id, "abc");
        assert_eq!(a.ifname, "eth0");
        let args: Vec<String> = a.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            args,
            [
                "IgnoreUnknown=1",
                "K8S_POD_NAMESPACE=prod",
                "K8S_POD_NAME=web",
                "K8S_POD_INFRA_CONTAINER_ID=abc",
                "K8S_POD_UID=u-1"
            ]
        );
    }

    #[test]
    fn runtime_config_carries_ports_dns_and_bandwidth() {
        let runtime = Value::Object(runtime_config(&pod()));
        assert_eq!(
            runtime["portMappings"],
            serde_json::json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}])
        );
        assert_eq!(runtime["dns"]["servers"][0], "10.96.0.10");
        assert_eq!(runtime["bandwidth"]["ingressRate"], 10_000_000);
        assert!(runtime["bandwidth"].get("egressRate").is_none());
        assert_eq!(
            runtime["ips"],
            serde_json::json!(["10.1.0.5/24", "fd00::5/64"])
        );
        assert_eq!(runtime["mac"], "0a:58:0a:01:00:05");
        assert!(runtime_config(&cri::PodSandboxConfig::default()).is_empty());
    }

    #[test]
    fn quantities_parse_or_are_ignored() {
        assert_eq!(quantity_bits("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bits("500k"), Some(500_000));
        assert_eq!(quantity_bits("12"), Some(12));
        for bad in [
            "",
            "M",
            "1X",
            "-1M",
            "99999999999999999999",
            "18446744073709551615T",
        ] {
            assert_eq!(quantity_bits(bad), None, "{bad}");
        }
    }

    #[test]
    fn pod_ips_put_ipv4_first() {
        let record = PodNetwork {
            network: Value::Null,
            attachment: Attachment::default(),
            runtime_config: Map::new(),
            result: Some(serde_json::json!({"ips": [
                {"address": "fd00::5/64"}, {"address": "10.88.0.5/16"}, {"address": "bogus"}
            ]})),
        };
        assert_eq!(record.ips(), ["10.88.0.5", "fd00::5"]);
    }
}
