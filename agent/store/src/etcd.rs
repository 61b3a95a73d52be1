//! etcd backend: the store model maps one to one onto etcd v3 (revisions, txn, watch, leases).
//!
//! Availability rules: connecting never waits for etcd (the gRPC channel connects in the
//! background and reconnects by itself), every call is bounded by `EtcdOptions::timeout`, and a
//! watch survives etcd restarts by resuming from the revision after the last one it delivered.

use std::fmt::Display;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient,
    LeaseClient, PutOptions, Txn, TxnOp, WatchClient, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};

/// Default bound on every etcd call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default longest pause between attempts to re-establish a broken watch.
pub const DEFAULT_WATCH_RETRY_MAX: Duration = Duration::from_secs(2);
/// HTTP/2 pings detect a dead connection (e.g. a silently partitioned etcd) that would otherwise
/// leave a watch waiting forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Listing a large prefix can exceed the client's 4 MiB default reply size.
const MAX_MESSAGE: usize = 64 << 20;
/// Events buffered between the watch task and its consumer.
const WATCH_BUFFER: usize = 256;

// gRPC status codes (fixed by the gRPC spec); compared numerically to avoid depending on tonic.
const GRPC_CANCELLED: i32 = 1;
const GRPC_UNKNOWN: i32 = 2;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_ABORTED: i32 = 10;
const GRPC_UNAVAILABLE: i32 = 14;

/// Watches re-established after a lost connection or a cancelled watch, by every watch of
/// this process (for the agent's metrics).
static WATCH_RECONNECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a watch resumed after losing etcd.
pub fn watch_reconnects() -> u64 {
    WATCH_RECONNECTS.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Bound on every call, on connecting and on (re)creating a watch.
    pub timeout: Duration,
    /// Longest pause between attempts to re-establish a broken watch (backoff doubles up to it).
    pub watch_retry_max: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            watch_retry_max: DEFAULT_WATCH_RETRY_MAX,
        }
    }
}

pub struct EtcdStore {
    spec: String,
    ctx: Ctx,
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    watch_retry_max: Duration,
}

/// What error messages and the watch tasks need.
#[derive(Debug, Clone)]
struct Ctx {
    /// "host:port,host:port", for error messages.
    targets: String,
    timeout: Duration,
    /// More than one member: a request that could not connect may find another.
    several: bool,
}

impl Ctx {
    fn unavailable(&self, what: &str, detail: impl Display) -> StoreError {
        StoreError::Unavailable(format!(
            "cannot reach etcd at {}: {what}: {detail}",
            self.targets
        ))
    }

    fn map_err(&self, what: &str, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        match e {
            E::GRpcStatus(s) => match i32::from(s.code()) {
                GRPC_CANCELLED
                | GRPC_UNKNOWN
                | GRPC_DEADLINE_EXCEEDED
                | GRPC_RESOURCE_EXHAUSTED
                | GRPC_ABORTED
                | GRPC_UNAVAILABLE => self.unavailable(what, with_causes(s.message(), &s)),
                _ => StoreError::Backend(format!(
                    "etcd at {}: {what}: {} ({:?})",
                    self.targets,
                    s.message(),
                    s.code()
                )),
            },
            E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::EndpointError(_) => {
                self.unavailable(what, e)
            }
            other => StoreError::Backend(format!("etcd at {}: {what}: {other}", self.targets)),
        }
    }

    /// Runs `make()`'s request under the timeout. A request that could not even connect to
    /// the member the client picked (a dead member of several) never reached etcd, so it is
    /// made again, write or not, if there are other members; a read (`idempotent`) is also
    /// made again when the cluster was electing a leader. Both for at most [`RETRY_WINDOW`]:
    /// with every member down, the caller hears so within it (at once with a single member).
    async fn attempt<T, F, Fut>(
        &self,
        idempotent: bool,
        mut make: F,
    ) -> std::result::Result<std::result::Result<T, etcd_client::Error>, tokio::time::error::Elapsed>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let until = tokio::time::Instant::now() + RETRY_WINDOW;
        tokio::time::timeout(self.timeout, async {
            loop {
                match make().await {
                    Err(e)
                        if ((self.several && never_sent(&e)) || (idempotent && leader_changing(&e)))
                            && tokio::time::Instant::now() < until =>
                    {
                        debug!(etcd = %self.targets, error = %e, "no connection to that member; again");
                        tokio::time::sleep(UNSENT_RETRY_PAUSE).await;
                    }
                    r => return r,
                }
            }
        })
        .await
    }

    /// Runs one etcd call under the timeout (see [`Ctx::attempt`]).
    async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, make: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match self.attempt(idempotent, make).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map_err(what, e)),
            Err(_) => {
                Err(self.unavailable(what, format_args!("no answer within {:?}", self.timeout)))
            }
        }
    }
}

