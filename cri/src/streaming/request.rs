//! Streaming requests as the CRI Exec/Attach/PortForward RPCs validated
//! them, kept under one-time tokens until the client connects.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// How long a token stays valid (kubelet's default, as containerd's).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Requests waiting at once: a client asking for URLs it never uses
/// cannot grow the cache without bound.
pub const MAX_PENDING: usize = 1000;

/// An exec (a new process) or an attach (the container's own process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRequest {
    pub container_id: String,
    /// The command of an exec; empty for an attach.
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl ProcessRequest {
    pub fn is_attach(&self) -> bool {
        self.cmd.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    Exec(ProcessRequest),
    Attach(ProcessRequest),
    /// Ports named in the request (a client may still name others).
    PortForward {
        pod_id: String,
        ports: Vec<u16>,
    },
}

impl StreamRequest {
    /// The URL path segment that serves it.
    pub fn kind(&self) -> &'static str {
        match self {
            StreamRequest::Exec(_) => "exec",
            StreamRequest::Attach(_) => "attach",
            StreamRequest::PortForward { .. } => "portforward",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("too many streaming requests are waiting ({MAX_PENDING}); try again later")]
    Full,
    #[error("cannot make a token: {0}")]
    Random(String),
}

/// One-time tokens: `take` hands a request out once, before it expires.
#[derive(Debug, Default)]
pub struct RequestCache {
    pending: Mutex<HashMap<String, (Instant, StreamRequest)>>,
}

impl RequestCache {
    /// Stores `request` and returns its token (32 random bytes, URL-safe
    /// base64 without padding).
    pub fn insert(&self, request: StreamRequest) -> Result<String, CacheError> {
        let mut pending = lock(&self.pending);
        let now = Instant::now();
        pending.retain(|_, (expires, _)| *expires > now);
        if pending.len() >= MAX_PENDING {
            return Err(CacheError::Full);
        }
        let token = new_token()?;
        pending.insert(token.clone(), (now + TOKEN_TTL, request));
        Ok(token)
    }

    /// The request behind `token`, once: unknown, used and expired tokens
    /// give `None`.
    pub fn take(&self, token: &str) -> Option<StreamRequest> {
        let (expires, request) = lock(&self.pending).remove(token)?;
        (expires > Instant::now()).then_some(request)
    }
}

fn new_token() -> Result<String, CacheError> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    crate::fill_random(&mut bytes).map_err(|e| CacheError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> StreamRequest {
        StreamRequest::Exec(ProcessRequest {
            container_id: "c".into(),
            cmd: vec!["sh".into()],
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
    }

    #[test]
    fn tokens_are_one_time_and_unique() {
        let cache = RequestCache::default();
        let a = cache.insert(exec()).unwrap();
        let b = cache.insert(exec()).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(cache.take(&a), Some(exec()));
        assert_eq!(cache.take(&a), None);
        assert_eq!(cache.take("unknown"), None);
        assert_eq!(cache.take(&b), Some(exec()));
    }

    #[test]
    fn expired_tokens_are_refused_and_the_cache_is_bounded() {
        let cache = RequestCache::default();
        let token = cache.insert(exec()).unwrap();
        {
            let mut pending = lock(&cache.pending);
            let entry = pending.get_mut(&token).unwrap();
            entry.0 = Instant::now() - Duration::from_secs(1);
        }
        assert_eq!(cache.take(&token), None);
        for _ in 0..MAX_PENDING {
            cache.insert(exec()).unwrap();
        }
        assert_eq!(cache.insert(exec()), Err(CacheError::Full));
    }
}
