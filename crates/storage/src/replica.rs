//! `PgReplica`: the read replica backend of the read routing seam (`callplane_core::reads`).
//!
//! A streaming replica replays the primary's write-ahead log; a read there sees every change
//! whose commit it has replayed. So the replica is asked where it has replayed to
//! (`pg_last_wal_replay_lsn()`), and a read goes to it only when that is at or past what its
//! reader must see: the newest write this process knows the organization made (raised by
//! [`PgReplica::raise`] and [`ReplicaRouting::wrote`]) and the position the client brought back.
//!
//! A background check (every `check_every`) asks the primary where its log ends and the replica
//! where it has replayed to; from the pairs it keeps, the lag is how long ago the primary wrote
//! the oldest change not yet replayed. A replica that does not answer is `down`, one further
//! behind than `max_lag` is `lagging`: both send reads to the primary until a check says
//! otherwise. A reader that needs more than the last check saw asks the replica again, one
//! question at a time for all such readers, until `wait` runs out.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::reads::{Fallback, Lsn, ReplicaRouting, ReplicaStatus};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The primary's log position: where its inserted records end (past every committed change).
/// With `synchronous_commit = off` a commit is visible before its record is flushed, so the
/// flush position could be behind a change a reader saw; the insert position never is.
const PRIMARY_LSN: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint";
/// The replica's replay position; NULL when the server is not replaying (it is a primary).
const REPLAYED_LSN: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint";

/// How long one question to either server may take before the replica counts as down.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a waiting reader asks the replica again.
const ASK_EVERY: Duration = Duration::from_millis(2);
/// The most primary positions kept for the lag (older ones are replayed or past any limit).
const MAX_SAMPLES: usize = 4096;

/// How the replica is used.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaSettings {
    /// Further behind than this, the replica gets no reads.
    pub max_lag: Duration,
    /// How long a reader waits for the replica to replay what it must see.
    pub wait: Duration,
    /// How often the primary's and the replica's positions are compared.
    pub check_every: Duration,
}

#[derive(Clone)]
pub struct PgReplica {
    inner: Arc<Inner>,
}

struct Inner {
    primary: PgStore,
    replica: PgStore,
    settings: ReplicaSettings,
    /// Where the replica had replayed to when last asked.
    replayed: AtomicU64,
    health: Mutex<Health>,
    /// Per organization, the newest write known here that its readers must see.
    marks: Mutex<HashMap<OrgId, u64>>,
    /// One question to the replica at a time for the readers that wait.
    asking: tokio::sync::Mutex<()>,
    on_replica: AtomicU64,
    fallbacks: [AtomicU64; Fallback::ALL.len()],
}

