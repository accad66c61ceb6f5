//! A network configuration list run as libcni runs it: ADD through the
//! plugins in order, each getting the previous one's result as
//! `prevResult`; DEL in reverse order with the cached result; CHECK in
//! order; STATUS and GC (1.1.0 lists). Each plugin's stdin is its own
//! configuration plus the list's `name` and `cniVersion` and the
//! `runtimeConfig` entries of the capabilities it declares.

use rscni_types::version::SpecVersion;
use serde_json::{Map, Value};

use super::config::NetworkConfig;
use super::plugin::{self, AddResult, Attachment, Command, Plugins};

/// One plugin's stdin.
pub fn plugin_stdin(
    config: &NetworkConfig,
    plugin: &Value,
    runtime_config: &Map<String, Value>,
    prev_result: Option<&Value>,
) -> Vec<u8> {
    let mut conf = plugin.as_object().cloned().unwrap_or_default();
    conf.insert("name".into(), Value::String(config.name.clone()));
    conf.insert(
        "cniVersion".into(),
        Value::String(config.cni_version.clone()),
    );
    let wanted: Map<String, Value> = plugin
        .get("capabilities")
        .and_then(Value::as_object)
        .map(|caps| {
            caps.iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .filter_map(|(cap, _)| Some((cap.clone(), runtime_config.get(cap)?.clone())))
                .collect()
        })
        .unwrap_or_default();
    if !wanted.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(wanted));
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    // Serializing a map of JSON values cannot fail.
    serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
}

