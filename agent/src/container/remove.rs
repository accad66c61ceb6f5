//! Stopping and removing containers.

use super::*;

impl Containers {
    /// Stops whatever still runs in the container (SIGTERM, then SIGKILL
    /// after `grace`), undoes its mounts and cgroup, and forgets it.
    pub async fn remove(&self, id: &str, grace: Duration) -> Result<(), Error> {
        let container = self.get(id)?;
        self.stop(&container, grace).await?;
        // Created but never started: the helper is gone; drop its socket.
        container.start.lock().await.take();
        let mounts = container.mounts.clone();
        let dir = container.dir.clone();
        let c = container.clone();
        tokio::task::spawn_blocking(move || {
            storage::unmount_all(&mounts);
            let _ = fs::remove_dir_all(&dir);
            c.cgroup.remove()
        })
        .await??;
        self.map().remove(id);
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    pub(super) async fn stop(&self, container: &Container, grace: Duration) -> Result<(), Error> {
        let init = &container.init;
        let started = container.start.lock().await.is_none();
        if init.exited().is_none() && started && !grace.is_zero() {
            let _ = init.signal(libc::SIGTERM);
            let _ = tokio::time::timeout(grace, init.wait()).await;
        }
        // Everything in its cgroup at once (cgroup.kill: a fork bomb too);
        // the init and the execs through their pidfds.
        container.cgroup.kill_all();
        if container.cgroup.path().is_none() {
            self.signal_descendants(container, libc::SIGKILL).await;
        }
        let _ = init.signal(libc::SIGKILL);
        let execs: Vec<_> = container.execs.lock().await.values().cloned().collect();
        for p in &execs {
            let _ = p.signal(libc::SIGKILL);
        }
        let all_dead = async {
            init.wait().await;
            for p in &execs {
                p.wait().await;
            }
        };
        tokio::time::timeout(KILL_TIMEOUT, all_dead)
            .await
            .map_err(|_| Error::Unkillable(container.id.clone()))
    }

    /// Stops and removes every container (guest shutdown).
    pub async fn remove_all(&self, grace: Duration) {
        let list = self.list();
        for c in &list {
            if c.init.exited().is_none() && c.start.lock().await.is_none() {
                let _ = c.init.signal(libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(grace, async {
            for c in &list {
                c.init.wait().await;
            }
        })
        .await;
        for c in list {
            if let Err(e) = self.remove(&c.id, Duration::ZERO).await {
                tracing::warn!(container = %c.id, "cannot remove: {e}");
            }
        }
        let pause = self.pause.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(pause) = pause {
            let _ = pause.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(KILL_TIMEOUT, pause.wait()).await;
        }
    }
}
