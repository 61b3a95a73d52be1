//! Making and unmaking a container's kernel side: namespace, interfaces, datapath
//! registration, DNS listener, process.
//!
//! `build_sandbox` records in [`Built`] each thing as soon as it exists, so `rollback` undoes
//! exactly those and nothing else: a namespace or interface that was already there when the
//! attempt started is never touched.

use std::path::Path;

use crate::containers::ContainerRecord;
use crate::error::{AgentError, Result};
use crate::model::{self, ContainerKind, Endpoint};
use crate::networks;
use crate::runtime::{DRAIN, Runtime, STOP_GRACE, internal, lock};
use crate::sandbox::{self, SandboxError};

/// What one attempt made, in order.
#[derive(Debug, Default)]
pub struct Built {
    netns: bool,
    dir: bool,
    /// Host-side names of the veths this attempt created.
    veths: Vec<String>,
    /// Veths whose `from_container` link this attempt pinned.
    programs: Vec<String>,
    /// Veths registered with the reconciler.
    ifaces: Vec<String>,
    dns: bool,
    /// `lo` of an external namespace this attempt set up (its index there).
    lo_up: Option<u32>,
    process: Option<sandbox::ProcessHandle>,
}

impl Built {
    pub(super) fn dns_started(&mut self) {
        self.dns = true;
    }

    pub(super) fn lo_up(&mut self, index: u32) {
        self.lo_up = Some(index);
    }
}

impl Runtime {
    pub(super) async fn build_sandbox(
        &self,
        rec: &ContainerRecord,
        built: &mut Built,
        extras: &super::SandboxExtras,
    ) -> Result<sandbox::ProcessHandle> {
        let c = &rec.container;
        let ns_name = self.netns_name(&c.name);
        let netns = sandbox::create_netns(&ns_name).map_err(|e| match e {
            SandboxError::NetnsExists(n) => AgentError::Conflict(format!(
                "network namespace {n} already exists and is not a container of this agent"
            )),
            other => AgentError::Internal(format!("creating network namespace: {other}")),
        })?;
        built.netns = true;
        self.plug_endpoints(&netns, rec, built).await?;
        let dir = self.container_dir(&c.name);
        std::fs::create_dir_all(&dir).map_err(internal("creating container state dir"))?;
        built.dir = true;
        let resolv = dir.join("resolv.conf");
        // The embedded DNS answers at 127.0.0.11 inside every container; ndots:0 keeps bare
        // service names from being tried against search domains first.
        std::fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")
            .map_err(internal("writing resolv.conf"))?;
        // A sandbox with its own hostname resolves it to its own address without asking DNS
        // (as Docker's /etc/hosts does): servers that look their name up at start (Python's
        // http.server) would otherwise wait for a resolver timeout.
        let hosts = match (&extras.hostname, rec.endpoints.first()) {
            (Some(h), Some(ep)) => {
                let path = dir.join("hosts");
                std::fs::write(
                    &path,
                    format!(
                        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{h}\n",
                        ep.ip
                    ),
                )
                .map_err(internal("writing the hosts file"))?;
                Some(path)
            }
            _ => None,
        };
        self.dns
            .start(&c.name, &netns, &c.networks)
            .map_err(internal("starting the container's DNS"))?;
        built.dns = true;
        let process = sandbox::spawn(&sandbox::SpawnRequest {
            netns: netns.clone(),
            argv: c.command.clone(),
            resolv_conf: Some(resolv),
            log: self.log_target(&dir),
            env: std::iter::once(("NETAGENT_CONTAINER".into(), c.name.clone()))
                .chain(extras.env.iter().cloned())
                .collect(),
            hosts_file: hosts,
            hostname: extras.hostname.clone(),
            mounts: extras.mounts.clone(),
            secrets: extras.secrets.clone(),
        })
        .map_err(|e| {
            AgentError::BadRequest(format!("cannot start {:?}: {e}", c.command.join(" ")))
        })?;
        built.process = Some(process);
        Ok(process)
    }

