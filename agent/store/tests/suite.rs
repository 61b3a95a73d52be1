//! One suite of store semantics, run against both backends (`embedded::*` and `etcd::*`), plus
//! backend-specific cases (persistence of the redb file; etcd restarts and unreachable etcd).
//!
//! The etcd cases start a real etcd per test (`/usr/bin/etcd`, or `NETAGENT_TEST_ETCD`) on free
//! loopback ports with a temporary data dir; it is killed and removed when the test ends, also
//! on panic. Every wait is bounded.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use netagent_store::embedded::{EmbeddedOptions, EmbeddedStore};
use netagent_store::etcd::{EtcdOptions, EtcdStore};
use netagent_store::{Compare, Op, Revision, Store, StoreError, WatchEvent, WatchStream};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for a whole test case.
const CASE_LIMIT: Duration = Duration::from_secs(90);
/// Upper bound for one expected event or condition.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is observed.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Backends

struct Backend {
    // Field order matters: the store is dropped before the process or directory under it.
    store: Arc<dyn Store>,
    _guard: Guard,
}

#[allow(dead_code)] // the guards are held only for their Drop
enum Guard {
    Dir(TempDir),
    Etcd(EtcdProcess),
}

async fn embedded_backend() -> Backend {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    Backend {
        store: Arc::new(store),
        _guard: Guard::Dir(dir),
    }
}

async fn etcd_backend() -> Backend {
    let etcd = EtcdProcess::start().await;
    let store = EtcdStore::connect(&etcd.spec(), vec![etcd.endpoint()])
        .await
        .unwrap();
    Backend {
        store: Arc::new(store),
        _guard: Guard::Etcd(etcd),
    }
}

/// A real etcd process on free loopback ports. Killed (and its data dir removed) on drop.
struct EtcdProcess {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdProcess {
    fn binary() -> PathBuf {
        let bin = std::env::var_os("NETAGENT_TEST_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        assert!(
            bin.is_file(),
            "etcd binary not found at {}: the etcd store tests need a real etcd \
             (Debian package etcd-server, or set NETAGENT_TEST_ETCD=/path/to/etcd)",
            bin.display()
        );
        bin
    }

    /// Ports and data dir, not started yet.
    fn prepare() -> Self {
        // Fail here, with the clear message, if etcd is missing.
        Self::binary();
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        EtcdProcess {
            child: None,
            dir: TempDir::new().unwrap(),
            client_port,
            peer_port,
        }
    }

    /// Starts a fresh etcd, retrying with other ports if the chosen ones were taken meanwhile.
    async fn start() -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let mut etcd = Self::prepare();
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spec(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts etcd on this instance's ports and data dir and waits until it is healthy.
    async fn launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.endpoint();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(Self::binary());
        cmd.arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=netagent-store-test")
            // A single member elects itself after one election timeout; keep start-up short.
            .arg("--heartbeat-interval=100")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It kills etcd
        // if the test thread dies without running Drop (e.g. the harness is killed).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().map_err(|e| format!("spawning etcd: {e}"))?);

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}; log:\n{}",
                    self.log_tail()
                ));
            }
            if self.healthy().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "etcd not healthy within 20 s; log:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn healthy(&self) -> bool {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
                .await
                .ok()?;
            s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut body = Vec::new();
            s.read_to_end(&mut body).await.ok()?;
            Some(String::from_utf8_lossy(&body).contains("\"health\":\"true\""))
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Some(true))
        )
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data.
    async fn restart(&mut self) {
        self.kill();
        self.launch().await.unwrap();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The store's current revision.
async fn current(store: &dyn Store) -> Revision {
    store.list("\u{1}no-such-prefix/").await.unwrap().1
}

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

async fn next_events(w: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_event(w).await);
    }
    out
}

