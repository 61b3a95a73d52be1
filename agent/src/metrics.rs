//! `--metrics-addr`: Prometheus metrics at `/metrics` and a health check at `/healthz`, on a
//! TCP address of the node's own (off by default; the API socket stays the only way to change
//! anything).
//!
//! Every scrape reads the sources afresh (the datapath's per-CPU counters and conntrack
//! tables, the reconciler's status, the view, the tunnels, /proc) into a registry of its own:
//! nothing is cached between scrapes, so a value is never staler than the scrape. Names are
//! stable; counters come from monotonic sources (kernel counters survive agent restarts, so a
//! restart does not reset them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use netagent_datapath::map_names;
use netagent_store::Store;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::runtime::{Runtime, lock};
use crate::tunnels::Tunnels;
use crate::view::ClusterView;

/// How long `/healthz` waits for the store before calling it down.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the endpoints read.
#[derive(Clone)]
pub struct Sources {
    pub store: Arc<dyn Store>,
    pub runtime: Arc<Runtime>,
    pub view: watch::Receiver<Arc<ClusterView>>,
    pub tunnels: Arc<std::sync::OnceLock<Arc<Tunnels>>>,
    /// Capacity of the established and the new-connection conntrack tables.
    pub ct_capacity: (u32, u32),
    pub dns: Arc<crate::dns::Dns>,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Serves until `stop` turns true. Binding fails at once (a taken port is an error at start,
/// not a silent lack of metrics).
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(%addr, "metrics and health at /metrics, /healthz");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(sources);
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    }))
}

/// The health of each part, `None` when fine, else why not.
struct Health {
    store: Option<String>,
    datapath: Option<String>,
    /// The store's revision at the probe, when it answered.
    store_revision: Option<i64>,
}

impl Health {
    async fn probe(src: &Sources) -> Health {
        // A list of a key that never exists: as cheap as a get, and it says the revision.
        let (store, store_revision) = match tokio::time::timeout(
            STORE_PROBE_TIMEOUT,
            src.store.list("/netagent/healthz-probe/"),
        )
        .await
        {
            Ok(Ok((_, revision))) => (None, Some(revision)),
            Ok(Err(e)) => (Some(format!("store: {e}")), None),
            Err(_) => (
                Some(format!("store: no answer within {STORE_PROBE_TIMEOUT:?}")),
                None,
            ),
        };
        let reconciler = &src.runtime.reconciler;
        let errors = reconciler.status().errors;
        let readable = lock(reconciler.datapath()).drop_counters().err();
        let datapath = match (readable, errors.first()) {
            (Some(e), _) => Some(format!("datapath: maps unreadable: {e}")),
            (None, Some(first)) => Some(format!(
                "datapath: {} entries the kernel refused, first: {first}",
                errors.len()
            )),
            (None, None) => None,
        };
        Health {
            store,
            datapath,
            store_revision,
        }
    }

    fn ok(&self) -> bool {
        self.store.is_none() && self.datapath.is_none()
    }
}

async fn healthz(State(src): State<Sources>) -> impl IntoResponse {
    let h = Health::probe(&src).await;
    if h.ok() {
        return (StatusCode::OK, "ok\n".to_owned());
    }
    let why: Vec<String> = [h.store, h.datapath].into_iter().flatten().collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{}\n", why.join("\n")),
    )
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics to a client that asks for it (Prometheus does), the classic text format to
/// everyone else (curl, promtool).
async fn metrics(State(src): State<Sources>, headers: HeaderMap) -> impl IntoResponse {
    let health = Health::probe(&src).await;
    let registry = collect(&src, &health);
    let mut body = String::new();
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    match encode(&mut body, &registry) {
        Ok(()) if openmetrics => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body),
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            to_prometheus_text(&body),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics: {e}\n"),
        ),
    }
}

/// One scrape's registry.
fn collect(src: &Sources, health: &Health) -> Registry {
    let mut reg = Registry::default();
    datapath_metrics(&mut reg, src);
    control_metrics(&mut reg, src, health);
    tunnel_metrics(&mut reg, src);
    dns_metrics(&mut reg, src);
    process_metrics(&mut reg);
    reg
}

