//! The node's CNI network configuration: the first valid file of the conf
//! dir in lexical order (`.conflist`, `.conf`, `.json`; a single-plugin
//! `.conf` is used as a list of one), as kubelet's runtimes pick it. The
//! dir is watched (inotify): a file added, changed or removed is used for
//! the next pod without a restart, and a file still being written is not
//! read until it is closed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use rscni_types::types::{NetConf, NetConfList};
use rscni_types::version::SpecVersion;
use serde_json::Value;

/// The largest configuration file read (a hostile or broken file could be
/// anything).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no valid CNI network configuration in {dir}{}", skipped_text(.skipped))]
    NoConfig { dir: PathBuf, skipped: Vec<String> },
    #[error("cannot read the CNI conf dir {dir}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
}

fn skipped_text(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!(" (skipped: {})", skipped.join("; "))
    }
}

/// One network configuration as the plugins get it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// The file it came from.
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// CHECK is skipped for this network (`disableCheck`).
    pub disable_check: bool,
    /// Each plugin's configuration as written (its own keys kept).
    pub plugins: Vec<Value>,
}

impl NetworkConfig {
    /// Parses a `.conflist` (or a single-plugin `.conf` when `single`).
    pub fn parse(file: &Path, bytes: &[u8], single: bool) -> Result<NetworkConfig, Error> {
        let invalid = |message: String| Error::Invalid {
            file: file.to_path_buf(),
            message,
        };
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let list = if single {
            let conf: NetConf = serde_json::from_value(value.clone())
                .map_err(|e| invalid(format!("not a CNI network configuration: {e}")))?;
            conf.validate_name().map_err(|e| invalid(e.to_string()))?;
            let mut plugin = value;
            if let Some(object) = plugin.as_object_mut() {
                // The list carries them; each plugin gets them again.
                object.remove("name");
                object.remove("cniVersion");
            }
            NetworkConfig {
                file: file.to_path_buf(),
                name: conf.name,
                cni_version: conf.cni_version,
                disable_check: false,
                plugins: vec![plugin],
            }
        } else {
            let list: NetConfList = serde_json::from_value(value.clone())
                .map_err(|e| invalid(format!("not a CNI network configuration list: {e}")))?;
            let plugins = value
                .get("plugins")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            NetworkConfig {
                file: file.to_path_buf(),
                name: list.name,
                cni_version: list.cni_version,
                disable_check: list.disable_check,
                plugins,
            }
        };
        list.validate().map_err(invalid)?;
        Ok(list)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("the network has no name".into());
        }
        let version: SpecVersion = self
            .cni_version
            .parse()
            .map_err(|e| format!("cniVersion {:?}: {e}", self.cni_version))?;
        if !version.is_supported() || version > SpecVersion::CURRENT {
            return Err(format!(
                // Before 0.3.0 results had another layout (ip4/ip6), which
                // no maintained plugin speaks any more.
                "cniVersion {version} is not supported (0.3.0 to {})",
                SpecVersion::CURRENT
            ));
        }
        if self.plugins.is_empty() {
            return Err("the list has no plugins".into());
        }
        for (i, plugin) in self.plugins.iter().enumerate() {
            let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
            if !valid_plugin_type(kind) {
                return Err(format!(
                    "plugin {i}: \"type\" must name a plugin binary, got {kind:?}"
                ));
            }
        }
        Ok(())
    }

    /// The plugin binary names, in order.
    pub fn plugin_types(&self) -> Vec<&str> {
        self.plugins
            .iter()
            .filter_map(|p| p.get("type").and_then(Value::as_str))
            .collect()
    }

    /// The configuration as one JSON list (cached with a pod: its DEL gets
    /// the configuration its ADD had, whatever the dir holds by then).
    pub fn to_list_json(&self) -> Value {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": self.plugins,
        })
    }
}

/// A plugin type is a file name in the plugin dirs: nothing that walks
/// out of them.
fn valid_plugin_type(kind: &str) -> bool {
    !kind.is_empty() && kind != "." && kind != ".." && !kind.contains('/') && !kind.contains('\0')
}

