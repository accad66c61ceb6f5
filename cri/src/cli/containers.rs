//! `frakti ps`, `stop`, `rm`, `inspect` and `stats`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_cri::v1 as cri;

use super::resolve::{self, Found};
use super::table::{command_cell, render};
use super::{CLI_LABEL, Clients, Format, ago, container_status, short_id, status_error};

/// Default seconds between the stop signal and SIGKILL, as docker's.
pub const DEFAULT_STOP_TIMEOUT: i64 = 10;

fn state_name(state: i32) -> &'static str {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => "created",
        Ok(cri::ContainerState::ContainerRunning) => "running",
        Ok(cri::ContainerState::ContainerExited) => "exited",
        _ => "unknown",
    }
}

/// The process's arguments, from the OCI spec in the verbose status.
fn command_of(response: &cri::ContainerStatusResponse) -> Vec<String> {
    let Some(info) = response.info.get("info") else {
        return Vec::new();
    };
    let info: serde_json::Value = serde_json::from_str(info).unwrap_or_default();
    info["spec"]["process"]["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect()
}

/// `frakti ps`.
pub async fn ps(
    clients: &mut Clients,
    all: bool,
    quiet: bool,
    pods: bool,
    format: Format,
) -> anyhow::Result<()> {
    if pods {
        return list_pods(clients, quiet, format).await;
    }
    let mut found = resolve::all(clients).await?;
    found.retain(|f| all || f.container.state == cri::ContainerState::ContainerRunning as i32);
    found.sort_by_key(|f| std::cmp::Reverse(f.container.created_at));
    if quiet {
        for f in &found {
            println!("{}", short_id(f.id()));
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for f in &found {
        let response = container_status(clients, f.id(), true).await?;
        let command = command_of(&response);
        let st = response.status.unwrap_or_default();
        let shown_state = match cri::ContainerState::try_from(st.state) {
            Ok(cri::ContainerState::ContainerExited) => {
                format!("exited ({}) {}", st.exit_code, ago(st.finished_at))
            }
            Ok(cri::ContainerState::ContainerRunning) => format!("up since {}", ago(st.started_at)),
            _ => state_name(st.state).to_string(),
        };
        let image = f.container.image.as_ref().map_or("", |i| i.image.as_str());
        let image = st
            .image
            .as_ref()
            .map(|i| i.image.as_str())
            .filter(|i| !i.is_empty())
            .unwrap_or(image);
        rows.push(vec![
            short_id(f.id()).to_string(),
            image.to_string(),
            command_cell(&command, 30),
            ago(f.container.created_at),
            shown_state,
            f.name().to_string(),
        ]);
        json.push(serde_json::json!({
            "id": f.id(), "name": f.name(), "pod": f.container.pod_sandbox_id,
            "image": image, "command": command, "state": state_name(st.state), "exitCode": st.exit_code,
            "createdAt": f.container.created_at, "startedAt": st.started_at,
            "finishedAt": st.finished_at, "labels": f.container.labels,
            "frakti": f.own_pod,
        }));
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Format::Table => print!(
            "{}",
            render(
                &[
                    "CONTAINER ID",
                    "IMAGE",
                    "COMMAND",
                    "CREATED",
                    "STATUS",
                    "NAME"
                ],
                &rows
            )
        ),
    }
    Ok(())
}

async fn list_pods(clients: &mut Clients, quiet: bool, format: Format) -> anyhow::Result<()> {
    let mut pods = clients
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .map_err(status_error)?
        .into_inner()
        .items;
    pods.sort_by_key(|p| std::cmp::Reverse(p.created_at));
    if quiet {
        for pod in &pods {
            println!("{}", short_id(&pod.id));
        }
        return Ok(());
    }
    let state = |p: &cri::PodSandbox| {
        if p.state == cri::PodSandboxState::SandboxReady as i32 {
            "ready"
        } else {
            "notready"
        }
    };
    match format {
        Format::Json => {
            let rows: Vec<_> = pods
                .iter()
                .map(|p| {
                    let m = p.metadata.clone().unwrap_or_default();
                    serde_json::json!({"id": p.id, "name": m.name, "namespace": m.namespace,
                        "uid": m.uid, "state": state(p), "createdAt": p.created_at,
                        "labels": p.labels, "frakti": p.labels.contains_key(CLI_LABEL)})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = pods
                .iter()
                .map(|p| {
                    let m = p.metadata.clone().unwrap_or_default();
                    vec![
                        short_id(&p.id).to_string(),
                        m.name,
                        m.namespace,
                        state(p).to_string(),
                        ago(p.created_at),
                    ]
                })
                .collect();
            print!(
                "{}",
                render(&["POD ID", "NAME", "NAMESPACE", "STATE", "CREATED"], &rows)
            );
        }
    }
    Ok(())
}

/// Stops a container; one of `frakti run` also has its pod (VM) stopped.
pub async fn stop_one(clients: &mut Clients, found: &Found, timeout: i64) -> anyhow::Result<()> {
    clients
        .runtime
        .stop_container(cri::StopContainerRequest {
            container_id: found.id().to_string(),
            timeout,
        })
        .await
        .map_err(status_error)?;
    if found.own_pod {
        clients
            .runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: found.container.pod_sandbox_id.clone(),
            })
            .await
            .map_err(status_error)?;
    }
    Ok(())
}

/// Removes a container (after stopping it); one of `frakti run` goes with
/// its pod, and its `--volume-device`s are unregistered from `root`.
pub async fn remove_one(clients: &mut Clients, found: &Found, root: &Path) -> anyhow::Result<()> {
    if found.own_pod {
        let pod_sandbox_id = found.container.pod_sandbox_id.clone();
        let uid = clients
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod_sandbox_id.clone(),
                verbose: false,
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .status
            .and_then(|s| s.metadata)
            .map(|m| m.uid);
        remove_pod(clients, &pod_sandbox_id).await?;
        if let Some(uid) = uid.filter(|u| !u.is_empty()) {
            super::volumes::unregister(root, &uid);
        }
        return Ok(());
    }
    clients
        .runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: found.id().to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(())
}

/// Stops and removes a pod (its VM and its containers).
pub async fn remove_pod(clients: &mut Clients, pod_id: &str) -> anyhow::Result<()> {
    clients
        .runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        })
        .await
        .map_err(status_error)?;
    clients
        .runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(())
}

/// Runs `each` on every reference; all are tried, the failures reported
/// one line each, and the command fails if any did.
async fn for_each(
    clients: &mut Clients,
    references: &[String],
    mut each: impl AsyncFnMut(&mut Clients, Found) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut failed = 0usize;
    for reference in references {
        let result = match resolve::container(clients, reference).await {
            Ok(found) => each(clients, found).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => println!("{reference}"),
            Err(e) => {
                failed += 1;
                eprintln!("frakti: error: {reference}: {e:#}");
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} failed", references.len());
    Ok(())
}

pub async fn stop(
    clients: &mut Clients,
    references: &[String],
    timeout: i64,
) -> anyhow::Result<()> {
    for_each(clients, references, async |clients, found| {
        stop_one(clients, &found, timeout).await
    })
    .await
}

pub async fn rm(
    clients: &mut Clients,
    references: &[String],
    force: bool,
    root: &Path,
) -> anyhow::Result<()> {
    for_each(clients, references, async |clients, found| {
        let running = found.container.state == cri::ContainerState::ContainerRunning as i32;
        anyhow::ensure!(
            !running || force,
            "container {} is running: stop it first, or rm -f",
            short_id(found.id())
        );
        remove_one(clients, &found, root).await
    })
    .await
}

/// `frakti inspect`: the container's status (verbose) and its pod's, as JSON.
pub async fn inspect(clients: &mut Clients, reference: &str) -> anyhow::Result<()> {
    let found = resolve::container(clients, reference).await?;
    let st = container_status(clients, found.id(), true).await?;
    let pod = clients
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: found.container.pod_sandbox_id.clone(),
            verbose: true,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let parse_info = |info: &HashMap<String, String>| -> serde_json::Value {
        info.iter()
            .map(|(k, v)| {
                let value = serde_json::from_str(v).unwrap_or(serde_json::Value::String(v.clone()));
                (k.clone(), value)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let c = st.status.unwrap_or_default();
    let p = pod.status.unwrap_or_default();
    let out = serde_json::json!({
        "id": c.id,
        "name": found.name(),
        "state": state_name(c.state),
        "createdAt": c.created_at, "startedAt": c.started_at, "finishedAt": c.finished_at,
        "exitCode": c.exit_code, "reason": c.reason, "message": c.message,
        "image": c.image.map(|i| i.image), "imageRef": c.image_ref,
        "logPath": c.log_path,
        "labels": c.labels, "annotations": c.annotations,
        "mounts": c.mounts.iter().map(|m| serde_json::json!({
            "hostPath": m.host_path, "containerPath": m.container_path, "readonly": m.readonly,
        })).collect::<Vec<_>>(),
        "info": parse_info(&st.info),
        "pod": {
            "id": p.id,
            "name": p.metadata.as_ref().map(|m| m.name.clone()),
            "namespace": p.metadata.as_ref().map(|m| m.namespace.clone()),
            "state": if p.state == cri::PodSandboxState::SandboxReady as i32 { "ready" } else { "notready" },
            "ip": p.network.map(|n| n.ip),
            "frakti": found.own_pod,
            "info": parse_info(&pod.info),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `frakti stats`: CPU and memory of the running containers, refreshed
/// every second (or once).
pub async fn stats(clients: &mut Clients, no_stream: bool, format: Format) -> anyhow::Result<()> {
    let mut last: HashMap<String, (u64, Instant)> = HashMap::new();
    let mut first = true;
    loop {
        let names: HashMap<String, String> = resolve::all(clients)
            .await?
            .into_iter()
            .map(|f| (f.id().to_string(), f.name().to_string()))
            .collect();
        let stats = clients
            .runtime
            .list_container_stats(cri::ListContainerStatsRequest::default())
            .await
            .map_err(status_error)?
            .into_inner()
            .stats;
        let now = Instant::now();
        let mut rows = Vec::new();
        let mut json = Vec::new();
        for s in &stats {
            let id = s
                .attributes
                .as_ref()
                .map_or("", |a| a.id.as_str())
                .to_string();
            let cpu = s
                .cpu
                .as_ref()
                .and_then(|c| c.usage_core_nano_seconds.as_ref())
                .map_or(0, |v| v.value);
            let memory = s
                .memory
                .as_ref()
                .and_then(|m| m.working_set_bytes.as_ref())
                .map_or(0, |v| v.value);
            let percent = last.get(&id).and_then(|(before, at)| {
                let elapsed = now.duration_since(*at).as_nanos() as f64;
                (elapsed > 0.0).then(|| cpu.saturating_sub(*before) as f64 / elapsed * 100.0)
            });
            last.insert(id.clone(), (cpu, now));
            let name = names.get(&id).cloned().unwrap_or_default();
            rows.push(vec![
                short_id(&id).to_string(),
                name.clone(),
                percent.map_or("--".to_string(), |p| format!("{p:.1}%")),
                format!("{:.1}MiB", memory as f64 / 1048576.0),
            ]);
            json.push(
                serde_json::json!({"id": id, "name": name, "cpuPercent": percent,
                "cpuNanoseconds": cpu, "memoryWorkingSetBytes": memory}),
            );
        }
        // Without a first sample CPU% is unknown: sample twice, then show.
        if first && !no_stream {
            first = false;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        match format {
            Format::Json => println!("{}", serde_json::to_string(&json).context("json")?),
            Format::Table => {
                if !no_stream {
                    // Clear the screen and go home, as `docker stats` does.
                    print!("\x1b[2J\x1b[H");
                }
                print!(
                    "{}",
                    render(&["CONTAINER ID", "NAME", "CPU %", "MEM USAGE"], &rows)
                );
            }
        }
        if no_stream {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