fn datapath_metrics(reg: &mut Registry, src: &Sources) {
    let drops = Family::<Labels, Counter>::default();
    let by_hook = Family::<Labels, Counter>::default();
    let ct = Family::<Labels, Gauge>::default();
    let ct_cap = Family::<Labels, Gauge>::default();
    let up = Gauge::<i64>::default();
    // One visit to the maps; one that cannot be read shows as missing series here and as
    // netagent_datapath_up 0.
    let (forwarded, flows, usage) = {
        let dp = lock(src.runtime.reconciler.datapath());
        if let Ok(counters) = dp.drop_counters() {
            up.set(1);
            for (reason, n) in counters {
                drops
                    .get_or_create(&labels(&[("reason", reason)]))
                    .inc_by(n);
            }
        }
        if let Ok(counters) = dp.drop_counters_by_hook() {
            for (hook, reason, n) in counters {
                by_hook
                    .get_or_create(&labels(&[("hook", hook), ("reason", reason)]))
                    .inc_by(n);
            }
        }
        (
            dp.forwarded().unwrap_or_default(),
            dp.flows().unwrap_or_default(),
            dp.map_usage().unwrap_or_default(),
        )
    };
    // The conntrack tables' entries are their maps' (counted once, with the other maps).
    for (table, map) in [
        ("established", map_names::CONNTRACK),
        ("new", map_names::CT_NEW),
    ] {
        if let Some(u) = usage.iter().find(|u| u.name == map) {
            ct.get_or_create(&labels(&[("table", table)]))
                .set(i64::from(u.entries));
        }
    }
    let view = src.view.borrow().clone();
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (hook, action, c) in forwarded {
        let l = labels(&[("hook", hook), ("action", action)]);
        packets.get_or_create(&l).inc_by(c.packets);
        bytes.get_or_create(&l).inc_by(c.bytes);
    }
    let new_flows = Family::<Labels, Counter>::default();
    let by_ip: BTreeMap<std::net::Ipv4Addr, &crate::model::Endpoint> =
        view.endpoints.values().map(|e| (e.ip, e)).collect();
    let by_num: BTreeMap<u32, &str> = view
        .services
        .values()
        .map(|s| (s.num, s.name.as_str()))
        .collect();
    for (key, n) in flows {
        // The set id is the service number and the network's index (see reconcile::desired).
        let Some(svc) = by_num.get(&(key.service_id >> 8)) else {
            continue;
        };
        let ip = std::net::Ipv4Addr::from(key.backend);
        let container = by_ip.get(&ip).map_or("", |e| e.container.as_str());
        new_flows
            .get_or_create(&labels(&[
                ("service", svc),
                ("backend", &ip.to_string()),
                ("container", container),
            ]))
            .inc_by(n);
    }
    let entries = Family::<Labels, Gauge>::default();
    let capacity = Family::<Labels, Gauge>::default();
    for u in usage {
        let l = labels(&[("map", u.name)]);
        entries.get_or_create(&l).set(i64::from(u.entries));
        capacity.get_or_create(&l).set(i64::from(u.capacity));
    }
    reg.register(
        "netagent_datapath_forwarded_packets",
        "Packets the eBPF programs let through, by program (hook) and action (pass: on to the \
         kernel's stack; redirect: straight to another device)",
        packets,
    );
    reg.register(
        "netagent_datapath_forwarded_bytes",
        "Bytes (whole frames as the hook saw them) the eBPF programs let through, by hook and \
         action",
        bytes,
    );
    reg.register(
        "netagent_lb_new_flows",
        "Connections the balancer sent to each backend of each service (VIP and routing mesh; \
         pairs unused for long age out of the datapath's LRU table)",
        new_flows,
    );
    reg.register(
        "netagent_map_entries",
        "Entries in use in each datapath map whose entries come and go",
        entries,
    );
    reg.register(
        "netagent_map_capacity",
        "Entries each datapath map can hold",
        capacity,
    );
    for (table, n) in [
        ("established", src.ct_capacity.0),
        ("new", src.ct_capacity.1),
    ] {
        ct_cap
            .get_or_create(&labels(&[("table", table)]))
            .set(i64::from(n));
    }
    reg.register(
        "netagent_datapath_drops",
        "Packets the eBPF programs dropped (or answered instead of forwarding), by reason \
         (`events_lost`: drop events the ring buffer had no room for)",
        drops,
    );
    reg.register(
        "netagent_datapath_hook_drops",
        "Dropped packets by program (hook) and reason; reasons with no drops left out",
        by_hook,
    );
    reg.register(
        "netagent_datapath_up",
        "1 if the datapath's maps can be read",
        up,
    );
    reg.register(
        "netagent_conntrack_entries",
        "Conntrack entries (two per tracked connection), by table, expired ones not yet \
         collected included",
        ct,
    );
    reg.register(
        "netagent_conntrack_capacity",
        "Entries each conntrack table can hold",
        ct_cap,
    );
}