async fn assert_quiet(w: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(QUIET, w.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

/// Simplified event for comparisons: (put?, key, value, revision).
type Ev = (bool, String, Vec<u8>, Revision);

fn simple(ev: &WatchEvent) -> Ev {
    match ev {
        WatchEvent::Put(kv) => (true, kv.key.clone(), kv.value.clone(), kv.mod_revision),
        WatchEvent::Delete { key, mod_revision } => (false, key.clone(), Vec::new(), *mod_revision),
    }
}

fn put_ev(key: &str, value: &str, rev: Revision) -> Ev {
    (true, key.to_string(), value.as_bytes().to_vec(), rev)
}

fn del_ev(key: &str, rev: Revision) -> Ev {
    (false, key.to_string(), Vec::new(), rev)
}

/// Polls `cond` until it holds, at most `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The suite, written once

mod cases {
    use super::*;

    pub async fn kv_semantics(store: Arc<dyn Store>) {
        let s = store.as_ref();
        let r0 = current(s).await;
        assert!(r0 >= 1);
        assert_eq!(s.get("a").await.unwrap(), None);

        assert!(s.create("a", b"1".to_vec(), None).await.unwrap());
        let a = s.get("a").await.unwrap().unwrap();
        assert_eq!(a.value, b"1");
        assert_eq!((a.create_revision, a.mod_revision), (r0 + 1, r0 + 1));
        assert_eq!(a.lease, None);
        assert_eq!(current(s).await, r0 + 1);

        // create-if-absent does not touch an existing key, nor the revision.
        assert!(!s.create("a", b"2".to_vec(), None).await.unwrap());
        assert_eq!(s.get("a").await.unwrap().unwrap().value, b"1");
        assert_eq!(current(s).await, r0 + 1);

        // compare-and-swap only with the current mod revision.
        assert!(!s.compare_and_swap("a", 0, b"x".to_vec()).await.unwrap());
        assert!(
            !s.compare_and_swap("a", a.mod_revision + 7, b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            s.compare_and_swap("a", a.mod_revision, b"3".to_vec())
                .await
                .unwrap()
        );
        let a2 = s.get("a").await.unwrap().unwrap();
        assert_eq!(a2.value, b"3");
        assert_eq!(a2.create_revision, a.create_revision);
        assert_eq!(a2.mod_revision, r0 + 2);
        assert!(
            !s.compare_and_swap("a", a.mod_revision, b"4".to_vec())
                .await
                .unwrap()
        );
        // expected 0 means "must not exist": creates.
        assert!(s.compare_and_swap("b", 0, b"b".to_vec()).await.unwrap());
        assert_eq!(s.get("b").await.unwrap().unwrap().create_revision, r0 + 3);

        // list: prefix only, key order, read revision.
        for k in ["dir/c", "dir/a", "dirx", "dir/b/1", "di"] {
            assert!(s.create(k, k.as_bytes().to_vec(), None).await.unwrap());
        }
        let (kvs, rev) = s.list("dir/").await.unwrap();
        let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["dir/a", "dir/b/1", "dir/c"]);
        assert_eq!(kvs[0].value, b"dir/a");
        assert_eq!(rev, r0 + 8);
        assert_eq!(rev, current(s).await);
        let (all, _) = s.list("").await.unwrap();
        assert_eq!(all.len(), 7);
        assert!(s.list("nothing/").await.unwrap().0.is_empty());

        // delete
        assert!(s.delete("a").await.unwrap());
        assert_eq!(s.get("a").await.unwrap(), None);
        assert_eq!(current(s).await, r0 + 9);
        assert!(!s.delete("a").await.unwrap());
        assert_eq!(current(s).await, r0 + 9, "deleting nothing is no change");
        // re-created keys start a new life.
        assert!(s.create("a", b"again".to_vec(), None).await.unwrap());
        let a3 = s.get("a").await.unwrap().unwrap();
        assert_eq!((a3.create_revision, a3.mod_revision), (r0 + 10, r0 + 10));
        assert!(
            s.compare_and_swap("a", a3.mod_revision, Vec::new())
                .await
                .unwrap()
        );
        assert_eq!(s.get("a").await.unwrap().unwrap().value, b"");
    }

    pub async fn txn_all_or_nothing(store: Arc<dyn Store>) {
        let s = store.as_ref();
        assert!(s.create("x", b"1".to_vec(), None).await.unwrap());
        let x = s.get("x").await.unwrap().unwrap();
        let r = current(s).await;

        let ok = s
            .txn(
                vec![
                    Compare::mod_revision("x", x.mod_revision),
                    Compare::absent("y"),
                ],
                vec![Op::put("y", "y"), Op::put("z", "z"), Op::delete("x")],
            )
            .await
            .unwrap();
        assert!(ok);
        assert_eq!(current(s).await, r + 1, "a transaction is one revision");
        let y = s.get("y").await.unwrap().unwrap();
        let z = s.get("z").await.unwrap().unwrap();
        assert_eq!((y.mod_revision, z.mod_revision), (r + 1, r + 1));
        assert_eq!(s.get("x").await.unwrap(), None);

        // One failing compare: nothing happens.
        let ok = s
            .txn(
                vec![
                    Compare::mod_revision("y", y.mod_revision),
                    Compare::absent("z"),
                ],
                vec![Op::put("w", "w"), Op::delete("y")],
            )
            .await
            .unwrap();
        assert!(!ok);
        assert_eq!(s.get("w").await.unwrap(), None);
        assert!(s.get("y").await.unwrap().is_some());
        assert_eq!(current(s).await, r + 1);

        // A compare against a deleted key sees it as absent.
        assert!(
            s.txn(vec![Compare::absent("x")], vec![Op::put("x", "back")])
                .await
                .unwrap()
        );
        assert!(
            !s.txn(
                vec![Compare::mod_revision("x", x.mod_revision)],
                vec![Op::delete("x")]
            )
            .await
            .unwrap()
        );

        // Without compares it always applies.
        assert!(s.txn(vec![], vec![Op::put("v", "v")]).await.unwrap());

        // The same key twice in one transaction is refused (as etcd does), changing nothing.
        let before = current(s).await;
        let dup = s
            .txn(vec![], vec![Op::put("d", "1"), Op::delete("d")])
            .await;
        assert!(matches!(dup, Err(StoreError::Backend(_))), "{dup:?}");
        assert_eq!(current(s).await, before);
    }

    /// 20 tasks race to take the lowest free number, serialised by a guard key: every task must
    /// end with its own number and together they fill 0..20.
    pub async fn txn_concurrent_allocation(store: Arc<dyn Store>) {
        const TASKS: usize = 20;
        let mut handles = Vec::new();
        for task in 0..TASKS {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                for _attempt in 0..2000 {
                    let guard = store
                        .get("alloc/guard")
                        .await
                        .unwrap()
                        .map_or(0, |kv| kv.mod_revision);
                    let (taken, _) = store.list("alloc/n/").await.unwrap();
                    let used: HashSet<usize> = taken
                        .iter()
                        .map(|kv| kv.key["alloc/n/".len()..].parse().unwrap())
                        .collect();
                    let n = (0..).find(|n| !used.contains(n)).unwrap();
                    let key = format!("alloc/n/{n:03}");
                    let won = store
                        .txn(
                            vec![
                                Compare::mod_revision("alloc/guard", guard),
                                Compare::absent(&*key),
                            ],
                            vec![
                                Op::put("alloc/guard", task.to_string()),
                                Op::put(key, task.to_string()),
                            ],
                        )
                        .await
                        .unwrap();
                    if won {
                        return n;
                    }
                    tokio::task::yield_now().await;
                }
                panic!("task {task} never won an allocation");
            }));
        }
        let mut got = Vec::new();
        for h in handles {
            got.push(h.await.unwrap());
        }
        got.sort_unstable();
        assert_eq!(got, (0..TASKS).collect::<Vec<_>>());
        let (kvs, _) = store.list("alloc/n/").await.unwrap();
        assert_eq!(kvs.len(), TASKS);
        let owners: HashSet<Vec<u8>> = kvs.into_iter().map(|kv| kv.value).collect();
        assert_eq!(owners.len(), TASKS, "each number has a different owner");
    }

    pub async fn watch_replays_history_then_live(store: Arc<dyn Store>) {
        let s = store.as_ref();
        let start = current(s).await + 1;
        let mut expected: Vec<Ev> = Vec::new();

        assert!(s.create("w/a", b"1".to_vec(), None).await.unwrap());
        expected.push(put_ev("w/a", "1", current(s).await));
        assert!(s.create("other/x", b"x".to_vec(), None).await.unwrap());
        let a = s.get("w/a").await.unwrap().unwrap();
        assert!(
            s.compare_and_swap("w/a", a.mod_revision, b"2".to_vec())
                .await
                .unwrap()
        );
        let middle = current(s).await;
        expected.push(put_ev("w/a", "2", middle));
        assert!(s.create("w/b", b"b".to_vec(), None).await.unwrap());
        expected.push(put_ev("w/b", "b", current(s).await));
        assert!(
            s.txn(
                vec![],
                vec![
                    Op::put("w/c", "c"),
                    Op::delete("w/b"),
                    Op::put("other/y", "y")
                ],
            )
            .await
            .unwrap()
        );
        let r = current(s).await;
        expected.push(put_ev("w/c", "c", r));
        expected.push(del_ev("w/b", r));
        assert!(s.delete("w/a").await.unwrap());
        expected.push(del_ev("w/a", current(s).await));

        let mut w = s.watch("w/", start).await.unwrap();
        let got: Vec<Ev> = next_events(&mut w, expected.len())
            .await
            .iter()
            .map(simple)
            .collect();
        assert_eq!(got, expected);

        // A watch from the middle replays only from there.
        let mut w2 = s.watch("w/", middle).await.unwrap();
        let got2: Vec<Ev> = next_events(&mut w2, expected.len() - 1)
            .await
            .iter()
            .map(simple)
            .collect();
        assert_eq!(got2, expected[1..]);

        // Then live events, once each, nothing outside the prefix.
        assert!(s.create("other/z", b"z".to_vec(), None).await.unwrap());
        assert!(s.create("w/d", b"d".to_vec(), None).await.unwrap());
        let rd = current(s).await;
        assert!(s.delete("w/c").await.unwrap());
        let live = vec![put_ev("w/d", "d", rd), del_ev("w/c", rd + 1)];
        let got: Vec<Ev> = next_events(&mut w, 2).await.iter().map(simple).collect();
        assert_eq!(got, live);
        let got2: Vec<Ev> = next_events(&mut w2, 2).await.iter().map(simple).collect();
        assert_eq!(got2, live);
        assert_quiet(&mut w).await;
        assert_quiet(&mut w2).await;

        // Put events carry the full key value.
        let mut w3 = s.watch("w/d", rd).await.unwrap();
        match next_event(&mut w3).await {
            WatchEvent::Put(kv) => {
                assert_eq!(
                    (kv.create_revision, kv.mod_revision, kv.lease),
                    (rd, rd, None)
                );
            }
            other => panic!("expected a put, got {other:?}"),
        }
    }

    pub async fn watch_from_next_revision_sees_only_new(store: Arc<dyn Store>) {
        let s = store.as_ref();
        for i in 0..5 {
            assert!(
                s.create(&format!("n/{i}"), b"old".to_vec(), None)
                    .await
                    .unwrap()
            );
        }
        let r = current(s).await;
        let mut w = s.watch("n/", r + 1).await.unwrap();
        assert_quiet(&mut w).await;
        assert!(s.create("n/new", b"new".to_vec(), None).await.unwrap());
        assert_eq!(
            simple(&next_event(&mut w).await),
            put_ev("n/new", "new", r + 1)
        );
        assert_quiet(&mut w).await;
    }

    /// A watch opened while another task writes misses nothing and repeats nothing.
    pub async fn watch_while_writing(store: Arc<dyn Store>) {
        const N: usize = 200;
        let start = current(store.as_ref()).await + 1;
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    let key = format!("c/{i:04}");
                    assert!(
                        store
                            .create(&key, key.as_bytes().to_vec(), None)
                            .await
                            .unwrap()
                    );
                }
            })
        };
        // Open the watch somewhere in the middle of the writes.
        wait_for("some writes", WAIT, || async {
            current(store.as_ref()).await >= start + 20
        })
        .await;
        let mut w = store.watch("c/", start).await.unwrap();
        let events = next_events(&mut w, N).await;
        tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
        let mut last = start - 1;
        for (i, ev) in events.iter().enumerate() {
            assert_eq!(ev.key(), format!("c/{i:04}"));
            assert!(
                ev.revision() > last,
                "revisions must grow: {ev:?} after {last}"
            );
            last = ev.revision();
        }
        assert_quiet(&mut w).await;
    }

    pub async fn lease_expiry_deletes_keys(store: Arc<dyn Store>) {
        let s = store.as_ref();
        let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
        let granted = Instant::now();
        assert!(
            s.create("node/1", b"up".to_vec(), Some(lease))
                .await
                .unwrap()
        );
        assert!(s.create("node/static", b"x".to_vec(), None).await.unwrap());
        assert_eq!(s.get("node/1").await.unwrap().unwrap().lease, Some(lease));
        let mut w = s.watch("node/", current(s).await + 1).await.unwrap();

        tokio::time::sleep(Duration::from_millis(800)).await;
        if granted.elapsed() < Duration::from_millis(1500) {
            assert!(
                s.get("node/1").await.unwrap().is_some(),
                "expired too early"
            );
        }
        wait_for("the leased key to expire", WAIT, || async {
            s.get("node/1").await.unwrap().is_none()
        })
        .await;
        // `granted` is taken after the reply, so allow for the round trip.
        assert!(
            granted.elapsed() >= Duration::from_millis(1900),
            "expired before its TTL"
        );
        match next_event(&mut w).await {
            WatchEvent::Delete { key, .. } => assert_eq!(key, "node/1"),
            other => panic!("expected the lease deletion, got {other:?}"),
        }
        assert_quiet(&mut w).await;
        assert!(s.get("node/static").await.unwrap().is_some());
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(l)) if l == lease
        ));
        assert!(matches!(
            s.create("node/2", Vec::new(), Some(lease)).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    pub async fn keep_alive_keeps_keys(store: Arc<dyn Store>) {
        let s = store.as_ref();
        let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
        assert!(s.create("ka/1", b"up".to_vec(), Some(lease)).await.unwrap());
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(400)).await;
            s.keep_alive(lease).await.unwrap();
        }
        assert!(
            s.get("ka/1").await.unwrap().is_some(),
            "key with a refreshed lease must outlive the TTL"
        );
        // Once refreshes stop, it goes.
        wait_for("the key to expire after keep-alives stop", WAIT, || async {
            s.get("ka/1").await.unwrap().is_none()
        })
        .await;
    }

    pub async fn revoke_deletes_at_once(store: Arc<dyn Store>) {
        let s = store.as_ref();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        assert!(s.create("rv/a", b"a".to_vec(), Some(lease)).await.unwrap());
        assert!(
            s.txn(vec![], vec![Op::put_with_lease("rv/b", "b", lease)])
                .await
                .unwrap()
        );
        assert!(s.create("rv/c", b"c".to_vec(), None).await.unwrap());
        // Replacing a value keeps its lease.
        let b = s.get("rv/b").await.unwrap().unwrap();
        assert!(
            s.compare_and_swap("rv/b", b.mod_revision, b"b2".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(s.get("rv/b").await.unwrap().unwrap().lease, Some(lease));

        let r = current(s).await;
        let mut w = s.watch("rv/", r + 1).await.unwrap();
        s.revoke_lease(lease).await.unwrap();
        assert_eq!(s.get("rv/a").await.unwrap(), None);
        assert_eq!(s.get("rv/b").await.unwrap(), None);
        assert!(s.get("rv/c").await.unwrap().is_some());
        assert_eq!(current(s).await, r + 1, "a revoke is one revision");
        let mut got: Vec<Ev> = next_events(&mut w, 2).await.iter().map(simple).collect();
        got.sort();
        assert_eq!(got, vec![del_ev("rv/a", r + 1), del_ev("rv/b", r + 1)]);
        assert_quiet(&mut w).await;

        assert!(matches!(
            s.revoke_lease(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.create("rv/d", Vec::new(), Some(lease)).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    pub async fn unknown_lease_is_refused(store: Arc<dyn Store>) {
        let s = store.as_ref();
        let bogus = 0x7eef_beef;
        assert!(matches!(
            s.create("u/a", Vec::new(), Some(bogus)).await,
            Err(StoreError::LeaseNotFound(l)) if l == bogus
        ));
        assert!(matches!(
            s.txn(
                vec![],
                vec![Op::put("u/b", "b"), Op::put_with_lease("u/c", "c", bogus)]
            )
            .await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert_eq!(
            s.get("u/b").await.unwrap(),
            None,
            "a refused txn changes nothing"
        );
        assert!(matches!(
            s.keep_alive(bogus).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        assert!(matches!(
            s.revoke_lease(bogus).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }
}

/// Instantiates every case for both backends; each case is bounded by CASE_LIMIT.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::embedded_backend().await;
                    tokio::time::timeout(super::CASE_LIMIT, super::cases::$case(backend.store.clone()))
                        .await
                        .expect("test case timed out");
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::etcd_backend().await;
                    tokio::time::timeout(super::CASE_LIMIT, super::cases::$case(backend.store.clone()))
                        .await
                        .expect("test case timed out");
                }
            )*
        }
    };
}

suite!(
    kv_semantics,
    txn_all_or_nothing,
    txn_concurrent_allocation,
    watch_replays_history_then_live,
    watch_from_next_revision_sees_only_new,
    watch_while_writing,
    lease_expiry_deletes_keys,
    keep_alive_keeps_keys,
    revoke_deletes_at_once,
    unknown_lease_is_refused,
);

// ---------------------------------------------------------------------------------------------
// Embedded only

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(CASE_LIMIT, f)
        .await
        .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_persists_across_reopen() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        // Parent directories are created.
        let path = dir.path().join("state/nested/store.redb");

        let (rev, long_lease, history) = {
            let s = EmbeddedStore::open(&path).unwrap();
            assert!(s.create("p/a", b"a".to_vec(), None).await.unwrap());
            assert!(s.create("p/b", b"b".to_vec(), None).await.unwrap());
            let a = s.get("p/a").await.unwrap().unwrap();
            assert!(
                s.compare_and_swap("p/a", a.mod_revision, b"a2".to_vec())
                    .await
                    .unwrap()
            );
            let long = s.grant_lease(Duration::from_secs(60)).await.unwrap();
            assert!(s.create("p/long", b"l".to_vec(), Some(long)).await.unwrap());
            let mut w = s.watch("p/", 1).await.unwrap();
            let history: Vec<Ev> = next_events(&mut w, 4).await.iter().map(simple).collect();
            (current(&s).await, long, history)
        };

        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(current(&s).await, rev, "revision survives a restart");
        assert_eq!(s.get("p/a").await.unwrap().unwrap().value, b"a2");
        assert_eq!(s.get("p/b").await.unwrap().unwrap().value, b"b");
        let l = s.get("p/long").await.unwrap().unwrap();
        assert_eq!(l.lease, Some(long_lease));
        // History survives too and continues with the next revision.
        let mut w = s.watch("p/", 1).await.unwrap();
        let replay: Vec<Ev> = next_events(&mut w, 4).await.iter().map(simple).collect();
        assert_eq!(replay, history);
        assert!(s.create("p/c", b"c".to_vec(), None).await.unwrap());
        assert_eq!(
            simple(&next_event(&mut w).await),
            put_ev("p/c", "c", rev + 1)
        );
        // The lease is still known and refreshable; new lease ids do not collide.
        s.keep_alive(long_lease).await.unwrap();
        let short = s.grant_lease(Duration::from_secs(2)).await.unwrap();
        assert_ne!(short, long_lease);
        assert!(
            s.create("p/short", b"s".to_vec(), Some(short))
                .await
                .unwrap()
        );
        drop(w);
        drop(s);

        // Closed longer than the short TTL: after reopening, its key goes right away, and
        // with a Delete event.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let s = EmbeddedStore::open(&path).unwrap();
        let r = current(&s).await;
        let mut w = s.watch("p/", r).await.unwrap();
        let reopened = Instant::now();
        wait_for(
            "the expired lease's key to go after reopen",
            WAIT,
            || async { s.get("p/short").await.unwrap().is_none() },
        )
        .await;
        assert!(
            reopened.elapsed() < Duration::from_secs(2),
            "expiry after restart was not prompt"
        );
        let mut saw_delete = false;
        while !saw_delete {
            match next_event(&mut w).await {
                WatchEvent::Delete { key, .. } => saw_delete = key == "p/short",
                WatchEvent::Put(_) => {}
            }
        }
        assert!(s.get("p/long").await.unwrap().is_some());
        assert!(matches!(
            s.keep_alive(short).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_leases_keep_their_deadline_across_reopen() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("store.redb");
        let granted = Instant::now();
        {
            let s = EmbeddedStore::open(&path).unwrap();
            let lease = s.grant_lease(Duration::from_secs(3)).await.unwrap();
            assert!(s.create("k", b"v".to_vec(), Some(lease)).await.unwrap());
        }
        // Reopened within the TTL: nobody refreshes it, so it expires 3 s after the grant, not
        // 3 s after the reopen.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s = EmbeddedStore::open(&path).unwrap();
        assert!(s.get("k").await.unwrap().is_some());
        wait_for("the key to expire", WAIT, || async {
            s.get("k").await.unwrap().is_none()
        })
        .await;
        let at = granted.elapsed();
        assert!(
            at >= Duration::from_secs(3) && at < Duration::from_millis(4200),
            "expired {at:?} after the grant"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_history_is_bounded() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let options = EmbeddedOptions {
            history: 10,
            ..EmbeddedOptions::default()
        };
        let s = EmbeddedStore::open_with(&dir.path().join("s.redb"), options).unwrap();
        for i in 0..30 {
            assert!(
                s.create(&format!("h/{i:02}"), Vec::new(), None)
                    .await
                    .unwrap()
            );
        }
        let r = current(&s).await;
        assert_eq!(r, 31);
        let mut old = s.watch("h/", 5).await.unwrap();
        match tokio::time::timeout(WAIT, old.next()).await.unwrap() {
            Some(Err(StoreError::Compacted { requested, oldest })) => {
                assert_eq!((requested, oldest), (5, r - 9));
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(
            tokio::time::timeout(WAIT, old.next())
                .await
                .unwrap()
                .is_none(),
            "the stream ends after the error"
        );
        // The last 10 revisions are still there.
        let mut w = s.watch("h/", r - 9).await.unwrap();
        let evs = next_events(&mut w, 10).await;
        assert_eq!(evs[0].key(), "h/20");
        assert_eq!(evs[9].key(), "h/29");
    })
    .await;
}

/// A watcher that falls behind the live channel catches up from the log without gaps or repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lagging_watcher_catches_up() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let options = EmbeddedOptions {
            broadcast_capacity: 2,
            ..EmbeddedOptions::default()
        };
        let s = EmbeddedStore::open_with(&dir.path().join("s.redb"), options).unwrap();
        let start = current(&s).await + 1;
        let mut w = s.watch("l/", start).await.unwrap();
        for i in 0..50 {
            assert!(
                s.create(&format!("l/{i:02}"), Vec::new(), None)
                    .await
                    .unwrap()
            );
        }
        let evs = next_events(&mut w, 50).await;
        for (i, ev) in evs.iter().enumerate() {
            assert_eq!(ev.key(), format!("l/{i:02}"));
            assert_eq!(ev.revision(), start + i as i64);
        }
        assert_quiet(&mut w).await;
        assert!(s.create("l/50", Vec::new(), None).await.unwrap());
        assert_eq!(next_event(&mut w).await.key(), "l/50");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_drop_ends_watches_and_allows_reopen() {
    bounded(async {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("s.redb");
        let s = EmbeddedStore::open(&path).unwrap();
        let mut w = s.watch("", 1).await.unwrap();
        drop(s);
        match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
            Some(Err(StoreError::Unavailable(_))) | None => {}
            other => panic!("expected the watch to end, got {other:?}"),
        }
        // The file is closed, so it can be opened again at once.
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(current(&s).await, 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// etcd only

async fn connect_fast(etcd: &EtcdProcess) -> EtcdStore {
    let options = EtcdOptions {
        timeout: Duration::from_secs(2),
        watch_retry_max: Duration::from_millis(300),
    };
    EtcdStore::connect_with(&etcd.spec(), vec![etcd.endpoint()], options)
        .await
        .unwrap()
}

/// Retries a write while etcd comes back; Unavailable is the only acceptable failure.
async fn create_retrying(s: &dyn Store, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match s.create(key, key.as_bytes().to_vec(), None).await {
            // false: an earlier attempt that timed out did commit.
            Ok(_) => return,
            Err(StoreError::Unavailable(e)) => {
                assert!(Instant::now() < deadline, "etcd did not come back: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("unexpected error writing {key}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_survives_restart() {
    bounded(async {
        let mut etcd = EtcdProcess::start().await;
        let s = connect_fast(&etcd).await;
        let start = current(&s).await + 1;
        let mut w = s.watch("r/", start).await.unwrap();
        for i in 0..10 {
            assert!(
                s.create(&format!("r/{i:02}"), Vec::new(), None)
                    .await
                    .unwrap()
            );
        }
        let mut events = next_events(&mut w, 5).await;

        etcd.kill();
        assert!(matches!(
            s.get("r/00").await,
            Err(StoreError::Unavailable(_))
        ));
        etcd.restart().await;
        // Written while the watch may still be reconnecting: it must pick them up from its
        // resume revision, after the five events not yet consumed.
        for i in 10..20 {
            create_retrying(&s, &format!("r/{i:02}")).await;
        }
        events.extend(next_events(&mut w, 15).await);
        assert_quiet(&mut w).await;

        let keys: Vec<&str> = events.iter().map(|e| e.key()).collect();
        let expected: Vec<String> = (0..20).map(|i| format!("r/{i:02}")).collect();
        assert_eq!(keys, expected, "every event exactly once, in order");
        for pair in events.windows(2) {
            assert!(pair[0].revision() < pair[1].revision());
        }

        // And again, with the watch idle while etcd is down.
        etcd.restart().await;
        create_retrying(&s, "r/20").await;
        assert_eq!(next_event(&mut w).await.key(), "r/20");
        assert_quiet(&mut w).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_fails_fast() {
    bounded(async {
        let port = free_port(); // nothing listens there once the probe socket is closed
        let spec = format!("etcd://127.0.0.1:{port}");
        let t0 = Instant::now();
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            EtcdStore::connect(&spec, vec![format!("http://127.0.0.1:{port}")]),
        )
        .await
        .expect("connect hung")
        .expect("connect is lazy and must not fail on a down etcd");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "connect waited for etcd"
        );

        let t1 = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(6), s.get("k"))
            .await
            .expect("get hung")
            .unwrap_err();
        assert!(t1.elapsed() < Duration::from_secs(5));
        match &err {
            StoreError::Unavailable(msg) => {
                assert!(
                    msg.contains(&format!("127.0.0.1:{port}")),
                    "message names etcd: {msg}"
                );
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        for (what, result) in [
            ("watch", s.watch("", 1).await.err()),
            ("grant", s.grant_lease(Duration::from_secs(5)).await.err()),
            ("txn", s.txn(vec![], vec![Op::put("a", "b")]).await.err()),
        ] {
            assert!(
                matches!(result, Some(StoreError::Unavailable(_))),
                "{what}: {result:?}"
            );
        }

        // Through the agent's entry point too.
        let dir = TempDir::new().unwrap();
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            netagent_store::open(&spec, dir.path()),
        )
        .await
        .expect("open hung")
        .unwrap();
        assert_eq!(s.describe(), spec);
        let err = tokio::time::timeout(Duration::from_secs(6), s.list(""))
            .await
            .expect("list hung")
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    })
    .await;
}

/// An address that drops packets instead of refusing: calls still end within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_blackholed_address_fails_fast() {
    bounded(async {
        // TEST-NET-1 (RFC 5737): never routed to a real host.
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            EtcdStore::connect(
                "etcd://192.0.2.1:2379",
                vec!["http://192.0.2.1:2379".into()],
            ),
        )
        .await
        .expect("connect hung")
        .unwrap();
        let t = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(6), s.get("k"))
            .await
            .expect("get hung")
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("192.0.2.1:2379")),
            "{err:?}"
        );
    })
    .await;
}

/// The agent may start before etcd: the same client works once etcd is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_recovers_when_started_later() {
    bounded(async {
        let mut etcd = EtcdProcess::prepare();
        let s = connect_fast(&etcd).await;
        assert!(matches!(s.get("k").await, Err(StoreError::Unavailable(_))));
        etcd.launch().await.unwrap();
        create_retrying(&s, "k").await;
        assert!(s.get("k").await.unwrap().is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compacted_watch_fails() {
    bounded(async {
        let etcd = EtcdProcess::start().await;
        let s = connect_fast(&etcd).await;
        for i in 0..5 {
            assert!(s.create(&format!("k/{i}"), Vec::new(), None).await.unwrap());
        }
        let r = current(&s).await;
        let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        raw.compact(r, None).await.unwrap();

        let mut w = s.watch("k/", 2).await.unwrap();
        match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
            Some(Err(StoreError::Compacted { requested, oldest })) => {
                assert_eq!((requested, oldest), (2, r));
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        assert!(
            tokio::time::timeout(WAIT, w.next())
                .await
                .unwrap()
                .is_none()
        );
        // From the compaction revision on it works.
        let mut w = s.watch("k/", r).await.unwrap();
        assert_eq!(next_event(&mut w).await.key(), "k/4");
    })
    .await;
}