    /// Creates each endpoint's interface in `netns`, attaches `from_container` to it and
    /// waits until the reconciler has installed the endpoints.
    pub(super) async fn plug_endpoints(
        &self,
        netns: &Path,
        rec: &ContainerRecord,
        built: &mut Built,
    ) -> Result<()> {
        for (i, ep) in rec.endpoints.iter().enumerate() {
            let net = networks::get(&*self.store, &ep.network).await?;
            let mac = model::parse_mac(&ep.mac)
                .ok_or_else(|| AgentError::Internal(format!("bad MAC {} in store", ep.mac)))?;
            let attached = sandbox::attach(
                &self.netlink,
                &sandbox::AttachRequest {
                    netns: netns.to_path_buf(),
                    host_ifname: ep.host_ifname.clone(),
                    ifname: ep.ifname.clone(),
                    address: ep.ip,
                    prefix_len: net.subnet.prefix_len(),
                    gateway: net.gateway,
                    mtu: net.effective_mtu(self.uplink_mtu),
                    mac,
                    router_mac: self.router_mac,
                    default_route: i == 0,
                },
            )
            .await
            .map_err(|e| match e {
                SandboxError::Netlink(n) if n.errno() == Some(libc::EEXIST) => {
                    AgentError::Conflict(format!(
                        "interface {} already exists in the namespace or on the node",
                        ep.ifname
                    ))
                }
                other => AgentError::Internal(format!("creating the container interface: {other}")),
            })?;
            built.veths.push(ep.host_ifname.clone());
            lock(self.reconciler.datapath())
                .attach_from_container(&ep.host_ifname)
                .map_err(internal("attaching from_container"))?;
            built.programs.push(ep.host_ifname.clone());
            self.reconciler
                .register_iface(&ep.host_ifname, attached.host_ifindex);
            built.ifaces.push(ep.host_ifname.clone());
        }
        // The endpoints are in the store (reserved before we came here): once the view has
        // that revision, one pass installs them, before anything in the namespace can send.
        let changes = self
            .reconciler
            .sync(rec.revision)
            .await
            .map_err(AgentError::Unavailable)?;
        if let Some(ep) = rec.endpoints.iter().find(|e| {
            changes
                .errors
                .iter()
                .any(|err| err.starts_with(&format!("endpoint {} ", e.ip)))
        }) {
            return Err(AgentError::Internal(format!(
                "the datapath refused endpoint {}: {}",
                ep.ip,
                changes.errors.join("; ")
            )));
        }
        Ok(())
    }

    /// Undoes what one attempt made, newest first.
    pub(super) async fn rollback(&self, rec: &ContainerRecord, built: Built) {
        let c = &rec.container;
        if built.dns {
            self.dns.stop(&c.name).await;
        }
        if let Some(p) = built.process
            && let Err(e) = sandbox::stop(&p, STOP_GRACE).await
        {
            tracing::warn!(container = %c.name, error = %e, "stopping process");
        }
        self.unplug(&built.ifaces, &built.programs, &built.veths)
            .await;
        if let Some(index) = built.lo_up {
            let down = async {
                let inside = crate::netlink::Netlink::in_netns(Path::new(&c.netns))?;
                inside.set_link_down(index).await
            };
            if let Err(e) = down.await {
                tracing::warn!(container = %c.name, error = %e, "setting lo down again");
            }
        }
        if built.netns {
            if let Err(e) = sandbox::kill_namespace_processes(Path::new(&c.netns)).await {
                tracing::debug!(container = %c.name, error = %e, "no namespace to sweep");
            }
            if let Err(e) = sandbox::delete_netns(&self.netns_name(&c.name)) {
                tracing::warn!(container = %c.name, error = %e, "deleting namespace");
            }
        }
        if built.dir {
            let _ = std::fs::remove_dir_all(self.container_dir(&c.name));
        }
    }

