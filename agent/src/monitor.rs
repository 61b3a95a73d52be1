//! `netctl monitor`: the datapath's drop and trace events, decoded, to every client that
//! follows them.
//!
//! One task owns the DROP_EVENTS ring buffer (a ring buffer has one consumer), decodes each
//! record against the current view (network and container names) and broadcasts it. A client
//! too slow for the broadcast loses events and is told how many; drop events the datapath could
//! not report (ring full, or over its per-CPU rate limit) are announced once a second from its
//! counter. Trace events (packets let through) are switched on in the datapath only while a
//! client follows them, and are limited to 1000 per CPU per second (not counted as lost: a
//! trace is a sample).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use netagent_datapath::{
    Datapath, DropEvent, DropEvents, DropReason, ForwardAction, Hook, TRACE_REASON,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};

use crate::runtime::lock;
use crate::view::ClusterView;

/// Events a client may fall behind by before it loses some.
const CLIENT_BACKLOG: usize = 4096;
/// How often the datapath's lost-event counter is looked at.
const LOST_EVERY: Duration = Duration::from_secs(1);

/// One line of `netctl monitor --format json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Drop(Packet),
    /// A packet a hook let through, as it left the hook (after any NAT).
    Trace(Packet),
    /// Events that were not delivered: by the datapath (`datapath`), or to this client, which
    /// read too slowly (`client`).
    Lost {
        count: u64,
        by: &'static str,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Packet {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub hook: &'static str,
    /// Drops: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Traces: what the hook did with it (`pass` to the stack, `redirect` to a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    /// `tcp`, `udp`, `icmp`, `arp`, the IP protocol number, or the ethertype (`0x86dd`).
    pub proto: String,
    pub src: String,
    pub dst: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    pub vni: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_container: Option<String>,
    pub len: u32,
    pub ifindex: u32,
}

/// What a client follows.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Trace events instead of drops.
    pub traces: bool,
    pub network: Option<String>,
    pub container: Option<String>,
}

impl Filter {
    pub fn matches(&self, line: &Line) -> bool {
        let d = match line {
            Line::Drop(d) if !self.traces => d,
            Line::Trace(d) if self.traces => d,
            Line::Drop(_) | Line::Trace(_) => return false,
            Line::Lost { .. } => return true,
        };
        let network = self
            .network
            .as_ref()
            .is_none_or(|n| d.network.as_ref() == Some(n));
        let container = self.container.as_ref().is_none_or(|c| {
            d.src_container.as_ref() == Some(c) || d.dst_container.as_ref() == Some(c)
        });
        network && container
    }
}

pub struct Monitor {
    tx: broadcast::Sender<Arc<Line>>,
    datapath: Arc<std::sync::Mutex<Datapath>>,
    /// Clients following trace events; the datapath traces while this is above zero.
    tracers: AtomicUsize,
}

/// A client's interest in trace events; tracing stops when the last one is dropped.
pub struct Tracing(Arc<Monitor>);

impl Drop for Tracing {
    fn drop(&mut self) {
        if self.0.tracers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.set_trace(false);
        }
    }
}

impl Monitor {
    /// Takes the datapath's ring buffer and starts decoding it.
    pub fn start(
        datapath: Arc<std::sync::Mutex<Datapath>>,
        view: watch::Receiver<Arc<ClusterView>>,
    ) -> anyhow::Result<Arc<Monitor>> {
        let events = lock(&datapath).take_drop_events()?;
        // SAFETY: the ring buffer owns its fd for as long as it lives, and the AsyncFd owns
        // the ring buffer: the fd stays open and the same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(events) }
            .map_err(|e| anyhow::anyhow!("watching the drop event ring buffer: {e}"))?;
        let (tx, _) = broadcast::channel(CLIENT_BACKLOG);
        // A previous agent's tracing must not outlive it (the map is not pinned, but be sure).
        lock(&datapath).set_trace(false)?;
        let monitor = Arc::new(Monitor {
            tx: tx.clone(),
            datapath: datapath.clone(),
            tracers: AtomicUsize::new(0),
        });
        tokio::spawn(read(fd, datapath, view, tx));
        Ok(monitor)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Line>> {
        self.tx.subscribe()
    }

    /// Turns trace events on until the returned guard (and every other) is dropped.
    pub fn trace(self: &Arc<Self>) -> Tracing {
        if self.tracers.fetch_add(1, Ordering::SeqCst) == 0 {
            self.set_trace(true);
        }
        Tracing(self.clone())
    }

    fn set_trace(&self, on: bool) {
        if let Err(e) = lock(&self.datapath).set_trace(on) {
            tracing::warn!(error = %e, on, "switching trace events");
        }
    }
}

async fn read(
    mut fd: AsyncFd<DropEvents>,
    datapath: Arc<std::sync::Mutex<Datapath>>,
    view: watch::Receiver<Arc<ClusterView>>,
    tx: broadcast::Sender<Arc<Line>>,
) {
    let mut lost = lock(&datapath).drop_events_lost().unwrap_or(0);
    let mut tick = tokio::time::interval(LOST_EVERY);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else {
                    tracing::warn!("drop event ring buffer unreadable; monitor stopped");
                    return;
                };
                let events = guard.get_inner_mut().drain();
                guard.clear_ready();
                // Decoding costs something; with nobody watching, the records are only read.
                if tx.receiver_count() == 0 {
                    continue;
                }
                let v = view.borrow().clone();
                let clock = Clock::now();
                for e in &events {
                    let packet = decode(e, &v, &clock);
                    let line = if e.reason == TRACE_REASON {
                        Line::Trace(packet)
                    } else {
                        Line::Drop(packet)
                    };
                    let _ = tx.send(Arc::new(line));
                }
            }
            _ = tick.tick() => {
                let now = lock(&datapath).drop_events_lost().unwrap_or(lost);
                if now > lost && tx.receiver_count() > 0 {
                    let _ = tx.send(Arc::new(Line::Lost { count: now - lost, by: "datapath" }));
                }
                lost = now;
            }
        }
    }
}

