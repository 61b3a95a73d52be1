//! The agent's in-memory view of the cluster, kept current by a store watch.
//!
//! Level-triggered consumers (the reconciler, DNS) read the latest snapshot from a
//! `tokio::sync::watch` channel instead of asking the store on every decision.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use netagent_store::{KeyValue, Revision, Store, WatchEvent};
use tokio::sync::watch;

use crate::model::{Container, Endpoint, Network, Node, Service, keys};

mod persist;

pub use persist::{PERSISTED_VIEW, persist};

/// The view's maps are persistent (structurally shared) maps: publishing a new snapshot after an
/// event clones the view in O(1) and the event's insert copies O(log n) nodes. A deep clone of
/// every endpoint, task and container per event made a busy cluster's view fall seconds behind
/// the store. (The consumers still recompute from the whole view per change.)
pub type ViewMap<V> = imbl::OrdMap<String, V>;

/// Every entry that differs between two snapshots of a map: (key, before, after), `None` on
/// the side it is missing from. O(changes) when the two share structure.
pub fn changes<'a, V: Clone + PartialEq>(
    old: &'a ViewMap<V>,
    new: &'a ViewMap<V>,
) -> impl Iterator<Item = (&'a String, Option<&'a V>, Option<&'a V>)> + 'a {
    old.diff(new).map(|item| match item {
        imbl::ordmap::DiffItem::Add(k, v) => (k, None, Some(v)),
        imbl::ordmap::DiffItem::Update {
            old: (k, o),
            new: (_, n),
        } => (k, Some(o), Some(n)),
        imbl::ordmap::DiffItem::Remove(k, v) => (k, Some(v), None),
    })
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterView {
    /// Store revision this view reflects.
    pub revision: Revision,
    pub networks: ViewMap<Network>,
    pub nodes: ViewMap<Node>,
    pub alive: imbl::OrdSet<String>,
    /// Keyed by "<network>/<container>", as under `keys::ENDPOINTS`.
    pub endpoints: ViewMap<Endpoint>,
    pub services: ViewMap<Service>,
    #[serde(default)]
    pub containers: ViewMap<Container>,
    #[serde(default)]
    pub tasks: ViewMap<netagent_orchestrator::Task>,
    #[serde(default)]
    pub task_status: ViewMap<netagent_orchestrator::TaskStatus>,
    /// Revisions the orchestrator fences its writes on: service records, its own per-service
    /// keys, the leader key.
    #[serde(default)]
    pub revisions: ViewMap<Revision>,
    /// The node holding the leader key.
    #[serde(default)]
    pub leader: Option<String>,
    /// Read from the store by this agent (not the copy saved by a previous run).
    #[serde(skip)]
    pub live: bool,
}

/// Keys whose revisions the view keeps (see [`ClusterView::revisions`]).
fn keeps_revision(key: &str) -> bool {
    key.starts_with(keys::SERVICES) || key.starts_with(keys::ORCHESTRATOR) || key == keys::LEADER
}

/// Removes a record; removing one the map does not hold leaves it as it was, shared with
/// earlier snapshots (a persistent map copies its path even to remove nothing, and most
/// deletes name no kept revision: IPAM keys, endpoints).
fn remove_held<V: Clone>(map: &mut ViewMap<V>, key: &str) {
    if map.contains_key(key) {
        map.remove(key);
    }
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue, what: &str) -> Option<T> {
    match serde_json::from_slice(&kv.value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "skipping corrupt {what}");
            None
        }
    }
}

/// Puts a record; one equal to what the map holds leaves the map as it was, shared with
/// earlier snapshots, so consumers that compare by structure see no change (a `container
/// run` rewrites its networks' records unchanged, to fence a concurrent `network rm`).
fn put_decoded<T: serde::de::DeserializeOwned + Clone + PartialEq>(
    map: &mut ViewMap<T>,
    name: &str,
    kv: &KeyValue,
    what: &str,
) {
    if let Some(v) = decode(kv, what)
        && map.get(name) != Some(&v)
    {
        map.insert(name.to_string(), v);
    }
}

