//! Embedded DNS for containers (design section 6, issue 5).
//!
//! Every container gets a resolver at 127.0.0.11 that answers, from an in-memory view, the
//! names of the networks the container is on, and forwards everything else to the node's
//! upstream resolvers:
//!
//! - `web` -> the VIP of service `web` (with dnsrr: its task addresses, shuffled);
//! - `tasks.web` -> all live task addresses, shuffled per answer;
//! - a container name or alias -> its address(es);
//! - `<name>.<network>` -> the same, restricted to that network;
//! - PTR for every known address (answered as `<name>.<network>.`);
//! - SRV `_<port>._<proto>.<service>` for published ports;
//! - a name that exists only on networks the asker is not on -> NXDOMAIN;
//! - another type for an existing name -> NOERROR without records.
//!
//! The crate knows nothing of namespaces, netlink or the store. The agent:
//! 1. creates one [`Resolver`] and calls [`Resolver::publish`] with a fresh [`DnsView`] on
//!    every store change (lookups are lock-free; the next query sees the new view);
//! 2. per container, binds a `UdpSocket` and a `TcpListener` on 127.0.0.11:53 inside the
//!    container's namespace and runs [`serve`] with [`Resolver::handler`]`(networks)`.
//!
//! ```no_run
//! # async fn agent() -> Result<(), Box<dyn std::error::Error>> {
//! use netagent_dns::{DnsView, Endpoint, Resolver, ResolverConfig, Service, serve};
//!
//! let resolver = Resolver::new(ResolverConfig {
//!     upstreams: netagent_dns::upstreams_from_resolv_conf(
//!         &std::fs::read_to_string("/etc/resolv.conf")?,
//!     ),
//!     ..ResolverConfig::default()
//! });
//!
//! // On every store event:
//! let mut view = DnsView::new();
//! view.network_mut("front").insert_service(
//!     "web",
//!     Service { endpoint: Endpoint::Vip("10.1.0.2".parse()?), tasks: vec![], ports: vec![] },
//! );
//! resolver.publish(view);
//!
//! // Per container (sockets bound inside its namespace):
//! let udp = tokio::net::UdpSocket::bind("127.0.0.11:53").await?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.11:53").await?;
//! let handler = resolver.handler(["front"]);
//! let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn(serve(handler.clone(), udp, tcp, async move {
//!     let _ = stop_rx.await;
//! }));
//! // Container joins a network: handler.set_networks(["front", "back"]);
//! // Container removed:
//! let _ = stop_tx.send(());
//! task.await??;
//! # Ok(())
//! # }
//! ```

mod forward;
mod handler;
mod lookup;
mod resolv_conf;
mod server;
mod stats;
mod udp;
mod view;

pub use forward::ForwardError;
pub use handler::{
    DEFAULT_UPSTREAM_TIMEOUT, MAX_FORWARDS_IN_FLIGHT, MAX_UDP_PAYLOAD, Resolver, ResolverConfig,
    ScopedHandler, Transport,
};
pub use resolv_conf::{parse_upstream, upstreams_from_resolv_conf};
pub use server::{TCP_IDLE_TIMEOUT, serve};
pub use stats::{LATENCY_BUCKETS, QueryResult, QueryStats, StatsSnapshot};
pub use view::{DnsView, Endpoint, NetworkNames, PortProto, PublishedPort, Service};

/// TTL of every local answer: short, so that caches in applications do not outlive a
/// replica that moved.
pub const LOCAL_TTL: u32 = 5;

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listener (UDP or TCP) stopped serving.
    #[error("dns listener failed: {0}")]
    Listener(String),
    /// The listeners did not stop within the shutdown grace period.
    #[error("dns listeners did not stop in time")]
    ShutdownTimeout,
}