fn plugin_type(plugin: &Value) -> &str {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// ADD through the list; the last plugin's result. On failure the caller
/// runs [`del`] (plugins' DEL is idempotent), as kubelet's runtimes do.
pub async fn add(
    plugins: &Plugins,
    config: &NetworkConfig,
    attachment: &Attachment,
    runtime_config: &Map<String, Value>,
) -> Result<AddResult, plugin::Error> {
    let mut prev: Option<AddResult> = None;
    for conf in &config.plugins {
        let kind = plugin_type(conf);
        let stdin = plugin_stdin(config, conf, runtime_config, prev.as_ref().map(|p| &p.raw));
        let out = plugins
            .exec(kind, Command::Add, Some(attachment), &stdin)
            .await?;
        prev = Some(plugin::parse_result(kind, &out)?);
    }
    prev.ok_or_else(|| plugin::Error::InvalidResult {
        plugin: config.name.clone(),
        command: Command::Add.as_str(),
        message: "the list has no plugins".into(),
    })
}

/// DEL through the list in reverse order. Every plugin runs even when one
/// fails (so each releases what it holds); the first failure is returned.
pub async fn del(
    plugins: &Plugins,
    config: &NetworkConfig,
    attachment: &Attachment,
    runtime_config: &Map<String, Value>,
    cached_result: Option<&Value>,
) -> Result<(), plugin::Error> {
    let mut first_error = None;
    for conf in config.plugins.iter().rev() {
        let stdin = plugin_stdin(config, conf, runtime_config, cached_result);
        if let Err(e) = plugins
            .exec(plugin_type(conf), Command::Del, Some(attachment), &stdin)
            .await
        {
            tracing::warn!(container = %attachment.container_id, "{e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn version(config: &NetworkConfig) -> Option<SpecVersion> {
    config.cni_version.parse().ok()
}

/// CHECK through the list (lists of 0.4.0 and later that allow it).
pub async fn check(
    plugins: &Plugins,
    config: &NetworkConfig,
    attachment: &Attachment,
    runtime_config: &Map<String, Value>,
    cached_result: &Value,
) -> Result<(), plugin::Error> {
    let has_check = version(config).is_some_and(|v| v >= SpecVersion::new(0, 4, 0));
    if config.disable_check || !has_check {
        return Ok(());
    }
    for conf in &config.plugins {
        let stdin = plugin_stdin(config, conf, runtime_config, Some(cached_result));
        plugins
            .exec(plugin_type(conf), Command::Check, Some(attachment), &stdin)
            .await?;
    }
    Ok(())
}

/// Whether STATUS and GC exist for this list (1.1.0).
fn has_status_and_gc(config: &NetworkConfig) -> bool {
    version(config).is_some_and(|v| v >= SpecVersion::new(1, 1, 0))
}

/// STATUS of every plugin (1.1.0 lists): whether the network can take pods.
pub async fn status(plugins: &Plugins, config: &NetworkConfig) -> Result<(), plugin::Error> {
    if !has_status_and_gc(config) {
        return Ok(());
    }
    let empty = Map::new();
    for conf in &config.plugins {
        let stdin = plugin_stdin(config, conf, &empty, None);
        plugins
            .exec(plugin_type(conf), Command::Status, None, &stdin)
            .await?;
    }
    Ok(())
}

/// GC (1.1.0 lists): plugins release what belongs to no attachment in
/// `valid` (what a crash between ADD and our cache left behind).
pub async fn gc(
    plugins: &Plugins,
    config: &NetworkConfig,
    valid: &[Attachment],
) -> Result<(), plugin::Error> {
    if !has_status_and_gc(config) {
        return Ok(());
    }
    let attachments: Vec<Value> = valid
        .iter()
        .map(|a| serde_json::json!({"containerID": a.container_id, "ifname": a.ifname}))
        .collect();
    let mut first_error = None;
    for conf in &config.plugins {
        let mut conf = conf.clone();
        if let Some(object) = conf.as_object_mut() {
            object.insert(
                "cni.dev/valid-attachments".into(),
                Value::Array(attachments.clone()),
            );
        }
        let stdin = plugin_stdin(config, &conf, &Map::new(), None);
        if let Err(e) = plugins
            .exec(plugin_type(&conf), Command::Gc, None, &stdin)
            .await
        {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

    fn list(plugins: &str, version: &str) -> NetworkConfig {
        let text = format!(r#"{{"cniVersion":"{version}","name":"net","plugins":{plugins}}}"#);
        NetworkConfig::parse(Path::new("t.conflist"), text.as_bytes(), false).unwrap()
    }

    #[test]
    fn runtime_config_goes_only_to_plugins_that_declare_the_capability() {
        let config = list(
            r#"[{"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true,"bandwidth":false}}]"#,
            "1.0.0",
        );
        let runtime: Map<String, Value> = serde_json::from_str(
            r#"{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}],"bandwidth":{"ingressRate":1}}"#,
        )
        .unwrap();
        let prev = serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]});
        let bridge: Value =
            serde_json::from_slice(&plugin_stdin(&config, &config.plugins[0], &runtime, None))
                .unwrap();
        assert_eq!(bridge["name"], "net");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert_eq!(bridge["bridge"], "cni0");
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        let portmap: Value = serde_json::from_slice(&plugin_stdin(
            &config,
            &config.plugins[1],
            &runtime,
            Some(&prev),
        ))
        .unwrap();
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert!(portmap["runtimeConfig"].get("bandwidth").is_none());
        assert_eq!(portmap["prevResult"], prev);
    }

    /// A fake plugin dir: each plugin records its command and stdin and
    /// answers with a result naming itself.
    fn recording_plugins(dir: &Path, names: &[&str]) -> Plugins {
        for name in names {
            let path = dir.join(name);
            let body = format!(
                "#!/bin/sh\nin=$(cat)\necho \"$CNI_COMMAND {name} $in\" >> {log}\n\
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.0.0.2/24\"}}],\"dns\":{{\"search\":[\"{name}\"]}}}}'\n\
                 [ -e {dir}/fail-$CNI_COMMAND-{name} ] && exit 1\nexit 0\n",
                log = dir.join("log").display(),
                dir = dir.display()
            );
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Plugins {
            dirs: vec![dir.to_path_buf()],
            timeout: Duration::from_secs(5),
        }
    }

    fn log(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn add_chains_results_and_del_runs_in_reverse_with_the_cached_result() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = recording_plugins(dir.path(), &["first", "second"]);
        let config = list(r#"[{"type":"first"},{"type":"second"}]"#, "1.0.0");
        let attachment = Attachment::default();
        let added = add(&plugins, &config, &attachment, &Map::new())
            .await
            .unwrap();
        assert_eq!(added.raw["dns"]["search"][0], "second");
        let lines = log(dir.path());
        assert!(lines[0].starts_with("ADD first {"), "{lines:?}");
        assert!(!lines[0].contains("prevResult"), "{lines:?}");
        assert!(lines[1].contains("\"prevResult\":{"), "{lines:?}");
        assert!(lines[1].contains("\"search\":[\"first\"]"), "{lines:?}");

        std::fs::write(dir.path().join("fail-DEL-second"), "").unwrap();
        let err = del(
            &plugins,
            &config,
            &attachment,
            &Map::new(),
            Some(&added.raw),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("second (DEL) failed"), "{err}");
        let lines = log(dir.path());
        // The failure of the first to run did not stop the second.
        assert!(lines[2].starts_with("DEL second"), "{lines:?}");
        assert!(lines[3].starts_with("DEL first"), "{lines:?}");
        assert!(lines[3].contains("\"search\":[\"second\"]"), "{lines:?}");
    }

    #[tokio::test]
    async fn check_status_and_gc_follow_the_lists_version() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = recording_plugins(dir.path(), &["p"]);
        let attachment = Attachment::default();
        let prev = serde_json::json!({});
        let old = list(r#"[{"type":"p"}]"#, "0.3.1");
        check(&plugins, &old, &attachment, &Map::new(), &prev)
            .await
            .unwrap();
        status(&plugins, &old).await.unwrap();
        gc(&plugins, &old, &[]).await.unwrap();
        assert!(log(dir.path()).is_empty());
        let new = list(r#"[{"type":"p"}]"#, "1.1.0");
        let valid = [Attachment {
            container_id: "pod1".into(),
            ifname: "eth0".into(),
            ..Default::default()
        }];
        check(&plugins, &new, &attachment, &Map::new(), &prev)
            .await
            .unwrap();
        status(&plugins, &new).await.unwrap();
        gc(&plugins, &new, &valid).await.unwrap();
        let lines = log(dir.path());
        assert!(lines[0].starts_with("CHECK p"), "{lines:?}");
        assert!(lines[1].starts_with("STATUS p"), "{lines:?}");
        assert!(
            lines[2].contains(
                r#""cni.dev/valid-attachments":[{"containerID":"pod1","ifname":"eth0"}]"#
            ),
            "{lines:?}"
        );
        std::fs::write(dir.path().join("fail-STATUS-p"), "").unwrap();
        assert!(status(&plugins, &new).await.is_err());
    }
}
