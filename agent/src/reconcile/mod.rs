//! Level-triggered reconciliation of the datapath maps with the cluster view.
//!
//! From a view snapshot and what this node has plugged (`LocalState`) we keep the desired
//! content of the maps for this node (`desired`), computed from the change since the last
//! pass (`Basis`) or whole; we read what the maps hold and write only the difference
//! (`apply`). Between reads, every `RESYNC`, a pass diffs against what the last complete
//! pass wrote instead (`apply_since`); a pass that reads also computes the desired content
//! whole. Start-up runs the same code, so a restarted agent changes nothing that is already
//! right and the pinned maps keep forwarding throughout.
//!
//! The [`Reconciler`] is the only writer of the routing and load-balancing maps. The runtime
//! does not write endpoints itself: it registers the interface it plugged and asks for a pass
//! ([`Reconciler::sync`]) that has seen its store change, so no pass can ever work from a
//! list of interfaces older than the endpoint it is about to remove.

mod apply;
mod basis;
mod desired;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use netagent_datapath::Datapath;
use netagent_store::Revision;
use serde::Serialize;
use tokio::sync::watch;

pub use apply::{Changes, apply, apply_since};
pub use basis::{Basis, Whole};
pub use desired::{
    Desired, Subnet, Table, desired, local_endpoint, network_info, remote_endpoint, set_id,
};

use crate::runtime::lock;
use crate::view::ClusterView;

/// Also reconcile this often without a store event: repairs anything changed behind our back.
const RESYNC: Duration = Duration::from_secs(10);
/// How long [`Reconciler::sync`] waits for the view to catch up with a store write.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// What this node's runtime has plugged, as the reconciler sees it. Persistent maps: a pass
/// takes a copy in O(1) and diffs it against the last one in O(changes).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LocalState {
    /// Host-side veth name -> ifindex of every local endpoint's interface.
    pub ifaces: imbl::OrdMap<String, u32>,
    /// Local containers that must not take new connections (exited, being removed), also
    /// before the store has heard of it.
    pub unready: imbl::OrdSet<String>,
}

impl LocalState {
    pub fn with_ifaces<'a>(ifaces: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        Self {
            ifaces: ifaces
                .into_iter()
                .map(|(n, i)| (n.to_string(), i))
                .collect(),
            unready: imbl::OrdSet::new(),
        }
    }
}

/// The outcome of the last pass, for `node inspect`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReconcileStatus {
    /// Store revision of the view the last pass worked from.
    pub revision: Revision,
    pub passes: u64,
    /// RFC 3339, UTC.
    pub last_pass: Option<String>,
    /// What the last pass that changed anything did, errors included.
    pub last_changes: Changes,
    /// Entries that failed in the last pass (empty when the datapath matches the view).
    pub errors: Vec<String>,
    /// Passes whose desired state was computed from the change, and whole ones (start, every
    /// read-back, and changes the step-by-step computation does not take), with the reason
    /// of the last whole one.
    pub from_change: u64,
    pub whole: u64,
    pub last_whole_reason: Option<String>,
    /// How long the last pass took, and all passes together (microseconds).
    pub last_duration_us: u64,
    pub total_duration_us: u64,
}

/// The maps' content as a pass left it: `desired`, written in full, on maps last read back
/// at `read_at`.
struct Written {
    desired: Desired,
    read_at: std::time::Instant,
}

pub struct Reconciler {
    node: String,
    datapath: Arc<Mutex<Datapath>>,
    view: watch::Receiver<Arc<ClusterView>>,
    local: Mutex<LocalState>,
    /// One pass at a time: a pass reads the maps, then writes the difference.
    pass_lock: tokio::sync::Mutex<()>,
    status: Mutex<ReconcileStatus>,
    /// What the last pass wrote, if it wrote all of it: the next pass diffs against it
    /// instead of reading every map back (O(changes) syscalls, not O(entries)), until the
    /// maps were last read `RESYNC` ago.
    written: Mutex<Option<Written>>,
    /// The last pass's desired state and what it came from: the next one is computed from
    /// the change.
    basis: Mutex<Option<Basis>>,
    /// Set once the runtime has re-registered this node's containers after a start: until
    /// then the local state is empty, and a pass would remove every local endpoint.
    adopted: watch::Sender<bool>,
}

