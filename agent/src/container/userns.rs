//! The pod's user namespace: made with the first container that asks for
//! one and held by descriptor for the pod's life; every later container
//! must ask for the same mappings (a pod has one user namespace, as
//! Kubernetes defines it).

use super::*;
use crate::idmap::IdMap;

/// The pod's user namespace and its mappings.
pub struct PodUserns {
    pub map: IdMap,
    pub fd: OwnedFd,
}

impl Containers {
    /// The pod's user namespace with `map`, made now if there is none yet.
    /// Called with the create lock held.
    pub(super) async fn pod_userns(&self, map: &IdMap) -> Result<Arc<PodUserns>, Error> {
        let existing = self
            .userns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(userns) = existing {
            if userns.map != *map {
                return Err(Error::Invalid(format!(
                    "a pod has one user namespace: this container's mappings \
                     (uids {:?}, gids {:?}) differ from the pod's (uids {:?}, gids {:?})",
                    map.uids, map.gids, userns.map.uids, userns.map.gids
                )));
            }
            return Ok(userns);
        }
        let userns = Arc::new(PodUserns {
            map: map.clone(),
            fd: self.make_userns(map).await?,
        });
        *self.userns.lock().unwrap_or_else(|e| e.into_inner()) = Some(userns.clone());
        tracing::info!(uids = %map.uid_map_text().trim(), gids = %map.gid_map_text().trim(),
            "pod user namespace created");
        Ok(userns)
    }

    /// A new user namespace with `map`: a helper is cloned into it and
    /// waits for a frame while the agent writes its uid_map and gid_map
    /// (as guest root, so any guest ids may be mapped) and opens it; then
    /// the helper is told nothing and exits.
    async fn make_userns(&self, map: &IdMap) -> Result<OwnedFd, Error> {
        let (ours, theirs) = UnixStream::pair().map_err(Error::Helper)?;
        let spawned = self
            .spawn(SpawnSpec {
                new_namespaces: CloneFlags::CLONE_NEWUSER,
                join: vec![],
                child_fds: vec![dev_null()?, dev_null()?, dev_null()?, theirs.into()],
            })
            .await?;
        let pid = spawned.pid;
        let map = map.clone();
        let opened = tokio::task::spawn_blocking(move || -> Result<OwnedFd, Error> {
            let write = |file: &str, text: String| {
                fs::write(format!("/proc/{pid}/{file}"), text).map_err(|e| {
                    Error::Setup(format!("cannot write the user namespace's {file}: {e}"))
                })
            };
            write("uid_map", map.uid_map_text())?;
            write("gid_map", map.gid_map_text())?;
            fs::File::open(format!("/proc/{pid}/ns/user"))
                .map(OwnedFd::from)
                .map_err(|source| Error::Namespaces { pid, source })
        })
        .await;
        // Its end of file tells the helper to exit; the kill makes sure.
        drop(ours);
        let _ = process::signal_pidfd(&spawned.pidfd, pid, libc::SIGKILL);
        let _ = tokio::time::timeout(KILL_TIMEOUT, process::wait_exit(&spawned.exit)).await;
        opened?
    }
}

/// The container's id mappings when its spec asks for a user namespace.
pub(super) fn spec_userns(spec: &Spec) -> Result<Option<IdMap>, Error> {
    let linux = spec.linux().clone().unwrap_or_default();
    let mut wants = false;
    for ns in linux.namespaces().iter().flatten() {
        if ns.typ() == LinuxNamespaceType::User {
            if ns.path().is_some() {
                return Err(Error::Invalid(
                    "joining a user namespace by path is not supported: the pod's user \
                     namespace is made from linux.uidMappings/gidMappings"
                        .into(),
                ));
            }
            wants = true;
        }
    }
    IdMap::from_spec(&linux, wants).map_err(Error::from)
}
