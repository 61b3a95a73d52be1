//! Encrypted networks on this node: the WireGuard device (`netagent-wireguard`), its TUN's
//! address and routes, the VXLAN device whose packets the kernel routes into it, and the
//! peers, which follow the node list.
//!
//! ```text
//! container -> from_container -> netagent-vxe (VXLAN, remote = peer's tunnel address)
//!           -> route 169.254.128.0/17 dev netagent-wg -> agent: encrypt -> UDP to peer:51820
//! peer:51820 -> agent: decrypt, check (VXLAN from that peer's tunnel address to ours)
//!           -> netagent-wg -> netagent-vxe (port 4790) -> from_overlay (tunnel device) -> container
//! ```
//!
//! Nothing of an encrypted network can leave in clear: the datapath sends its packets only to
//! the tunnel's VXLAN device (or drops them as `no_tunnel`), that device's destinations are
//! tunnel addresses, and under the TUN's route for them lies an unreachable route, so with the
//! TUN gone they go nowhere. While the agent is down the persistent TUN has no reader and the
//! kernel drops what is routed into it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use netagent_datapath::{Datapath, TunnelConfig};
use netagent_store::Store;
use netagent_wireguard::{Device, DeviceConfig, KeyPair, PeerConfig, keys};
use tokio::sync::watch;

use crate::model::{self, NodeWireguard};
use crate::netlink::Netlink;
use crate::runtime::lock;
use crate::view::ClusterView;
use crate::{model::WIREGUARD_OVERHEAD, nodes};

/// The TUN device the encrypted VXLAN packets are routed into.
pub const TUN_DEVICE: &str = "netagent-wg";
/// The collect-metadata VXLAN device of encrypted networks.
pub const VXLAN_ENC_DEVICE: &str = "netagent-vxe";
/// Its UDP port; on the tunnel only, never on the wire in clear.
pub const VXLAN_ENC_PORT: u16 = 4790;
/// Metric of the unreachable route under the tunnel range.
const FALLBACK_METRIC: u32 = 4242;
const KEY_FILE: &str = "wireguard.key";
const ADDR_FILE: &str = "tunnel.addr";

pub struct Tunnels {
    node: String,
    device: Device,
    record: Mutex<NodeWireguard>,
    key_path: PathBuf,
    advertise: Ipv4Addr,
    /// The peers last given to the device, to skip unchanged views.
    peers: Mutex<Vec<PeerConfig>>,
}

/// What the tunnels need from the agent.
pub struct TunnelSetup<'a> {
    pub node: &'a str,
    pub state_dir: &'a Path,
    pub advertise: Ipv4Addr,
    pub port: u16,
    pub uplink_mtu: u32,
    pub store: &'a dyn Store,
    pub netlink: &'a Netlink,
    pub datapath: &'a Arc<Mutex<Datapath>>,
}

impl Tunnels {
    /// Sets the tunnels up (idempotent across agent restarts: the persistent TUN, its address
    /// and the VXLAN device are kept). Waits for the store only on a node's very first start,
    /// to claim its tunnel address.
    pub async fn start(s: TunnelSetup<'_>) -> anyhow::Result<Arc<Tunnels>> {
        let key_path = s.state_dir.join(KEY_FILE);
        let key = KeyPair::load_or_create(&key_path).context("loading the WireGuard key")?;
        let tunnel_addr = tunnel_addr(&s).await?;
        let device = Device::start(&DeviceConfig {
            tun_name: TUN_DEVICE.into(),
            tunnel_addr,
            vxlan_port: VXLAN_ENC_PORT,
            control_port: crate::agent::CONTROL_PORT,
            listen: SocketAddrV4::new(s.advertise, s.port),
            key: key.clone(),
        })
        .with_context(|| format!("starting WireGuard on {}:{}", s.advertise, s.port))?;
        let tun_mtu = s.uplink_mtu.saturating_sub(WIREGUARD_OVERHEAD);
        let index = s
            .netlink
            .require_link_index(TUN_DEVICE)
            .await
            .context("finding the TUN device")?;
        s.netlink.disable_ipv6(TUN_DEVICE).await?;
        s.netlink.set_link_mtu(index, tun_mtu).await?;
        let (range, len) = model::TUNNEL_RANGE;
        s.netlink.add_address(index, tunnel_addr, len).await?;
        s.netlink.set_link_up(index).await?;
        s.netlink
            .add_unreachable_route(range, len, FALLBACK_METRIC)
            .await?;
        let vxe = s
            .netlink
            .ensure_vxlan(
                VXLAN_ENC_DEVICE,
                VXLAN_ENC_PORT,
                Some(tun_mtu.saturating_sub(model::VXLAN_OVERHEAD)),
            )
            .await
            .context("creating the tunnel's VXLAN device")?;
        {
            let mut dp = lock(s.datapath);
            dp.attach_from_overlay(VXLAN_ENC_DEVICE)
                .context("attaching from_overlay to the tunnel's VXLAN device")?;
            dp.set_tunnel_config(TunnelConfig {
                vxlan_enc_ifindex: vxe,
                wireguard_port: s.port,
            })?;
        }
        tracing::info!(%tunnel_addr, port = s.port, public_key = %keys::encode(&key.public), "tunnels ready");
        Ok(Arc::new(Tunnels {
            node: s.node.to_string(),
            device,
            record: Mutex::new(NodeWireguard {
                public_key: keys::encode(&key.public),
                port: s.port,
                tunnel_addr,
            }),
            key_path,
            advertise: s.advertise,
            peers: Mutex::new(Vec::new()),
        }))
    }

