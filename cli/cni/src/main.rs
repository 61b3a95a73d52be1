//! `netagent-cni`: a CNI plugin (spec 1.1) that attaches a runtime's container to a netagent
//! overlay network through the node's agent. Installed into the runtime's CNI bin directory
//! as `netagent` (the `type` of the configuration).
//!
//! The request is in the environment, the configuration on stdin; the result or a CNI error
//! object goes to stdout, diagnostics to stderr.

mod client;
mod env;
mod plugin;
mod spec;

use std::io::Read as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors are answered in the configuration's version when it has one we speak.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| spec::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_owned());
    let outcome = match read {
        Err(e) => {
            Err(spec::CniError::new(spec::code::IO, "cannot read stdin")
                .with_details(e.to_string()))
        }
        Ok(_) => env::request(|k| std::env::var(k).ok()).and_then(|req| plugin::run(&req, &stdin)),
    };
    match outcome {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "netagent-cni: {e}{}",
                if e.details.is_empty() {
                    String::new()
                } else {
                    format!(": {}", e.details)
                }
            );
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