impl ClusterView {
    /// Replicas per (service, network) that are ready and whose node is alive, each list in
    /// container-name order. One pass over the endpoints, so callers that walk every service
    /// stay linear.
    pub fn live_replicas(&self) -> BTreeMap<(&str, &str), Vec<&Endpoint>> {
        let mut out: BTreeMap<(&str, &str), Vec<&Endpoint>> = BTreeMap::new();
        for e in self.endpoints.values() {
            if let Some(svc) = e.service.as_deref()
                && e.ready
                && self.alive.contains(&e.node)
            {
                out.entry((svc, e.network.as_str())).or_default().push(e);
            }
        }
        for list in out.values_mut() {
            list.sort_by(|a, b| a.container.cmp(&b.container));
        }
        out
    }

    /// Whether `other` holds the very same networks, nodes, live nodes, endpoints and services
    /// (the inputs of DNS and of the datapath's desired state), by structure: `true` means
    /// equal; `false` means changed, or rebuilt from an equal store listing. O(1): a task's
    /// status or a container's pid changing leaves these maps shared between snapshots.
    pub fn same_routing(&self, other: &ClusterView) -> bool {
        self.networks.ptr_eq(&other.networks)
            && self.nodes.ptr_eq(&other.nodes)
            && self.alive.ptr_eq(&other.alive)
            && self.endpoints.ptr_eq(&other.endpoints)
            && self.services.ptr_eq(&other.services)
    }

    /// Whether `other` holds the very same inputs of the orchestrator's pass (services, their
    /// tasks and statuses, nodes, live nodes, the fencing revisions), by structure like
    /// [`ClusterView::same_routing`]: a container or endpoint change leaves them shared.
    pub fn same_orchestration(&self, other: &ClusterView) -> bool {
        self.services.ptr_eq(&other.services)
            && self.tasks.ptr_eq(&other.tasks)
            && self.task_status.ptr_eq(&other.task_status)
            && self.nodes.ptr_eq(&other.nodes)
            && self.alive.ptr_eq(&other.alive)
            && self.revisions.ptr_eq(&other.revisions)
    }

    /// A container with its endpoints, as this view knows them.
    pub fn container_record(&self, name: &str) -> Option<crate::containers::ContainerRecord> {
        let container = self.containers.get(name)?.clone();
        let endpoints = container
            .networks
            .iter()
            .filter_map(|n| self.endpoints.get(&format!("{n}/{name}")).cloned())
            .collect();
        Some(crate::containers::ContainerRecord {
            container,
            endpoints,
            revision: 0,
        })
    }

    fn from_list(kvs: &[KeyValue], revision: Revision) -> Self {
        let mut view = ClusterView {
            revision,
            live: true,
            ..Default::default()
        };
        for kv in kvs {
            view.put(kv);
        }
        view
    }

    fn put(&mut self, kv: &KeyValue) {
        if keeps_revision(&kv.key) {
            self.revisions.insert(kv.key.clone(), kv.mod_revision);
        }
        let k = kv.key.as_str();
        if let Some(name) = k.strip_prefix(keys::NETWORKS) {
            put_decoded(&mut self.networks, name, kv, "network");
        } else if let Some(name) = k.strip_prefix(keys::NODES) {
            put_decoded(&mut self.nodes, name, kv, "node");
        } else if let Some(name) = k.strip_prefix(keys::ALIVE) {
            if !self.alive.contains(name) {
                self.alive.insert(name.to_string());
            }
        } else if let Some(name) = k.strip_prefix(keys::SERVICES) {
            put_decoded(&mut self.services, name, kv, "service");
        } else if let Some(id) = k.strip_prefix(keys::ENDPOINTS) {
            put_decoded(&mut self.endpoints, id, kv, "endpoint");
        } else if let Some(name) = k.strip_prefix(keys::CONTAINERS) {
            put_decoded(&mut self.containers, name, kv, "container");
        } else if let Some(id) = k.strip_prefix(keys::TASKS) {
            put_decoded(&mut self.tasks, id, kv, "task");
        } else if let Some(id) = k.strip_prefix(keys::TASK_STATUS) {
            put_decoded(&mut self.task_status, id, kv, "task status");
        } else if k == keys::LEADER {
            self.leader = decode::<crate::orchestrator::LeaderRecord>(kv, "leader").map(|l| l.node);
        }
    }