    /// What this node publishes about its tunnels.
    pub fn record(&self) -> NodeWireguard {
        lock(&self.record).clone()
    }

    /// The peers of `view`: every other node with a tunnel.
    fn peers_of(&self, view: &ClusterView) -> Vec<PeerConfig> {
        view.nodes
            .values()
            .filter(|n| n.name != self.node)
            .filter_map(|n| {
                let wg = n.wireguard.as_ref()?;
                let public_key = match keys::decode(&wg.public_key) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(node = %n.name, error = %e, "ignoring a bad WireGuard key");
                        return None;
                    }
                };
                Some(PeerConfig {
                    name: n.name.clone(),
                    public_key,
                    tunnel_addr: wg.tunnel_addr,
                    endpoint: SocketAddrV4::new(n.address, wg.port),
                })
            })
            .collect()
    }

    /// Runs forever: the device's peers follow the node list.
    pub async fn follow(self: Arc<Self>, mut view_rx: watch::Receiver<Arc<ClusterView>>) {
        loop {
            let view = view_rx.borrow_and_update().clone();
            let peers = self.peers_of(&view);
            let changed = *lock(&self.peers) != peers;
            if changed {
                tracing::info!(peers = peers.len(), "WireGuard peers changed");
                self.device.set_peers(&peers);
                *lock(&self.peers) = peers;
            }
            if view_rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Replaces this node's key: saved, published, then used; the old key keeps answering
    /// until the peers have switched, and traffic stays on the old sessions until the new
    /// ones are up. Returns the new public key.
    pub async fn rotate_key(
        &self,
        store: &dyn Store,
        registration: &watch::Sender<nodes::Registration>,
    ) -> Result<String, crate::error::AgentError> {
        let new = KeyPair::generate();
        new.save(&self.key_path)
            .map_err(|e| crate::error::AgentError::Internal(format!("saving the new key: {e}")))?;
        let mut record = self.record();
        record.public_key = keys::encode(&new.public);
        registration.send_modify(|r| r.wireguard = Some(record.clone()));
        nodes::set_wireguard(store, &self.node, &record).await?;
        self.device.rotate_key(new);
        *lock(&self.record) = record.clone();
        tracing::info!(public_key = %record.public_key, "WireGuard key rotated");
        Ok(record.public_key)
    }

    /// What `node inspect` shows.
    pub fn status(&self) -> serde_json::Value {
        let r = self.record();
        let peers: Vec<serde_json::Value> = self
            .device
            .peer_stats()
            .into_iter()
            .map(|p| {
                serde_json::json!({
                    "node": p.name,
                    "endpoint": p.endpoint.to_string(),
                    "tunnel_addr": p.tunnel_addr,
                    "public_key": keys::encode(&p.public_key.into()),
                    "last_handshake_secs_ago": p.since_handshake.map(|d| d.as_secs_f64()),
                    "tx_bytes": p.tx_bytes,
                    "rx_bytes": p.rx_bytes,
                    "sessions": p.sessions,
                })
            })
            .collect();
        let c = &self.device.engine().counters;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        serde_json::json!({
            "public_key": r.public_key,
            "port": r.port,
            "listen": SocketAddrV4::new(self.advertise, r.port).to_string(),
            "tunnel_addr": r.tunnel_addr,
            "peers": peers,
            "received": {
                "data": n(&c.rx_data),
                "control": n(&c.rx_control),
                "malformed": n(&c.rx_malformed),
                "unknown_peer": n(&c.rx_unknown_peer),
                "rejected": n(&c.rx_rejected),
                "forbidden": n(&c.rx_forbidden),
            },
            "handshakes": n(&c.handshakes),
            "sent_no_peer": n(&c.tx_no_peer),
        })
    }
}

/// The node's tunnel address: claimed in the store (and kept in the state dir, so a restart
/// while the store is unreachable still has it).
async fn tunnel_addr(s: &TunnelSetup<'_>) -> anyhow::Result<Ipv4Addr> {
    let path = s.state_dir.join(ADDR_FILE);
    let saved: Option<Ipv4Addr> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let mut delay = Duration::from_millis(200);
    loop {
        match nodes::claim_tunnel_addr(s.store, s.node, saved).await {
            Ok(addr) => {
                if saved != Some(addr) {
                    std::fs::write(&path, addr.to_string())
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                return Ok(addr);
            }
            Err(e) => match saved {
                // Claimed on an earlier start; the claim is in the store already.
                Some(addr) => {
                    tracing::warn!(error = %e, %addr, "store unavailable; using the saved tunnel address");
                    return Ok(addr);
                }
                None => {
                    tracing::warn!(error = %e, "cannot claim a tunnel address yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            },
        }
    }
}
