//! The view on disk, for an agent that restarts while the store is unreachable: a snapshot
//! (`view.json`) and a journal of the changes since (`view.journal`).
//!
//! Writing the whole view after every change cost most of a busy agent's CPU (serialising
//! 10^3 containers, tasks and endpoints twice a second while they churn). The journal holds
//! what changed between two saved views, found by diffing the persistent maps, so a save
//! costs O(changes); a fresh snapshot replaces the journal once the journal outgrows it, so
//! the disk holds O(view) and a load replays at most about one view's worth.
//!
//! Journal: JSON lines. The first names the snapshot revision it extends (`{"base":R}`);
//! then batches, one line per changed entry (`{"r":R,"m":"endpoints","k":"net/c","v":{..}}`,
//! no `v` for a removal) closed by `{"r":R,"end":true}`. A load applies only whole batches
//! newer than the snapshot, in a journal whose base is the snapshot's revision: a crash in
//! mid-write, or between a new snapshot and its new journal, loses at most the last batch.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imbl::ordmap::DiffItem;
use netagent_store::Revision;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClusterView, ViewMap};

/// The file in the state dir holding the last view the agent saw, so an agent that restarts
/// while the store is unreachable still knows its containers, answers DNS and keeps the
/// datapath as it was. Its journal is the same name with the extension `journal`.
pub const PERSISTED_VIEW: &str = "view.json";

/// Saves at most this often while the view changes.
const PERSIST_EVERY: Duration = Duration::from_millis(500);

/// A journal smaller than this is never compacted, whatever the snapshot's size.
const JOURNAL_MIN: u64 = 1 << 20;

fn journal_path(path: &Path) -> PathBuf {
    path.with_extension("journal")
}

/// The view's maps by the name their journal lines carry. Written once here so the journal's
/// writer and reader cannot disagree on a name.
macro_rules! view_maps {
    ($each:ident) => {
        $each!(
            networks,
            nodes,
            endpoints,
            services,
            containers,
            tasks,
            task_status,
            revisions
        )
    };
}

#[derive(Serialize)]
struct Header {
    base: Revision,
}

#[derive(Serialize)]
struct Change<'a, T> {
    r: Revision,
    m: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    k: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<&'a T>,
}

#[derive(Serialize)]
struct End {
    r: Revision,
    end: bool,
}

/// Any journal line, as read back.
#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    base: Option<Revision>,
    #[serde(default)]
    r: Revision,
    #[serde(default)]
    m: Option<String>,
    #[serde(default)]
    k: Option<String>,
    #[serde(default)]
    v: Option<serde_json::Value>,
    #[serde(default)]
    end: bool,
}

fn line(out: &mut impl Write, value: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

fn map_changes<V: Serialize + Clone + PartialEq>(
    out: &mut impl Write,
    r: Revision,
    m: &str,
    old: &ViewMap<V>,
    new: &ViewMap<V>,
) -> std::io::Result<()> {
    for item in old.diff(new) {
        let (k, v) = match item {
            DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => (k, Some(v)),
            DiffItem::Remove(k, _) => (k, None),
        };
        line(
            out,
            &Change {
                r,
                m,
                k: Some(k),
                v,
            },
        )?;
    }
    Ok(())
}

/// Writes the batch that turns `old` into `new`.
fn batch(out: &mut impl Write, old: &ClusterView, new: &ClusterView) -> std::io::Result<()> {
    let r = new.revision;
    macro_rules! each {
        ($($f:ident),*) => { $( map_changes(out, r, stringify!($f), &old.$f, &new.$f)?; )* };
    }
    view_maps!(each);
    for item in old.alive.diff(&new.alive) {
        let (k, v) = match item {
            imbl::ordset::DiffItem::Add(k) => (k, Some(&true)),
            imbl::ordset::DiffItem::Remove(k) => (k, None),
        };
        line(
            out,
            &Change {
                r,
                m: "alive",
                k: Some(k),
                v,
            },
        )?;
    }
    if old.leader != new.leader {
        line(
            out,
            &Change {
                r,
                m: "leader",
                k: None,
                v: new.leader.as_ref(),
            },
        )?;
    }
    line(out, &End { r, end: true })
}

fn put_or_remove<V: serde::de::DeserializeOwned + Clone>(
    map: &mut ViewMap<V>,
    k: Option<String>,
    v: Option<serde_json::Value>,
) -> Result<(), String> {
    let k = k.ok_or("a change without a key")?;
    match v {
        Some(v) => {
            map.insert(k, serde_json::from_value(v).map_err(|e| e.to_string())?);
        }
        None => {
            map.remove(&k);
        }
    }
    Ok(())
}

fn replay_change(view: &mut ClusterView, l: Line) -> Result<(), String> {
    let m = l.m.ok_or("a change without a map")?;
    macro_rules! each {
        ($($f:ident),*) => {
            match m.as_str() {
                $( stringify!($f) => put_or_remove(&mut view.$f, l.k, l.v), )*
                "alive" => {
                    let k = l.k.ok_or("a change without a key")?;
                    if l.v.is_some() {
                        view.alive.insert(k);
                    } else {
                        view.alive.remove(&k);
                    }
                    Ok(())
                }
                "leader" => {
                    view.leader = l.v.map(serde_json::from_value).transpose().map_err(|e| e.to_string())?;
                    Ok(())
                }
                other => Err(format!("unknown map {other:?}")),
            }
        };
    }
    view_maps!(each)
}

/// Applies the journal's whole batches to `view`, the snapshot it extends; stops at the first
/// line it cannot read. Returns how many batches it applied.
fn replay(view: &mut ClusterView, journal: impl BufRead) -> usize {
    let mut lines = journal.lines();
    let base = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| serde_json::from_str::<Line>(&l).ok())
        .and_then(|l| l.base);
    if base != Some(view.revision) {
        return 0;
    }
    let (mut next, mut applied) = (view.clone(), 0);
    for text in lines {
        let Some(l) = text
            .ok()
            .and_then(|t| serde_json::from_str::<Line>(&t).ok())
        else {
            break;
        };
        if l.end {
            next.revision = l.r;
            *view = next.clone();
            applied += 1;
        } else if let Err(e) = replay_change(&mut next, l) {
            // Later batches build on this one: stop at the last whole batch before it.
            tracing::warn!(error = %e, "stopping at an unreadable change in the saved view's journal");
            break;
        }
    }
    applied
}

