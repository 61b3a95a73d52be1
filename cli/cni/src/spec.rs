//! The CNI specification's data (1.1, down to 0.3.0): versions, the network configuration
//! this plugin reads, error codes, and results in the shape each version expects. No I/O.

use serde::Deserialize;
use serde_json::{Value, json};

/// Versions this plugin speaks, oldest first. 0.1.0 and 0.2.0 results had another shape.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The agent's socket when the configuration names none.
pub const DEFAULT_SOCKET: &str = "/run/netagent/netagent.sock";

/// Error codes of the specification (section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100+): the agent refused the request as conflicting with what it has.
    pub const CONFLICT: u32 = 100;
    /// Plugin-specific: the attachment is not what ADD made (CHECK).
    pub const CHECK_FAILED: u32 = 101;
    /// Plugin-specific: the agent failed internally.
    pub const AGENT_FAILED: u32 = 102;
}

/// An error as the plugin prints it on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (CNI error {code})")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The error object, in `version` (the config's, or the newest when it is unknown).
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

/// Compares dotted versions numerically ("0.10.0" > "0.4.0").
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(min)
}

/// DNS settings of the configuration, passed on in results.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct DnsConf {
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub domain: Option<String>,
}

/// Per-container settings under `args.cni` (the CNI conventions' place for them).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ArgsCni {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Args {
    #[serde(default)]
    pub cni: ArgsCni,
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's configuration as the runtime passes it on stdin: the network's `name` and
/// `cniVersion` with this plugin's entry of the list, plus what the runtime adds.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The netagent network; the CNI network's name when not given.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub socket: Option<String>,
    /// Every container of this configuration joins this service (unless its args say
    /// another).
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub dns: DnsConf,
    #[serde(default)]
    pub args: Args,
    #[serde(default, rename = "runtimeConfig")]
    pub runtime_config: Value,
    #[serde(default, rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Refused: netagent assigns addresses itself.
    #[serde(default)]
    pub ipam: Option<Value>,
}

impl NetConf {
    /// Parses and checks the configuration: version supported, type ours, no IPAM section.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE, "cannot decode the network configuration")
                .with_details(e.to_string())
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "CNI version {} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if conf.ipam.is_some() {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "ipam: netagent assigns addresses itself; remove the ipam section",
            ));
        }
        if conf.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "name must not be empty",
            ));
        }
        Ok(conf)
    }

    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }

    pub fn socket(&self) -> &str {
        self.socket.as_deref().unwrap_or(DEFAULT_SOCKET)
    }

    /// Aliases the runtime passes through the `aliases` capability, for this network.
    pub fn runtime_aliases(&self) -> Vec<String> {
        self.runtime_config["aliases"][&self.name]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Turns a 1.0-shaped result into `version`'s shape: before 1.0.0 each IP says its family.
pub fn result_for_version(mut result: Value, version: &str) -> Value {
    result["cniVersion"] = json!(version);
    let old = !version_at_least(version, "1.0.0");
    if let Some(ips) = result["ips"].as_array_mut() {
        for ip in ips {
            if old {
                let v6 = ip["address"].as_str().is_some_and(|a| a.contains(':'));
                ip["version"] = json!(if v6 { "6" } else { "4" });
            } else if let Some(o) = ip.as_object_mut() {
                o.remove("version");
            }
        }
    }
    result
}

/// Adds `ours` (1.0 shaped) to a previous plugin's result: interfaces appended, our IPs'
/// interface indexes moved past the previous ones, routes appended, DNS merged.
pub fn merge_results(prev: &Value, ours: &Value) -> Value {
    let list = |v: &Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    let mut interfaces = list(prev, "interfaces");
    let offset = interfaces.len() as u64;
    interfaces.extend(list(ours, "interfaces"));
    let mut ips = list(prev, "ips");
    for mut ip in list(ours, "ips") {
        if let Some(i) = ip["interface"].as_u64() {
            ip["interface"] = json!(i + offset);
        }
        ips.push(ip);
    }
    let mut routes = list(prev, "routes");
    routes.extend(list(ours, "routes"));
    let mut dns = prev["dns"].clone();
    if !dns.is_object() {
        dns = json!({});
    }
    for key in ["nameservers", "search", "options"] {
        let mut merged = list(&dns, key);
        for v in list(&ours["dns"], key) {
            if !merged.contains(&v) {
                merged.push(v);
            }
        }
        if !merged.is_empty() {
            dns[key] = Value::Array(merged);
        }
    }
    if dns.get("domain").is_none()
        && let Some(d) = ours["dns"].get("domain")
    {
        dns["domain"] = d.clone();
    }
    let mut out = prev.clone();
    if !out.is_object() {
        out = json!({});
    }
    out["interfaces"] = Value::Array(interfaces);
    out["ips"] = Value::Array(ips);
    out["routes"] = Value::Array(routes);
    out["dns"] = dns;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"services","type":"netagent"{extra}}}"#)
                .as_bytes(),
        )
    }

    #[test]
    fn configuration_defaults_and_refusals() {
        let c = conf("").unwrap();
        assert_eq!(c.network(), "services");
        assert_eq!(c.socket(), DEFAULT_SOCKET);
        let c = conf(r#","network":"other","socket":"/s","dns":{"search":["svc"]}"#).unwrap();
        assert_eq!((c.network(), c.socket()), ("other", "/s"));
        assert_eq!(c.dns.search, ["svc"]);
        let e =
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"netagent"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert_eq!(
            conf(r#","ipam":{"type":"host-local"}"#).unwrap_err().code,
            2
        );
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, code::DECODE);
        let c = conf(r#","runtimeConfig":{"aliases":{"services":["a","b"],"x":["c"]}}"#).unwrap();
        assert_eq!(c.runtime_aliases(), ["a", "b"]);
    }

    #[test]
    fn results_take_the_shape_of_the_version() {
        let r = json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
            "ips":[{"address":"10.0.0.2/24","interface":0}],"routes":[],"dns":{}});
        let old = result_for_version(r.clone(), "0.3.1");
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        let new = result_for_version(old, "1.1.0");
        assert_eq!(new["cniVersion"], "1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert!(version_at_least("0.10.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }

    #[test]
    fn chained_results_keep_the_previous_plugins_part() {
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"lo0"}],
            "ips":[{"address":"192.168.1.2/24","interface":0}],
            "dns":{"nameservers":["1.1.1.1"]}});
        let ours = json!({"interfaces":[{"name":"eth0"}],
            "ips":[{"address":"10.0.0.2/24","interface":0}],
            "routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["127.0.0.11"],"search":["s"]}});
        let m = merge_results(&prev, &ours);
        assert_eq!(m["interfaces"].as_array().unwrap().len(), 2);
        assert_eq!(m["ips"][1]["interface"], 1);
        assert_eq!(m["ips"][0]["address"], "192.168.1.2/24");
        assert_eq!(m["dns"]["nameservers"], json!(["1.1.1.1", "127.0.0.11"]));
        assert_eq!(m["dns"]["search"], json!(["s"]));
        assert_eq!(m["routes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn errors_print_in_the_spec_shape() {
        let e = CniError::new(code::TRY_AGAIN, "agent restarting").with_details("ECONNREFUSED");
        let v = e.to_json("1.1.0");
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent restarting");
        assert_eq!(v["details"], "ECONNREFUSED");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert!(
            CniError::new(3, "x")
                .to_json("1.0.0")
                .get("details")
                .is_none()
        );
    }
}
