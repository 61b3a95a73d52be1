//! The lab itself: bring-up, access for tests, and teardown on drop.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::cmd::{self, Background, Output, wait_until};
use crate::layout::{self, BRIDGE, ETCD_ADDR, ETCD_PORT, FABRIC_GATEWAY, RUN_ROOT, UPLINK};
use crate::record::{self, Owner, Record};
use crate::status::{self, LabStatus};
use crate::teardown::{self, STOP_GRACE};
use crate::{Signal, bins, sys};

/// Bound for commands tests run inside the lab (ping, curl, dig, ...).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for one netctl call.
pub const NETCTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for etcd to answer a health check after it starts.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);
const ETCD_BIN: &str = "/usr/bin/etcd";
/// Lines of a daemon's log quoted in start-up errors.
const LOG_TAIL_LINES: usize = 40;

/// Where the cluster state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A real etcd on the fabric at 198.18.0.2:2379, shared by all nodes.
    #[default]
    Etcd,
    /// Each agent's own embedded file store (single-node clusters).
    Embedded,
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Etcd => "etcd",
            StoreKind::Embedded => "embedded",
        })
    }
}

impl FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "etcd" => Ok(StoreKind::Etcd),
            "embedded" => Ok(StoreKind::Embedded),
            other => Err(format!("unknown store {other:?}: use etcd or embedded")),
        }
    }
}

/// How to build a lab. `LabConfig { nodes: 2, ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of nodes, n1..=nN (0..=200).
    pub nodes: usize,
    /// Lab prefix; default: a fresh unique one ("nl" + 5 hex digits).
    pub prefix: Option<String>,
    pub store: StoreKind,
    /// Passed to every agent as `--lease-ttl`; short so node-death tests are quick.
    pub lease_ttl_secs: u64,
    /// Start one netagent per node. Off: topology (and etcd) only; agents
    /// can still be started one by one with [`Lab::start_agent`].
    pub start_agents: bool,
    /// Appended to every agent's command line.
    pub extra_agent_args: Vec<String>,
    /// Appended to one node's agent command line after those (node number, 1-based; e.g. a
    /// mixed cluster of agents with different options).
    pub extra_agent_args_per_node: Vec<(usize, Vec<String>)>,
    /// Set in every agent's environment. `NOTIFY_SOCKET` is removed from it otherwise, so
    /// agents of a lab run from a systemd unit never talk to that service manager.
    pub agent_env: Vec<(String, String)>,
    /// netagent binary; default: `NETAGENT_BIN`, else next to the current executable.
    pub netagent_bin: Option<PathBuf>,
    /// netctl binary; default: `NETCTL_BIN`, else next to the current executable.
    pub netctl_bin: Option<PathBuf>,
    /// How long an agent may take to accept connections on its socket.
    pub agent_ready_timeout: Duration,
    /// etcd members (with [`StoreKind::Etcd`]): 1 (default) or up to
    /// [`layout::MAX_ETCD_MEMBERS`], one cluster on consecutive fabric addresses from
    /// 198.18.0.2; the agents get every member's endpoint.
    pub etcd_members: usize,
    /// Keep IPv6 on in the lab's namespaces. Off by default: the design is
    /// IPv4-only, and IPv6 neighbour discovery and MLD would show up in
    /// every fabric capture.
    pub ipv6: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 3,
            prefix: None,
            store: StoreKind::Etcd,
            lease_ttl_secs: 5,
            start_agents: true,
            extra_agent_args: Vec::new(),
            extra_agent_args_per_node: Vec::new(),
            agent_env: Vec::new(),
            netagent_bin: None,
            netctl_bin: None,
            agent_ready_timeout: Duration::from_secs(20),
            etcd_members: 1,
            ipv6: false,
        }
    }
}

/// The daemons this process started and must reap.
#[derive(Default)]
struct Procs {
    etcd: Option<Child>,
    /// Members 1.. of a multi-member etcd (index k-1 holds member k).
    etcd_members: Vec<Option<Child>>,
    /// Index i-1 holds node i's agent.
    agents: Vec<Option<Child>>,
}