impl ClusterView {
    /// The view saved by [`persist`] (or [`ClusterView::save`]), if there is a readable one.
    pub fn load(path: &Path) -> Option<ClusterView> {
        let bytes = std::fs::read(path).ok()?;
        let mut view: ClusterView = match serde_json::from_slice(&bytes) {
            Ok(view) => view,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable saved view");
                return None;
            }
        };
        if let Ok(f) = File::open(journal_path(path)) {
            let batches = replay(&mut view, BufReader::new(f));
            tracing::debug!(batches, "saved view's journal replayed");
        }
        Some(view)
    }

    /// Writes the whole view as the snapshot, atomically (write then rename), so a crash
    /// leaves the previous copy whole. The journal of an earlier snapshot no longer applies
    /// (its base is another revision).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        // A name of its own per write: the last save at shutdown may overlap a periodic one.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("json.tmp{n}"));
        // Buffered: serde_json writes token by token, a syscall each on a bare File.
        let mut f = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
        serde_json::to_writer(&mut f, self).map_err(std::io::Error::other)?;
        f.flush()?;
        f.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// Writes views one after the other: a batch on the journal while it is smaller than the
/// snapshot, a new snapshot and journal otherwise.
struct Saver {
    path: PathBuf,
    /// The last view saved, with the open journal and its size; `None`: the next save is a
    /// snapshot.
    last: Option<(Arc<ClusterView>, File, u64)>,
    snapshot_bytes: u64,
    journal_min: u64,
}

impl Saver {
    fn new(path: PathBuf, journal_min: u64) -> Self {
        Saver {
            path,
            last: None,
            snapshot_bytes: 0,
            journal_min,
        }
    }

    fn save(&mut self, view: Arc<ClusterView>) -> std::io::Result<()> {
        let compact_at = self.snapshot_bytes.max(self.journal_min);
        match self.last.take() {
            Some((old, journal, bytes)) if bytes < compact_at => {
                let mut out = BufWriter::with_capacity(1 << 16, &journal);
                batch(&mut out, &old, &view)?;
                out.flush()?;
                drop(out);
                journal.sync_data()?;
                let bytes = journal.metadata().map_or(bytes, |m| m.len());
                self.last = Some((view, journal, bytes));
            }
            _ => {
                view.save(&self.path)?;
                self.snapshot_bytes = std::fs::metadata(&self.path)?.len();
                let journal = File::create(journal_path(&self.path))?;
                let mut out = BufWriter::new(&journal);
                line(
                    &mut out,
                    &Header {
                        base: view.revision,
                    },
                )?;
                out.flush()?;
                drop(out);
                journal.sync_data()?;
                self.last = Some((view, journal, 0));
            }
        }
        Ok(())
    }
}