fn control_metrics(reg: &mut Registry, src: &Sources, health: &Health) {
    let status = src.runtime.reconciler.status();
    let passes = Counter::<u64>::default();
    passes.inc_by(status.passes);
    let errors = Gauge::<i64>::default();
    errors.set(status.errors.len() as i64);
    let total = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    total.inc_by(status.total_duration_us as f64 / 1e6);
    let last = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    last.set(status.last_duration_us as f64 / 1e6);
    let view = src.view.borrow().clone();
    let revision = Gauge::<i64>::default();
    revision.set(view.revision);
    // Read after the probe: a view that caught up meanwhile shows 0, never a negative lag.
    let lag = Gauge::<i64>::default();
    if let Some(store_rev) = health.store_revision {
        lag.set((store_rev - view.revision).max(0));
    }
    let restarts = Counter::<u64>::default();
    restarts.inc_by(crate::view::watch_restarts());
    let reconnects = Counter::<u64>::default();
    reconnects.inc_by(netagent_store::etcd::watch_reconnects());
    let store_up = Gauge::<i64>::default();
    store_up.set(i64::from(health.store.is_none()));
    let healthy = Gauge::<i64>::default();
    healthy.set(i64::from(health.ok()));

    let objects = Family::<Labels, Gauge>::default();
    for (kind, n) in [
        ("networks", view.networks.len()),
        ("endpoints", view.endpoints.len()),
        ("services", view.services.len()),
    ] {
        objects
            .get_or_create(&labels(&[("kind", kind)]))
            .set(n as i64);
    }
    let backends = Family::<Labels, Gauge>::default();
    for svc in view.services.keys() {
        let ready = view
            .endpoints
            .values()
            .filter(|e| e.ready && e.service.as_deref() == Some(svc.as_str()))
            .count();
        backends
            .get_or_create(&labels(&[("service", svc)]))
            .set(ready as i64);
    }
    let mut by_state: BTreeMap<String, i64> = BTreeMap::new();
    for s in view.task_status.values() {
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{:?}", s.state).to_lowercase());
        *by_state.entry(state).or_default() += 1;
    }
    let tasks = Family::<Labels, Gauge>::default();
    for (state, n) in by_state {
        tasks.get_or_create(&labels(&[("state", &state)])).set(n);
    }

    reg.register(
        "netagent_reconcile_passes",
        "Reconciler passes (desired maps computed from the view and written as a difference)",
        passes,
    );
    reg.register(
        "netagent_reconcile_duration_seconds",
        "Time spent in reconciler passes, all together",
        total,
    );
    reg.register(
        "netagent_reconcile_last_duration_seconds",
        "How long the last reconciler pass took",
        last,
    );
    reg.register(
        "netagent_reconcile_errors",
        "Map entries the kernel refused in the last pass (retried every pass)",
        errors,
    );
    reg.register(
        "netagent_view_revision",
        "Store revision of the cluster view this node works from",
        revision,
    );
    if health.store_revision.is_some() {
        reg.register(
            "netagent_store_watch_lag_revisions",
            "Store revisions committed but not yet in this node's view, at the scrape (0 when \
             the watch is current; writes by others outside /netagent/ count too)",
            lag,
        );
    }
    reg.register(
        "netagent_store_watch_restarts",
        "Times the store watch had to start over with a fresh list (outages, compactions)",
        restarts,
    );
    reg.register(
        "netagent_store_watch_reconnects",
        "Times an etcd watch resumed after losing its connection (no event lost: it resumes \
         from the last revision it saw)",
        reconnects,
    );
    reg.register(
        "netagent_store_up",
        "1 if the store answered a read within 1 s",
        store_up,
    );
    reg.register(
        "netagent_healthy",
        "1 if /healthz answers 200 (store and datapath fine)",
        healthy,
    );
    reg.register(
        "netagent_objects",
        "Objects in the cluster view, by kind",
        objects,
    );
    reg.register(
        "netagent_service_backends",
        "Ready backends of each service, cluster-wide",
        backends,
    );
    reg.register(
        "netagent_tasks",
        "Orchestrated tasks of the cluster, by state",
        tasks,
    );
}

