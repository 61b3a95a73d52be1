//! `netctl monitor`: the agent's drop (or trace) events, one line each, until Ctrl-C.

use clap::Args;
use serde_json::Value;

use crate::Format;
use crate::client::Client;

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Events to show: `drop`, or `trace`: packets the datapath let through, as they left
    /// each hook (at most 1000 per CPU per second).
    #[arg(long = "type", default_value = "drop", value_parser = ["drop", "trace"])]
    kind: String,
    /// Only events of this network.
    #[arg(long)]
    network: Option<String>,
    /// Only events to or from this container.
    #[arg(long)]
    container: Option<String>,
}

pub async fn run(client: &Client, format: Format, args: MonitorArgs) -> anyhow::Result<()> {
    let mut path = format!("/v1/monitor?type={}", encode(&args.kind));
    if let Some(n) = &args.network {
        path.push_str(&format!("&network={}", encode(n)));
    }
    if let Some(c) = &args.container {
        path.push_str(&format!("&container={}", encode(c)));
    }
    client
        .follow_lines(&path, |line| {
            match format {
                Format::Json => println!("{line}"),
                Format::Table => match serde_json::from_str::<Value>(line) {
                    Ok(v) => println!("{}", render(&v)),
                    Err(_) => println!("{line}"),
                },
            }
            Ok(())
        })
        .await
}

/// Percent-encodes a query value (names are letters, digits, `-_.`; anything else is escaped).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn render(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    if v["type"] == "lost" {
        return format!(
            "!! {} events lost ({})",
            v["count"].as_u64().unwrap_or(0),
            match v["by"].as_str() {
                Some("client") => "this client read too slowly",
                _ => "datapath: ring buffer full or rate-limited",
            }
        );
    }
    let addr = |ip: &str, port: &str| match v[port].as_u64() {
        Some(p) => format!("{}:{p}", s(ip)),
        None => s(ip),
    };
    let what = match v["action"].as_str() {
        Some(action) => format!("trace:{action}"),
        None => s("reason"),
    };
    let mut line = format!(
        "{} {} {} {} {} -> {}",
        s("time"),
        s("hook"),
        what,
        s("proto"),
        addr("src", "src_port"),
        addr("dst", "dst_port"),
    );
    if let Some(n) = v["network"].as_str() {
        line.push_str(&format!(" net {n}"));
    }
    if v["vni"].as_u64().unwrap_or(0) != 0 {
        line.push_str(&format!(" vni {}", v["vni"]));
    }
    let who = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    if v["src_container"].is_string() || v["dst_container"].is_string() {
        line.push_str(&format!(
            " ({} -> {})",
            who("src_container"),
            who("dst_container")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_drop_and_a_loss() {
        let v: Value = serde_json::from_str(
            r#"{"type":"drop","time":"T","hook":"from_container","reason":"policy_isolation",
                "proto":"udp","src":"10.0.0.2","dst":"10.1.0.2","src_port":40000,"dst_port":7,
                "vni":0,"network":"a","src_container":"x","len":60,"ifindex":3}"#,
        )
        .unwrap();
        assert_eq!(
            render(&v),
            "T from_container policy_isolation udp 10.0.0.2:40000 -> 10.1.0.2:7 net a (x -> -)"
        );
        let lost: Value =
            serde_json::from_str(r#"{"type":"lost","count":5,"by":"client"}"#).unwrap();
        assert!(render(&lost).starts_with("!! 5 events lost"));
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