/// The first valid configuration of `dir` in lexical order; invalid files
/// are skipped (and named in the error when none is valid).
pub fn load_dir(dir: &Path) -> Result<NetworkConfig, Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::ReadDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| config_kind(p).is_some())
        .collect();
    files.sort();
    let mut skipped = Vec::new();
    for file in files {
        match load_file(&file) {
            Ok(config) => return Ok(config),
            Err(e) => {
                tracing::warn!("skipping CNI configuration: {e}");
                skipped.push(e.to_string());
            }
        }
    }
    Err(Error::NoConfig {
        dir: dir.to_path_buf(),
        skipped,
    })
}

/// `Some(single)` for the extensions CNI configurations have.
fn config_kind(path: &Path) -> Option<bool> {
    match path.extension()?.to_str()? {
        "conflist" => Some(false),
        "conf" | "json" => Some(true),
        _ => None,
    }
}

fn load_file(file: &Path) -> Result<NetworkConfig, Error> {
    let invalid = |message: String| Error::Invalid {
        file: file.to_path_buf(),
        message,
    };
    let meta = fs::metadata(file).map_err(|e| invalid(e.to_string()))?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(invalid(format!(
            "{} bytes, more than the {MAX_CONFIG_BYTES} a configuration may have",
            meta.len()
        )));
    }
    let bytes = fs::read(file).map_err(|e| invalid(e.to_string()))?;
    let single = config_kind(file) == Some(true);
    // A `.json`/`.conf` file holding a list is used as one.
    let single = single && !is_list(&bytes);
    NetworkConfig::parse(file, &bytes, single)
}

fn is_list(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes).is_ok_and(|v| v.get("plugins").is_some())
}

/// The conf dir, reloaded when inotify says it changed.
pub struct ConfigSource {
    dir: PathBuf,
    changed: Arc<AtomicBool>,
    current: Mutex<Option<Result<Arc<NetworkConfig>, String>>>,
}