/// Runs forever: saves every new view (rate-limited) to `path` and its journal.
pub async fn persist(mut rx: watch::Receiver<Arc<ClusterView>>, path: PathBuf) {
    let mut saver = Some(Saver::new(path.clone(), JOURNAL_MIN));
    let mut saved = 0;
    loop {
        let view = rx.borrow_and_update().clone();
        // Revision 0 is the empty view before the store (or the saved copy) answered.
        if view.revision > 0 && view.revision != saved {
            let mut s = saver
                .take()
                .unwrap_or_else(|| Saver::new(path.clone(), JOURNAL_MIN));
            let v = view.clone();
            match tokio::task::spawn_blocking(move || {
                let r = s.save(v);
                (s, r)
            })
            .await
            {
                Ok((s, r)) => {
                    saver = Some(s);
                    match r {
                        Ok(()) => saved = view.revision,
                        Err(e) => tracing::warn!(error = %e, "cannot save the cluster view"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "saving the cluster view panicked"),
            }
        }
        tokio::time::sleep(PERSIST_EVERY).await;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    fn endpoint(c: &str, ip: &str) -> Endpoint {
        serde_json::from_value(serde_json::json!({
            "id": c, "container": c, "network": "front", "ip": ip,
            "mac": "", "node": "n1", "ifname": "eth0", "host_ifname": format!("na{c}"),
        }))
        .expect("endpoint")
    }

    /// Views 1..=n, each changing endpoints, liveness, revisions or the leader.
    fn views(n: usize) -> Vec<Arc<ClusterView>> {
        let mut v = ClusterView {
            revision: 1,
            ..Default::default()
        };
        let mut out = vec![Arc::new(v.clone())];
        for i in 2..=n {
            v.revision = i as Revision * 3;
            v.endpoints.insert(
                format!("front/c{}", i % 7),
                endpoint(&format!("c{}", i % 7), &format!("10.1.0.{i}")),
            );
            if i % 3 == 0 {
                v.endpoints.remove(&format!("front/c{}", (i + 2) % 7));
            }
            if i % 4 == 0 && v.alive.remove("n2").is_none() {
                v.alive.insert("n2".into());
            }
            v.revisions.insert("/netagent/leader".into(), i as Revision);
            v.leader = (i % 5 != 0).then(|| format!("n{}", i % 3));
            out.push(Arc::new(v.clone()));
        }
        out
    }

    #[test]
    fn a_snapshot_and_its_journal_load_as_the_last_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PERSISTED_VIEW);
        let all = views(30);
        let mut s = Saver::new(path.clone(), JOURNAL_MIN);
        for v in &all {
            s.save(v.clone()).unwrap();
            assert_eq!(ClusterView::load(&path).as_ref(), Some(&**v));
        }
        // One snapshot, the rest journaled.
        let snapshot: ClusterView = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(snapshot.revision, 1);
    }

    #[test]
    fn a_torn_batch_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PERSISTED_VIEW);
        let all = views(5);
        let mut s = Saver::new(path.clone(), JOURNAL_MIN);
        for v in &all {
            s.save(v.clone()).unwrap();
        }
        let journal = journal_path(&path);
        let len = std::fs::metadata(&journal).unwrap().len();
        // Cut into the last batch's end line.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        assert_eq!(ClusterView::load(&path).as_ref(), Some(&*all[3]));
    }

    #[test]
    fn a_journal_of_another_snapshot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PERSISTED_VIEW);
        let all = views(6);
        let mut s = Saver::new(path.clone(), JOURNAL_MIN);
        for v in &all[..4] {
            s.save(v.clone()).unwrap();
        }
        // A whole save (as at shutdown) of an older view: its journal does not extend it.
        all[2].save(&path).unwrap();
        assert_eq!(ClusterView::load(&path).as_ref(), Some(&*all[2]));
    }

    #[test]
    fn a_journal_larger_than_its_snapshot_becomes_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PERSISTED_VIEW);
        let all = views(40);
        let mut s = Saver::new(path.clone(), 0);
        let mut snapshots = 0;
        for v in &all {
            s.save(v.clone()).unwrap();
            let on_disk: ClusterView =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            snapshots += usize::from(on_disk.revision == v.revision);
            let journal = std::fs::metadata(journal_path(&path)).unwrap().len();
            let snapshot = std::fs::metadata(&path).unwrap().len();
            // The header, plus at most one batch past the snapshot's size.
            assert!(
                journal < 2 * snapshot + 200,
                "journal {journal} snapshot {snapshot}"
            );
            assert_eq!(ClusterView::load(&path).as_ref(), Some(&**v));
        }
        assert!(
            snapshots > 1 && snapshots < all.len(),
            "{snapshots} snapshots"
        );
    }
}