/// A running lab. Node indices are 1-based (`n1` is node 1). Accessors panic
/// on an index outside `1..=nodes()`; actions return an error.
pub struct Lab {
    prefix: String,
    run_dir: PathBuf,
    config: LabConfig,
    /// Resolved at `up` when agents start then, so a missing binary fails
    /// before anything is built.
    netagent: Option<PathBuf>,
    procs: Mutex<Procs>,
    detached: bool,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("nodes", &self.config.nodes)
            .field("store", &self.config.store)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Builds the lab: namespaces, bridge and veths, etcd (healthy), agents
    /// (accepting on their sockets). On any error everything built so far
    /// is removed again before the error is returned.
    pub fn up(config: LabConfig) -> Result<Lab> {
        sys::ensure_root("netlab")?;
        if config.etcd_members == 0 || config.etcd_members > layout::MAX_ETCD_MEMBERS {
            bail!(
                "a lab runs 1 to {} etcd members, not {}",
                layout::MAX_ETCD_MEMBERS,
                config.etcd_members
            );
        }
        if config.nodes > layout::MAX_NODES {
            bail!("a lab has at most {} nodes", layout::MAX_NODES);
        }
        if config.lease_ttl_secs == 0 {
            bail!("lease_ttl_secs must be at least 1");
        }
        if config.store == StoreKind::Etcd && !Path::new(ETCD_BIN).is_file() {
            bail!("{ETCD_BIN} not found: run `cargo xtask setup` (Debian etcd-server)");
        }
        let netagent = match config.start_agents && config.nodes > 0 {
            true => Some(bins::find(
                "netagent",
                "NETAGENT_BIN",
                config.netagent_bin.as_deref(),
            )?),
            false => None,
        };
        teardown::reap_stale();
        let prefix = claim_prefix(config.prefix.as_deref())?;
        let lab = Lab {
            run_dir: layout::run_dir(&prefix),
            procs: Mutex::new(Procs {
                etcd: None,
                etcd_members: Vec::new(),
                agents: (0..config.nodes).map(|_| None).collect(),
            }),
            prefix,
            config,
            netagent,
            detached: false,
        };
        // From here on an early return drops `lab`, which tears down what
        // was built so far.
        record::write_owner(&lab.run_dir, Owner::current())?;
        record::write_record(&lab.run_dir, &lab.record())?;
        lab.build_topology()
            .with_context(|| format!("building the topology of lab {}", lab.prefix))?;
        if lab.config.store == StoreKind::Etcd {
            // A new multi-member cluster is healthy only once a quorum runs: the others first.
            for k in 1..lab.config.etcd_members {
                lab.start_etcd_member(k)?;
            }
            lab.start_etcd()?;
        }
        if lab.netagent.is_some() {
            lab.start_all_agents()?;
        }
        Ok(lab)
    }

    fn record(&self) -> Record {
        Record {
            prefix: self.prefix.clone(),
            nodes: self.config.nodes,
            store: self.config.store,
            start_agents: self.config.start_agents,
            lease_ttl_secs: self.config.lease_ttl_secs,
        }
    }

    /// Removes lab `prefix` (from any process): daemons, namespaces, pins, run dir.
    pub fn down(prefix: &str) -> Result<()> {
        sys::ensure_root("netlab down")?;
        teardown::down(prefix)
    }

    /// Removes every lab under /run/netlab; returns their prefixes.
    pub fn down_all() -> Result<Vec<String>> {
        sys::ensure_root("netlab down")?;
        teardown::down_all()
    }

    /// What runs in every lab under /run/netlab.
    pub fn status_all() -> Result<Vec<LabStatus>> {
        status::status_all()
    }

    /// Keeps the lab running after this value is gone (for `cargo xtask lab
    /// up`); returns its prefix for [`Lab::down`]. Its daemons are recorded
    /// in pid files, so `down` finds them from another process.
    pub fn detach(mut self) -> Result<String> {
        // If this fails, `self` drops undetached and the lab is torn down,
        // rather than left behind looking as if it belonged to this process.
        record::write_owner(&self.run_dir, Owner::Detached)?;
        self.detached = true;
        Ok(self.prefix.clone())
    }

    // ---- names and addresses ------------------------------------------

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `/run/netlab/<prefix>`.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    pub fn nodes(&self) -> usize {
        self.config.nodes
    }

    fn assert_node(&self, i: usize) {
        assert!(
            (1..=self.config.nodes).contains(&i),
            "lab {} has nodes 1..={}, not {i}",
            self.prefix,
            self.config.nodes
        );
    }

    fn check_node(&self, i: usize) -> Result<()> {
        if !(1..=self.config.nodes).contains(&i) {
            bail!(
                "lab {} has nodes 1..={}, not {i}",
                self.prefix,
                self.config.nodes
            );
        }
        Ok(())
    }

    pub fn fabric_ns(&self) -> String {
        layout::fabric_ns(&self.prefix)
    }

    /// Network namespace of node `i`: `<prefix>-n<i>`.
    pub fn node_ns(&self, i: usize) -> String {
        self.assert_node(i);
        layout::node_ns(&self.prefix, i)
    }

    /// Node name as the agent knows it: `n<i>`.
    pub fn node_name(&self, i: usize) -> String {
        self.assert_node(i);
        layout::node_name(i)
    }

