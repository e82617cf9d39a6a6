//! `PgRealtimeBus`: organizations' event streams over Postgres, the phase-1 backend.
//!
//! Publishing is in two steps (migration `20261130000005_realtime_outbox.sql` says why). An
//! event is first queued in `realtime_outbox`, inside the transaction of the change that makes
//! it (`queue_realtime_events`), or on its own (`publish`). After commit, the process's publisher moves
//! queued events into their organizations' streams, one batch per short transaction
//! (`callplane_publish_outbox`): numbered, stored and notified. Any process may publish; an
//! advisory lock makes them take turns, and each wakes its own publisher after its commits (a
//! timer catches what a stopped process left queued).
//!
//! One LISTEN connection per process receives every notification and fans it out in memory to
//! that organization's subscribers only, so every `callplane serve` on the database delivers
//! every event. Subscribers never block the publisher: each has a bounded queue, and one that
//! falls behind is told it lagged and must resume from the stored history. The history is read
//! in pages bounded in count and bytes.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::reads::Lsn;
use callplane_core::seams::{Delivery, PublishedEvent, RealtimeBus, RealtimeEvent, StoreError, StoreResult};
use futures::stream::{self, BoxStream, StreamExt};
use sqlx::Row;
use sqlx::postgres::PgListener;
use sqlx::types::Json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, watch};
use tracing::{info, warn};

pub const CHANNEL: &str = "callplane_events";

/// The most outbox rows (a change's events each) one publishing transaction moves.
const PUBLISH_BATCH: i32 = 512;

/// How often a publisher looks for events queued by a process that stopped before publishing.
const PUBLISH_SWEEP: Duration = Duration::from_secs(1);

type Tx<'t> = sqlx::Transaction<'t, sqlx::Postgres>;

/// Queues events in the caller's transaction; they are published after it commits (wake the
/// bus with [`RealtimeBus::queued`]) and never if it rolls back.
pub async fn queue_realtime_events(tx: &mut Tx<'_>, events: &[RealtimeEvent]) -> StoreResult<()> {
    queue(&mut **tx, events).await
}

/// One queued event, as an element of its outbox row's `events`.
#[derive(serde::Serialize)]
struct Queued<'a> {
    kind: &'a str,
    call_id: Option<&'a str>,
    data: &'a serde_json::Value,
}

