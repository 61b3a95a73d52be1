//! End to end (root): a real runtime. Podman (Debian's, with `network_backend = "cni"` and
//! runc) runs a container from a local busybox root filesystem on a netagent overlay network
//! through `netagent-cni`; it reaches a netagent container on the other node by address and
//! by name, that container resolves it, and `podman rm` leaves nothing behind.
//!
//! Podman is confined to this test: its storage, run and temporary directories and its CNI
//! configuration live in the lab's run directory (`CONTAINERS_CONF`, `--root`, `--runroot`),
//! and its default network is ours, so it never creates its own `cni-podman0` bridge.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netlab::Lab;

mod common;
use common::{etcd_lab, ok, wait_until, workspace_bin};

struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Configuration, plugin directory and root filesystem under `dir`.
    fn new(lab: &Lab, dir: &Path) -> Podman {
        let p = Podman {
            dir: dir.to_path_buf(),
        };
        for d in ["bin", "net.d", "root", "runroot", "tmp", "rootfs/bin"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        // The runtime looks plugins up by `type`: netagent-cni is installed as `netagent`.
        std::os::unix::fs::symlink(workspace_bin("netagent-cni"), dir.join("bin/netagent"))
            .unwrap();
        std::fs::write(
            dir.join("net.d/10-netagent.conflist"),
            format!(
                r#"{{"cniVersion":"1.0.0","name":"services","plugins":[{{"type":"netagent","network":"services","socket":"{}"}}]}}"#,
                lab.socket(1).display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{0}/bin\"]\n\
                 network_config_dir = \"{0}/net.d\"\ndefault_network = \"services\"\n\
                 [engine]\ntmp_dir = \"{0}/tmp\"\nevents_logger = \"file\"\n",
                dir.display()
            ),
        )
        .unwrap();
        std::fs::copy("/bin/busybox", dir.join("rootfs/bin/busybox")).unwrap();
        for applet in [
            "sh", "sleep", "ping", "nslookup", "nc", "printf", "ip", "cat",
        ] {
            std::os::unix::fs::symlink("busybox", dir.join("rootfs/bin").join(applet)).unwrap();
        }
        p
    }

    /// `podman ARGS`, bounded by 60 s: (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(args);
        let out = netlab::run(&mut c, Duration::from_secs(60)).expect("run podman");
        (out.success(), out.stdout, out.stderr)
    }

    fn exec(&self, name: &str, cmd: &[&str]) -> (bool, String, String) {
        let mut argv = vec!["exec", name];
        argv.extend_from_slice(cmd);
        self.run(&argv)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Whatever the test did: no container, mount or namespace of podman's stays.
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

#[test]
fn podman_runs_a_container_on_the_overlay_across_nodes() {
    let lab = etcd_lab(2);
    ok(
        &lab,
        1,
        &[
            "network",
            "create",
            "--subnet",
            "10.99.0.0/24",
            "--attachable",
            "services",
        ],
    );
    common::http_server(&lab, 2, "peer", "services", None);
    let peer = common::container_ip(&lab, 2, "peer");
    let podman = Podman::new(&lab, &lab.run_dir().join("podman"));
    let namespaces_before = netns_list();
    let links_before = lab
        .exec_in_node(1, &["ip", "-o", "link"])
        .unwrap()
        .stdout
        .lines()
        .count();

    let rootfs = podman.dir.join("rootfs").display().to_string();
    let (good, out, err) = podman.run(&[
        "run",
        "-d",
        "--name",
        "box",
        "--network",
        "services",
        "--dns",
        "127.0.0.11",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--rootfs",
        &rootfs,
        "/bin/sleep",
        "300",
    ]);
    assert!(
        good,
        "podman run: {out}{err}\nagent log:\n{}",
        lab.agent_log(1)
    );

    // Its address on the overlay, as the agent recorded the attachment.
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    let attachments: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ip = attachments[0]["ip"]
        .as_str()
        .expect("an attachment")
        .to_owned();
    assert!(ip.starts_with("10.99.0."), "{list}");
    let (_, addr, _) = podman.exec("box", &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{ip}/24")), "{addr}");

    // To the other node's container by address and by name.
    let (good, out, err) = podman.exec("box", &["ping", "-c", "1", "-W", "2", &peer]);
    assert!(good, "ping {peer}: {out}{err}");
    let (good, out, err) = podman.exec("box", &["nslookup", "peer", "127.0.0.11"]);
    assert!(good && out.contains(&peer), "nslookup: {out}{err}");
    // HTTP by name (busybox's nc: its static wget crashes resolving through glibc's NSS).
    let (good, out, err) = podman.exec(
        "box",
        &[
            "sh",
            "-c",
            r#"printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 peer 80"#,
        ],
    );
    assert!(
        good && out.ends_with("peer"),
        "GET http://peer/: {out}{err}"
    );
    // And back: the netagent container resolves the Podman container by its name.
    let named = wait_until(Duration::from_secs(5), || {
        common::exec(
            &lab,
            2,
            "peer",
            &["dig", "+short", "+time=1", "+tries=1", "@127.0.0.11", "box"],
        )
        .stdout
        .contains(&ip)
    });
    assert!(named.is_some(), "box does not resolve on n2");

    // podman rm: the attachment, its namespace and its interface go; nothing of Podman's own
    // network is made.
    let start = Instant::now();
    let (good, out, err) = podman.run(&["rm", "--force", "--time", "0", "box"]);
    assert!(good, "podman rm: {out}{err}");
    let (_, list) = common::api(&lab, 1, "GET", "/v1/attach", "");
    assert_eq!(list.trim(), "[]", "after {:?}", start.elapsed());
    assert_eq!(netns_list(), namespaces_before);
    let host_links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!host_links.contains("cni-podman"), "{host_links}");
    let node_links = lab.exec_in_node(1, &["ip", "-o", "link"]).unwrap().stdout;
    assert_eq!(node_links.lines().count(), links_before, "{node_links}");
    let on_n2 = common::json(&lab, 2, &["container", "ls"]).to_string();
    assert!(!on_n2.contains(&ip), "{on_n2}");
}