    fn delete(&mut self, key: &str) {
        remove_held(&mut self.revisions, key);
        if let Some(name) = key.strip_prefix(keys::NETWORKS) {
            remove_held(&mut self.networks, name);
        } else if let Some(name) = key.strip_prefix(keys::NODES) {
            remove_held(&mut self.nodes, name);
        } else if let Some(name) = key.strip_prefix(keys::ALIVE) {
            if self.alive.contains(name) {
                self.alive.remove(name);
            }
        } else if let Some(name) = key.strip_prefix(keys::SERVICES) {
            remove_held(&mut self.services, name);
        } else if let Some(id) = key.strip_prefix(keys::ENDPOINTS) {
            remove_held(&mut self.endpoints, id);
        } else if let Some(name) = key.strip_prefix(keys::CONTAINERS) {
            remove_held(&mut self.containers, name);
        } else if let Some(id) = key.strip_prefix(keys::TASKS) {
            remove_held(&mut self.tasks, id);
        } else if let Some(id) = key.strip_prefix(keys::TASK_STATUS) {
            remove_held(&mut self.task_status, id);
        } else if key == keys::LEADER {
            self.leader = None;
        }
    }

    fn apply(&mut self, ev: &WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => self.put(kv),
            WatchEvent::Delete { key, .. } => self.delete(key),
        }
        self.revision = ev.revision();
    }
}

/// Times [`follow`] had to start over (a failed list or watch, a watch that ended): store
/// outages and compactions, for the metrics.
static WATCH_RESTARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn watch_restarts() -> u64 {
    WATCH_RESTARTS.load(std::sync::atomic::Ordering::Relaxed)
}

