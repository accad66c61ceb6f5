//! The daemon crashes (kill -9) and comes back: running pods and
//! containers are found again, exits that happened meanwhile are reported
//! with their codes, logs go on, nothing leaks.

use std::time::Duration;

use anyhow::ensure;
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test("cri::a_restarted_daemon_finds_its_pods", || {
        with_daemon(&[], restart)
    })]
}

async fn restart(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("survivor", &daemon.log_dir())).await?;
    let ticker = create(
        &mut c,
        &pod,
        container_config("ticker", &["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"]),
    )
    .await?;
    start(&mut c, &ticker).await?;
    let quitter = create(&mut c, &pod, container_config("quitter", &["sh", "-c", "sleep 3; exit 42"])).await?;
    start(&mut c, &quitter).await?;
    let log = daemon.log_dir().join("ticker.log");
    wait_for_text(&log, "tick 2\n", Duration::from_secs(30)).await?;

    daemon.kill();
    // The quitter exits while nobody watches.
    tokio::time::sleep(Duration::from_secs(4)).await;
    daemon.spawn().await?;
    let mut c = daemon.runtime().await?;

    let st = pod_status(&mut c, &pod, false).await?.status.map(|s| s.state);
    ensure!(st == Some(cri::PodSandboxState::SandboxReady as i32), "pod state {st:?}");
    let st = status(&mut c, &ticker).await?;
    ensure!(st.state == cri::ContainerState::ContainerRunning as i32, "{st:?}");
    let st = wait_exited(&mut c, &quitter, Duration::from_secs(10)).await?;
    ensure!(st.exit_code == 42, "{st:?}");
    // The log goes on after the restart.
    let before = std::fs::read_to_string(&log)?.lines().count();
    wait_for_text(&log, &format!("tick {}\n", before + 3), Duration::from_secs(30)).await?;
    let out = exec(&mut c, &ticker, &["echo", "still here"], 10).await?;
    ensure!(out.stdout == b"still here\n", "{out:?}");

    c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await?;
    let leaks = daemon.leaks();
    ensure!(leaks.is_empty(), "left behind: {leaks:#?}");
    Ok(())
}