    /// Unregisters interfaces (and lets the reconciler remove their endpoints), detaches
    /// programs and deletes veths.
    async fn unplug(&self, ifaces: &[String], programs: &[String], veths: &[String]) {
        for name in ifaces {
            self.reconciler.unregister_iface(name);
        }
        if !ifaces.is_empty() {
            self.reconciler.pass().await;
        }
        for name in programs {
            if let Err(e) = lock(self.reconciler.datapath()).detach_from_container(name) {
                tracing::warn!(ifname = %name, error = %e, "detaching from_container");
            }
        }
        for name in veths {
            if let Err(e) = sandbox::detach(&self.netlink, name).await {
                tracing::warn!(ifname = %name, error = %e, "deleting veth");
            }
        }
    }

    /// Takes the container's endpoints out of the balancer and DNS, here at once and on every
    /// node through the store; waits for the other nodes to follow if it was a replica.
    pub(super) async fn take_out_of_service(&self, rec: &ContainerRecord) {
        self.reconciler.set_ready(&rec.container.name, false);
        self.reconciler.pass().await;
        let replica = rec.endpoints.iter().any(|e| e.service.is_some());
        match crate::containers::set_ready(&*self.store, &rec.container.name, false).await {
            Ok(()) if replica => tokio::time::sleep(DRAIN).await,
            Ok(()) => {}
            Err(e) => tracing::warn!(container = %rec.container.name, error = %e,
                "cannot mark the container unready in the store; other nodes learn of its \
                 removal when it is released"),
        }
    }

    /// Removes everything the kernel holds for a container (`rm`, detach); tolerant of parts
    /// already gone. The process is stopped only after the container left the balancer, and
    /// gets `grace` between SIGTERM and SIGKILL. `keep_logs`: move the log there first.
    pub(super) async fn teardown(
        &self,
        rec: &ContainerRecord,
        grace: std::time::Duration,
        keep_logs: Option<&Path>,
    ) {
        let c = &rec.container;
        self.take_out_of_service(rec).await;
        if let Some(m) = lock(&self.monitors).remove(&c.name) {
            m.abort();
        }
        // The listener's sockets hold the namespace; close them first.
        self.dns.stop(&c.name).await;
        if let (Some(pid), Some(start_time)) = (c.pid, c.start_time) {
            let p = sandbox::ProcessHandle { pid, start_time };
            if let Err(e) = sandbox::stop(&p, grace).await {
                tracing::warn!(container = %c.name, error = %e, "stopping process");
            }
        }
        // Whatever the main process left running in the namespace goes with it. Only for our
        // own sandboxes: an external namespace's processes belong to whoever made it.
        if c.kind == ContainerKind::Sandbox {
            match sandbox::kill_namespace_processes(Path::new(&c.netns)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(container = %c.name, n, "killed leftover processes"),
                Err(e) => tracing::debug!(container = %c.name, error = %e, "no namespace to sweep"),
            }
        }
        let names: Vec<String> = rec
            .endpoints
            .iter()
            .map(|e| e.host_ifname.clone())
            .collect();
        self.unplug(&names, &names, &names).await;
        self.reconciler.set_ready(&c.name, true);
        if c.kind == ContainerKind::Sandbox {
            if let Err(e) = sandbox::delete_netns(&self.netns_name(&c.name)) {
                tracing::warn!(container = %c.name, error = %e, "deleting namespace");
            }
            if let Some(to) = keep_logs {
                let from = self.container_dir(&c.name).join(super::logs::DIR);
                let moved = to
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::rename(&from, to));
                if let Err(e) = moved
                    && from.exists()
                {
                    tracing::warn!(container = %c.name, error = %e, "keeping the log");
                }
            }
            let _ = std::fs::remove_dir_all(self.container_dir(&c.name));
        }
    }
}

/// The endpoints of `rec` as the view knows them, for adoption.
pub(super) fn endpoints_of<'a>(
    view: &'a crate::view::ClusterView,
    container: &str,
) -> Vec<&'a Endpoint> {
    view.endpoints
        .values()
        .filter(|e| e.container == container)
        .collect()
}
