//! The phase advisor's figures. `serve` writes what it counted (dashboard requests, answers,
//! webhooks, refused searches, live transcript messages) to `advisor_daily` every
//! `advisor.sample_interval_seconds`, with the database's connections and Redis's memory at
//! that moment, so the figures outlive the process and add up across servers. [`Advisor`]
//! gathers a window of them with what only the database knows (failed events, concurrent
//! calls, sizes) and judges them with [`callplane_api::advice::advise`].

use crate::settings::Settings;
use async_trait::async_trait;
use callplane_api::Metrics;
use callplane_api::advice::{
    Advice, AdviceSource, AdvisorSettings, Component, DayFigures, Figures, RedisMemory, advise,
};
use callplane_core::routes::{Routes, Seam};
use callplane_core::seams::{StoreError, StoreResult};
use callplane_storage::PgStore;
use chrono::{Days, NaiveDate, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How long one probe (the database's connections, Redis's memory) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What uses memory in Redis, as far as the advisor asks.
#[async_trait]
pub trait MemoryProbe: Send + Sync {
    async fn used_memory(&self) -> StoreResult<u64>;
    /// Whether a seam uses this Redis now (a phase move changes it while the process runs).
    fn in_use(&self) -> bool {
        true
    }
}

/// Writes what this process counted since the last write to `advisor_daily`.
pub struct Sampler {
    store: PgStore,
    metrics: Arc<Metrics>,
    redis: Option<Arc<dyn MemoryProbe>>,
    /// The counts already written; held while a write is under way.
    written: tokio::sync::Mutex<Vec<(&'static str, u64)>>,
}

impl Sampler {
    pub fn new(store: PgStore, metrics: Arc<Metrics>, redis: Option<Arc<dyn MemoryProbe>>) -> Arc<Self> {
        let written = metrics.advisor_counts().map(|(name, _)| (name, 0)).to_vec();
        Arc::new(Self { store, metrics, redis, written: tokio::sync::Mutex::new(written) })
    }

    /// Adds what was counted since the last write to today's figures, with the connections
    /// and Redis memory now as peaks. When the database does not take it, the counts wait for
    /// the next write: none is lost, none is written twice.
    pub async fn flush(&self) -> StoreResult<()> {
        let mut written = self.written.lock().await;
        let counts = self.metrics.advisor_counts();
        let mut figures: Vec<(&str, i64)> = counts
            .iter()
            .zip(written.iter())
            .filter(|((_, now), (_, before))| now > before)
            .map(|((name, now), (_, before))| (*name, i64::try_from(now - before).unwrap_or(i64::MAX)))
            .collect();
        if let Ok(Ok(c)) = tokio::time::timeout(PROBE_TIMEOUT, self.store.database_connections()).await
            && c.limit > 0
        {
            // In basis points: the share of the binding limit.
            figures.push(("db_connections_bp_peak", c.used.saturating_mul(10_000) / c.limit));
        }
        if let Some(redis) = self.redis.as_ref().filter(|r| r.in_use())
            && let Ok(Ok(bytes)) = tokio::time::timeout(PROBE_TIMEOUT, redis.used_memory()).await
        {
            figures.push(("redis_memory_peak", i64::try_from(bytes).unwrap_or(i64::MAX)));
        }
        self.store.record_advisor_day(Utc::now().date_naive(), &figures).await?;
        *written = counts.to_vec();
        Ok(())
    }

    /// Writes every `every` for as long as the process runs.
    pub fn spawn(self: &Arc<Self>, every: Duration) {
        let sampler = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = sampler.flush().await {
                    warn!(error = %e, "writing the advisor's figures failed; they are kept for the next write");
                }
            }
        });
    }
}

/// The advisor over a database (and Redis, when a backend uses it).
pub struct Advisor {
    store: PgStore,
    settings: AdvisorSettings,
    answer_deadline_ms: u64,
    /// The backends serving now (a phase move changes them while the process runs).
    routes: Arc<Routes>,
    transcripts: &'static str,
    realtime: &'static str,
    redis: Option<Arc<dyn MemoryProbe>>,
    /// This process's counts, written before the figures are read (in `serve`).
    sampler: Option<Arc<Sampler>>,
}

impl Advisor {
    pub fn new(
        settings: &Settings,
        store: PgStore,
        redis: Option<Arc<dyn MemoryProbe>>,
        sampler: Option<Arc<Sampler>>,
        routes: Arc<Routes>,
    ) -> Self {
        Self {
            store,
            settings: settings.advisor.clone(),
            answer_deadline_ms: settings.vapi.answer_deadline_ms,
            routes,
            transcripts: settings.backends.transcripts.into(),
            realtime: settings.backends.realtime.into(),
            redis,
            sampler,
        }
    }