/// Queues the events as one outbox row per run of the same organization (a change's events
/// are one row), in order (migration `20261208000001_outbox_one_row_per_change.sql`).
async fn queue<'e>(exec: impl sqlx::PgExecutor<'e>, events: &[RealtimeEvent]) -> StoreResult<()> {
    let mut rows: Vec<(uuid::Uuid, Vec<Queued>)> = Vec::new();
    for e in events {
        let q = Queued { kind: &e.kind, call_id: e.call_id.as_deref(), data: &e.data };
        match rows.last_mut() {
            Some((org, queued)) if *org == e.org_id.0 => queued.push(q),
            _ => rows.push((e.org_id.0, vec![q])),
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let (orgs, events): (Vec<_>, Vec<_>) = rows.into_iter().map(|(org, queued)| (org, Json(queued))).unzip();
    sqlx::query(
        "INSERT INTO realtime_outbox (organization_id, events) \
         SELECT org, events FROM unnest($1::uuid[], $2::jsonb[]) WITH ORDINALITY AS r(org, events, n) ORDER BY n",
    )
    .bind(orgs)
    .bind(events)
    .execute(exec)
    .await
    .map_err(db)?;
    Ok(())
}

/// The most event data (as JSON text) one history page carries beyond its first event.
const HISTORY_PAGE_BYTES: i64 = 64 * 1024;

/// Told of every published event's organization and log position, before its subscribers are.
type Heard = Arc<dyn Fn(OrgId, Lsn) + Send + Sync>;

/// The per-organization senders of this process.
#[derive(Default)]
struct Fanout {
    orgs: Mutex<HashMap<OrgId, broadcast::Sender<Delivery>>>,
    heard: Mutex<Option<Heard>>,
}

/// A notification: the event, and where the primary's log ended when it was published (past
/// the commit of the change it announces; migration `20261207000001_notify_log_position.sql`).
#[derive(serde::Deserialize)]
struct Notified {
    #[serde(flatten)]
    event: PublishedEvent,
    lsn: Option<u64>,
}

impl Fanout {
    fn hear(&self, notified: Notified) {
        if let Some(lsn) = notified.lsn
            && let Some(heard) = self.heard.lock().ok().and_then(|h| h.clone())
        {
            heard(notified.event.org_id, Lsn(lsn));
        }
        self.dispatch(notified.event);
    }

    fn dispatch(&self, event: PublishedEvent) {
        let Ok(mut orgs) = self.orgs.lock() else { return };
        if let Some(tx) = orgs.get(&event.org_id) {
            if tx.receiver_count() == 0 {
                orgs.remove(&event.org_id);
            } else {
                let _ = tx.send(Delivery::Event(Arc::new(event)));
            }
        }
    }

    /// The listener lost notifications (its connection dropped): every subscriber must
    /// resume from the history.
    fn lag_all(&self) {
        if let Ok(mut orgs) = self.orgs.lock() {
            for tx in orgs.values() {
                let _ = tx.send(Delivery::Lagged);
            }
            orgs.clear();
        }
    }
}

#[derive(Clone)]
pub struct PgRealtimeBus {
    store: PgStore,
    fanout: Arc<Fanout>,
    queue: usize,
    wake: Arc<Notify>,
}

impl PgRealtimeBus {
    /// Starts the process's listener and publisher, and waits until the listener is listening,
    /// so no event published after this returns can be missed.
    pub async fn start(store: PgStore, queue: usize) -> StoreResult<Self> {
        let bus = Self { store, fanout: Arc::default(), queue: queue.max(16), wake: Arc::default() };
        let (ready_tx, mut ready_rx) = watch::channel(false);
        let task = bus.clone();
        tokio::spawn(async move { task.listen_forever(ready_tx).await });
        let publisher = bus.clone();
        tokio::spawn(async move { publisher.publish_forever().await });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|ready| *ready))
            .await
            .map_err(|_| {
                let timeout = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the realtime listener could not connect within 10s",
                );
                StoreError::unavailable("postgres", timeout)
            })?
            .map_err(|_| StoreError::Internal("the realtime listener stopped".into()))?;
        Ok(bus)
    }

    /// Tells `heard` of each published event's organization and log position as it arrives,
    /// before its subscribers see it (the read replica's router raises that organization's mark).
    pub fn on_heard(&self, heard: impl Fn(OrgId, Lsn) + Send + Sync + 'static) {
        if let Ok(mut slot) = self.fanout.heard.lock() {
            *slot = Some(Arc::new(heard));
        }
    }

    /// Publishes what is queued, whenever a commit of this process queued events and every
    /// [`PUBLISH_SWEEP`]. A wake-up that arrives while a batch is being published is kept,
    /// so nothing queued before it waits for the sweep.
    async fn publish_forever(self) {
        loop {
            if let Err(e) = publish_queued(&self.store).await {
                warn!(error = %e, "publishing queued realtime events failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let _ = tokio::time::timeout(PUBLISH_SWEEP, self.wake.notified()).await;
        }
    }

    async fn listen_forever(self, ready: watch::Sender<bool>) {
        let mut first = true;
        loop {
            match PgListener::connect_with(self.store.direct()).await {
                Ok(mut listener) => match listener.listen(CHANNEL).await {
                    Ok(()) => {
                        if !first {
                            info!("realtime listener reconnected");
                        }
                        first = false;
                        let _ = ready.send(true);
                        if let Err(e) = self.receive(&mut listener).await {
                            warn!(error = %e, "realtime listener lost its connection; reconnecting");
                        }
                    }
                    Err(e) => warn!(error = %e, "LISTEN failed; retrying"),
                },
                Err(e) => warn!(error = %e, "realtime listener cannot connect; retrying"),
            }
            self.fanout.lag_all();
            if ready.is_closed() && first {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn receive(&self, listener: &mut PgListener) -> Result<(), sqlx::Error> {
        loop {
            // `try_recv` reports a dropped connection as `None` (and reconnects on the next
            // call); notifications sent meanwhile are lost, so subscribers must resume.
            match listener.try_recv().await? {
                Some(n) => match serde_json::from_str::<Notified>(n.payload()) {
                    Ok(notified) => self.fanout.hear(notified),
                    Err(e) => warn!(error = %e, "ignoring a malformed realtime notification"),
                },
                None => {
                    warn!("realtime listener reconnecting; subscribers will resume from history");
                    self.fanout.lag_all();
                }
            }
        }
    }
}

#[async_trait]
impl RealtimeBus for PgRealtimeBus {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn queues_in_transaction(&self) -> bool {
        true
    }

    fn queued(&self) {
        self.wake.notify_one();
    }

    async fn publish(&self, events: &[RealtimeEvent]) -> StoreResult<()> {
        queue(self.store.pool(), events).await?;
        self.queued();
        Ok(())
    }

    async fn subscribe(&self, org: OrgId) -> StoreResult<BoxStream<'static, Delivery>> {
        let rx = {
            let mut orgs =
                self.fanout.orgs.lock().map_err(|_| StoreError::Internal("realtime fanout poisoned".into()))?;
            orgs.entry(org).or_insert_with(|| broadcast::channel(self.queue).0).subscribe()
        };
        Ok(stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Ok(Delivery::Event(e)) => Some((Delivery::Event(e), Some(rx))),
                // Lagged ends the stream: the subscriber resumes from the history.
                Ok(Delivery::Lagged) | Err(broadcast::error::RecvError::Lagged(_)) => Some((Delivery::Lagged, None)),
                Err(broadcast::error::RecvError::Closed) => Some((Delivery::Lagged, None)),
            }
        })
        .boxed())
    }

    /// At most `limit` events, and no more than [`HISTORY_PAGE_BYTES`] of their data past the
    /// first: a page is what this process holds for a client catching up, however large the
    /// events are.
    async fn history(&self, org: OrgId, after_seq: i64, limit: i64) -> StoreResult<Vec<PublishedEvent>> {
        // The window runs over the `limit` rows only, so a long backlog is never scanned whole.
        let rows = sqlx::query(
            "SELECT seq, kind, call_id, data, created_at FROM ( \
                 SELECT *, sum(octet_length(data::text)) OVER (ORDER BY seq) - octet_length(data::text) AS before \
                 FROM (SELECT seq, kind, call_id, data, created_at FROM realtime_events \
                       WHERE organization_id = $1 AND seq > $2 ORDER BY seq LIMIT $3) page \
             ) sized WHERE before < $4 ORDER BY seq",
        )
        .bind(org.0)
        .bind(after_seq)
        .bind(limit)
        .bind(HISTORY_PAGE_BYTES)
        .fetch_all(self.store.pool())
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(PublishedEvent {
                    org_id: org,
                    seq: r.try_get("seq")?,
                    kind: r.try_get("kind")?,
                    call_id: r.try_get("call_id")?,
                    data: r.try_get("data")?,
                    at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db)
    }

    fn subscribers(&self) -> usize {
        self.fanout.orgs.lock().map(|o| o.values().map(|tx| tx.receiver_count()).sum()).unwrap_or(0)
    }
}

/// Publishes every queued event, a batch per transaction; returns how many.
async fn publish_queued(store: &PgStore) -> StoreResult<u64> {
    let mut total = 0;
    loop {
        let n: i32 = sqlx::query_scalar("SELECT callplane_publish_outbox($1)")
            .bind(PUBLISH_BATCH)
            .fetch_one(store.pool())
            .await
            .map_err(db)?;
        total += n as u64;
        // A row holds one event or more: fewer events than the batch's rows means the queue
        // ran out.
        if n < PUBLISH_BATCH {
            return Ok(total);
        }
    }
}

impl PgStore {
    /// Events queued and not yet published.
    pub async fn realtime_queued(&self) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT coalesce(sum(coalesce(jsonb_array_length(events), 1)), 0)::bigint FROM realtime_outbox",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// Deletes stored events older than the retention window; returns how many.
    pub async fn prune_realtime_events(&self, older_than: chrono::DateTime<chrono::Utc>) -> StoreResult<u64> {
        Ok(sqlx::query("DELETE FROM realtime_events WHERE created_at < $1")
            .bind(older_than)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected())
    }

    /// The oldest stored sequence number of an organization, if any.
    pub async fn oldest_realtime_seq(&self, org: OrgId) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT min(seq) FROM realtime_events WHERE organization_id = $1")
            .bind(org.0)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }
}
