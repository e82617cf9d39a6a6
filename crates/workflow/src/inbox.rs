//! `Inbox`: accepted webhooks on local disk, fsync'd, until their effects have committed.
//!
//! The inbox must not share the database's failures, so it lives on the server's own disk.
//! It is a [redb](https://docs.rs/redb) database rather than a file format of our own: redb
//! is a maintained, pure-Rust, ACID key-value store whose commits are durable when they
//! return (`Durability::Immediate`), crash-safe by design (copy-on-write B-trees with a
//! checksummed commit slot), and tested for it upstream. A hand-written log would have to
//! re-learn torn writes, partial records and compaction.
//!
//! One writer thread owns every write. Appends that arrive together are committed in one
//! transaction (group commit): a burst of webhooks costs one fsync per batch, not one each,
//! and no append returns before its batch is on disk. Removals ride along in the same
//! batches, or commit without an fsync of their own: a removal lost in a crash only means the
//! event is processed again, which is harmless because processing is idempotent on the call.

use callplane_core::seams::ReceivedWebhook;
use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use tokio::sync::oneshot;

/// Event id -> the body as received.
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// Event id -> [`Meta`] as JSON.
const META: TableDefinition<u64, &[u8]> = TableDefinition::new("meta");

/// The most operations committed in one transaction.
const MAX_BATCH: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("the inbox holds {depth} events ({bytes} bytes), its limit")]
    Full { depth: u64, bytes: u64 },
    #[error("opening the inbox at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the inbox's disk failed")]
    Disk(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the inbox's writer has stopped")]
    Stopped,
}

fn disk(e: impl Into<redb::Error>) -> InboxError {
    InboxError::Disk(Box::new(e.into()))
}

/// How much the inbox may hold before it refuses new events.
#[derive(Clone, Copy, Debug)]
pub struct InboxLimits {
    pub max_events: u64,
    pub max_bytes: u64,
}

/// What is kept beside an event's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    received_at: DateTime<Utc>,
    path_org: Option<String>,
    org: Option<callplane_core::OrgId>,
    unprocessable: Option<callplane_core::seams::Unprocessable>,
    attempts: u32,
    /// Attempts that failed with every backend answering (absent in inboxes written before it).
    #[serde(default)]
    failures: u32,
    next_attempt_at: DateTime<Utc>,
    last_error: Option<String>,
}

/// An event waiting in the inbox.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub id: u64,
    pub webhook: ReceivedWebhook,
    /// Attempts made, whatever stopped them.
    pub attempts: u32,
    /// Attempts that failed with every backend answering: what `max_attempts` counts. A
    /// backend being down (the database, Temporal) is waited out, however long.
    pub failures: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// A failed attempt, recorded so the next one waits and the reason shows in `inbox status`.
#[derive(Clone, Debug)]
pub struct Failure {
    pub attempts: u32,
    pub failures: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub error: String,
}

type Done = oneshot::Sender<Result<(), InboxError>>;

enum Op {
    Append {
        id: u64,
        meta: Vec<u8>,
        body: bytes::Bytes,
        done: Done,
    },
    Remove {
        id: u64,
        done: Done,
    },
    Fail {
        id: u64,
        failure: Failure,
        done: Done,
    },
    /// Makes everything before it durable.
    Flush {
        done: Done,
    },
}

impl Op {
    fn into_done(self) -> Done {
        match self {
            Op::Append { done, .. } | Op::Remove { done, .. } | Op::Fail { done, .. } | Op::Flush { done } => done,
        }
    }

    fn must_be_durable(&self) -> bool {
        matches!(self, Op::Append { .. } | Op::Flush { .. })
    }
}

struct Counts {
    depth: AtomicU64,
    bytes: AtomicU64,
}

/// The inbox. Cheap to clone; clones share the database and its writer.
#[derive(Clone)]
pub struct Inbox {
    db: Arc<Database>,
    writer: mpsc::Sender<Op>,
    counts: Arc<Counts>,
    next_id: Arc<AtomicU64>,
    limits: InboxLimits,
    path: PathBuf,
}