fn restarted() {
    WATCH_RESTARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Events applied at most before a view is published, so consumers never wait long behind
/// a burst.
const MAX_BATCH: usize = 1024;

/// Follows the store forever: list, then watch from the next revision; on any watch failure
/// (compaction, store outage) start over with a fresh list, so the view never misses a change.
pub async fn follow(store: Arc<dyn Store>, tx: watch::Sender<Arc<ClusterView>>) {
    loop {
        let (kvs, revision) = match store.list(keys::ROOT).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read cluster state; retrying");
                restarted();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut view = ClusterView::from_list(&kvs, revision);
        tx.send_replace(Arc::new(view.clone()));
        let mut events = match store.watch(keys::ROOT, revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch cluster state; retrying");
                restarted();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        'watch: while let Some(mut item) = events.next().await {
            // Every event already received is applied before the view is published: a
            // transaction's or a watch response's events reach consumers as one change.
            for _ in 0..MAX_BATCH {
                match item {
                    Ok(ev) => {
                        tracing::debug!(key = ev.key(), revision = ev.revision(), "store event");
                        view.apply(&ev);
                    }
                    Err(e) => {
                        tx.send_replace(Arc::new(view.clone()));
                        tracing::warn!(error = %e, "store watch ended; re-reading state");
                        break 'watch;
                    }
                }
                match events.next().now_or_never() {
                    Some(Some(next)) => item = next,
                    _ => break,
                }
            }
            tx.send_replace(Arc::new(view.clone()));
        }
        restarted();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use netagent_store::embedded::EmbeddedStore;

    use super::*;
    use crate::model::NetworkCreate;
    use crate::networks;

    #[test]
    fn consumers_tell_their_inputs_changed_by_structure() {
        let v1 = ClusterView::default();
        let mut v2 = v1.clone();
        assert!(v1.same_routing(&v2) && v1.same_orchestration(&v2));
        // A container's endpoint: routing input only (the orchestrator's pass can wait).
        let ep: Endpoint = serde_json::from_value(serde_json::json!({
            "id": "c1", "container": "c1", "network": "front", "ip": "10.1.0.3",
            "mac": "", "node": "n1", "ifname": "eth0", "host_ifname": "",
        }))
        .expect("endpoint");
        v2.endpoints.insert("front/c1".into(), ep);
        assert!(!v1.same_routing(&v2));
        assert!(v1.same_orchestration(&v2));
        // A fencing revision: the orchestrator's input only.
        let mut v3 = v1.clone();
        v3.revisions.insert("/netagent/services/web".into(), 7);
        assert!(v1.same_routing(&v3));
        assert!(!v1.same_orchestration(&v3));
        // A node coming alive: both.
        let mut v4 = v1.clone();
        v4.alive.insert("n1".into());
        assert!(!v1.same_routing(&v4) && !v1.same_orchestration(&v4));
    }

    #[test]
    fn an_unchanged_record_leaves_the_view_shared() {
        let kv = |key: &str, value: &[u8], rev| KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: 2,
            mod_revision: rev,
            lease: None,
        };
        let net = serde_json::json!({
            "name": "front", "id": "x", "driver": "overlay", "vni": 4096,
            "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "encrypted": false,
            "attachable": false, "internal": false, "created": "",
        })
        .to_string();
        let mut v = ClusterView::default();
        v.put(&kv("/netagent/networks/front", net.as_bytes(), 2));
        v.put(&kv("/netagent/alive/n1", b"", 3));
        v.put(&kv("/netagent/orchestrator/web", b"1", 3));
        let before = v.clone();
        v.put(&kv("/netagent/networks/front", net.as_bytes(), 4));
        v.put(&kv("/netagent/alive/n1", b"", 5));
        assert!(v.same_routing(&before));
        // Deleting what the view does not hold (an IPAM key) leaves it shared too.
        v.apply(&WatchEvent::Delete {
            key: "/netagent/ipam/front/10.1.0.9".into(),
            mod_revision: 7,
        });
        assert!(v.same_routing(&before) && v.same_orchestration(&before));
        let changed = net.replace("\"vni\":4096", "\"vni\":4097");
        assert_ne!(changed, net);
        v.put(&kv("/netagent/networks/front", changed.as_bytes(), 6));
        assert!(!v.same_routing(&before));
        assert_eq!(v.networks["front"].vni, 4097);
    }

    #[tokio::test]
    async fn view_follows_creates_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let req = NetworkCreate {
            name: "before".into(),
            subnet: "10.1.0.0/24".into(),
            ..Default::default()
        };
        networks::create(&*s, &req).await.unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(ClusterView::default()));
        let task = tokio::spawn(follow(s.clone(), tx));
        let wait = |rx: &mut watch::Receiver<Arc<ClusterView>>, f: fn(&ClusterView) -> bool| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| f(v)))
                    .await
                    .expect("view did not converge")
                    .map(|_| ())
            }
        };
        wait(&mut rx, |v| v.networks.contains_key("before"))
            .await
            .unwrap();
        let req = NetworkCreate {
            name: "after".into(),
            subnet: "10.2.0.0/24".into(),
            ..Default::default()
        };
        networks::create(&*s, &req).await.unwrap();
        wait(&mut rx, |v| v.networks.contains_key("after"))
            .await
            .unwrap();
        networks::remove(&*s, "before").await.unwrap();
        wait(&mut rx, |v| !v.networks.contains_key("before"))
            .await
            .unwrap();
        task.abort();
    }
}
