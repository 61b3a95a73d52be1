//! The DNS benchmark's lab (DESIGN.md section 9, DNS row; issue 5): one
//! node running netagent with a local upstream resolver, one network with
//! `total` names on it, a client container to query from, and dnsmasq
//! serving the same names as the baseline.
//!
//! Where things run:
//! - netagent's resolver: 127.0.0.11:53 in the client container's network
//!   namespace (the agent opens it there, as for every container).
//! - the baseline dnsmasq: 127.0.0.12:53 in that same namespace, from a hosts
//!   file with the same names and addresses. Same namespace, same loopback
//!   path, same client: the server is the only difference.
//! - the upstream for forwarded names: dnsmasq on the fabric gateway address
//!   (198.18.0.1:53, the lab's "physical network"), answering every name
//!   under `fwd.test` itself, so a forwarded query measures netagent's
//!   forwarding and not some real resolver.
//!
//! The names: `SERVICES` services `svc<k>` (VIP mode), each with one replica
//! container `ctr<k>`, and the rest as aliases `n<j>` spread over those
//! containers (a command line takes 100 aliases easily; 1000 containers
//! would take minutes to start on 2 CPUs and say nothing more about DNS).
//!
//! Everything lives in the lab: the files in its run dir, the servers in its
//! namespaces, so the lab's teardown (on drop, also on error or panic, or by
//! the next `Lab::up` if this process was killed) removes them all.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netlab::{Background, FABRIC_GATEWAY, Lab, LabConfig, StoreKind};
use serde::Serialize;

use crate::cluster::{inspect, netctl, retry, service_vip};
use crate::dnsperf::{self, Load};
use crate::tools::{self, QUICK};

/// netagent's resolver, in every container.
pub const OURS_ADDR: &str = "127.0.0.11";
/// The dnsmasq baseline, next to it in the client container's namespace.
pub const BASELINE_ADDR: &str = "127.0.0.12";
/// Forwarded names are `f<j>.fwd.test`; the upstream answers them all with this.
pub const FORWARDED_DOMAIN: &str = "fwd.test";
const FORWARDED_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Services, and so replica containers carrying the aliases.
pub const SERVICES: usize = 10;
/// The fewest names that still give every container an alias.
pub const MIN_NAMES: usize = 2 * SERVICES + SERVICES;

const NETWORK: &str = "bench";
/// Room for the containers and the VIPs.
const SUBNET: &str = "10.53.0.0/24";
const CLIENT: &str = "client";
/// How long the resolvers may take to answer every name: netagent learns
/// the containers through its etcd watch.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// One pass over a query file (1000 queries) takes well under a second;
/// this bounds a pass whose queries all time out (1 s each, 100 in flight).
const PASS_TIMEOUT: Duration = Duration::from_secs(20);

/// How many names of each kind, as quoted with the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NameCounts {
    pub total: usize,
    pub services: usize,
    pub containers: usize,
    pub aliases: usize,
    /// Names in the forwarded query file.
    pub forwarded: usize,
}

impl NameCounts {
    /// `total` names: `SERVICES` services, as many containers, the rest aliases.
    pub fn new(total: usize) -> Result<NameCounts> {
        if total < MIN_NAMES {
            bail!("at least {MIN_NAMES} names, one alias per container at least");
        }
        Ok(NameCounts {
            total,
            services: SERVICES,
            containers: SERVICES,
            aliases: total - 2 * SERVICES,
            forwarded: total,
        })
    }

    /// Aliases of container `k`: every `SERVICES`-th, from `k` on.
    fn aliases_of(&self, k: usize) -> Vec<String> {
        (k..self.aliases)
            .step_by(self.containers)
            .map(alias)
            .collect()
    }
}

fn service(k: usize) -> String {
    format!("svc{k}")
}

fn container(k: usize) -> String {
    format!("ctr{k}")
}

fn alias(j: usize) -> String {
    format!("n{j:04}")
}

fn forwarded(j: usize) -> String {
    format!("f{j:04}.{FORWARDED_DOMAIN}")
}

/// The lab, ready: every name answers on both resolvers.
pub struct DnsLab {
    /// Network namespace of the client container; dnsperf runs there.
    pub client_netns: PathBuf,
    pub local_queries: PathBuf,
    pub forwarded_queries: PathBuf,
    /// Where dnsperf writes its output (tmpfs, rewritten by every run).
    pub dnsperf_out: PathBuf,
    pub names: NameCounts,
    /// The processes whose CPU time is read around each run; `None` if the
    /// pid turned out not to be the server itself.
    pub agent_pid: Option<u32>,
    pub baseline_pid: Option<u32>,
    pub upstream_pid: Option<u32>,
    /// Declared before `lab` so they are stopped before it is torn down.
    baseline: Background,
    upstream: Background,
    lab: Lab,
}