/// Pause between attempts of a request that found no connection.
const UNSENT_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a request is made again (see `Ctx::attempt`); below the 3 s in which `netctl` must
/// report an unreachable store, above etcd's 1 s election timeout.
const RETRY_WINDOW: Duration = Duration::from_secs(2);

/// etcd answered that it is between leaders: a read can simply be asked again.
fn leader_changing(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_UNAVAILABLE
                && (s.message().contains("leader changed") || s.message().contains("no leader"))
        }
        _ => false,
    }
}

/// Whether the request failed before it was sent: the connection to the member was refused
/// or could not be made (tonic reports these as a transport error, or as UNAVAILABLE with the
/// connect error among its causes).
fn never_sent(e: &etcd_client::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        {
            return true;
        }
        if err.to_string().contains("tcp connect error") {
            return true;
        }
        source = err.source();
    }
    false
}

/// `message` followed by the error's sources ("tcp connect error: Connection refused ..."):
/// the gRPC status alone rarely says why a connection failed.
fn with_causes(message: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = message.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// etcd's answer to an unknown or expired lease is a NotFound status.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_NOT_FOUND && s.message().contains("lease not found")
        }
        // Raised by the client when a keep-alive answer carries TTL 0.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| {
            StoreError::Backend(format!(
                "etcd key {:?} is not UTF-8",
                String::from_utf8_lossy(kv.key())
            ))
        })?
        .to_string();
    Ok(KeyValue {
        key,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn convert_event(ev: &etcd_client::Event) -> Result<Option<WatchEvent>> {
    let Some(kv) = ev.kv() else {
        return Ok(None);
    };
    Ok(Some(match ev.event_type() {
        EventType::Put => WatchEvent::Put(convert_kv(kv)?),
        EventType::Delete => WatchEvent::Delete {
            key: convert_kv(kv)?.key,
            mod_revision: kv.mod_revision(),
        },
    }))
}

fn compare(c: &Compare) -> EtcdCompare {
    if c.mod_revision == 0 {
        // A key's version is 0 exactly when it does not exist.
        EtcdCompare::version(c.key.as_str(), CompareOp::Equal, 0)
    } else {
        EtcdCompare::mod_revision(c.key.as_str(), CompareOp::Equal, c.mod_revision)
    }
}

fn txn_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
        }
        Op::Delete { key } => TxnOp::delete(key, None),
    }
}