impl Inbox {
    /// Opens (or creates) the inbox in `dir` and starts its writer thread.
    pub fn open(dir: &Path, limits: InboxLimits) -> Result<Self, InboxError> {
        let path = dir.join("inbox.redb");
        let open_err =
            |source: Box<dyn std::error::Error + Send + Sync>| InboxError::Open { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(|e| open_err(Box::new(e)))?;
        // A small page cache: the inbox is written once and read about once per event.
        let db = Database::builder().set_cache_size(16 << 20).create(&path).map_err(|e| open_err(Box::new(e)))?;
        // Create the tables, and read what a previous process left.
        let tx = db.begin_write().map_err(|e| open_err(Box::new(e)))?;
        let (depth, bytes, last) = {
            let bodies = tx.open_table(BODIES).map_err(|e| open_err(Box::new(e)))?;
            tx.open_table(META).map_err(|e| open_err(Box::new(e)))?;
            let mut bytes = 0u64;
            for entry in bodies.iter().map_err(|e| open_err(Box::new(e)))? {
                let (_, body) = entry.map_err(|e| open_err(Box::new(e)))?;
                bytes += body.value().len() as u64;
            }
            let last = bodies.last().map_err(|e| open_err(Box::new(e)))?.map(|(k, _)| k.value());
            (bodies.len().map_err(|e| open_err(Box::new(e)))?, bytes, last)
        };
        tx.commit().map_err(|e| open_err(Box::new(e)))?;

        let db = Arc::new(db);
        let counts = Arc::new(Counts { depth: AtomicU64::new(depth), bytes: AtomicU64::new(bytes) });
        let (writer, ops) = mpsc::channel();
        let (thread_db, thread_counts) = (db.clone(), counts.clone());
        std::thread::Builder::new()
            .name("inbox-writer".into())
            .spawn(move || write_loop(&thread_db, &thread_counts, &ops))
            .map_err(|e| open_err(Box::new(e)))?;
        Ok(Self { db, writer, counts, next_id: Arc::new(AtomicU64::new(last.map_or(1, |l| l + 1))), limits, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an event of `len` bytes would fit.
    pub fn has_room(&self, len: u64) -> bool {
        self.depth() < self.limits.max_events && self.bytes() + len <= self.limits.max_bytes
    }

    pub fn depth(&self) -> u64 {
        self.counts.depth.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.counts.bytes.load(Ordering::Relaxed)
    }

    /// Stores a webhook; returns its id once it is on disk.
    pub async fn append(&self, webhook: &ReceivedWebhook) -> Result<u64, InboxError> {
        if !self.has_room(webhook.body.len() as u64) {
            return Err(InboxError::Full { depth: self.depth(), bytes: self.bytes() });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let meta = Meta {
            received_at: webhook.received_at,
            path_org: webhook.path_org.clone(),
            org: webhook.org,
            unprocessable: webhook.unprocessable.clone(),
            attempts: 0,
            failures: 0,
            next_attempt_at: webhook.received_at,
            last_error: None,
        };
        let meta = serde_json::to_vec(&meta).map_err(|e| InboxError::Disk(Box::new(e)))?;
        self.write(|done| Op::Append { id, meta, body: webhook.body.clone(), done }).await?;
        Ok(id)
    }

    /// Forgets an event whose effects have committed. Returns once a scan can no longer see
    /// it (its removal is durable with the next append, or within a second).
    pub async fn remove(&self, id: u64) -> Result<(), InboxError> {
        self.write(|done| Op::Remove { id, done }).await
    }

    /// Records a failed attempt; returns once a scan sees it.
    pub async fn record_failure(&self, id: u64, failure: Failure) -> Result<(), InboxError> {
        self.write(|done| Op::Fail { id, failure, done }).await
    }

    /// Makes every removal and failure so far durable (they otherwise ride on the next
    /// append, or wait up to a second): for a process about to exit.
    pub async fn flush(&self) -> Result<(), InboxError> {
        self.write(|done| Op::Flush { done }).await
    }

    async fn write(&self, op: impl FnOnce(Done) -> Op) -> Result<(), InboxError> {
        let (done, committed) = oneshot::channel();
        self.writer.send(op(done)).map_err(|_| InboxError::Stopped)?;
        committed.await.map_err(|_| InboxError::Stopped)?
    }

    /// Up to `limit` events due by `now`, oldest first, skipping the ids in `skip`.
    pub fn due(&self, now: DateTime<Utc>, limit: usize, skip: &HashSet<u64>) -> Result<Vec<StoredEvent>, InboxError> {
        self.scan(limit, |id, meta| !skip.contains(&id) && meta.next_attempt_at <= now)
    }

    /// Up to `limit` events, oldest first, whatever their next attempt.
    pub fn list(&self, limit: usize) -> Result<Vec<StoredEvent>, InboxError> {
        self.scan(limit, |_, _| true)
    }

    /// When the oldest stored event was received.
    pub fn oldest(&self) -> Option<DateTime<Utc>> {
        let tx = self.db.begin_read().ok()?;
        let meta = tx.open_table(META).ok()?;
        let (_, value) = meta.first().ok()??;
        serde_json::from_slice::<Meta>(value.value()).ok().map(|m| m.received_at)
    }

    fn scan(&self, limit: usize, wanted: impl Fn(u64, &Meta) -> bool) -> Result<Vec<StoredEvent>, InboxError> {
        let tx = self.db.begin_read().map_err(disk)?;
        let metas = tx.open_table(META).map_err(disk)?;
        let bodies = tx.open_table(BODIES).map_err(disk)?;
        let mut out = Vec::new();
        for entry in metas.iter().map_err(disk)? {
            if out.len() >= limit {
                break;
            }
            let (id, meta) = entry.map_err(disk)?;
            let id = id.value();
            // A record this build cannot read is skipped rather than blocking the rest; it
            // stays on disk for a build that can.
            let Ok(meta) = serde_json::from_slice::<Meta>(meta.value()) else { continue };
            if !wanted(id, &meta) {
                continue;
            }
            let Some(body) = bodies.get(id).map_err(disk)? else { continue };
            out.push(StoredEvent {
                id,
                webhook: ReceivedWebhook {
                    received_at: meta.received_at,
                    path_org: meta.path_org,
                    org: meta.org,
                    body: bytes::Bytes::copy_from_slice(body.value()),
                    unprocessable: meta.unprocessable,
                },
                attempts: meta.attempts,
                failures: meta.failures,
                next_attempt_at: meta.next_attempt_at,
                last_error: meta.last_error,
            });
        }
        Ok(out)
    }
}

/// The writer thread: takes every pending operation, applies them in one transaction,
/// commits durably, then answers the appends. Ends when every `Inbox` clone is dropped.
fn write_loop(db: &Database, counts: &Counts, ops: &mpsc::Receiver<Op>) {
    let mut last_durable = std::time::Instant::now();
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Removals alone skip the fsync, but not for more than a second: a long drain stays
        // on disk too, and redb frees pages only at durable commits.
        let durable =
            batch.iter().any(Op::must_be_durable) || last_durable.elapsed() >= std::time::Duration::from_secs(1);
        if durable {
            last_durable = std::time::Instant::now();
        }
        match apply(db, &batch, durable) {
            Ok((added, removed)) => {
                counts.depth.fetch_add(added.0, Ordering::Relaxed);
                counts.bytes.fetch_add(added.1, Ordering::Relaxed);
                counts.depth.fetch_sub(removed.0, Ordering::Relaxed);
                counts.bytes.fetch_sub(removed.1, Ordering::Relaxed);
                for op in batch {
                    let _ = op.into_done().send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "inbox commit failed");
                let message = e.to_string();
                for op in batch {
                    let _ = op.into_done().send(Err(InboxError::Disk(message.clone().into())));
                }
            }
        }
    }
}

/// Events and bytes.
type Amount = (u64, u64);

/// Applies a batch; returns what was added and what was removed.
///
/// Only appends must be on disk before anyone is told: a removal or a failure count lost in a
/// crash means an event is processed again, which is harmless. So a batch without appends may
/// commit without an fsync (`durable` false) and become durable with a later commit.
fn apply(db: &Database, batch: &[Op], durable: bool) -> Result<(Amount, Amount), redb::Error> {
    let mut tx = db.begin_write()?;
    if !durable {
        tx.set_durability(redb::Durability::None)?;
    }
    let mut added: Amount = (0, 0);
    let mut removed: Amount = (0, 0);
    {
        let mut bodies = tx.open_table(BODIES)?;
        let mut metas = tx.open_table(META)?;
        for op in batch {
            match op {
                Op::Append { id, meta, body, .. } => {
                    bodies.insert(*id, body.as_ref())?;
                    metas.insert(*id, meta.as_slice())?;
                    added.0 += 1;
                    added.1 += body.len() as u64;
                }
                Op::Remove { id, .. } => {
                    if let Some(body) = bodies.remove(*id)? {
                        removed.0 += 1;
                        removed.1 += body.value().len() as u64;
                    }
                    metas.remove(*id)?;
                }
                Op::Flush { .. } => {}
                Op::Fail { id, failure, .. } => {
                    let current = metas.get(*id)?.and_then(|m| serde_json::from_slice::<Meta>(m.value()).ok());
                    if let Some(mut meta) = current {
                        meta.attempts = failure.attempts;
                        meta.failures = failure.failures;
                        meta.next_attempt_at = failure.next_attempt_at;
                        meta.last_error = Some(failure.error.clone());
                        if let Ok(bytes) = serde_json::to_vec(&meta) {
                            metas.insert(*id, bytes.as_slice())?;
                        }
                    }
                }
            }
        }
    }
    tx.commit()?;
    Ok((added, removed))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn webhook(body: &str) -> ReceivedWebhook {
        ReceivedWebhook {
            received_at: Utc::now(),
            path_org: Some("org".into()),
            org: None,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            unprocessable: None,
        }
    }

    const ROOMY: InboxLimits = InboxLimits { max_events: 1000, max_bytes: 1 << 20 };

    #[tokio::test]
    async fn appended_events_survive_reopening_and_leave_when_removed() {
        let scratch = tempdir();
        let dir = scratch.path();
        let inbox = Inbox::open(dir, ROOMY).unwrap();
        let a = inbox.append(&webhook("{\"a\":1}")).await.unwrap();
        let b = inbox.append(&webhook("{\"b\":2}")).await.unwrap();
        assert!(b > a);
        assert_eq!(inbox.depth(), 2);
        drop(inbox);
        // The writer thread ends with the last clone; wait for it to release the file.
        let inbox = reopen(dir);
        assert_eq!(inbox.depth(), 2);
        let listed = inbox.list(10).unwrap();
        assert_eq!(listed.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(listed[0].webhook.body.as_ref(), b"{\"a\":1}");
        assert_eq!(listed[0].webhook.path_org.as_deref(), Some("org"));
        inbox.remove(a).await.unwrap();
        let c = inbox.append(&webhook("{}")).await.unwrap();
        assert!(c > b, "ids keep growing after a reopen");
        assert_eq!(inbox.list(10).unwrap().iter().map(|e| e.id).collect::<Vec<_>>(), vec![b, c]);
        assert_eq!(inbox.depth(), 2);
    }

    #[tokio::test]
    async fn a_full_inbox_refuses_new_events() {
        let dir = tempdir();
        let inbox = Inbox::open(dir.path(), InboxLimits { max_events: 2, max_bytes: 1 << 20 }).unwrap();
        inbox.append(&webhook("1")).await.unwrap();
        inbox.append(&webhook("2")).await.unwrap();
        assert!(matches!(inbox.append(&webhook("3")).await, Err(InboxError::Full { depth: 2, .. })));
        let dir = tempdir();
        let small = Inbox::open(dir.path(), InboxLimits { max_events: 10, max_bytes: 4 }).unwrap();
        assert!(matches!(small.append(&webhook("12345")).await, Err(InboxError::Full { .. })));
    }

    #[tokio::test]
    async fn a_failed_event_waits_for_its_next_attempt() {
        let dir = tempdir();
        let inbox = Inbox::open(dir.path(), ROOMY).unwrap();
        let a = inbox.append(&webhook("1")).await.unwrap();
        let b = inbox.append(&webhook("2")).await.unwrap();
        let later = Utc::now() + chrono::Duration::seconds(60);
        inbox
            .record_failure(a, Failure { attempts: 1, failures: 0, next_attempt_at: later, error: "db down".into() })
            .await
            .unwrap();
        let c = inbox.append(&webhook("3")).await.unwrap();
        let due: Vec<u64> = inbox.due(Utc::now(), 10, &HashSet::new()).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(due, vec![b, c]);
        let all = inbox.list(10).unwrap();
        assert_eq!((all[0].id, all[0].attempts, all[0].last_error.as_deref()), (a, 1, Some("db down")));
        let skip = HashSet::from([b]);
        let due: Vec<u64> = inbox.due(later, 10, &skip).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(due, vec![a, c], "claimed events are skipped");
    }

    /// A directory of its own, removed with everything in it when dropped.
    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("callplane-inbox-test-").tempdir().unwrap()
    }

    fn reopen(dir: &Path) -> Inbox {
        for _ in 0..100 {
            if let Ok(inbox) = Inbox::open(dir, ROOMY) {
                return inbox;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the inbox did not reopen");
    }
}