impl DnsLab {
    pub fn prefix(&self) -> &str {
        self.lab.prefix()
    }

    pub fn build(names: NameCounts) -> Result<DnsLab> {
        let upstream_addr = format!("{FABRIC_GATEWAY}:53");
        let lab = Lab::up(LabConfig {
            nodes: 1,
            store: StoreKind::Etcd,
            extra_agent_args: vec!["--dns-upstream".to_owned(), upstream_addr],
            ..Default::default()
        })
        .context("lab for the DNS benchmark")?;
        eprintln!("bench:   lab {}", lab.prefix());
        let upstream = lab.spawn_in_fabric(&dnsmasq_argv(
            &FABRIC_GATEWAY.to_string(),
            &[format!("--address=/{FORWARDED_DOMAIN}/{FORWARDED_ANSWER}")],
        ))?;

        let records = populate(&lab, &names)?;
        let client = {
            netctl(
                &lab,
                1,
                &[
                    "container",
                    "run",
                    "-d",
                    "--name",
                    CLIENT,
                    "--network",
                    NETWORK,
                    "--",
                    "sleep",
                    "3600",
                ],
            )?;
            inspect(&lab, 1, CLIENT)?
        };

        let dir = lab.run_dir().join("dns-bench");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let hosts = dir.join("hosts");
        let local_queries = dir.join("local.queries");
        let forwarded_queries = dir.join("forwarded.queries");
        write(&hosts, records.iter().map(|(n, ip)| format!("{ip} {n}")))?;
        write(
            &local_queries,
            records.iter().map(|(n, _)| format!("{n} A")),
        )?;
        write(
            &forwarded_queries,
            (0..names.forwarded).map(|j| format!("{} A", forwarded(j))),
        )?;

        let baseline = netlab::spawn(&mut tools::in_netns(
            &client.netns,
            &dnsmasq_argv(
                BASELINE_ADDR,
                &[format!("--addn-hosts={}", hosts.display())],
            ),
        ))?;

        let mut dns_lab = DnsLab {
            client_netns: client.netns,
            local_queries,
            forwarded_queries,
            dnsperf_out: dir.join("dnsperf.out"),
            names,
            agent_pid: None,
            baseline_pid: None,
            upstream_pid: None,
            baseline,
            upstream,
            lab,
        };
        dns_lab
            .wait_ready(&records)
            .with_context(|| format!("DNS lab {}", dns_lab.prefix()))?;
        // Only now: until dnsmasq answers, its pid may still be nsenter's.
        dns_lab.agent_pid = dns_lab
            .lab
            .agent_pid(1)
            .filter(|&p| is_process(p, "netagent"));
        dns_lab.baseline_pid = Some(dns_lab.baseline.pid()).filter(|&p| is_process(p, "dnsmasq"));
        dns_lab.upstream_pid = Some(dns_lab.upstream.pid()).filter(|&p| is_process(p, "dnsmasq"));
        Ok(dns_lab)
    }

    /// Waits until both resolvers answer every query of their files with
    /// NOERROR, then checks that they give the same addresses for a few
    /// names of each kind: a resolver that answered fast with nothing, or
    /// with something else, would win the benchmark.
    fn wait_ready(&self, records: &[(String, Ipv4Addr)]) -> Result<()> {
        for (server, queries, n) in [
            (OURS_ADDR, &self.local_queries, self.names.total),
            (OURS_ADDR, &self.forwarded_queries, self.names.forwarded),
            (BASELINE_ADDR, &self.local_queries, self.names.total),
        ] {
            retry(READY_TIMEOUT, || self.one_pass(server, queries, n)).with_context(|| {
                format!(
                    "{server} never answered every query of {}",
                    queries.display()
                )
            })?;
        }
        let mut checks: Vec<(&str, String, Ipv4Addr)> = Vec::new();
        // A service, a container, the first and the last alias.
        for (name, ip) in [
            &records[0],
            &records[SERVICES],
            &records[2 * SERVICES],
            &records[records.len() - 1],
        ] {
            checks.push((OURS_ADDR, name.clone(), *ip));
            checks.push((BASELINE_ADDR, name.clone(), *ip));
        }
        checks.push((OURS_ADDR, forwarded(0), FORWARDED_ANSWER));
        for (server, name, want) in checks {
            let got = tools::run_in(
                &self.client_netns,
                &[
                    "dig",
                    "+short",
                    "+tries=1",
                    "+time=2",
                    &format!("@{server}"),
                    &name,
                    "A",
                ],
                QUICK,
            )?;
            if got.trim() != want.to_string() {
                bail!("{server} answers {name} with {got:?}, expected {want}");
            }
        }
        Ok(())
    }

