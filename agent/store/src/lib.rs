//! Cluster state store: one trait, two backends.
//!
//! The model is etcd's: a flat key space of byte values, a cluster-wide revision that grows by one
//! per committed change, multi-key transactions guarded by mod-revision compares, prefix watches
//! that can resume from any revision, and leases that delete their keys when they expire.
//! `embedded` keeps that model in a local redb file (one node); `etcd` maps it onto a real etcd.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub mod embedded;
pub mod etcd;

/// A store revision. Starts at 1 for an empty store; 0 means "the key does not exist" in compares.
pub type Revision = i64;

/// A lease identifier. Keys put with a lease are deleted when the lease expires or is revoked.
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the change that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last change to the key.
    pub mod_revision: Revision,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A guard of a transaction: the key's current mod revision must equal the given one
/// (0: the key must not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: Revision,
}

impl Compare {
    pub fn absent(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            mod_revision: 0,
        }
    }
    pub fn mod_revision(key: impl Into<String>, rev: Revision) -> Self {
        Self {
            key: key.into(),
            mod_revision: rev,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
    pub fn put_with_lease(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// `mod_revision` is the revision of the deletion.
    Delete {
        key: String,
        mod_revision: Revision,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Events of a watch, in revision order, each exactly once. An `Err` item means the watch cannot
/// continue (for example the requested revision was compacted); the stream ends after it.
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached (etcd down, timeout). Callers may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for a revision the store no longer keeps.
    #[error("revision {requested} was compacted (oldest kept: {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("invalid store address {0:?}: {1}")]
    InvalidAddress(String, String),
    #[error("store error: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Current value of one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// All keys starting with `prefix`, in key order, and the store revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Creates `key` if it does not exist. Returns false (and changes nothing) if it does.
    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool>;

    /// Replaces `key` if its mod revision is still `expected` (0: it must not exist).
    async fn compare_and_swap(&self, key: &str, expected: Revision, value: Vec<u8>)
    -> Result<bool>;

    /// Deletes `key`. Returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Applies all `ops` atomically (one new revision) if every compare holds; else nothing.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool>;

    /// Events for keys under `prefix` with revision >= `from` (from <= current+1), then live
    /// events, each exactly once and in order, also across reconnects of the backend.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;

    /// A new lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Refreshes a lease. `LeaseNotFound` once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Human-readable address, for errors and logs ("embedded:/var/lib/...", "etcd://h:p").
    fn describe(&self) -> String;
}

/// Opens the store named by the agent's `--store` flag: `embedded` (a redb file in `state_dir`)
/// or `etcd://host:port[,host:port...]`.
pub async fn open(spec: &str, state_dir: &std::path::Path) -> Result<std::sync::Arc<dyn Store>> {
    if spec == "embedded" {
        let store = embedded::EmbeddedStore::open(&state_dir.join("store.redb"))?;
        return Ok(std::sync::Arc::new(store));
    }
    if let Some(rest) = spec.strip_prefix("etcd://") {
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| format!("http://{s}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::InvalidAddress(
                spec.to_string(),
                "no endpoints after etcd://".into(),
            ));
        }
        let store = etcd::EtcdStore::connect(spec, endpoints).await?;
        return Ok(std::sync::Arc::new(store));
    }
    Err(StoreError::InvalidAddress(
        spec.to_string(),
        "expected \"embedded\" or \"etcd://host:port[,host:port]\"".into(),
    ))
}