    /// The window's figures: the servers' daily counts and peaks, with what the database
    /// holds now.
    pub async fn figures(&self) -> StoreResult<Figures> {
        let today = Utc::now().date_naive();
        let first = today.checked_sub_days(Days::new(u64::from(self.settings.window_days.max(1) - 1))).unwrap_or(today);
        let from = first.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
        let store = &self.store;
        let cap = i64::try_from(self.settings.calls_stored).unwrap_or(i64::MAX - 1).saturating_add(1);
        let (rows, failed, concurrent, connections, transcripts, calls) = tokio::try_join!(
            store.advisor_days(first),
            store.dead_letters_by_day(from),
            store.concurrent_call_peaks(from),
            store.database_connections(),
            store.transcripts_bytes(),
            store.calls_stored_up_to(cap),
        )?;
        let mut days: BTreeMap<NaiveDate, DayFigures> = first
            .iter_days()
            .take_while(|d| *d <= today)
            .map(|day| (day, DayFigures { day, ..Default::default() }))
            .collect();
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        for (day, name, value) in rows {
            let Some(d) = days.get_mut(&day) else { continue };
            let slot = match name.as_str() {
                "dashboard_requests" => &mut d.dashboard_requests,
                "dashboard_slow" => &mut d.dashboard_slow,
                "answers" => &mut d.answers,
                "answers_slow" => &mut d.answers_slow,
                "webhooks" => &mut d.webhooks,
                "searches_refused" => &mut d.searches_refused,
                "transcript_messages" => &mut d.transcript_messages,
                "db_connections_bp_peak" => {
                    d.db_connections_peak_share = value as f64 / 10_000.0;
                    continue;
                }
                "redis_memory_peak" => &mut d.redis_memory_peak_bytes,
                _ => continue,
            };
            *slot = count(value);
        }
        for (day, n) in failed {
            if let Some(d) = days.get_mut(&day) {
                d.failed_events = count(n);
            }
        }
        for (day, n) in concurrent {
            if let Some(d) = days.get_mut(&day) {
                d.concurrent_calls_peak = count(n);
            }
        }
        let redis_memory = match self.redis.as_ref().filter(|r| r.in_use()) {
            None => RedisMemory::NotConfigured,
            Some(redis) => match tokio::time::timeout(PROBE_TIMEOUT, redis.used_memory()).await {
                Ok(Ok(bytes)) => RedisMemory::Used(bytes),
                Ok(Err(e)) => RedisMemory::Unreachable(e.to_string()),
                Err(_) => RedisMemory::Unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
            },
        };
        Ok(Figures {
            days: days.into_values().collect(),
            db_connections_now: count(connections.used),
            db_connections_limit: count(connections.limit),
            db_connections_scope: connections.scope.to_owned(),
            redis_memory,
            transcripts_bytes: count(transcripts),
            calls_stored: count(calls),
            answer_deadline_ms: self.answer_deadline_ms,
            search_on: self.routes.route(Seam::Search).backend != "off",
            components: self.components(),
        })
    }
}

#[async_trait]
impl AdviceSource for Advisor {
    async fn advice(&self) -> Result<Advice, StoreError> {
        if let Some(sampler) = &self.sampler
            && let Err(e) = sampler.flush().await
        {
            warn!(error = %e, "writing this server's advisor figures failed; advising on what is written");
        }
        Ok(advise(&self.settings, &self.figures().await?, Utc::now()))
    }
}

impl Advisor {
    /// Each component's backend and the phase it belongs to. A backend phase 1 and 2 share (the
    /// Postgres transcripts and real-time bus) counts as phase 2: only what phase 2 moves keeps
    /// a system on phase 1.
    fn components(&self) -> Vec<Component> {
        let component = |component: &str, backend: &'static str, phase: u8| Component {
            component: component.to_owned(),
            backend: backend.to_owned(),
            phase,
        };
        let routed = |seam: Seam, phase2: &str| {
            let backend = self.routes.route(seam).backend;
            component(seam.name(), backend, if backend == phase2 { 2 } else { 1 })
        };
        vec![
            routed(Seam::UsageCounter, "redis"),
            routed(Seam::FunctionData, "redis"),
            routed(Seam::EventPipeline, "temporal"),
            routed(Seam::Search, "postgres"),
            component("transcripts", self.transcripts, 2),
            component("realtime", self.realtime, 2),
        ]
    }
}