/// etcd leases are whole seconds.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// Creates a client for `endpoints` ("http://host:port"). Does not wait for etcd: calls made
    /// while it is unreachable fail with `Unavailable` after the timeout, and succeed again once
    /// it is back.
    pub async fn connect(spec: &str, endpoints: Vec<String>) -> Result<EtcdStore> {
        Self::connect_with(spec, endpoints, EtcdOptions::default()).await
    }

    pub async fn connect_with(
        spec: &str,
        endpoints: Vec<String>,
        options: EtcdOptions,
    ) -> Result<EtcdStore> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidAddress(
                spec.to_string(),
                "no endpoints".into(),
            ));
        }
        let targets = endpoints
            .iter()
            .map(|e| {
                e.trim_start_matches("http://")
                    .trim_start_matches("https://")
            })
            .collect::<Vec<_>>()
            .join(",");
        let ctx = Ctx {
            targets,
            timeout: options.timeout,
            several: endpoints.len() > 1,
        };
        let connect_options = ConnectOptions::new()
            .with_connect_timeout(options.timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, options.timeout)
            .with_keep_alive_while_idle(true)
            // Without a leader a member cannot serve linearizable requests or watches; fail
            // fast instead of hanging on it.
            .with_require_leader(true);
        // The balanced channel connects lazily in the background, so this returns at once; the
        // timeout only guards against surprises.
        let client = match tokio::time::timeout(
            options.timeout,
            Client::connect(&endpoints, Some(connect_options)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(
                e @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_)),
            )) => {
                return Err(StoreError::InvalidAddress(spec.to_string(), e.to_string()));
            }
            Ok(Err(e)) => return Err(ctx.map_err("connecting", e)),
            Err(_) => {
                return Err(ctx.unavailable(
                    "connecting",
                    format_args!("no answer within {:?}", options.timeout),
                ));
            }
        };
        info!(etcd = %ctx.targets, "etcd store client created");
        Ok(EtcdStore {
            spec: spec.to_string(),
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            lease: client.lease_client(),
            ctx,
            watch_retry_max: options.watch_retry_max,
        })
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.ctx.timeout
    }

    async fn txn_raw(&self, what: &str, txn: Txn, leases: &[LeaseId]) -> Result<bool> {
        let attempt = self.ctx.attempt(false, || {
            let (mut kv, txn) = (self.kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        });
        match attempt.await {
            Ok(Ok(resp)) => Ok(resp.succeeded()),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(
                leases.first().copied().unwrap_or(0),
            )),
            Ok(Err(e)) => Err(self.ctx.map_err(what, e)),
            Err(_) => Err(self.ctx.unavailable(
                what,
                format_args!("no answer within {:?}", self.ctx.timeout),
            )),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .ctx
            .call("get", true, || {
                let mut kv = self.kv.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let resp = self
            .ctx
            .call("list", true, || {
                let mut kv = self.kv.clone();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Backend("etcd list response without header".into()))?;
        let kvs = resp.kvs().iter().map(convert_kv).collect::<Result<_>>()?;
        Ok((kvs, revision))
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool> {
        let txn = Txn::new()
            .when([compare(&Compare::absent(key))])
            .and_then([txn_op(Op::Put {
                key: key.to_string(),
                value,
                lease,
            })]);
        self.txn_raw("create", txn, lease.as_slice()).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<bool> {
        let put = if expected == 0 {
            TxnOp::put(key, value, None)
        } else {
            // Replacing a value keeps the key's lease. (etcd refuses ignore_lease on an absent
            // key, hence only here.)
            TxnOp::put(key, value, Some(PutOptions::new().with_ignore_lease()))
        };
        let txn = Txn::new()
            .when([compare(&Compare::mod_revision(key, expected))])
            .and_then([put]);
        self.txn_raw("compare-and-swap", txn, &[]).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let resp = self
            .ctx
            .call("delete", false, || {
                let mut kv = self.kv.clone();
                async move { kv.delete(key, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool> {
        let leases: Vec<LeaseId> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { lease, .. } => *lease,
                Op::Delete { .. } => None,
            })
            .collect();
        let txn = Txn::new()
            .when(compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(ops.into_iter().map(txn_op).collect::<Vec<_>>());
        self.txn_raw("txn", txn, &leases).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let from = from.max(1);
        let mut task = WatchTask {
            client: self.watch.clone(),
            ctx: self.ctx.clone(),
            prefix: prefix.to_string(),
            cursor: from - 1,
            retry_max: self.watch_retry_max,
        };
        // The first attempt is made here so an unreachable etcd is reported to the caller now;
        // later breaks are repaired by the task.
        let first = task.open().await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(task.run(first, tx));
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let resp = self
            .ctx
            .call("lease grant", false, || {
                let mut lease = self.lease.clone();
                async move { lease.grant(ttl_secs(ttl), None).await }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd at {}: lease grant: {}",
                self.ctx.targets,
                resp.error()
            )));
        }
        debug!(lease = resp.id(), ttl = resp.ttl(), "granted lease");
        Ok(resp.id())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<()> {
        // One request on a fresh keep-alive stream; the client reads the first answer and turns
        // TTL 0 (expired or unknown lease) into an error. The stream closes when dropped.
        let attempt = self.ctx.attempt(true, || {
            let mut lease = self.lease.clone();
            async move { lease.keep_alive(id).await.map(drop) }
        });
        match attempt.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) => Err(self.ctx.map_err("lease keep-alive", e)),
            Err(_) => Err(self.ctx.unavailable(
                "lease keep-alive",
                format_args!("no answer within {:?}", self.ctx.timeout),
            )),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let attempt = self.ctx.attempt(true, || {
            let mut lease = self.lease.clone();
            async move { lease.revoke(id).await }
        });
        match attempt.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) => Err(self.ctx.map_err("lease revoke", e)),
            Err(_) => Err(self.ctx.unavailable(
                "lease revoke",
                format_args!("no answer within {:?}", self.ctx.timeout),
            )),
        }
    }

    fn describe(&self) -> String {
        self.spec.clone()
    }
}

/// One store watch: keeps an etcd watch open and re-creates it after failures.
struct WatchTask {
    client: WatchClient,
    ctx: Ctx,
    prefix: String,
    /// Highest revision delivered (or skipped as before `from`); the next etcd watch starts
    /// after it and anything at or below it is a duplicate.
    cursor: Revision,
    retry_max: Duration,
}

/// A freshly created etcd watch and its first answer, if that needs handling.
type Opened = (etcd_client::WatchStream, Option<etcd_client::WatchResponse>);

/// How one etcd watch stream ended.
enum Ended {
    /// The consumer dropped the store stream.
    Consumer,
    /// An error (e.g. the requested revision was compacted) was sent; the stream ends.
    Final,
    /// Connection lost or watch cancelled by the server: resume.
    Broken(String),
}

impl WatchTask {
    /// Creates the etcd watch starting after the cursor and waits for etcd's first answer, so a
    /// watch that could not be created is an error here. That answer is returned for `pump`
    /// unless it is the plain "created" confirmation.
    async fn open(&mut self) -> Result<Opened> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.cursor + 1);
        let ctx = self.ctx.clone();
        let make = || {
            let (mut client, prefix, options) =
                (self.client.clone(), self.prefix.clone(), options.clone());
            async move {
                let mut stream = client.watch(prefix, Some(options)).await?;
                match stream.message().await? {
                    Some(resp)
                        if resp.created() && resp.events().is_empty() && !resp.canceled() =>
                    {
                        Ok((stream, None))
                    }
                    // E.g. created and at once canceled for compaction: `pump` judges it.
                    Some(resp) => Ok((stream, Some(resp))),
                    None => Err(etcd_client::Error::WatchError(
                        "watch stream closed before it was created".into(),
                    )),
                }
            }
        };
        ctx.call("watch", true, make).await
    }

    async fn run(mut self, first: Opened, tx: mpsc::Sender<Result<WatchEvent>>) {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut stream = Some(first);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let current = match stream.take() {
                Some(s) => s,
                None => {
                    // Pause before every attempt, so a watch etcd keeps cancelling cannot spin.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(self.retry_max);
                    match self.open().await {
                        Ok(s) => {
                            WATCH_RECONNECTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            info!(prefix = %self.prefix, resume_from = self.cursor + 1, "etcd watch re-established");
                            s
                        }
                        Err(e) => {
                            debug!(prefix = %self.prefix, error = %e, "re-creating etcd watch failed; retrying");
                            continue;
                        }
                    }
                }
            };
            let before = self.cursor;
            match self.pump(current.0, current.1, &tx).await {
                Ended::Consumer | Ended::Final => return,
                Ended::Broken(why) => {
                    if self.cursor > before {
                        backoff = FIRST_BACKOFF;
                    }
                    warn!(prefix = %self.prefix, etcd = %self.ctx.targets, reason = %why, resume_from = self.cursor + 1, "etcd watch broke; resuming");
                }
            }
        }
    }

    /// Forwards events of one etcd watch stream until it ends.
    async fn pump(
        &mut self,
        mut stream: etcd_client::WatchStream,
        mut first: Option<etcd_client::WatchResponse>,
        tx: &mpsc::Sender<Result<WatchEvent>>,
    ) -> Ended {
        loop {
            let msg = match first.take() {
                Some(resp) => Ok(Some(resp)),
                None => tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return Ended::Consumer,
                },
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => return Ended::Broken("stream closed".into()),
                Err(e) => return Ended::Broken(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                let err = StoreError::Compacted {
                    requested: self.cursor + 1,
                    oldest: resp.compact_revision(),
                };
                let _ = tx.send(Err(err)).await;
                return Ended::Final;
            }
            if resp.canceled() {
                return Ended::Broken(format!("canceled by etcd: {}", resp.cancel_reason()));
            }
            // etcd never splits one revision's events across responses, so the cursor may move
            // to the highest revision of the response once all of it is forwarded.
            let start = self.cursor;
            let mut highest = start;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let rev = kv.mod_revision();
                if rev <= start {
                    continue;
                }
                let item = match convert_event(ev) {
                    Ok(Some(e)) => Ok(e),
                    Ok(None) => continue,
                    Err(e) => Err(e),
                };
                let fatal = item.is_err();
                if tx.send(item).await.is_err() {
                    return Ended::Consumer;
                }
                if fatal {
                    return Ended::Final;
                }
                highest = highest.max(rev);
            }
            self.cursor = highest;
        }
    }
}