struct Health {
    /// The last check's error, when the replica did not answer it.
    down: Option<String>,
    /// The primary's positions at the checks, oldest first, with when they were seen.
    samples: VecDeque<(Instant, u64)>,
    /// The last check's primary position.
    primary: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PgReplica {
    /// A router over `primary` and `replica`; reads go to the primary until the first check
    /// (started here) has heard from both.
    pub fn start(primary: PgStore, replica: PgStore, settings: ReplicaSettings) -> Self {
        let inner = Arc::new(Inner {
            primary,
            replica,
            settings,
            replayed: AtomicU64::new(0),
            health: Mutex::new(Health { down: Some("not checked yet".into()), samples: VecDeque::new(), primary: 0 }),
            marks: Mutex::default(),
            asking: tokio::sync::Mutex::new(()),
            on_replica: AtomicU64::new(0),
            fallbacks: Default::default(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(settings.check_every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.check().await;
            }
        });
        Self { inner }
    }

    /// Reads of `org` wait for the replica to replay `lsn` from now on (a change the real-time
    /// stream announced, or a write another part of this process made).
    pub fn raise(&self, org: OrgId, lsn: Lsn) {
        let mut marks = lock(&self.inner.marks);
        let mark = marks.entry(org).or_default();
        *mark = (*mark).max(lsn.0);
    }
}

async fn ask(store: &PgStore, sql: &str) -> Result<Option<i64>, String> {
    match tokio::time::timeout(ASK_TIMEOUT, sqlx::query_scalar::<_, Option<i64>>(sql).fetch_one(store.pool())).await {
        Ok(Ok(lsn)) => Ok(lsn),
        Ok(Err(e)) => Err(callplane_core::error_chain(&db(e))),
        Err(_) => Err(format!("no answer within {} ms", ASK_TIMEOUT.as_millis())),
    }
}

impl Inner {
    async fn check(&self) {
        let (primary, replayed) = tokio::join!(ask(&self.primary, PRIMARY_LSN), self.ask_replayed());
        let now = Instant::now();
        let mut health = lock(&self.health);
        let was_down = health.down.is_some();
        if let Ok(Some(lsn)) = primary {
            health.primary = lsn as u64;
            if health.samples.back().is_none_or(|&(_, last)| last < lsn as u64) {
                health.samples.push_back((now, lsn as u64));
            }
        }
        health.down = replayed.err();
        let replayed = self.replayed.load(Ordering::Relaxed);
        // Positions replayed no longer matter for the lag, nor marks for readers.
        while health.samples.front().is_some_and(|&(_, lsn)| lsn <= replayed) || health.samples.len() > MAX_SAMPLES {
            health.samples.pop_front();
        }
        match (&health.down, was_down) {
            (Some(why), false) => warn!(error = %why, "the read replica is down; dashboard reads go to the primary"),
            (None, true) => info!(replayed = %Lsn(replayed), "the read replica answers; dashboard reads go to it"),
            _ => {}
        }
        drop(health);
        lock(&self.marks).retain(|_, mark| *mark > replayed);
    }

    /// Asks the replica where it has replayed to, and keeps the answer.
    async fn ask_replayed(&self) -> Result<u64, String> {
        match ask(&self.replica, REPLAYED_LSN).await? {
            Some(lsn) => {
                let lsn = lsn as u64;
                self.replayed.fetch_max(lsn, Ordering::Relaxed);
                Ok(lsn)
            }
            None => Err("the replica is not replaying a primary's log (it was promoted, or is a primary)".into()),
        }
    }

    fn lag(&self, health: &Health) -> (f64, u64) {
        let replayed = self.replayed.load(Ordering::Relaxed);
        let seconds =
            health.samples.iter().find(|&&(_, lsn)| lsn > replayed).map_or(0.0, |(at, _)| at.elapsed().as_secs_f64());
        (seconds, health.primary.saturating_sub(replayed))
    }

    /// Why no read may go to the replica at all now, if so: it is down, or too far behind.
    fn unusable(&self, health: &Health) -> Option<Fallback> {
        if health.down.is_some() {
            Some(Fallback::Down)
        } else if self.lag(health).0 > self.settings.max_lag.as_secs_f64() {
            Some(Fallback::Lagging)
        } else {
            None
        }
    }

    fn fallback(&self, why: Fallback) -> &AtomicU64 {
        &self.fallbacks[why as usize]
    }
}

#[async_trait]
impl ReplicaRouting for PgReplica {
    async fn ready(&self, org: OrgId, after: Option<Lsn>) -> Result<(), Fallback> {
        let inner = &self.inner;
        if let Some(why) = inner.unusable(&lock(&inner.health)) {
            return Err(why);
        }
        let mark = lock(&inner.marks).get(&org).copied().unwrap_or(0);
        let need = mark.max(after.map_or(0, |a| a.0));
        let deadline = Instant::now() + inner.settings.wait;
        loop {
            if inner.replayed.load(Ordering::Relaxed) >= need {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Fallback::Behind);
            }
            // Waiting for the question, and its answer, counts against the reader's wait.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let asked = tokio::time::timeout(remaining, async {
                let _one = inner.asking.lock().await;
                if inner.replayed.load(Ordering::Relaxed) >= need {
                    return Ok(());
                }
                inner.ask_replayed().await.map(|_| ())
            })
            .await;
            match asked {
                Err(_) => return Err(Fallback::Behind),
                Ok(Err(_)) => return Err(Fallback::Down),
                Ok(Ok(())) => {}
            }
            if inner.replayed.load(Ordering::Relaxed) < need {
                tokio::time::sleep(ASK_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
    }

    fn served(&self, fallback: Option<Fallback>) {
        let counter = match fallback {
            None => &self.inner.on_replica,
            Some(why) => self.inner.fallback(why),
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    async fn wrote(&self, org: OrgId) -> Option<Lsn> {
        match ask(&self.inner.primary, PRIMARY_LSN).await {
            Ok(Some(lsn)) => {
                let lsn = Lsn(lsn as u64);
                self.raise(org, lsn);
                Some(lsn)
            }
            Ok(None) | Err(_) => None,
        }
    }

    fn status(&self) -> ReplicaStatus {
        let inner = &self.inner;
        let health = lock(&inner.health);
        let (lag_seconds, lag_bytes) = inner.lag(&health);
        let state = match inner.unusable(&health) {
            Some(Fallback::Down) => "down",
            Some(_) => "lagging",
            None => "streaming",
        };
        ReplicaStatus {
            state,
            lag_seconds,
            lag_bytes,
            replayed: Lsn(inner.replayed.load(Ordering::Relaxed)),
            reads_on_replica: inner.on_replica.load(Ordering::Relaxed),
            fallbacks: Fallback::ALL.iter().map(|&f| (f.as_str(), inner.fallback(f).load(Ordering::Relaxed))).collect(),
            error: health.down.clone(),
        }
    }
}