    /// Node `i`'s address on the fabric, 198.18.0.(10+i).
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        self.assert_node(i);
        layout::node_addr(i)
    }

    /// Agent `i`'s API socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.assert_node(i);
        layout::socket(&self.prefix, i)
    }

    /// `unix://<socket>`, as netctl's `-H` takes it.
    pub fn host(&self, i: usize) -> String {
        format!("unix://{}", self.socket(i).display())
    }

    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.assert_node(i);
        layout::state_dir(&self.prefix, i)
    }

    pub fn bpf_dir(&self, i: usize) -> PathBuf {
        self.assert_node(i);
        layout::bpf_dir(&self.prefix, i)
    }

    pub fn agent_log_path(&self, i: usize) -> PathBuf {
        self.assert_node(i);
        layout::agent_log(&self.prefix, i)
    }

    /// Everything agent `i` printed, over all its starts (each start begins
    /// with a `==== netlab: starting` line). Empty if it never started.
    pub fn agent_log(&self, i: usize) -> String {
        fs::read(self.agent_log_path(i))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// etcd's client endpoint, `198.18.0.2:2379`; `None` with the embedded store.
    pub fn etcd_endpoint(&self) -> Option<String> {
        (self.config.store == StoreKind::Etcd).then(|| format!("{ETCD_ADDR}:{ETCD_PORT}"))
    }

    /// The agents' `--store` argument.
    pub fn store_url(&self) -> String {
        store_url(&self.config)
    }

    fn lock(&self) -> MutexGuard<'_, Procs> {
        // A panic while holding the lock cannot leave Procs inconsistent
        // (each update is one assignment), so a poisoned lock is still usable.
        self.procs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pid of agent `i` if this lab started it and it has not been killed.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.assert_node(i);
        self.lock().agents[i - 1].as_ref().map(Child::id)
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.lock().etcd.as_ref().map(Child::id)
    }

    // ---- running things ------------------------------------------------

    /// Runs `netctl -H unix://<socket of node i> ARGS...` (from the root
    /// namespace: netctl only talks to the socket). A non-zero exit is not
    /// an error here; look at `Output::status` or call `Output::check`.
    pub fn netctl<I, S>(&self, i: usize, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.check_node(i)?;
        let bin = bins::find("netctl", "NETCTL_BIN", self.config.netctl_bin.as_deref())?;
        let mut c = Command::new(bin);
        c.arg("-H").arg(self.host(i)).args(args);
        // -H wins anyway; removing it keeps a stray environment out of test output.
        c.env_remove("NETCTL_HOST");
        cmd::run(&mut c, NETCTL_TIMEOUT)
    }

    /// Runs `argv` in node `i`'s namespace, bounded by 30 s.
    pub fn exec_in_node<S: AsRef<OsStr>>(&self, i: usize, argv: &[S]) -> Result<Output> {
        self.exec_in_node_timeout(i, argv, EXEC_TIMEOUT)
    }

    pub fn exec_in_node_timeout<S: AsRef<OsStr>>(
        &self,
        i: usize,
        argv: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        self.check_node(i)?;
        cmd::run(&mut sys::in_netns(&self.node_ns(i), argv), timeout)
    }

    /// Runs `argv` in the fabric namespace (the "physical network": a
    /// client outside every node, tcpdump on br0), bounded by 30 s.
    pub fn exec_in_fabric<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Output> {
        self.exec_in_fabric_timeout(argv, EXEC_TIMEOUT)
    }

    pub fn exec_in_fabric_timeout<S: AsRef<OsStr>>(
        &self,
        argv: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        cmd::run(&mut sys::in_netns(&self.fabric_ns(), argv), timeout)
    }

    /// Starts `argv` in node `i`'s namespace in the background (servers,
    /// captures). Stop it with `Background::stop`; teardown kills it anyway.
    pub fn spawn_in_node<S: AsRef<OsStr>>(&self, i: usize, argv: &[S]) -> Result<Background> {
        self.check_node(i)?;
        cmd::spawn(&mut sys::in_netns(&self.node_ns(i), argv))
    }

    pub fn spawn_in_fabric<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Background> {
        cmd::spawn(&mut sys::in_netns(&self.fabric_ns(), argv))
    }

    /// Adds the outside host: a namespace (`<prefix>-wan`, removed with the lab) at
    /// [`layout::OUTSIDE_ADDR`], behind the fabric, which now routes between the nodes and it
    /// over a link of `mtu` bytes (smaller than the fabric's 1500: path MTU discovery has to
    /// work across it). No node is on that link; the nodes reach it through their default
    /// route, as a LAN server or the internet.
    pub fn add_outside_host(&self, mtu: u32) -> Result<()> {
        let fabric = self.fabric_ns();
        let wan = self.outside_ns();
        self.add_netns(&wan)?;
        let mtu = mtu.to_string();
        sys::ip(&[
            "link", "add", "wan0", "netns", &fabric, "mtu", &mtu, "type", "veth", "peer", "name",
            UPLINK, "netns", &wan, "mtu", &mtu,
        ])?;
        let gw = format!("{}/{}", layout::OUTSIDE_GATEWAY, layout::OUTSIDE_PREFIX_LEN);
        sys::ip(&["-n", &fabric, "addr", "add", &gw, "dev", "wan0"])?;
        sys::ip(&["-n", &fabric, "link", "set", "wan0", "up"])?;
        let addr = format!("{}/{}", layout::OUTSIDE_ADDR, layout::OUTSIDE_PREFIX_LEN);
        sys::ip(&["-n", &wan, "addr", "add", &addr, "dev", UPLINK])?;
        sys::ip(&["-n", &wan, "link", "set", UPLINK, "up"])?;
        let via = layout::OUTSIDE_GATEWAY.to_string();
        sys::ip(&[
            "-n", &wan, "route", "add", "default", "via", &via, "dev", UPLINK,
        ])?;
        let mut c = sys::in_netns(&fabric, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        cmd::run(&mut c, Duration::from_secs(10))?.check()?;
        Ok(())
    }

    pub fn outside_ns(&self) -> String {
        layout::outside_ns(&self.prefix)
    }

    /// Runs `argv` on the outside host (see [`Lab::add_outside_host`]).
    pub fn exec_in_outside_timeout<S: AsRef<OsStr>>(
        &self,
        argv: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        cmd::run(&mut sys::in_netns(&self.outside_ns(), argv), timeout)
    }

    pub fn spawn_in_outside<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Background> {
        cmd::spawn(&mut sys::in_netns(&self.outside_ns(), argv))
    }

    // ---- topology -------------------------------------------------------

    fn build_topology(&self) -> Result<()> {
        let fabric = self.fabric_ns();
        self.add_netns(&fabric)?;
        sys::ip(&["-n", &fabric, "link", "add", BRIDGE, "type", "bridge"])?;
        let gateway = format!("{FABRIC_GATEWAY}/{}", layout::FABRIC_PREFIX_LEN);
        sys::ip(&["-n", &fabric, "addr", "add", &gateway, "dev", BRIDGE])?;
        if self.config.store == StoreKind::Etcd {
            for k in 0..self.config.etcd_members.max(1) {
                let etcd = format!(
                    "{}/{}",
                    layout::etcd_member_addr(k),
                    layout::FABRIC_PREFIX_LEN
                );
                sys::ip(&["-n", &fabric, "addr", "add", &etcd, "dev", BRIDGE])?;
            }
        }
        sys::ip(&["-n", &fabric, "link", "set", BRIDGE, "up"])?;

        for i in 1..=self.config.nodes {
            let ns = self.node_ns(i);
            let port = layout::node_name(i);
            self.add_netns(&ns)?;
            // Both ends are created directly in their namespaces, so no
            // interface ever appears in the root namespace.
            sys::ip(&[
                "link", "add", UPLINK, "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &fabric,
            ])?;
            let addr = format!("{}/{}", layout::node_addr(i), layout::FABRIC_PREFIX_LEN);
            sys::ip(&["-n", &ns, "addr", "add", &addr, "dev", UPLINK])?;
            sys::ip(&["-n", &ns, "link", "set", UPLINK, "up"])?;
            // Like a real host: a default route via the "physical" gateway.
            // The gateway is the fabric namespace, which routes nowhere.
            let gw = FABRIC_GATEWAY.to_string();
            sys::ip(&[
                "-n", &ns, "route", "add", "default", "via", &gw, "dev", UPLINK,
            ])?;
            sys::ip(&["-n", &fabric, "link", "set", &port, "master", BRIDGE, "up"])?;
        }
        Ok(())
    }

    fn add_netns(&self, ns: &str) -> Result<()> {
        sys::ip(&["netns", "add", ns])?;
        sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        if !self.config.ipv6 && Path::new("/proc/sys/net/ipv6").exists() {
            // Before any interface is added, so `default` covers them all.
            let mut c = sys::in_netns(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            );
            cmd::run(&mut c, Duration::from_secs(10))?.check()?;
        }
        Ok(())
    }

    // ---- etcd -----------------------------------------------------------

    /// Starts etcd (again) in the fabric namespace and waits until it is
    /// healthy. Its data dir is kept across stop/start.
    pub fn start_etcd(&self) -> Result<()> {
        if self.config.store != StoreKind::Etcd {
            bail!(
                "lab {} uses the embedded store: there is no etcd",
                self.prefix
            );
        }
        {
            let mut procs = self.lock();
            if let Some(child) = procs.etcd.as_mut()
                && child.try_wait()?.is_none()
            {
                bail!("etcd of lab {} is already running", self.prefix);
            }
            let child = self.spawn_etcd()?;
            record::write_pid(&self.run_dir, record::ETCD, child.id())?;
            procs.etcd = Some(child);
        }
        self.wait_etcd_healthy(Instant::now() + ETCD_READY_TIMEOUT)
    }

    /// Starts member `k` >= 1 of a multi-member etcd (again, after [`Lab::stop_etcd_member`]);
    /// it is healthy once a quorum runs.
    pub fn start_etcd_member(&self, k: usize) -> Result<()> {
        if k == 0 || k >= self.config.etcd_members {
            bail!(
                "lab {} has no etcd member {k} (members 1..{} can be started on their own)",
                self.prefix,
                self.config.etcd_members
            );
        }
        let mut procs = self.lock();
        if procs.etcd_members.len() < k {
            procs.etcd_members.resize_with(k, || None);
        }
        if let Some(child) = procs.etcd_members[k - 1].as_mut()
            && child.try_wait()?.is_none()
        {
            bail!("etcd member {k} of lab {} is already running", self.prefix);
        }
        let child = self.spawn_etcd_member(k)?;
        record::write_pid(&self.run_dir, &format!("etcd{k}"), child.id())?;
        procs.etcd_members[k - 1] = Some(child);
        Ok(())
    }

    /// Kills etcd member `k` >= 1 with `signal` (SIGKILL: a member that dies).
    pub fn stop_etcd_member(&self, k: usize, signal: Signal) -> Result<()> {
        let child = self
            .lock()
            .etcd_members
            .get_mut(k.wrapping_sub(1))
            .and_then(Option::take);
        let Some(mut child) = child else {
            bail!("etcd member {k} of lab {} is not running", self.prefix);
        };
        let result = stop_child(&mut child, signal, STOP_GRACE);
        record::remove_pid(&self.run_dir, &format!("etcd{k}"));
        result.map(drop)
    }

    fn spawn_etcd(&self) -> Result<Child> {
        self.spawn_etcd_member(0)
    }

    fn spawn_etcd_member(&self, k: usize) -> Result<Child> {
        let addr = layout::etcd_member_addr(k);
        let client = format!("http://{addr}:{ETCD_PORT}");
        let members = self.config.etcd_members.max(1);
        // One member: peers only on the fabric namespace's loopback. More: each on its own
        // fabric address.
        let peer_of = |k: usize| match members {
            1 => "http://127.0.0.1:2380".to_owned(),
            _ => format!("http://{}:2380", layout::etcd_member_addr(k)),
        };
        let name_of = |k: usize| match k {
            0 => "netlab".to_owned(),
            k => format!("netlab{k}"),
        };
        let peer = peer_of(k);
        let peer = peer.as_str();
        let name = name_of(k);
        let data_dir = match k {
            0 => layout::etcd_data_dir(&self.prefix),
            k => layout::etcd_member_data_dir(&self.prefix, k),
        };
        let data_dir = data_dir.to_string_lossy();
        let initial_cluster = (0..members)
            .map(|m| format!("{}={}", name_of(m), peer_of(m)))
            .collect::<Vec<_>>()
            .join(",");
        let argv = [
            ETCD_BIN,
            "--name",
            &name,
            "--data-dir",
            &data_dir,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ];
        let mut c = sys::in_netns(&self.fabric_ns(), &argv);
        // etcd reads ETCD_* variables as flags; the host's must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                c.env_remove(key);
            }
        }
        let log = match k {
            0 => layout::etcd_log(&self.prefix),
            k => layout::etcd_member_log(&self.prefix, k),
        };
        spawn_daemon(c, &log, "etcd")
    }

    fn etcdctl_health(&self) -> Result<Output> {
        let endpoint = format!("{ETCD_ADDR}:{ETCD_PORT}");
        let mut c = sys::in_netns(
            &self.fabric_ns(),
            &[
                "etcdctl",
                "--endpoints",
                &endpoint,
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "endpoint",
                "health",
            ],
        );
        c.env("ETCDCTL_API", "3");
        cmd::run(&mut c, Duration::from_secs(5))
    }

    fn wait_etcd_healthy(&self, deadline: Instant) -> Result<()> {
        let log = layout::etcd_log(&self.prefix);
        loop {
            if let Some(child) = self.lock().etcd.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "etcd exited ({status}) before it was healthy; last lines of {}:\n{}",
                    log.display(),
                    log_tail(&log)
                );
            }
            let health = self.etcdctl_health();
            if matches!(&health, Ok(out) if out.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last = match health {
                    Ok(out) => format!("{}{}", out.stdout, out.stderr),
                    Err(e) => format!("{e:#}"),
                };
                bail!(
                    "etcd not healthy within {ETCD_READY_TIMEOUT:?}: {}; last lines of {}:\n{}",
                    last.trim(),
                    log.display(),
                    log_tail(&log)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops etcd (SIGTERM, SIGKILL after 5 s) so tests can see how agents
    /// behave when the store is unreachable.
    pub fn stop_etcd(&self) -> Result<()> {
        let child = self.lock().etcd.take();
        let Some(mut child) = child else {
            bail!("etcd of lab {} is not running", self.prefix);
        };
        let result = stop_child(&mut child, Signal::SIGTERM, STOP_GRACE);
        record::remove_pid(&self.run_dir, record::ETCD);
        result.map(drop)
    }

    // ---- agents ---------------------------------------------------------

    fn netagent_bin(&self) -> Result<PathBuf> {
        match &self.netagent {
            Some(p) => Ok(p.clone()),
            None => bins::find(
                "netagent",
                "NETAGENT_BIN",
                self.config.netagent_bin.as_deref(),
            ),
        }
    }

    fn start_all_agents(&self) -> Result<()> {
        let bin = self.netagent_bin()?;
        // Spawn all, then wait: agents start in parallel.
        for i in 1..=self.config.nodes {
            self.spawn_agent_locked(i, &bin)?;
        }
        let deadline = Instant::now() + self.config.agent_ready_timeout;
        for i in 1..=self.config.nodes {
            self.wait_agent_ready(i, deadline)?;
        }
        Ok(())
    }

    /// (Re)starts agent `i` with the same arguments as at `up` and waits
    /// until it accepts connections on its socket.
    pub fn start_agent(&self, i: usize) -> Result<()> {
        self.check_node(i)?;
        let bin = self.netagent_bin()?;
        self.spawn_agent_locked(i, &bin)?;
        self.wait_agent_ready(i, Instant::now() + self.config.agent_ready_timeout)
    }

    fn spawn_agent_locked(&self, i: usize, bin: &Path) -> Result<()> {
        let mut procs = self.lock();
        if let Some(child) = procs.agents[i - 1].as_mut()
            && child.try_wait()?.is_none()
        {
            bail!("agent n{i} of lab {} is already running", self.prefix);
        }
        let child = self.spawn_agent(i, bin)?;
        record::write_pid(&self.run_dir, &layout::node_name(i), child.id())?;
        procs.agents[i - 1] = Some(child);
        Ok(())
    }

    fn spawn_agent(&self, i: usize, bin: &Path) -> Result<Child> {
        let socket = layout::socket(&self.prefix, i);
        // A socket file left by a killed agent would look like readiness.
        match fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
        }
        let state = layout::state_dir(&self.prefix, i);
        fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        sys::ensure_bpffs()?;
        let bpf = layout::bpf_dir(&self.prefix, i);
        fs::create_dir_all(&bpf).with_context(|| format!("creating {}", bpf.display()))?;

        let mut argv = vec![bin.to_string_lossy().into_owned()];
        argv.extend(agent_args(&self.prefix, i, &self.config));
        let mut c = sys::in_netns(&layout::node_ns(&self.prefix, i), &argv);
        c.env_remove("NOTIFY_SOCKET");
        c.envs(self.config.agent_env.iter().map(|(k, v)| (k, v)));
        spawn_daemon(
            c,
            &layout::agent_log(&self.prefix, i),
            &format!("agent n{i}"),
        )
    }

    fn wait_agent_ready(&self, i: usize, deadline: Instant) -> Result<()> {
        let socket = layout::socket(&self.prefix, i);
        let log = layout::agent_log(&self.prefix, i);
        loop {
            match self.lock().agents[i - 1].as_mut() {
                None => bail!("agent n{i} is not running"),
                Some(child) => {
                    if let Some(status) = child.try_wait()? {
                        bail!(
                            "agent n{i} exited ({status}) before its socket {} accepted \
                             connections; last lines of {}:\n{}",
                            socket.display(),
                            log.display(),
                            log_tail(&log)
                        );
                    }
                }
            }
            // Connect rather than test for the file: the socket is ready
            // only once the agent listens on it.
            if UnixStream::connect(&socket).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent n{i} did not accept connections on {} within {:?}; last lines of {}:\n{}",
                    socket.display(),
                    self.config.agent_ready_timeout,
                    log.display(),
                    log_tail(&log)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (SIGKILL, SIGTERM, ...) to agent `i` and waits for it
    /// to exit (5 s after SIGKILL, 10 s otherwise; past that it is killed
    /// and an error returned). Restart it with [`Lab::start_agent`].
    pub fn kill_agent(&self, i: usize, signal: Signal) -> Result<ExitStatus> {
        self.check_node(i)?;
        let child = self.lock().agents[i - 1].take();
        let Some(mut child) = child else {
            bail!("agent n{i} of lab {} is not running", self.prefix);
        };
        let grace = match signal {
            Signal::SIGKILL => Duration::from_secs(5),
            _ => 2 * STOP_GRACE,
        };
        let result = stop_child(&mut child, signal, grace);
        record::remove_pid(&self.run_dir, &layout::node_name(i));
        result
    }

    // ---- teardown -------------------------------------------------------

    fn teardown(&mut self) -> Result<()> {
        let procs = self.procs.get_mut().unwrap_or_else(PoisonError::into_inner);
        let mut errors = Vec::new();
        // Agents before etcd: they may deregister from the store on SIGTERM.
        let agents: Vec<Child> = procs.agents.iter_mut().filter_map(Option::take).collect();
        if let Err(e) = stop_children(agents, STOP_GRACE) {
            errors.push(e);
        }
        let mut etcd: Vec<Child> = procs.etcd.take().into_iter().collect();
        etcd.extend(procs.etcd_members.iter_mut().filter_map(Option::take));
        if let Err(e) = stop_children(etcd, STOP_GRACE) {
            errors.push(e);
        }
        if let Err(e) = teardown::down(&self.prefix) {
            errors.push(e);
        }
        match errors.is_empty() {
            true => Ok(()),
            false => bail!(
                "{}",
                errors
                    .iter()
                    .map(|e| format!("{e:#}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.teardown() {
            eprintln!("netlab: teardown of lab {} incomplete: {e:#}", self.prefix);
        }
    }
}

fn store_url(config: &LabConfig) -> String {
    match config.store {
        StoreKind::Etcd => {
            let endpoints: Vec<String> = (0..config.etcd_members.max(1))
                .map(|k| format!("{}:{ETCD_PORT}", layout::etcd_member_addr(k)))
                .collect();
            format!("etcd://{}", endpoints.join(","))
        }
        StoreKind::Embedded => "embedded".to_owned(),
    }
}

/// netagent's command line for node `i` (DESIGN.md section 5 plus the lease TTL).
fn agent_args(prefix: &str, i: usize, config: &LabConfig) -> Vec<String> {
    let mut args: Vec<String> = [
        "--node-name".to_owned(),
        layout::node_name(i),
        "--advertise-addr".to_owned(),
        layout::node_addr(i).to_string(),
        "--store".to_owned(),
        store_url(config),
        "--socket".to_owned(),
        layout::socket(prefix, i).to_string_lossy().into_owned(),
        "--state-dir".to_owned(),
        layout::state_dir(prefix, i).to_string_lossy().into_owned(),
        "--bpf-dir".to_owned(),
        layout::bpf_dir(prefix, i).to_string_lossy().into_owned(),
        "--uplink".to_owned(),
        UPLINK.to_owned(),
        "--lease-ttl".to_owned(),
        config.lease_ttl_secs.to_string(),
        // Container namespaces carry the lab's prefix, so teardown finds and removes them and
        // parallel labs never collide on a container name.
        "--netns-prefix".to_owned(),
        format!("{prefix}-{}-", layout::node_name(i)),
    ]
    .into();
    args.extend(config.extra_agent_args.iter().cloned());
    for (node, extra) in &config.extra_agent_args_per_node {
        if *node == i {
            args.extend(extra.iter().cloned());
        }
    }
    args
}

/// Claims a prefix by creating its run dir (atomic: two processes cannot
/// both create it).
fn claim_prefix(wanted: Option<&str>) -> Result<String> {
    fs::create_dir_all(RUN_ROOT).with_context(|| format!("creating {RUN_ROOT}"))?;
    let try_claim = |prefix: &str| -> Result<bool> {
        if !teardown::lab_namespaces(prefix)?.is_empty() {
            return Ok(false);
        }
        match fs::create_dir(layout::run_dir(prefix)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).with_context(|| format!("creating the run dir of lab {prefix}")),
        }
    };
    match wanted {
        Some(prefix) => {
            layout::validate_prefix(prefix)?;
            if !try_claim(prefix)? {
                bail!(
                    "lab {prefix} already exists (run dir or namespaces); remove it with \
                     `cargo xtask lab down --prefix {prefix}`"
                );
            }
            Ok(prefix.to_owned())
        }
        None => {
            for _ in 0..100 {
                let prefix = layout::generate_prefix();
                if try_claim(&prefix)? {
                    return Ok(prefix);
                }
            }
            bail!("could not find a free lab prefix in 100 tries")
        }
    }
}

/// Starts a long-running daemon with stdout and stderr appended to `log`.
///
/// It gets its own process group: a Ctrl-C in the terminal must not kill it
/// behind the lab's back, and a detached lab's daemons must outlive the
/// terminal. Teardown (or the next `Lab::up`, if the owner died) stops it.
fn spawn_daemon(mut c: Command, log: &Path, what: &str) -> Result<Child> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "==== netlab: starting {what}: {}", cmd::describe(&c))
        .with_context(|| format!("writing {}", log.display()))?;
    let stderr: File = file
        .try_clone()
        .with_context(|| format!("duplicating {}", log.display()))?;
    c.stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        .process_group(0);
    c.spawn()
        .with_context(|| format!("cannot start {what}: `{}`", cmd::describe(&c)))
}

/// Sends `signal`, waits up to `grace`; if still running, SIGKILL and an error.
fn stop_child(child: &mut Child, signal: Signal, grace: Duration) -> Result<ExitStatus> {
    let pid = child.id() as i32;
    sys::signal(pid, signal)?;
    if let Some(status) = wait_until(child, Instant::now() + grace)? {
        return Ok(status);
    }
    sys::signal(pid, Signal::SIGKILL)?;
    let _ = wait_until(child, Instant::now() + Duration::from_secs(5));
    bail!("pid {pid} did not exit within {grace:?} of {signal}; sent SIGKILL")
}

/// SIGTERM to all at once, one shared grace period, then SIGKILL; reaps them.
fn stop_children(mut children: Vec<Child>, grace: Duration) -> Result<()> {
    for c in &children {
        sys::signal(c.id() as i32, Signal::SIGTERM)?;
    }
    let deadline = Instant::now() + grace;
    let mut stuck = Vec::new();
    for c in &mut children {
        if wait_until(c, deadline)?.is_none() {
            sys::signal(c.id() as i32, Signal::SIGKILL)?;
            if wait_until(c, Instant::now() + Duration::from_secs(5))?.is_none() {
                stuck.push(c.id());
            }
        }
    }
    if !stuck.is_empty() {
        bail!("processes {stuck:?} survived SIGKILL for 5 s");
    }
    Ok(())
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_kind_parses_and_prints() {
        for k in [StoreKind::Etcd, StoreKind::Embedded] {
            assert_eq!(k.to_string().parse::<StoreKind>().unwrap(), k);
        }
        assert!("redis".parse::<StoreKind>().is_err());
        let mut cfg = LabConfig::default();
        assert_eq!(store_url(&cfg), "etcd://198.18.0.2:2379");
        cfg.etcd_members = 3;
        assert_eq!(
            store_url(&cfg),
            "etcd://198.18.0.2:2379,198.18.0.3:2379,198.18.0.4:2379"
        );
        cfg.store = StoreKind::Embedded;
        assert_eq!(store_url(&cfg), "embedded");
    }

    #[test]
    fn agent_command_line_follows_the_contract() {
        let cfg = LabConfig {
            lease_ttl_secs: 7,
            extra_agent_args: vec!["--dns-upstream".into(), "198.18.0.1".into()],
            ..Default::default()
        };
        assert_eq!(
            agent_args("nl1", 2, &cfg).join(" "),
            "--node-name n2 --advertise-addr 198.18.0.12 --store etcd://198.18.0.2:2379 \
             --socket /run/netlab/nl1/n2.sock --state-dir /run/netlab/nl1/n2/state \
             --bpf-dir /sys/fs/bpf/nl1/n2 --uplink eth0 --lease-ttl 7 --netns-prefix nl1-n2- \
             --dns-upstream 198.18.0.1"
        );
    }

    #[test]
    fn log_tail_keeps_the_end() {
        let path = std::env::temp_dir().join(format!("netlab-tail-{}", std::process::id()));
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(
            tail.starts_with("line 60") && tail.ends_with("line 99"),
            "{tail}"
        );
        fs::remove_file(&path).unwrap();
        assert!(log_tail(&path).contains("cannot read"));
    }

    #[test]
    fn stop_child_escalates() {
        // A child that ignores SIGTERM is killed after the grace period.
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        thread::sleep(Duration::from_millis(100));
        let err = stop_child(&mut child, Signal::SIGTERM, Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("SIGKILL"), "{err}");
        assert!(child.try_wait().unwrap().is_some());
    }
}