    /// One pass over `queries` at `server`: every query must come back NOERROR.
    fn one_pass(&self, server: &str, queries: &Path, n: usize) -> Result<()> {
        let run = dnsperf::run(
            &self.client_netns,
            server,
            queries,
            None,
            Load::Saturate,
            &self.dnsperf_out,
            PASS_TIMEOUT,
        )?
        .parse()?;
        if run.noerror() != n as u64 {
            bail!(
                "{} NOERROR answers of {n}: {}",
                run.noerror(),
                run.problem().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Creates the network, the services and their containers with the aliases;
/// returns every name with the address it must resolve to, services first,
/// then containers, then aliases.
fn populate(lab: &Lab, names: &NameCounts) -> Result<Vec<(String, Ipv4Addr)>> {
    netctl(lab, 1, &["network", "create", "--subnet", SUBNET, NETWORK])?;
    let mut services = Vec::new();
    let mut containers = Vec::new();
    let mut aliases = vec![None; names.aliases];
    for k in 0..names.services {
        let svc = service(k);
        netctl(
            lab,
            1,
            &["service", "create", "--name", &svc, "--network", NETWORK],
        )?;
        let ctr = container(k);
        let mine = names.aliases_of(k);
        let mut args: Vec<&str> = vec![
            "container",
            "run",
            "-d",
            "--name",
            &ctr,
            "--network",
            NETWORK,
            "--service",
            &svc,
        ];
        for a in &mine {
            args.extend(["--alias", a.as_str()]);
        }
        args.extend(["--", "sleep", "3600"]);
        netctl(lab, 1, &args)?;
        let ip = inspect(lab, 1, &ctr)?.ip;
        for j in (k..names.aliases).step_by(names.containers) {
            aliases[j] = Some(ip);
        }
        services.push((svc.clone(), service_vip(lab, 1, &svc, NETWORK)?));
        containers.push((ctr, ip));
    }
    let aliases = aliases
        .into_iter()
        .enumerate()
        .map(|(j, ip)| Ok((alias(j), ip.with_context(|| format!("alias {j} unplaced"))?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(services
        .into_iter()
        .chain(containers)
        .chain(aliases)
        .collect())
}

/// dnsmasq answering on `addr`:53 from what `extra` gives it and nothing
/// else: no /etc/dnsmasq.conf, /etc/hosts or resolv.conf; in the foreground
/// (so the lab can stop it), logging to stderr, no pid file. Its cache is on
/// (default size); hosts-file names are answered from it regardless.
fn dnsmasq_argv(addr: &str, extra: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--log-facility=-",
        // Stays root: nothing to gain from dropping privileges in a lab, and
        // the default user may not exist.
        "--user=root",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
    ]
    .map(str::to_owned)
    .into();
    argv.push(format!("--listen-address={addr}"));
    argv.extend_from_slice(extra);
    argv
}

fn write(path: &Path, lines: impl Iterator<Item = String>) -> Result<()> {
    let text: String = lines.map(|l| l + "\n").collect();
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// True if `pid` is the program `comm` itself (not, say, the nsenter that
/// was to exec it): its CPU time is then the server's.
fn is_process(pid: u32, comm: &str) -> bool {
    let found = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let ok = found.trim() == comm;
    if !ok {
        eprintln!(
            "bench: warning: pid {pid} is {:?}, not {comm}; its CPU time is not reported",
            found.trim()
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_thousand_names() {
        let n = NameCounts::new(1000).unwrap();
        assert_eq!((n.services, n.containers, n.aliases), (10, 10, 980));
        let all: Vec<String> = (0..n.containers).flat_map(|k| n.aliases_of(k)).collect();
        assert_eq!(all.len(), 980);
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), 980);
        assert_eq!(n.aliases_of(0).len(), 98);
        assert_eq!(n.aliases_of(3)[..2], ["n0003", "n0013"]);
        assert!(NameCounts::new(MIN_NAMES - 1).is_err());
        let few = NameCounts::new(MIN_NAMES).unwrap();
        assert!((0..few.containers).all(|k| few.aliases_of(k).len() == 1));
    }

    #[test]
    fn dnsmasq_command_line() {
        let argv = dnsmasq_argv("127.0.0.12", &["--addn-hosts=/h".to_owned()]).join(" ");
        assert!(argv.starts_with("dnsmasq --keep-in-foreground --conf-file=/dev/null"));
        assert!(argv.ends_with("--listen-address=127.0.0.12 --addn-hosts=/h"));
        assert_eq!(forwarded(7), "f0007.fwd.test");
    }
}
