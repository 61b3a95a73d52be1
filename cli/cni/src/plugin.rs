//! The six verbs against the agent's attach API.

use std::time::Duration;

use serde_json::{Value, json};

use crate::client::{Client, Response, TransportError, encode};
use crate::env::{Command, Request, attachment_id};
use crate::spec::{self, CniError, NetConf, code, version_at_least};

/// How long each verb waits for the agent. ADD and DEL include the agent's own work (a
/// replica's removal drains for a second); STATUS must answer quickly whatever happens.
const ADD_TIMEOUT: Duration = Duration::from_secs(60);
const DEL_TIMEOUT: Duration = Duration::from_secs(60);
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `req` with the configuration on `stdin`; what to print on success.
pub fn run(req: &Request, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if req.command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    if conf.kind != "netagent" {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("type {:?}: this plugin is \"netagent\"", conf.kind),
        ));
    }
    let needs = |min: &str, verb: &str| {
        if version_at_least(&conf.cni_version, min) {
            Ok(())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{verb} needs CNI {min} or later; the config says {}",
                    conf.cni_version
                ),
            ))
        }
    };
    match req.command {
        Command::Add => add(req, &conf).map(Some),
        Command::Del => del(req, &conf).map(|()| None),
        Command::Check => {
            needs("0.4.0", "CHECK")?;
            check(req, &conf).map(|()| None)
        }
        Command::Status => {
            needs("1.1.0", "STATUS")?;
            status(&conf).map(|()| None)
        }
        Command::Gc => {
            needs("1.1.0", "GC")?;
            gc(&conf).map(|()| None)
        }
        Command::Version => unreachable!("answered above"),
    }
}

/// VERSION: the versions we speak, in the one asked for if we speak it.
fn version(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| spec::SUPPORTED.contains(&v.as_str()));
    json!({
        "cniVersion": asked.as_deref().unwrap_or("1.1.0"),
        "supportedVersions": spec::SUPPORTED,
    })
}

/// The agent could not be asked: it may be restarting.
fn unreachable(e: TransportError) -> CniError {
    CniError::new(code::TRY_AGAIN, "netagent did not answer; try again").with_details(e.to_string())
}

/// The agent said no: its message, with a code for what kind of no.
fn refused(resp: &Response, not_found: u32, conflict: u32) -> CniError {
    let c = match resp.status {
        400 => code::INVALID_CONFIG,
        404 => not_found,
        409 => conflict,
        503 => code::TRY_AGAIN,
        _ => code::AGENT_FAILED,
    };
    CniError::new(c, resp.error_message())
}

fn add(req: &Request, conf: &NetConf) -> Result<Value, CniError> {
    let netns = req.netns.as_deref().unwrap_or_default();
    if !std::path::Path::new(netns).exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {netns} does not exist"),
        ));
    }
    let id = attachment_id(&req.container_id, &req.ifname);
    let service = req
        .args
        .service
        .clone()
        .or_else(|| conf.args.cni.service.clone())
        .or_else(|| conf.service.clone());
    let mut aliases: Vec<String> = Vec::new();
    // The pod name is a DNS name only when it can be one: Kubernetes allows 253 characters,
    // a DNS label 63; a pod must not fail to start over its name.
    let pod_name = req.args.pod_name.iter().filter(|n| {
        let usable = valid_name(n);
        if !usable {
            eprintln!("netagent-cni: pod name {n:?} is not a usable DNS name; not an alias");
        }
        usable
    });
    let candidates = pod_name
        .chain(&req.args.aliases)
        .chain(&conf.args.cni.aliases)
        .cloned()
        .chain(conf.runtime_aliases());
    for a in candidates {
        if a != id && !aliases.contains(&a) {
            aliases.push(a);
        }
    }
    let body = json!({
        "netns": netns,
        "ifname": req.ifname,
        "network": conf.network(),
        "id": id,
        "service": service,
        "aliases": aliases,
        "cni": { "container_id": req.container_id, "ifname": req.ifname, "network": conf.name },
    });
    let client = Client::new(conf.socket(), ADD_TIMEOUT);
    let resp = client
        .request("POST", "/v1/attach", Some(body.to_string().as_bytes()))
        .map_err(unreachable)?;
    if resp.status != 200 {
        return Err(refused(&resp, code::INVALID_CONFIG, code::CONFLICT));
    }
    let mut ours: Value = serde_json::from_slice(&resp.body).map_err(|e| {
        CniError::new(code::AGENT_FAILED, "netagent's answer is not a result")
            .with_details(e.to_string())
    })?;
    let dns = &conf.dns;
    if !dns.search.is_empty() {
        ours["dns"]["search"] = json!(dns.search);
    }
    if !dns.options.is_empty() {
        ours["dns"]["options"] = json!(dns.options);
    }
    if let Some(d) = &dns.domain {
        ours["dns"]["domain"] = json!(d);
    }
    let result = match &conf.prev_result {
        Some(prev) => spec::merge_results(&spec::result_for_version(prev.clone(), "1.0.0"), &ours),
        None => ours,
    };
    Ok(spec::result_for_version(result, &conf.cni_version))
}

