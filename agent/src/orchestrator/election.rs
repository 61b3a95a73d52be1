//! One leader at a time: the agent holding `keys::LEADER` under its lease. The key's mod
//! revision is the leader's fencing token: every orchestrator write compares it, so a deposed
//! leader (whose lease ran out while it was cut off) can no longer write anything.

use std::sync::Arc;
use std::time::Duration;

use netagent_store::{Compare, LeaseId, Op, Revision, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::keys;
use crate::view::ClusterView;

/// The leader key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub node: String,
    pub since: String,
}

/// Held leadership: write with `revision` as the fence; ends when `lost` turns true.
pub struct Term {
    pub lease: LeaseId,
    pub revision: Revision,
    pub lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Term {
    /// Gives leadership up at once (a graceful stop), so another agent takes over without
    /// waiting for the lease to run out.
    pub async fn resign(self, store: &dyn Store) {
        self.keeper.abort();
        if let Err(e) = store.revoke_lease(self.lease).await {
            tracing::warn!(error = %e, "could not resign leadership; it lapses with the lease");
        }
    }
}

/// Tries once to become leader: when no one is, or the record is this node's own (left by its
/// previous run). `Ok(None)`: someone else leads.
pub async fn campaign(
    store: &Arc<dyn Store>,
    node: &str,
    ttl: Duration,
    view: &ClusterView,
) -> Result<Option<Term>, StoreError> {
    let compare = match (&view.leader, view.revisions.get(keys::LEADER)) {
        (None, _) => Compare::absent(keys::LEADER),
        (Some(n), Some(&rev)) if n == node => Compare::mod_revision(keys::LEADER, rev),
        _ => return Ok(None),
    };
    let lease = store.grant_lease(ttl).await?;
    let record = LeaderRecord {
        node: node.to_string(),
        since: crate::model::now_rfc3339(),
    };
    let value = serde_json::to_vec(&record).unwrap_or_default();
    if !store
        .txn(
            vec![compare],
            vec![Op::put_with_lease(keys::LEADER, value, lease)],
        )
        .await?
    {
        let _ = store.revoke_lease(lease).await;
        return Ok(None);
    }
    let Some(kv) = store.get(keys::LEADER).await? else {
        return Ok(None);
    };
    let (lost_tx, lost) = watch::channel(false);
    let keeper = tokio::spawn(keep(store.clone(), lease, ttl, lost_tx));
    tracing::info!(node, revision = kv.mod_revision, "this agent is the leader");
    Ok(Some(Term {
        lease,
        revision: kv.mod_revision,
        lost,
        keeper,
    }))
}

/// Refreshes the lease three times per TTL; gives up (and says so) when it has expired or
/// could not be refreshed for a whole TTL, after which someone else may lead.
async fn keep(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration, lost: watch::Sender<bool>) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match store.keep_alive(lease).await {
            Ok(()) => last_ok = tokio::time::Instant::now(),
            Err(StoreError::LeaseNotFound(_)) => break,
            Err(e) => {
                tracing::warn!(error = %e, "leader lease refresh failed");
                if last_ok.elapsed() >= ttl {
                    break;
                }
            }
        }
    }
    tracing::warn!("leadership lost");
    lost.send_replace(true);
}