fn tunnel_metrics(reg: &mut Registry, src: &Sources) {
    let Some(t) = src.tunnels.get() else {
        return;
    };
    let status = t.status();
    let Some(peers) = status["peers"].as_array() else {
        return;
    };
    let tx = Family::<Labels, Counter>::default();
    let rx = Family::<Labels, Counter>::default();
    let since = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for p in peers {
        let Some(node) = p["node"].as_str() else {
            continue;
        };
        let l = labels(&[("peer", node)]);
        tx.get_or_create(&l)
            .inc_by(p["tx_bytes"].as_u64().unwrap_or(0));
        rx.get_or_create(&l)
            .inc_by(p["rx_bytes"].as_u64().unwrap_or(0));
        if let Some(s) = p["last_handshake_secs_ago"].as_f64() {
            since.get_or_create(&l).set(s);
        }
    }
    reg.register(
        "netagent_wireguard_sent_bytes",
        "Bytes sent to each peer's tunnel",
        tx,
    );
    reg.register(
        "netagent_wireguard_received_bytes",
        "Bytes received from each peer's tunnel",
        rx,
    );
    reg.register(
        "netagent_wireguard_seconds_since_handshake",
        "Seconds since the last completed handshake with each peer",
        since,
    );
}

fn dns_metrics(reg: &mut Registry, src: &Sources) {
    let stats = src.dns.stats();
    let queries = Family::<Labels, Counter>::default();
    for (result, n) in stats.results {
        queries
            .get_or_create(&labels(&[("result", result.name())]))
            .inc_by(n);
    }
    reg.register(
        "netagent_dns_queries",
        "DNS queries the containers' resolvers answered, by result (local answer, nxdomain, \
         forwarded upstream, error: malformed, refused or SERVFAIL)",
        queries,
    );
    reg.register(
        "netagent_dns_query_duration_seconds",
        "Time from a DNS query's arrival to its answer being sent",
        DnsLatency(stats),
    );
}

/// The DNS resolver's latency buckets, kept by the resolver as plain atomics.
#[derive(Debug)]
struct DnsLatency(netagent_dns::StatsSnapshot);

impl prometheus_client::encoding::EncodeMetric for DnsLatency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_secs,
            self.0.count,
            &self.0.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

fn process_metrics(reg: &mut Registry) {
    // statm: sizes in pages; the second field is the resident set.
    // SAFETY: sysconf has no preconditions.
    let page = i64::from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i32).max(1);
    if let Some(pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
    {
        let rss = Gauge::<i64>::default();
        rss.set(pages * page);
        reg.register(
            "process_resident_memory_bytes",
            "Resident memory of the agent",
            rss,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds = Gauge::<i64>::default();
        fds.set(dir.count() as i64);
        reg.register(
            "process_open_fds",
            "Open file descriptors of the agent",
            fds,
        );
    }
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): a counter's metadata names
/// its `_total` samples, and there is no `# EOF` or `# UNIT`.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP a_drops Drops.\n# TYPE a_drops counter\na_drops_total{reason=\"x\"} 3\n\
                  # HELP b Up.\n# TYPE b gauge\nb 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_drops_total Drops.\n# TYPE a_drops_total counter\n\
             a_drops_total{reason=\"x\"} 3\n# HELP b Up.\n# TYPE b gauge\nb 1\n"
        );
    }
}