/// Wall clock and CLOCK_MONOTONIC (the events' clock) read together.
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock {
            wall: SystemTime::now(),
            mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        }
    }

    fn wall_of(&self, mono_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.mono_ns.saturating_sub(mono_ns))
    }
}

fn decode(e: &DropEvent, view: &ClusterView, clock: &Clock) -> Packet {
    let src = std::net::Ipv4Addr::from(e.src_ip);
    let dst = std::net::Ipv4Addr::from(e.dst_ip);
    let endpoint = |ip: std::net::Ipv4Addr| view.endpoints.values().find(|ep| ep.ip == ip);
    let (src_ep, dst_ep) = (endpoint(src), endpoint(dst));
    let network = view
        .networks
        .values()
        .find(|n| e.vni != 0 && n.vni == e.vni)
        .map(|n| n.name.clone())
        .or_else(|| src_ep.or(dst_ep).map(|ep| ep.network.clone()));
    let proto = match (e.ethertype, e.ip_proto) {
        (0x0800, 6) => "tcp".to_owned(),
        (0x0800, 17) => "udp".to_owned(),
        (0x0800, 1) => "icmp".to_owned(),
        (0x0800, p) => p.to_string(),
        (0x0806, _) => "arp".to_owned(),
        (t, _) => format!("{t:#06x}"),
    };
    let ports = e.src_port != 0 || e.dst_port != 0;
    let trace = e.reason == TRACE_REASON;
    Packet {
        time: humantime::format_rfc3339_millis(clock.wall_of(e.timestamp_ns)).to_string(),
        hook: Hook::from_code(e.hook).map_or("unknown", Hook::name),
        reason: (!trace)
            .then(|| DropReason::from_code(e.reason).map_or("unknown", DropReason::name)),
        action: trace
            .then(|| ForwardAction::from_code(e.action).map_or("unknown", ForwardAction::name)),
        proto,
        src: src.to_string(),
        dst: dst.to_string(),
        src_port: ports.then_some(e.src_port),
        dst_port: ports.then_some(e.dst_port),
        vni: e.vni,
        network,
        src_container: src_ep.map(|ep| ep.container.clone()),
        dst_container: dst_ep.map(|ep| ep.container.clone()),
        len: e.pkt_len,
        ifindex: e.ifindex,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_line(network: &str, src: &str, dst: Option<&str>) -> Line {
        Line::Drop(Packet {
            time: String::new(),
            hook: "from_container",
            reason: Some("policy_isolation"),
            action: None,
            proto: "udp".into(),
            src: "10.0.0.2".into(),
            dst: "10.1.0.2".into(),
            src_port: Some(1),
            dst_port: Some(2),
            vni: 0,
            network: Some(network.into()),
            src_container: Some(src.into()),
            dst_container: dst.map(str::to_owned),
            len: 60,
            ifindex: 3,
        })
    }

    #[test]
    fn filters_by_network_and_either_container() {
        let line = drop_line("a", "x", Some("y"));
        assert!(Filter::default().matches(&line));
        let by_net = |n: &str| Filter {
            network: Some(n.into()),
            ..Filter::default()
        };
        let by_ctr = |c: &str| Filter {
            container: Some(c.into()),
            ..Filter::default()
        };
        let traces = Filter {
            traces: true,
            ..Filter::default()
        };
        assert!(!traces.matches(&line), "drops are not traces");
        let Line::Drop(p) = line.clone() else {
            unreachable!()
        };
        let trace = Line::Trace(Packet {
            reason: None,
            action: Some("redirect"),
            ..p
        });
        assert!(traces.matches(&trace) && !Filter::default().matches(&trace));
        assert_eq!(serde_json::to_value(&trace).unwrap()["type"], "trace");
        assert!(
            serde_json::to_value(&trace)
                .unwrap()
                .get("reason")
                .is_none()
        );
        assert!(by_net("a").matches(&line));
        assert!(!by_net("b").matches(&line));
        assert!(by_ctr("x").matches(&line) && by_ctr("y").matches(&line));
        assert!(!by_ctr("z").matches(&line));
        let lost = Line::Lost {
            count: 3,
            by: "client",
        };
        assert!(by_ctr("z").matches(&lost), "losses reach every client");
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["type"], "drop");
        assert_eq!(json["reason"], "policy_isolation");
        assert_eq!(serde_json::to_value(&lost).unwrap()["type"], "lost");
    }

    #[test]
    fn event_times_are_wall_clock() {
        let c = Clock::now();
        let earlier = c.wall_of(c.mono_ns - 1_500_000_000);
        let d = c.wall.duration_since(earlier).unwrap();
        assert_eq!(d, Duration::from_millis(1500));
    }
}
