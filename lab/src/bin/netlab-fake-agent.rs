//! A stand-in for `netagent` for netlab's own tests.
//!
//! It takes netagent's flags (and insists on the ones the lab must pass),
//! listens on `--socket` as the real agent's API does and answers every
//! connection with one line, so the lab's agent handling (start, readiness,
//! logs, kill, restart, teardown) is testable without the real agent.
//! Extra flags: `--fail` exits with an error before listening;
//! `--never-listen` runs without ever opening the socket.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::exit;
use std::thread;
use std::time::Duration;

const REQUIRED: [&str; 8] = [
    "--node-name",
    "--advertise-addr",
    "--store",
    "--socket",
    "--state-dir",
    "--bpf-dir",
    "--uplink",
    "--lease-ttl",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("fake-netagent: started with {}", args.join(" "));
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(missing) = REQUIRED.iter().find(|f| value(f).is_none()) {
        eprintln!("fake-netagent: fatal: missing {missing}");
        exit(2);
    }
    if args.iter().any(|a| a == "--fail") {
        eprintln!("fake-netagent: fatal: told to fail");
        exit(3);
    }
    if args.iter().any(|a| a == "--never-listen") {
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }
    let (Some(socket), Some(node)) = (value("--socket"), value("--node-name")) else {
        unreachable!("checked above");
    };
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-netagent: fatal: binding {socket}: {e}");
            exit(1);
        }
    };
    println!("fake-netagent: {node} listening on {socket}");
    for mut conn in listener.incoming().flatten() {
        let _ = writeln!(conn, "fake-netagent {node}");
    }
}