/// The agent's rule for names (and aliases): 1-63 letters, digits, `-_.`, starting with a
/// letter or digit.
fn valid_name(n: &str) -> bool {
    n.len() <= 63
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn identity_query(req: &Request) -> String {
    format!(
        "container_id={}&ifname={}",
        encode(&req.container_id),
        encode(&req.ifname)
    )
}

/// DEL: done when the agent removed it or has no such attachment (already deleted, or ADD
/// never got that far); only an agent that cannot be asked is an error (the runtime retries).
fn del(req: &Request, conf: &NetConf) -> Result<(), CniError> {
    let id = attachment_id(&req.container_id, &req.ifname);
    let client = Client::new(conf.socket(), DEL_TIMEOUT);
    let path = format!("/v1/attach/{}?{}", encode(&id), identity_query(req));
    let resp = client.request("DELETE", &path, None).map_err(unreachable)?;
    match resp.status {
        204 | 404 => Ok(()),
        _ => Err(refused(&resp, code::UNKNOWN_CONTAINER, code::CONFLICT)),
    }
}

/// CHECK: the agent verifies the namespace side and the datapath; the previous result must
/// still hold our address.
fn check(req: &Request, conf: &NetConf) -> Result<(), CniError> {
    if conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult (the result ADD returned)",
        ));
    }
    let id = attachment_id(&req.container_id, &req.ifname);
    let client = Client::new(conf.socket(), CHECK_TIMEOUT);
    let path = format!("/v1/attach/{}/check?{}", encode(&id), identity_query(req));
    let resp = client.request("GET", &path, None).map_err(unreachable)?;
    if resp.status != 200 {
        return Err(refused(&resp, code::UNKNOWN_CONTAINER, code::CHECK_FAILED));
    }
    let attachment: Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    if let (Some(prev), Some(ip)) = (&conf.prev_result, attachment["ip"].as_str()) {
        let listed = prev["ips"].as_array().is_some_and(|ips| {
            ips.iter().any(|i| {
                i["address"]
                    .as_str()
                    .and_then(|a| a.split('/').next())
                    .is_some_and(|a| a == ip)
            })
        });
        if !listed {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("the previous result does not list the attachment's address {ip}"),
            ));
        }
    }
    Ok(())
}

/// STATUS: ready for ADD when the agent answers and knows the network.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let client = Client::new(conf.socket(), STATUS_TIMEOUT);
    let path = format!("/v1/networks/{}", encode(conf.network()));
    let resp = client.request("GET", &path, None).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("netagent is not reachable at {}", client.socket()),
        )
        .with_details(e.to_string())
    })?;
    match resp.status {
        200 => Ok(()),
        404 => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("network {:?} does not exist", conf.network()),
        )),
        _ => Err(CniError::new(code::NOT_AVAILABLE, resp.error_message())),
    }
}

/// GC: removes the attachments this CNI network made on the node that the runtime no longer
/// lists.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    // Without the list the runtime said nothing about what is in use: collecting then would
    // remove every attachment.
    let Some(valid) = conf.valid_attachments.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments",
        ));
    };
    let client = Client::new(conf.socket(), DEL_TIMEOUT);
    let resp = client
        .request("GET", "/v1/attach", None)
        .map_err(unreachable)?;
    if resp.status != 200 {
        return Err(refused(&resp, code::AGENT_FAILED, code::AGENT_FAILED));
    }
    let list: Vec<Value> = serde_json::from_slice(&resp.body).map_err(|e| {
        CniError::new(
            code::AGENT_FAILED,
            "netagent's attachment list is not a list",
        )
        .with_details(e.to_string())
    })?;
    let mut first_error = None;
    for a in list {
        let (Some(id), Some(cid), Some(ifname)) = (
            a["id"].as_str(),
            a["cni"]["container_id"].as_str(),
            a["cni"]["ifname"].as_str(),
        ) else {
            continue; // not made through CNI: not ours to collect
        };
        // Only what this CNI network added: another configuration (or runtime) on the same
        // netagent network has its own list.
        if a["network"] != conf.network()
            || a["cni"]["network"] != conf.name.as_str()
            || valid
                .iter()
                .any(|v| v.container_id == cid && v.ifname == ifname)
        {
            continue;
        }
        let path = format!(
            "/v1/attach/{}?container_id={}&ifname={}",
            encode(id),
            encode(cid),
            encode(ifname)
        );
        match client.request("DELETE", &path, None) {
            Ok(r) if r.status == 204 || r.status == 404 => {
                eprintln!("netagent-cni: GC removed {id}");
            }
            Ok(r) => {
                first_error.get_or_insert(refused(&r, code::AGENT_FAILED, code::CONFLICT));
            }
            Err(e) => {
                first_error.get_or_insert(unreachable(e));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
