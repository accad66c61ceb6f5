//! Finding a container by what a user types: its full id, its name, or a
//! unique prefix of its id, as docker does (in that order).

use k8s_cri::v1 as cri;

use super::{CLI_LABEL, Clients, status_error};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no such container: {0}")]
    NotFound(String),
    #[error("'{reference}' names {count} containers ({}): use an id", .ids.join(", "))]
    Ambiguous {
        reference: String,
        count: usize,
        ids: Vec<String>,
    },
    #[error("an empty container reference")]
    Empty,
}

/// The index of the container `reference` designates among `(id, name)`.
pub fn pick(containers: &[(&str, &str)], reference: &str) -> Result<usize, ResolveError> {
    if reference.is_empty() {
        return Err(ResolveError::Empty);
    }
    if let Some(i) = containers.iter().position(|(id, _)| *id == reference) {
        return Ok(i);
    }
    let by_name: Vec<usize> = (0..containers.len())
        .filter(|&i| containers[i].1 == reference)
        .collect();
    let by_prefix: Vec<usize> = (0..containers.len())
        .filter(|&i| containers[i].0.starts_with(reference))
        .collect();
    let candidates = if by_name.is_empty() {
        by_prefix
    } else {
        by_name
    };
    match candidates.as_slice() {
        [] => Err(ResolveError::NotFound(reference.to_string())),
        [one] => Ok(*one),
        many => Err(ResolveError::Ambiguous {
            reference: reference.to_string(),
            count: many.len(),
            ids: many
                .iter()
                .map(|&i| super::short_id(containers[i].0).to_string())
                .collect(),
        }),
    }
}

/// A container as the CLI acts on it.
#[derive(Debug, Clone)]
pub struct Found {
    pub container: cri::Container,
    /// Its pod was made by `frakti run`: the pod goes with the container.
    pub own_pod: bool,
}

impl Found {
    pub fn id(&self) -> &str {
        &self.container.id
    }

    pub fn name(&self) -> &str {
        self.container
            .metadata
            .as_ref()
            .map_or("", |m| m.name.as_str())
    }
}

/// Every container, with whether its pod is the CLI's.
pub async fn all(clients: &mut Clients) -> anyhow::Result<Vec<Found>> {
    let containers = clients
        .runtime
        .list_containers(cri::ListContainersRequest::default())
        .await
        .map_err(status_error)?
        .into_inner()
        .containers;
    let pods = clients
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await
        .map_err(status_error)?
        .into_inner()
        .items;
    let own = |pod_id: &str| {
        pods.iter()
            .any(|p| p.id == pod_id && p.labels.contains_key(CLI_LABEL))
    };
    Ok(containers
        .into_iter()
        .map(|c| Found {
            own_pod: own(&c.pod_sandbox_id),
            container: c,
        })
        .collect())
}

/// The container `reference` designates.
pub async fn container(clients: &mut Clients, reference: &str) -> anyhow::Result<Found> {
    let mut all = all(clients).await?;
    let keys: Vec<(&str, &str)> = all.iter().map(|f| (f.id(), f.name())).collect();
    let index = pick(&keys, reference)?;
    Ok(all.swap_remove(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &[(&str, &str)] = &[
        ("abc123", "web"),
        ("abd456", "db"),
        ("fff000", "abc"),
        ("eee111", "twin"),
        ("eee222", "twin"),
    ];

    #[test]
    fn ids_names_and_prefixes_resolve_in_dockers_order() {
        assert_eq!(pick(LIST, "abc123"), Ok(0));
        assert_eq!(pick(LIST, "web"), Ok(0));
        // A name wins over an id prefix.
        assert_eq!(pick(LIST, "abc"), Ok(2));
        assert_eq!(pick(LIST, "abd"), Ok(1));
        assert_eq!(pick(LIST, "f"), Ok(2));
    }

    #[test]
    fn unknown_ambiguous_and_empty_references_are_errors() {
        assert_eq!(pick(LIST, "zzz"), Err(ResolveError::NotFound("zzz".into())));
        let err = pick(LIST, "ab").unwrap_err();
        assert_eq!(
            err.to_string(),
            "'ab' names 2 containers (abc123, abd456): use an id"
        );
        assert!(matches!(
            pick(LIST, "twin"),
            Err(ResolveError::Ambiguous { count: 2, .. })
        ));
        assert_eq!(pick(LIST, ""), Err(ResolveError::Empty));
        assert_eq!(pick(&[], "x"), Err(ResolveError::NotFound("x".into())));
    }
}