impl Reconciler {
    pub fn new(
        node: String,
        datapath: Arc<Mutex<Datapath>>,
        view: watch::Receiver<Arc<ClusterView>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            datapath,
            view,
            local: Mutex::new(LocalState::default()),
            pass_lock: tokio::sync::Mutex::new(()),
            status: Mutex::new(ReconcileStatus::default()),
            written: Mutex::new(None),
            basis: Mutex::new(None),
            adopted: watch::channel(false).0,
        })
    }

    pub fn datapath(&self) -> &Arc<Mutex<Datapath>> {
        &self.datapath
    }

    /// The latest view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// A receiver of view changes.
    pub fn view_receiver(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }

    pub fn register_iface(&self, host_ifname: &str, ifindex: u32) {
        lock(&self.local)
            .ifaces
            .insert(host_ifname.to_string(), ifindex);
    }

    pub fn unregister_iface(&self, host_ifname: &str) {
        lock(&self.local).ifaces.remove(host_ifname);
    }

    /// Whether the veth is registered, i.e. its endpoint is installed as local.
    pub fn has_local_iface(&self, host_ifname: &str) -> bool {
        lock(&self.local).ifaces.contains_key(host_ifname)
    }

    /// Marks a local container as (not) taking new connections.
    pub fn set_ready(&self, container: &str, ready: bool) {
        let mut local = lock(&self.local);
        if ready {
            local.unready.remove(container);
        } else {
            local.unready.insert(container.to_string());
        }
    }

    pub fn mark_adopted(&self) {
        self.adopted.send_replace(true);
    }

    /// Returns once the runtime has taken back this node's containers.
    pub async fn wait_adopted(&self) {
        let mut rx = self.adopted.subscribe();
        let _ = rx.wait_for(|a| *a).await;
    }

    pub fn status(&self) -> ReconcileStatus {
        lock(&self.status).clone()
    }

    /// Waits (bounded) until the view reflects store revision `revision`, then runs a pass:
    /// when it returns, the maps hold everything that revision and the local state say.
    pub async fn sync(&self, revision: Revision) -> Result<Changes, String> {
        let mut rx = self.view.clone();
        match tokio::time::timeout(SYNC_TIMEOUT, rx.wait_for(|v| v.revision >= revision)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err("the cluster view stopped".into()),
            Err(_) => {
                return Err(format!(
                    "the cluster view did not reach store revision {revision} within {SYNC_TIMEOUT:?}"
                ));
            }
        }
        Ok(self.pass().await)
    }

    /// One pass: desired content from the latest view and the local state, difference
    /// written.
    pub async fn pass(&self) -> Changes {
        let _one = self.pass_lock.lock().await;
        let started = std::time::Instant::now();
        let view = self.view.borrow().clone();
        let local = lock(&self.local).clone();
        let earlier = lock(&self.written)
            .take()
            .filter(|w| w.read_at.elapsed() < RESYNC);
        let (want, stepped) = {
            let mut basis = lock(&self.basis);
            let (b, stepped) = match basis.take() {
                // A pass that reads the maps back also computes the desired state whole: a
                // slip in the step-by-step computation lives one RESYNC at most.
                Some(mut b) if earlier.is_some() => {
                    let r = b.advance(view.clone(), local);
                    (b, r)
                }
                Some(_) => (
                    Basis::new(&self.node, view.clone(), local),
                    Err(Whole("the maps are read back")),
                ),
                None => (
                    Basis::new(&self.node, view.clone(), local),
                    Err(Whole("first pass")),
                ),
            };
            let want = b.desired().clone();
            *basis = Some(b);
            (want, stepped)
        };
        let changes = {
            let mut dp = lock(&self.datapath);
            match &earlier {
                Some(w) => apply_since(&mut dp, &want, &w.desired),
                None => apply(&mut dp, &want),
            }
        };
        if changes.failed == 0 {
            let read_at = earlier.map_or_else(std::time::Instant::now, |w| w.read_at);
            *lock(&self.written) = Some(Written {
                desired: want,
                read_at,
            });
        }
        let mut status = lock(&self.status);
        status.revision = view.revision;
        status.passes += 1;
        match stepped {
            Ok(()) => status.from_change += 1,
            Err(Whole(why)) => {
                status.whole += 1;
                status.last_whole_reason = Some(why.to_string());
            }
        }
        status.last_pass = Some(crate::model::now_rfc3339());
        status.errors = changes.errors.clone();
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        status.last_duration_us = took;
        status.total_duration_us = status.total_duration_us.saturating_add(took);
        if !changes.is_empty() {
            status.last_changes = changes.clone();
        }
        drop(status);
        if changes.failed > 0 {
            tracing::warn!(
                revision = view.revision,
                failed = changes.failed,
                first = changes.errors.first().map(String::as_str).unwrap_or(""),
                "datapath reconcile left entries unwritten; will retry"
            );
        }
        if changes.upserted + changes.removed + changes.purged > 0 {
            tracing::info!(
                revision = view.revision,
                upserted = changes.upserted,
                removed = changes.removed,
                purged = changes.purged,
                "datapath reconciled"
            );
        }
        changes
    }

    /// Runs forever: once the runtime has adopted this node's containers, on every view
    /// change (and every `RESYNC`), bring the maps in line.
    pub async fn run(self: Arc<Self>) {
        let mut adopted = self.adopted.subscribe();
        if adopted.wait_for(|a| *a).await.is_err() {
            return;
        }
        let mut rx = self.view.clone();
        // What the last pass worked from, if it wrote everything: a change that leaves the
        // routing inputs and the local state as they were needs no pass (the RESYNC one still
        // comes).
        let mut done: Option<(Arc<ClusterView>, LocalState)> = None;
        let mut resync = false;
        loop {
            let view = rx.borrow_and_update().clone();
            let local = lock(&self.local).clone();
            let unchanged = done
                .as_ref()
                .is_some_and(|(v, l)| v.same_routing(&view) && *l == local);
            if view.revision > 0 && (resync || !unchanged) {
                let changes = self.pass().await;
                done = (changes.failed == 0).then_some((view, local));
            }
            resync = false;
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(RESYNC) => resync = true,
            }
        }
    }
}

/// How often idle established connections are removed from CONNTRACK. The shortest timeout
/// there is the close timeout (10 s by default); a few seconds of overstay cost nothing.
const CT_GC_EVERY: Duration = Duration::from_secs(5);

/// Runs forever: removes established connections that went idle past their timeout (the
/// programs never delete; CT_NEW is an LRU and needs no help).
pub async fn conntrack_gc(datapath: Arc<Mutex<Datapath>>) {
    let mut tick = tokio::time::interval(CT_GC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = netagent_datapath::monotonic_coarse_ns();
        // The walk happens under the lock, like every other map write, on a blocking thread
        // so the runtime keeps serving.
        let dp = datapath.clone();
        let result = tokio::task::spawn_blocking(move || lock(&dp).conntrack_gc(now)).await;
        match result {
            Ok(Ok(stats)) if stats.expired > 0 => tracing::debug!(
                expired = stats.expired,
                live = stats.live,
                new = stats.new,
                "conntrack garbage collected"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "conntrack garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "conntrack garbage collection panicked"),
        }
    }
}
