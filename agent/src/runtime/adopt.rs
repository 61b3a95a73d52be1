//! Taking back this node's containers after an agent restart. Nothing is recreated: their
//! interfaces are registered with the reconciler again, programs are re-attached (atomically
//! replacing the old ones on the pinned links), DNS listeners reopened and exits noticed.
//!
//! Works from the cluster view, which a restarted agent has from its saved copy before the
//! store answers: an agent that comes back while etcd is unreachable still serves its
//! containers.

use std::path::Path;
use std::sync::Arc;

use crate::model::ContainerKind;
use crate::runtime::{Runtime, lock};
use crate::sandbox;
use crate::view::ClusterView;

impl Runtime {
    /// Re-takes the local containers of `view`; then the reconciler may run.
    pub async fn adopt(self: &Arc<Self>, view: &ClusterView) -> usize {
        let mut adopted = 0;
        for c in view.containers.values().filter(|c| c.node == self.node) {
            let mut lost = false;
            for ep in super::build::endpoints_of(view, &c.name) {
                match self.netlink.link_index(&ep.host_ifname).await {
                    Ok(Some(ifindex)) => {
                        if let Err(e) =
                            lock(self.reconciler.datapath()).attach_from_container(&ep.host_ifname)
                        {
                            tracing::warn!(container = %c.name, error = %e, "re-attaching from_container");
                        }
                        self.reconciler.register_iface(&ep.host_ifname, ifindex);
                    }
                    Ok(None) => {
                        lost = true;
                        tracing::warn!(
                            container = %c.name,
                            ifname = %ep.host_ifname,
                            "interface missing; the container has lost its network"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "looking up interface"),
                }
            }
            if lost {
                // Out of every balancer and DNS: other nodes would otherwise keep sending
                // it new connections that cannot arrive. Through the store in the
                // background: adoption must not wait for a store that may be down.
                self.reconciler.set_ready(&c.name, false);
                let (store, name) = (self.store.clone(), c.name.clone());
                tokio::spawn(async move {
                    if let Err(e) = crate::containers::set_ready(&*store, &name, false).await {
                        tracing::warn!(container = %name, error = %e, "marking unready");
                    }
                });
            }
            // An attachment's namespace is the runtime's: serve DNS again while it exists (a
            // second attachment of the same namespace finds the port taken: the first serves).
            if c.kind == ContainerKind::External
                && Path::new(&c.netns).exists()
                && let Err(e) = self.dns.start(&c.name, Path::new(&c.netns), &c.networks)
            {
                tracing::debug!(container = %c.name, error = %e, "DNS for the attachment");
            }
            if c.kind == ContainerKind::Sandbox {
                if let Err(e) = self.dns.start(&c.name, Path::new(&c.netns), &c.networks) {
                    tracing::warn!(container = %c.name, error = %e, "restarting DNS");
                }
                match (c.pid, c.start_time) {
                    (Some(pid), Some(start_time)) => {
                        let p = sandbox::ProcessHandle { pid, start_time };
                        if sandbox::is_alive(&p) {
                            self.start_monitor(&c.name, p);
                        } else if c.exit.is_none() {
                            // Ended while no agent watched it.
                            let rt = self.clone();
                            let name = c.name.clone();
                            tokio::spawn(async move { rt.on_exit(&name, None).await });
                        } else {
                            self.reconciler.set_ready(&c.name, false);
                        }
                    }
                    _ => self.reconciler.set_ready(&c.name, false),
                }
            }
            adopted += 1;
        }
        self.reconciler.mark_adopted();
        tracing::info!(adopted, revision = view.revision, "adopted containers");
        adopted
    }
}
