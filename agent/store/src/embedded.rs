//! Embedded backend: etcd's data model in a local redb file, for single-node clusters.
//!
//! Layout (all in one redb file, so every change is one atomic redb commit):
//! - `meta`: current revision, highest revision dropped from the event log, next lease id.
//! - `kv`: key -> record (create/mod revision, lease, value).
//! - `leases`: lease id -> (TTL, wall-clock deadline). The deadline is persisted so a lease nobody
//!   refreshes still expires after a restart.
//! - `lease_keys`: lease id -> keys attached to it, so expiry does not scan the key space.
//! - `events`: revision -> the events of that revision; the bounded history watches replay.
//!
//! All writes are serialised by one mutex that is held until the committed events have been
//! handed to the broadcast channel, so live subscribers see revisions in commit order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use redb::{
    Database, MultimapTableDefinition, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, WriteTransaction,
};
use tokio::sync::{Notify, broadcast};
use tracing::{debug, info, warn};

use crate::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};

const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// (TTL in ms, deadline in ms since the Unix epoch).
const LEASES: TableDefinition<i64, (u64, u64)> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<i64, &str> = MultimapTableDefinition::new("lease_keys");
const EVENTS: TableDefinition<i64, &[u8]> = TableDefinition::new("events");

const META_REVISION: &str = "revision";
/// Highest revision whose events were dropped from the log (0: nothing dropped yet).
const META_COMPACTED: &str = "compacted";
const META_NEXT_LEASE: &str = "next_lease";

/// Revisions of history kept for watches by default.
pub const DEFAULT_HISTORY: i64 = 100_000;
/// Revisions buffered per live watcher before it lags and falls back to the log.
pub const DEFAULT_BROADCAST_CAPACITY: usize = 1024;
/// The reaper wakes at least this often, so a lease whose deadline moved is not missed for long.
const REAP_MAX_SLEEP: Duration = Duration::from_secs(1);

/// Tuning knobs of the embedded store; `Default` is what the agent uses.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How many revisions of events are kept for `watch`; older ones give `Compacted`.
    pub history: i64,
    /// Revisions buffered per live watcher before it has to re-read the log.
    pub broadcast_capacity: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            history: DEFAULT_HISTORY,
            broadcast_capacity: DEFAULT_BROADCAST_CAPACITY,
        }
    }
}

/// The redb-backed store. Dropping it closes the file (after in-flight operations finish) and
/// ends its watch streams.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    reaper: tokio::task::JoinHandle<()>,
}

struct Inner {
    path: PathBuf,
    /// `None` once the store is closed. Operations hold the read side for their whole duration
    /// so closing waits for them and the file is really closed when `drop` returns.
    db: RwLock<Option<Database>>,
    /// Serialises writers and owns the live lease table.
    writer: Mutex<Leases>,
    events: broadcast::Sender<Arc<Batch>>,
    /// Wakes the reaper when a lease with a possibly earlier deadline appears.
    lease_changed: Arc<Notify>,
    history: i64,
}

type Leases = HashMap<LeaseId, LeaseState>;

#[derive(Debug, Clone, Copy)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

/// The events of one committed revision.
#[derive(Debug)]
struct Batch {
    revision: Revision,
    events: Vec<WatchEvent>,
}

/// Adds context to redb errors.
trait Context<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| StoreError::Backend(format!("{what}: {e}")))
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("embedded store is closed".into())
}

