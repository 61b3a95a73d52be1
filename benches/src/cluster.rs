//! Driving the product on a lab, shared by the benchmarks: netctl calls,
//! what `container inspect` says, and waiting for something to converge.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netlab::Lab;
use serde_json::Value;

/// Runs netctl against node `i`'s agent; an error unless it exits 0.
pub fn netctl(lab: &Lab, i: usize, args: &[&str]) -> Result<String> {
    Ok(lab.netctl(i, args)?.check()?.stdout)
}

pub struct Container {
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

/// `netctl container inspect --format json NAME`: the `netns` path and the
/// first endpoint's address (the contract of issue 3).
pub fn inspect(lab: &Lab, i: usize, name: &str) -> Result<Container> {
    let out = netctl(lab, i, &["--format", "json", "container", "inspect", name])?;
    parse_inspect(&out).with_context(|| format!("container inspect {name}: {out}"))
}

fn parse_inspect(json: &str) -> Result<Container> {
    let v = one_object(json)?;
    let netns = v["netns"].as_str().context("no netns field")?;
    let ip = v["endpoints"][0]["ip"]
        .as_str()
        .context("no endpoints[0].ip field")?;
    Ok(Container {
        netns: PathBuf::from(netns),
        ip: parse_addr(ip)?,
    })
}

/// `netctl service inspect --format json NAME`: the service's VIP on `network`.
pub fn service_vip(lab: &Lab, i: usize, name: &str, network: &str) -> Result<Ipv4Addr> {
    let out = netctl(lab, i, &["--format", "json", "service", "inspect", name])?;
    parse_vip(&out, network).with_context(|| format!("service inspect {name}: {out}"))
}

fn parse_vip(json: &str, network: &str) -> Result<Ipv4Addr> {
    let v = one_object(json)?;
    let vip = v["vips"]
        .as_array()
        .context("no vips field")?
        .iter()
        .find(|e| e["network"].as_str() == Some(network))
        .and_then(|e| e["vip"].as_str())
        .with_context(|| format!("no VIP on network {network}"))?;
    parse_addr(vip)
}

/// An inspect answer: one name gives one object; accept a one-element list as well.
fn one_object(json: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(json).context("not JSON")?;
    Ok(match v {
        Value::Array(mut items) if items.len() == 1 => items.remove(0),
        other => other,
    })
}

/// Either a bare address or address/prefix.
fn parse_addr(s: &str) -> Result<Ipv4Addr> {
    let ip = s.split('/').next().unwrap_or(s);
    ip.parse().with_context(|| format!("bad address {ip:?}"))
}

/// Calls `f` until it succeeds or `timeout` has passed; then its last error.
pub fn retry<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Every node's drop counters that are not zero, as `n1 reason=count` words (from `node
/// inspect`): what a benchmark quotes when a run of this product saw errors.
pub fn drops(lab: &Lab, nodes: usize) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for i in 1..=nodes {
        let name = lab.node_name(i);
        let json = netctl(lab, i, &["--format", "json", "node", "inspect", &name])?;
        let v = one_object(&json)?;
        if let Some(drops) = v["datapath"]["drops"].as_object() {
            for (reason, n) in drops {
                if let Some(n) = n.as_u64().filter(|n| *n > 0) {
                    out.insert(format!("{name} {reason}"), n);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    #[test]
    fn inspect_contract() {
        let obj = r#"{"name":"srv","node":"n2","netns":"/run/netns/p-n2-srv",
            "endpoints":[{"network":"bench","ip":"10.50.0.3","mac":"02:00:00:00:00:01"}]}"#;
        let c = parse_inspect(obj).unwrap();
        assert_eq!(c.netns, PathBuf::from("/run/netns/p-n2-srv"));
        assert_eq!(c.ip, Ipv4Addr::new(10, 50, 0, 3));
        let list = r#"[{"netns":"/x","endpoints":[{"ip":"10.50.0.4/24"}]}]"#;
        assert_eq!(parse_inspect(list).unwrap().ip, Ipv4Addr::new(10, 50, 0, 4));
        assert!(parse_inspect(r#"{"netns":"/x","endpoints":[]}"#).is_err());
    }

    #[test]
    fn service_vip_per_network() {
        let obj = r#"[{"name":"web","vips":[{"network":"a","vip":"10.1.0.2"},
            {"network":"bench","vip":"10.53.0.2/24"}]}]"#;
        assert_eq!(
            parse_vip(obj, "bench").unwrap(),
            Ipv4Addr::new(10, 53, 0, 2)
        );
        assert!(parse_vip(obj, "other").is_err());
        assert!(parse_vip(r#"{"name":"db","vips":[]}"#, "a").is_err());
    }

    #[test]
    fn retry_gives_the_last_error() {
        let mut n = 0;
        let err = retry::<()>(Duration::from_millis(300), || {
            n += 1;
            bail!("attempt {n}")
        })
        .unwrap_err();
        assert!(n >= 2, "{n}");
        assert!(
            format!("{err:#}").contains(&format!("attempt {n}")),
            "{err:#}"
        );
        assert_eq!(retry(Duration::ZERO, || Ok(5)).unwrap(), 5);
    }
}