impl ConfigSource {
    /// Watches `dir` (created when missing, as kubelet's runtimes do: the
    /// network add-on writes its file there later).
    pub fn watch(dir: &Path) -> ConfigSource {
        let changed = Arc::new(AtomicBool::new(true));
        if let Err(e) = fs::create_dir_all(dir) {
            tracing::warn!("cannot create the CNI conf dir {}: {e}", dir.display());
        }
        if let Err(e) = spawn_watcher(dir, changed.clone()) {
            // Without inotify the dir is read for every pod.
            tracing::warn!(
                "cannot watch the CNI conf dir {} ({e}): reading it for every pod",
                dir.display()
            );
        }
        ConfigSource {
            dir: dir.to_path_buf(),
            changed,
            current: Mutex::new(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration to use now, or why there is none.
    pub fn current(&self) -> Result<Arc<NetworkConfig>, String> {
        let mut current = crate::lock(&self.current);
        if self.changed.swap(false, Ordering::SeqCst) || current.is_none() {
            let loaded = load_dir(&self.dir).map(Arc::new).map_err(|e| e.to_string());
            match &loaded {
                Ok(config) => tracing::info!(
                    file = %config.file.display(),
                    network = %config.name,
                    plugins = ?config.plugin_types(),
                    "CNI configuration loaded"
                ),
                Err(e) => tracing::warn!("{e}"),
            }
            *current = Some(loaded);
        }
        current.clone().unwrap_or_else(|| Err("not loaded".into()))
    }
}

/// A thread that marks the configuration changed on the events that end a
/// write (close after writing, rename in or out, removal), never on the
/// creation or modification of a file still being written.
fn spawn_watcher(dir: &Path, changed: Arc<AtomicBool>) -> nix::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        dir,
        AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF,
    )?;
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("cni-conf-watch".into())
        .spawn(move || {
            loop {
                match inotify.read_events() {
                    Ok(events) if !events.is_empty() => {
                        changed.store(true, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::warn!("watching {} stopped: {e}", dir.display());
                        // From now on every pod reads the dir.
                        changed.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        })
        .map(drop)
        .map_err(|_| nix::errno::Errno::EAGAIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{
        "cniVersion": "1.0.0", "name": "pods",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }"#;

    #[test]
    fn a_conflist_keeps_each_plugins_keys() {
        let config =
            NetworkConfig::parse(Path::new("a.conflist"), BRIDGE.as_bytes(), false).unwrap();
        assert_eq!(config.name, "pods");
        assert_eq!(config.plugin_types(), ["bridge", "portmap"]);
        assert_eq!(config.plugins[0]["bridge"], "cni0");
        assert_eq!(config.to_list_json()["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn a_single_conf_is_a_list_of_one() {
        let conf = r#"{"cniVersion": "0.4.0", "name": "p2p", "type": "ptp",
                       "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}"#;
        let config = NetworkConfig::parse(Path::new("a.conf"), conf.as_bytes(), true).unwrap();
        assert_eq!(config.plugin_types(), ["ptp"]);
        assert!(config.plugins[0].get("name").is_none());
        assert_eq!(config.cni_version, "0.4.0");
    }

    #[test]
    fn malformed_configurations_are_refused_with_the_reason() {
        let cases: &[(&str, bool, &str)] = &[
            ("", false, "not JSON"),
            ("{", false, "not JSON"),
            ("[]", false, "not a CNI network configuration list"),
            (
                r#"{"name": "x", "cniVersion": "1.0.0"}"#,
                false,
                "no plugins",
            ),
            (
                r#"{"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": "../../bin/sh"}]}"#,
                false,
                "must name a plugin binary",
            ),
            (
                r#"{"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": ""}]}"#,
                false,
                "must name a plugin binary",
            ),
            (
                r#"{"name": "x", "cniVersion": "9.9.9", "plugins": [{"type": "bridge"}]}"#,
                false,
                "cniVersion",
            ),
            (r#"{"name": "x", "cniVersion": "1.0.0"}"#, true, "not a CNI"),
            (
                r#"{"name": "a b", "type": "bridge"}"#,
                true,
                "invalid characters",
            ),
            (r#"{"name": 7, "plugins": 3}"#, false, "not a CNI"),
        ];
        for (text, single, want) in cases {
            let err = NetworkConfig::parse(Path::new("f"), text.as_bytes(), *single)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn the_first_valid_file_in_lexical_order_wins() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no valid CNI network configuration"), "{err}");
        fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        fs::write(dir.path().join("README"), "not a config").unwrap();
        fs::write(
            dir.path().join("20-b.conflist"),
            BRIDGE.replace("pods", "b"),
        )
        .unwrap();
        fs::write(
            dir.path().join("10-a.conflist"),
            BRIDGE.replace("pods", "a"),
        )
        .unwrap();
        assert_eq!(load_dir(dir.path()).unwrap().name, "a");
        fs::remove_file(dir.path().join("10-a.conflist")).unwrap();
        assert_eq!(load_dir(dir.path()).unwrap().name, "b");
        fs::remove_file(dir.path().join("20-b.conflist")).unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("05-broken.conflist: not JSON"), "{err}");
    }

    #[test]
    fn changes_are_seen_without_a_restart_but_not_half_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        let source = ConfigSource::watch(&conf_dir);
        assert!(source.current().is_err());
        fs::write(conf_dir.join("10-a.conflist"), BRIDGE.replace("pods", "a")).unwrap();
        wait_until(|| source.current().is_ok_and(|c| c.name == "a"));
        // Open for writing, half written, not closed: still "a".
        let mut half = fs::File::create(conf_dir.join("05-new.conflist")).unwrap();
        std::io::Write::write_all(&mut half, &BRIDGE.as_bytes()[..40]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(source.current().unwrap().name, "a");
        std::io::Write::write_all(&mut half, &BRIDGE.as_bytes()[40..]).unwrap();
        drop(half);
        wait_until(|| source.current().is_ok_and(|c| c.name == "pods"));
        fs::remove_file(conf_dir.join("05-new.conflist")).unwrap();
        wait_until(|| source.current().is_ok_and(|c| c.name == "a"));
    }

    fn wait_until(mut check: impl FnMut() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the change was not seen in 2 s");
    }
}