fn unix_ms(t: SystemTime) -> u64 {
    // A clock before 1970 is treated as the epoch; deadlines are then merely early.
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// TTLs are whole seconds (at least one), as in etcd, so both backends behave alike.
fn round_ttl(ttl: Duration) -> Duration {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path` with default options. Needs a tokio runtime: the
    /// lease reaper runs as a task on it.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    pub fn open_with(path: &Path, options: EmbeddedOptions) -> Result<EmbeddedStore> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Backend("the embedded store must be opened inside a tokio runtime".into())
        })?;
        if options.history < 1 || options.broadcast_capacity < 1 {
            return Err(StoreError::Backend(format!(
                "invalid embedded store options {options:?}: history and broadcast capacity must be positive"
            )));
        }
        let where_ = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .ctx(&format!("creating directory {}", parent.display()))?;
        }
        let db = Database::create(path).ctx(&format!("opening {where_}"))?;
        let leases = init(&db).ctx(&format!("initialising {where_}"))?;
        info!(path = %where_, leases = leases.len(), "opened embedded store");

        let (events, _) = broadcast::channel(options.broadcast_capacity);
        let lease_changed = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            writer: Mutex::new(leases),
            events,
            lease_changed: lease_changed.clone(),
            history: options.history,
        });
        let reaper = runtime.spawn(reap_loop(Arc::downgrade(&inner), lease_changed));
        Ok(EmbeddedStore { inner, reaper })
    }

    /// Runs blocking redb work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("embedded store task failed: {e}")))?;
        // Name the file in storage errors; the others carry their own meaning.
        result.map_err(|e| match e {
            StoreError::Backend(msg) => StoreError::Backend(format!(
                "embedded store {}: {msg}",
                self.inner.path.display()
            )),
            other => other,
        })
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.reaper.abort();
        self.inner.close();
    }
}

/// Creates the tables and initial meta entries if missing; loads the leases.
fn init(db: &Database) -> std::result::Result<Leases, redb::Error> {
    let txn = db.begin_write()?;
    let mut leases = Leases::new();
    {
        let mut meta = txn.open_table(META)?;
        for (key, initial) in [
            (META_REVISION, 1),
            (META_COMPACTED, 0),
            (META_NEXT_LEASE, 1),
        ] {
            if meta.get(key)?.is_none() {
                meta.insert(key, initial)?;
            }
        }
        txn.open_table(KV)?;
        txn.open_multimap_table(LEASE_KEYS)?;
        txn.open_table(EVENTS)?;
        let table = txn.open_table(LEASES)?;
        let now_ms = unix_ms(SystemTime::now());
        let now = Instant::now();
        for entry in table.iter()? {
            let (id, value) = entry?;
            let (ttl_ms, deadline_ms) = value.value();
            let ttl = Duration::from_millis(ttl_ms);
            // Clamp to the TTL so a clock that went backwards cannot extend a lease.
            let remaining = Duration::from_millis(deadline_ms.saturating_sub(now_ms)).min(ttl);
            leases.insert(
                id.value(),
                LeaseState {
                    ttl,
                    deadline: now + remaining,
                },
            );
        }
    }
    txn.commit()?;
    Ok(leases)
}

/// A key's stored record: create revision, mod revision, lease (0: none), then the value.
struct Record {
    create_revision: Revision,
    mod_revision: Revision,
    lease: Option<LeaseId>,
    value: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.value.len());
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.mod_revision.to_le_bytes());
        out.extend_from_slice(&self.lease.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(key: &str, buf: &[u8]) -> Result<Record> {
        let parse = || -> Result<Record> {
            let mut r = Reader(buf);
            let create_revision = r.i64()?;
            let mod_revision = r.i64()?;
            let lease = r.i64()?;
            Ok(Record {
                create_revision,
                mod_revision,
                lease: (lease != 0).then_some(lease),
                value: r.0.to_vec(),
            })
        };
        parse().map_err(|e| StoreError::Backend(format!("record of key {key:?}: {e}")))
    }

    fn into_kv(self, key: String) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: self.lease,
        }
    }
}

/// Bounds-checked little-endian reader for the stored encodings.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(StoreError::Backend("corrupt stored data: truncated".into()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn i64(&mut self) -> Result<i64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    let len = u32::try_from(b.len())
        .map_err(|_| StoreError::Backend(format!("value of {} bytes is too large", b.len())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// Event log entry: per event a tag (0 put, 1 delete) and the key; puts add the create
/// revision, lease and value. The mod revision is the entry's revision.
fn encode_events(events: &[WatchEvent]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for ev in events {
        match ev {
            WatchEvent::Put(kv) => {
                out.push(0);
                put_bytes(&mut out, kv.key.as_bytes())?;
                out.extend_from_slice(&kv.create_revision.to_le_bytes());
                out.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
                put_bytes(&mut out, &kv.value)?;
            }
            WatchEvent::Delete { key, .. } => {
                out.push(1);
                put_bytes(&mut out, key.as_bytes())?;
            }
        }
    }
    Ok(out)
}

fn decode_events(revision: Revision, buf: &[u8]) -> Result<Vec<WatchEvent>> {
    let mut r = Reader(buf);
    let mut events = Vec::new();
    while !r.0.is_empty() {
        let tag = r.take(1)?[0];
        let key = String::from_utf8(r.bytes()?.to_vec())
            .map_err(|_| StoreError::Backend("corrupt event log: key is not UTF-8".into()))?;
        match tag {
            0 => {
                let create_revision = r.i64()?;
                let lease = r.i64()?;
                let value = r.bytes()?.to_vec();
                events.push(WatchEvent::Put(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: revision,
                    lease: (lease != 0).then_some(lease),
                }));
            }
            1 => events.push(WatchEvent::Delete {
                key,
                mod_revision: revision,
            }),
            other => {
                return Err(StoreError::Backend(format!(
                    "corrupt event log at revision {revision}: unknown tag {other}"
                )));
            }
        }
    }
    Ok(events)
}

fn meta_get(txn_meta: &impl ReadableTable<&'static str, i64>, key: &str) -> Result<i64> {
    txn_meta
        .get(key)
        .ctx("reading meta")?
        .map(|v| v.value())
        .ok_or_else(|| StoreError::Backend(format!("meta entry {key:?} is missing")))
}

/// One write transaction in progress. Collects the events of the new revision and the lease
/// table changes, which are applied to memory only after the commit succeeded.
struct WriteCtx<'a> {
    txn: &'a WriteTransaction,
    leases: &'a Leases,
    /// Revision committed before this transaction.
    revision: Revision,
    events: Vec<WatchEvent>,
    lease_updates: Vec<(LeaseId, Option<LeaseState>)>,
    /// Something other than events changed (lease table, counters): commit even without events.
    dirty: bool,
}

impl WriteCtx<'_> {
    fn new_revision(&self) -> Revision {
        self.revision + 1
    }

    fn lease_alive(&self, lease: LeaseId) -> bool {
        self.leases
            .get(&lease)
            .is_some_and(|l| l.deadline > Instant::now())
    }

    fn mod_revision(&self, key: &str) -> Result<Revision> {
        let kv = self.txn.open_table(KV).ctx("opening kv")?;
        let rev = match kv.get(key).ctx("reading kv")? {
            Some(v) => Record::decode(key, v.value())?.mod_revision,
            None => 0,
        };
        Ok(rev)
    }

    /// Puts `key`. With `keep_lease` the key keeps the lease it has (and `lease` is ignored).
    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        keep_lease: bool,
    ) -> Result<()> {
        let rev = self.new_revision();
        let mut kv = self.txn.open_table(KV).ctx("opening kv")?;
        let old = match kv.get(key).ctx("reading kv")? {
            Some(v) => Some(Record::decode(key, v.value())?),
            None => None,
        };
        let old_lease = old.as_ref().and_then(|r| r.lease);
        let lease = if keep_lease { old_lease } else { lease };
        if let Some(l) = lease.filter(|l| !self.lease_alive(*l)) {
            return Err(StoreError::LeaseNotFound(l));
        }
        let record = Record {
            create_revision: old.as_ref().map_or(rev, |r| r.create_revision),
            mod_revision: rev,
            lease,
            value,
        };
        kv.insert(key, record.encode().as_slice())
            .ctx("writing kv")?;
        drop(kv);
        if old_lease != lease {
            let mut lk = self
                .txn
                .open_multimap_table(LEASE_KEYS)
                .ctx("opening lease keys")?;
            if let Some(l) = old_lease {
                lk.remove(l, key).ctx("writing lease keys")?;
            }
            if let Some(l) = lease {
                lk.insert(l, key).ctx("writing lease keys")?;
            }
        }
        self.events
            .push(WatchEvent::Put(record.into_kv(key.to_string())));
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<bool> {
        let rev = self.new_revision();
        let mut kv = self.txn.open_table(KV).ctx("opening kv")?;
        let old = match kv.remove(key).ctx("writing kv")? {
            Some(v) => Record::decode(key, v.value())?,
            None => return Ok(false),
        };
        drop(kv);
        if let Some(l) = old.lease {
            let mut lk = self
                .txn
                .open_multimap_table(LEASE_KEYS)
                .ctx("opening lease keys")?;
            lk.remove(l, key).ctx("writing lease keys")?;
        }
        self.events.push(WatchEvent::Delete {
            key: key.to_string(),
            mod_revision: rev,
        });
        Ok(true)
    }

    fn grant(&mut self, ttl: Duration) -> Result<LeaseId> {
        let mut meta = self.txn.open_table(META).ctx("opening meta")?;
        let id = meta_get(&meta, META_NEXT_LEASE)?;
        meta.insert(META_NEXT_LEASE, id + 1).ctx("writing meta")?;
        drop(meta);
        self.set_lease(id, ttl)?;
        Ok(id)
    }

    /// Stores the lease with a fresh deadline.
    fn set_lease(&mut self, id: LeaseId, ttl: Duration) -> Result<()> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let deadline_ms = unix_ms(SystemTime::now()).saturating_add(ttl_ms);
        let mut leases = self.txn.open_table(LEASES).ctx("opening leases")?;
        leases
            .insert(id, (ttl_ms, deadline_ms))
            .ctx("writing leases")?;
        self.lease_updates.push((
            id,
            Some(LeaseState {
                ttl,
                deadline: Instant::now() + ttl,
            }),
        ));
        self.dirty = true;
        Ok(())
    }

    /// Removes the lease and deletes its keys. Returns how many keys were deleted.
    fn revoke(&mut self, id: LeaseId) -> Result<usize> {
        let keys: Vec<String> = {
            let mut lk = self
                .txn
                .open_multimap_table(LEASE_KEYS)
                .ctx("opening lease keys")?;
            let removed = lk.remove_all(id).ctx("writing lease keys")?;
            removed
                .map(|k| k.map(|k| k.value().to_string()))
                .collect::<std::result::Result<_, _>>()
                .ctx("reading lease keys")?
        };
        let mut deleted = 0;
        for key in &keys {
            if self.delete(key)? {
                deleted += 1;
            }
        }
        let mut leases = self.txn.open_table(LEASES).ctx("opening leases")?;
        leases.remove(id).ctx("writing leases")?;
        self.lease_updates.push((id, None));
        self.dirty = true;
        Ok(deleted)
    }
}

impl Inner {
    fn close(&self) {
        let db = self
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if db.is_some() {
            debug!(path = %self.path.display(), "closed embedded store");
        }
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T>) -> Result<T> {
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref().ok_or_else(closed)?;
        let txn = db.begin_read().ctx("beginning read transaction")?;
        f(&txn)
    }

    /// Runs `f` in a write transaction; commits and publishes its events as one new revision
    /// (if it produced any). An error from `f` aborts everything.
    fn write<T>(&self, f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T>) -> Result<T> {
        let mut leases = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref().ok_or_else(closed)?;
        let txn = db.begin_write().ctx("beginning write transaction")?;
        let revision = {
            let meta = txn.open_table(META).ctx("opening meta")?;
            meta_get(&meta, META_REVISION)?
        };
        let mut ctx = WriteCtx {
            txn: &txn,
            leases: &leases,
            revision,
            events: Vec::new(),
            lease_updates: Vec::new(),
            dirty: false,
        };
        let out = match f(&mut ctx) {
            Ok(out) => out,
            Err(e) => {
                // Report the cause, not a failure to clean up after it.
                if let Err(abort) = txn.abort() {
                    warn!(error = %abort, "aborting write transaction failed");
                }
                return Err(e);
            }
        };
        let WriteCtx {
            events,
            lease_updates,
            dirty,
            ..
        } = ctx;
        if events.is_empty() && !dirty {
            txn.abort().ctx("aborting write transaction")?;
            return Ok(out);
        }
        let batch = if events.is_empty() {
            None
        } else {
            let new_rev = revision + 1;
            let mut meta = txn.open_table(META).ctx("opening meta")?;
            meta.insert(META_REVISION, new_rev).ctx("writing meta")?;
            let mut log = txn.open_table(EVENTS).ctx("opening event log")?;
            log.insert(new_rev, encode_events(&events)?.as_slice())
                .ctx("writing event log")?;
            // Drop what fell out of the history window; normally one revision per commit.
            let compacted = meta_get(&meta, META_COMPACTED)?;
            let keep_from = new_rev - self.history + 1;
            if keep_from - 1 > compacted {
                for rev in (compacted + 1)..keep_from {
                    log.remove(rev).ctx("pruning event log")?;
                }
                meta.insert(META_COMPACTED, keep_from - 1)
                    .ctx("writing meta")?;
            }
            Some(Batch {
                revision: new_rev,
                events,
            })
        };
        txn.commit().ctx("committing")?;
        for (id, state) in lease_updates {
            match state {
                Some(s) => leases.insert(id, s),
                None => leases.remove(&id),
            };
        }
        if let Some(batch) = batch {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(Arc::new(batch));
        }
        Ok(out)
    }

    /// Logged events under `prefix` with revision >= `from`, and the revision they were read at.
    fn read_log(&self, prefix: &str, from: Revision) -> Result<(Vec<WatchEvent>, Revision)> {
        self.read(|txn| {
            let meta = txn.open_table(META).ctx("opening meta")?;
            let current = meta_get(&meta, META_REVISION)?;
            let compacted = meta_get(&meta, META_COMPACTED)?;
            if from <= compacted {
                return Err(StoreError::Compacted {
                    requested: from,
                    oldest: compacted + 1,
                });
            }
            let log = txn.open_table(EVENTS).ctx("opening event log")?;
            let mut out = Vec::new();
            for entry in log.range(from..=current).ctx("reading event log")? {
                let (rev, data) = entry.ctx("reading event log")?;
                let events = decode_events(rev.value(), data.value())?;
                out.extend(events.into_iter().filter(|e| e.key().starts_with(prefix)));
            }
            Ok((out, current))
        })
    }

    /// Deletes leases whose deadline passed. Each lease is its own revision, as in etcd.
    fn reap(&self) -> Result<()> {
        let now = Instant::now();
        let expired: Vec<LeaseId> = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let deleted = self.write(|ctx| {
                // A keep-alive may have come in since the scan.
                match ctx.leases.get(&id) {
                    Some(l) if l.deadline <= Instant::now() => ctx.revoke(id).map(Some),
                    _ => Ok(None),
                }
            })?;
            if let Some(n) = deleted {
                info!(lease = id, keys = n, "lease expired, deleted its keys");
            }
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|l| l.deadline)
            .min()
    }
}

/// Expires leases. Holds only a weak reference so it never keeps a dropped store alive.
async fn reap_loop(inner: Weak<Inner>, lease_changed: Arc<Notify>) {
    loop {
        let next = match inner.upgrade() {
            Some(inner) => inner.next_deadline(),
            None => return,
        };
        let cap = Instant::now() + REAP_MAX_SLEEP;
        let wake = next.map_or(cap, |d| d.min(cap));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = lease_changed.notified() => continue,
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        match tokio::task::spawn_blocking(move || strong.reap()).await {
            Ok(Ok(())) => {}
            Ok(Err(StoreError::Unavailable(_))) => return, // closed
            Ok(Err(e)) => warn!(error = %e, "expiring leases failed; will retry"),
            Err(e) => warn!(error = %e, "lease reaper task failed; will retry"),
        }
    }
}

/// State of one embedded watch stream.
struct WatchState {
    inner: Weak<Inner>,
    rx: broadcast::Receiver<Arc<Batch>>,
    prefix: String,
    /// Highest revision already handled; anything at or below it is a duplicate.
    cursor: Revision,
    pending: VecDeque<WatchEvent>,
    failed: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent>, WatchState)> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.failed {
                return None;
            }
            match self.rx.recv().await {
                Ok(batch) => {
                    if batch.revision > self.cursor {
                        self.cursor = batch.revision;
                        let prefix = &self.prefix;
                        self.pending.extend(
                            batch
                                .events
                                .iter()
                                .filter(|e| e.key().starts_with(prefix.as_str()))
                                .cloned(),
                        );
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // The channel dropped revisions for this slow consumer: fill the gap from
                    // the log, then carry on with the channel (deduped by the cursor).
                    debug!(prefix = %self.prefix, skipped = n, "watcher lagged, re-reading the event log");
                    if let Err(e) = self.catch_up().await {
                        self.failed = true;
                        return Some((Err(e), self));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.failed = true;
                    return Some((Err(closed()), self));
                }
            }
        }
    }

    async fn catch_up(&mut self) -> Result<()> {
        let inner = self.inner.upgrade().ok_or_else(closed)?;
        let prefix = self.prefix.clone();
        let from = self.cursor + 1;
        let (events, at) = tokio::task::spawn_blocking(move || inner.read_log(&prefix, from))
            .await
            .map_err(|e| StoreError::Backend(format!("embedded store task failed: {e}")))??;
        self.pending.extend(events);
        self.cursor = self.cursor.max(at);
        Ok(())
    }
}

fn check_txn_keys(ops: &[Op]) -> Result<()> {
    let mut seen = HashSet::new();
    for op in ops {
        let key = match op {
            Op::Put { key, .. } | Op::Delete { key } => key,
        };
        if !seen.insert(key.as_str()) {
            // etcd rejects this too; keeping both backends alike.
            return Err(StoreError::Backend(format!(
                "duplicate key {key:?} in transaction"
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.blocking(move |inner| {
            inner.read(|txn| {
                let kv = txn.open_table(KV).ctx("opening kv")?;
                match kv.get(key.as_str()).ctx("reading kv")? {
                    Some(v) => Ok(Some(Record::decode(&key, v.value())?.into_kv(key))),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            inner.read(|txn| {
                let meta = txn.open_table(META).ctx("opening meta")?;
                let revision = meta_get(&meta, META_REVISION)?;
                let kv = txn.open_table(KV).ctx("opening kv")?;
                let mut out = Vec::new();
                for entry in kv.range(prefix.as_str()..).ctx("reading kv")? {
                    let (k, v) = entry.ctx("reading kv")?;
                    let key = k.value();
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    out.push(Record::decode(key, v.value())?.into_kv(key.to_string()));
                }
                Ok((out, revision))
            })
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool> {
        self.txn(
            vec![Compare::absent(key)],
            vec![Op::Put {
                key: key.to_string(),
                value,
                lease,
            }],
        )
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<bool> {
        let key = key.to_string();
        self.blocking(move |inner| {
            inner.write(|ctx| {
                if ctx.mod_revision(&key)? != expected {
                    return Ok(false);
                }
                // Replacing a value keeps the key's lease (etcd: put with ignore_lease). If that
                // lease just expired the key is about to be deleted, as etcd would already have
                // done: the swap fails like a stale compare rather than with a lease error.
                match ctx.put(&key, value, None, true) {
                    Ok(()) => Ok(true),
                    Err(StoreError::LeaseNotFound(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.blocking(move |inner| inner.write(|ctx| ctx.delete(&key)))
            .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool> {
        check_txn_keys(&ops)?;
        self.blocking(move |inner| {
            inner.write(|ctx| {
                for c in &compares {
                    if ctx.mod_revision(&c.key)? != c.mod_revision {
                        return Ok(false);
                    }
                }
                for op in ops {
                    match op {
                        Op::Put { key, value, lease } => ctx.put(&key, value, lease, false)?,
                        Op::Delete { key } => {
                            ctx.delete(&key)?;
                        }
                    }
                }
                Ok(true)
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let from = from.max(1);
        // Subscribe before reading the log: every revision is then in the log, in the channel,
        // or both (deduped by the cursor).
        let rx = self.inner.events.subscribe();
        let p = prefix.to_string();
        let initial = self.blocking(move |inner| inner.read_log(&p, from)).await;
        let (pending, cursor, failed) = match initial {
            Ok((events, at)) => (VecDeque::from(events), at.max(from - 1), false),
            Err(e @ StoreError::Compacted { .. }) => {
                // Reported as a stream item, like etcd does.
                return Ok(futures::stream::iter([Err(e)]).boxed());
            }
            Err(e) => return Err(e),
        };
        let state = WatchState {
            inner: Arc::downgrade(&self.inner),
            rx,
            prefix: prefix.to_string(),
            cursor,
            pending,
            failed,
        };
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = round_ttl(ttl);
        let id = self
            .blocking(move |inner| inner.write(|ctx| ctx.grant(ttl)))
            .await?;
        self.inner.lease_changed.notify_one();
        debug!(lease = id, ?ttl, "granted lease");
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |inner| {
            inner.write(|ctx| {
                // Past its deadline counts as gone even if the reaper has not run yet.
                let ttl = match ctx.leases.get(&lease) {
                    Some(l) if l.deadline > Instant::now() => l.ttl,
                    _ => return Err(StoreError::LeaseNotFound(lease)),
                };
                ctx.set_lease(lease, ttl)
            })
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let deleted = self
            .blocking(move |inner| {
                inner.write(|ctx| {
                    if !ctx.leases.contains_key(&lease) {
                        return Err(StoreError::LeaseNotFound(lease));
                    }
                    ctx.revoke(lease)
                })
            })
            .await?;
        debug!(lease, keys = deleted, "revoked lease");
        Ok(())
    }

    fn describe(&self) -> String {
        format!("embedded:{}", self.inner.path.display())
    }
}
