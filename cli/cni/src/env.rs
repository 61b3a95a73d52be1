//! The request's environment (CNI_COMMAND, CNI_CONTAINERID, ...) and CNI_ARGS. No I/O: the
//! caller passes the variables in.

use crate::spec::{CniError, code};

/// The verbs of CNI 1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// What the runtime asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: CniArgs,
}

/// The CNI_ARGS this plugin understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// Kubernetes' and Podman's name of the pod or container: a DNS name for it.
    pub pod_name: Option<String>,
    /// `NETAGENT_SERVICE`: the service it is a replica of.
    pub service: Option<String>,
    /// `NETAGENT_ALIASES`: more DNS names, comma separated.
    pub aliases: Vec<String>,
}

/// Keys other runtimes pass that carry nothing for us.
const IGNORED_KEYS: &[&str] = &[
    "K8S_POD_NAMESPACE",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IgnoreUnknown",
];

/// `KEY=VALUE;KEY=VALUE`. An unknown key is an error unless `IgnoreUnknown=1` (or `true`) is
/// among them, as the conventions say.
pub fn parse_args(s: &str) -> Result<CniArgs, CniError> {
    let pairs: Vec<(&str, &str)> = s
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: {p:?} is not KEY=VALUE"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let ignore_unknown = pairs.iter().any(|(k, v)| {
        *k == "IgnoreUnknown" && (v.eq_ignore_ascii_case("1") || v.eq_ignore_ascii_case("true"))
    });
    let mut args = CniArgs::default();
    for (k, v) in pairs {
        match k {
            "K8S_POD_NAME" if !v.is_empty() => args.pod_name = Some(v.to_owned()),
            "NETAGENT_SERVICE" if !v.is_empty() => args.service = Some(v.to_owned()),
            "NETAGENT_ALIASES" => {
                args.aliases = v
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "K8S_POD_NAME" | "NETAGENT_SERVICE" => {}
            k if IGNORED_KEYS.contains(&k) || ignore_unknown => {}
            k => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS: unknown key {k:?} (and no IgnoreUnknown=1)"),
                ));
            }
        }
    }
    Ok(args)
}

/// Container ids: letters, digits, `_`, `.`, `-`, starting with a letter or digit (the spec).
fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Reads the request from `var` (the process environment in `main`).
pub fn request(var: impl Fn(&str) -> Option<String>) -> Result<Request, CniError> {
    let missing = |name: &str| CniError::new(code::INVALID_ENV, format!("{name} is not set"));
    let command_s = var("CNI_COMMAND").ok_or_else(|| missing("CNI_COMMAND"))?;
    let command = Command::parse(&command_s).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {command_s:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
        )
    })?;
    let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
    let get = |name: &str| var(name).filter(|v| !v.is_empty());
    let container_id = match get("CNI_CONTAINERID") {
        Some(id) if valid_container_id(&id) => id,
        Some(id) => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_CONTAINERID {id:?}: letters, digits, '_', '.' and '-' only"),
            ));
        }
        None if per_container => return Err(missing("CNI_CONTAINERID")),
        None => String::new(),
    };
    let ifname = match get("CNI_IFNAME") {
        Some(i) => i,
        None if per_container => return Err(missing("CNI_IFNAME")),
        None => String::new(),
    };
    let netns = get("CNI_NETNS");
    if netns.is_none() && matches!(command, Command::Add | Command::Check) {
        return Err(missing("CNI_NETNS"));
    }
    let args = parse_args(&var("CNI_ARGS").unwrap_or_default())?;
    Ok(Request {
        command,
        container_id,
        netns,
        ifname,
        args,
    })
}

/// The agent's name for the attachment: the container id (at most 40 characters of it: ids
/// are 64 random hex digits, 40 of them do not collide) and the interface, a valid container
/// name of at most 63 characters. The agent also records the whole id and interface and
/// only ever removes the attachment they name.
pub fn attachment_id(container_id: &str, ifname: &str) -> String {
    let id: String = container_id.chars().take(40).collect();
    let ifname: String = ifname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{id}-{ifname}").chars().take(63).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn reads_the_request_and_names_what_is_missing() {
        let r = request(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;FOO=bar"),
        ]))
        .unwrap();
        assert_eq!(r.command, Command::Add);
        assert_eq!(r.args.pod_name.as_deref(), Some("web"));
        let e = request(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")])).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_IFNAME is not set"));
        let e = request(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert_eq!(e.msg, "CNI_NETNS is not set");
        // DEL needs no namespace; STATUS, GC and VERSION no container.
        let del = request(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]));
        assert!(del.unwrap().netns.is_none());
        assert!(request(env(&[("CNI_COMMAND", "STATUS")])).is_ok());
        assert_eq!(request(env(&[("CNI_COMMAND", "PUT")])).unwrap_err().code, 4);
        assert_eq!(request(env(&[])).unwrap_err().code, 4);
        let bad = request(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "-x/y"),
            ("CNI_IFNAME", "eth0"),
        ]));
        assert_eq!(bad.unwrap_err().code, 4);
    }

    #[test]
    fn args_know_their_keys() {
        let a =
            parse_args("NETAGENT_SERVICE=web;NETAGENT_ALIASES=a,b;K8S_POD_NAMESPACE=ns").unwrap();
        assert_eq!(a.service.as_deref(), Some("web"));
        assert_eq!(a.aliases, ["a", "b"]);
        assert!(parse_args("FOO=1").is_err());
        assert!(parse_args("FOO=1;IgnoreUnknown=true").is_ok());
        assert!(parse_args("novalue").is_err());
        assert_eq!(parse_args("").unwrap(), CniArgs::default());
    }

    #[test]
    fn attachment_ids_are_valid_names() {
        let long = "a".repeat(64);
        let id = attachment_id(&long, "eth0");
        assert_eq!(id, format!("{}-eth0", "a".repeat(40)));
        assert_eq!(attachment_id("c1", "net@1"), "c1-net_1");
        assert!(attachment_id(&long, &"x".repeat(30)).len() <= 63);
    }
}
