//! The composition root: configuration in, a running callplane out.

use crate::advisor::{Advisor, MemoryProbe, Sampler};
use crate::settings::{PipelineBackend, RealtimeBackend, Settings, TranscriptBackend};
use anyhow::Context;
use async_trait::async_trait;
use callplane_api::{AppState, Metrics, Readiness};
use callplane_billing::{BillingOff, StripeBilling, StripeWebhooks};
use callplane_core::metering::Metering;
use callplane_core::reads::{Readers, Reads};
use callplane_core::routes::{RoutedCounter, RoutedFunctionData, RoutedPipeline, RoutedSearch, Routes};
use callplane_core::seams::EventPipeline;
use callplane_core::seams::{FunctionData, RealtimeBus, TranscriptStore};
use callplane_storage::{PgAgentDirectory, PgFunctionData, PgRealtimeBus, PgReplica, PgStore, PgUsageCounter};
use callplane_workflow::reconcile::{Reconciler, spawn_sweeper};
use callplane_workflow::{DeadLetters, Inbox, InlinePipeline, LocalIntake, PipelineSettings, Processor};
use chrono::Utc;
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// A built application: its store, its pipeline, its intake and the HTTP state.
#[derive(Clone)]
pub struct App {
    pub settings: Settings,
    pub store: PgStore,
    pub pipeline: Arc<dyn EventPipeline>,
    /// Events that failed processing, and their replay.
    pub dead_letters: DeadLetters,
    pub intake: LocalIntake,
    pub agents: PgAgentDirectory,
    pub state: AppState,
    /// Writes this process's advisor figures to the database.
    pub sampler: Arc<Sampler>,
    /// The backend routes this process follows.
    pub routes: Arc<Routes>,
    /// Follows the database's routes and heartbeats.
    pub follower: Arc<crate::routes::Follower>,
    /// Set on shutdown: WebSocket sessions close with 1001.
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// The Temporal worker `serve` runs (`temporal.worker`), once it runs one; stops when the
    /// last clone drops.
    #[cfg(feature = "temporal")]
    pub worker: ServeWorker,
}

struct PgReadiness {
    store: PgStore,
    bus: Arc<dyn RealtimeBus>,
}

/// How often uncounted ledger rows are looked for.
const COUNTER_REPAIR_EVERY: Duration = Duration::from_secs(1);

/// How long `/readyz` and `/metrics` wait for the database before saying it did not answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

#[async_trait]
impl Readiness for PgReadiness {
    async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.migrations_current()).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err("migrations are not all applied; run `callplane migrate`".into()),
            Ok(Err(e)) => Err(format!("database unreachable: {e}")),
            Err(_) => Err(format!("database did not answer within {} ms", PROBE_TIMEOUT.as_millis())),
        }
    }

    async fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        let pool = self.store.pool();
        let mut g = vec![
            ("callplane_db_pool_connections", "Open database connections.", pool.size() as f64),
            ("callplane_db_pool_idle", "Idle database connections.", pool.num_idle() as f64),
            (
                "callplane_realtime_subscribers",
                "Live WebSocket subscriptions in this process.",
                self.bus.subscribers() as f64,
            ),
        ];
        // The database's figures are left out when it cannot answer in time.
        let (dead, live, review, uncounted, queued) = tokio::join!(
            tokio::time::timeout(PROBE_TIMEOUT, self.store.open_dead_letter_count()),
            tokio::time::timeout(PROBE_TIMEOUT, self.store.concurrent_calls()),
            tokio::time::timeout(PROBE_TIMEOUT, self.store.calls_for_review_count()),
            tokio::time::timeout(PROBE_TIMEOUT, self.store.uncounted_calls()),
            tokio::time::timeout(PROBE_TIMEOUT, self.store.realtime_queued()),
        );
        if let Ok(Ok(n)) = queued {
            g.push((
                "callplane_realtime_queued_events",
                "Realtime events committed and not yet published (the publisher is behind, or failing).",
                n as f64,
            ));
        }
        if let Ok(Ok(n)) = uncounted {
            g.push((
                "callplane_usage_uncounted_calls",
                "Billed calls not yet added to the usage counter (it failed, or is catching up).",
                n as f64,
            ));
        }
        if let Ok(Ok(n)) = review {
            g.push((
                "callplane_calls_needing_review",
                "Calls that ended connected with no known duration: not billed until reconciliation finds it.",
                n as f64,
            ));
        }
        if let Ok(Ok(n)) = dead {
            g.push(("callplane_dead_letters_open", "Dead-lettered events not yet replayed.", n as f64));
        }
        if let Ok(Ok(n)) = live {
            g.push(("callplane_concurrent_calls", "Calls in progress across all organizations.", n as f64));
        }
        g
    }
}

/// Redis's memory, asked of while a seam's route writes to Redis.
#[cfg(feature = "redis")]
struct RedisMemory {
    redis: callplane_cache::Redis,
    routes: Arc<Routes>,
}

#[cfg(feature = "redis")]
#[async_trait]
impl MemoryProbe for RedisMemory {
    async fn used_memory(&self) -> callplane_core::seams::StoreResult<u64> {
        self.redis.used_memory().await
    }

    fn in_use(&self) -> bool {
        use callplane_core::routes::Seam;
        [Seam::UsageCounter, Seam::FunctionData].into_iter().any(|s| self.routes.route(s).writes_to("redis"))
    }
}

/// The clients a backend may need, each made once, when some backend is configured to use it.
#[derive(Clone)]
pub struct Clients {
    pub store: PgStore,
    #[cfg(feature = "redis")]
    pub redis: Option<callplane_cache::Redis>,
}

impl Clients {
    pub async fn connect(settings: &Settings, store: &PgStore) -> anyhow::Result<Self> {
        // A build with Redis always has its client (it connects on first use), so a phase move
        // can route a seam to Redis while this process runs.
        #[cfg(feature = "redis")]
        let redis = {
            let redis = callplane_cache::Redis::new(settings.redis.url.expose_secret())
                .with_context(|| format!("redis.url {}", settings.redis_url_masked()))?;
            // Not fatal: the backends fall back (Postgres, the ledger) until Redis answers.
            if !settings.redis_backends().is_empty()
                && let Err(e) = redis.manager().await
            {
                warn!(error = %callplane_core::error_chain(&e), url = %settings.redis_url_masked(),
                      "Redis is not reachable; serving from Postgres until it is");
            }
            Some(redis)
        };
        #[cfg(not(feature = "redis"))]
        let _ = settings;
        Ok(Self {
            store: store.clone(),
            #[cfg(feature = "redis")]
            redis,
        })
    }

    /// What this process can serve beyond Postgres.
    pub fn abilities(&self, settings: &Settings) -> crate::routes::Abilities {
        #[cfg(feature = "redis")]
        let redis = self.redis.as_ref().map(|_| settings.redis_url_masked());
        #[cfg(not(feature = "redis"))]
        let redis = None;
        let t = &settings.temporal;
        let temporal = cfg!(feature = "temporal")
            .then(|| format!("{} namespace {} task queue {}", t.address, t.namespace, t.task_queue));
        crate::routes::Abilities { redis, temporal }
    }

    /// The routes to start with: the database's where a move has set one, `[backends]`
    /// otherwise.
    pub async fn routes(&self, settings: &Settings) -> anyhow::Result<Arc<Routes>> {
        crate::routes::load(settings, &self.store, &self.abilities(settings)).await
    }

    /// What the advisor asks Redis's memory of, while a seam uses Redis.
    pub fn memory_probe(&self, routes: &Arc<Routes>) -> Option<Arc<dyn MemoryProbe>> {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            return Some(Arc::new(RedisMemory { redis: redis.clone(), routes: routes.clone() }));
        }
        let _ = routes;
        None
    }

    /// The usage counter, routed, with its rules (alerts, admission, repair).
    pub fn metering(&self, settings: &Settings, routes: &Arc<Routes>) -> Arc<Metering> {
        let ledger = Arc::new(self.store.clone());
        #[cfg(feature = "redis")]
        let redis = self.redis.as_ref().map(|redis| {
            let counter = callplane_cache::RedisCounter::new(redis.clone(), ledger.clone());
            let unmarked = counter.leaving_the_ledger_unmarked();
            let counter: Arc<dyn callplane_core::seams::UsageCounter> = Arc::new(counter);
            let unmarked: Arc<dyn callplane_core::seams::UsageCounter> = Arc::new(unmarked);
            (counter, unmarked)
        });
        #[cfg(not(feature = "redis"))]
        let redis = None;
        let counter = RoutedCounter::new(routes.clone(), Arc::new(PgUsageCounter(self.store.clone())), redis);
        let included = settings.plans().into_iter().map(|(name, p)| (name, p.included_seconds())).collect();
        Arc::new(Metering::new(Arc::new(counter), ledger, included))
    }

    /// Function data, routed, over `primary` (Postgres).
    pub fn function_data(&self, settings: &Settings, primary: &PgStore, routes: &Arc<Routes>) -> Arc<dyn FunctionData> {
        self.routed_function_data(settings, primary, primary, routes)
    }

    /// Function data as the dashboard reads it on a read replica: Postgres reads there, and the
    /// Redis cache, when routed, stays the one over the primary (a miss never fills the cache
    /// from a replica that is behind).
    pub fn function_data_on(
        &self,
        settings: &Settings,
        replica: &PgStore,
        routes: &Arc<Routes>,
    ) -> Arc<dyn FunctionData> {
        self.routed_function_data(settings, replica, &self.store, routes)
    }

    fn routed_function_data(
        &self,
        settings: &Settings,
        reads: &PgStore,
        cache_fills_from: &PgStore,
        routes: &Arc<Routes>,
    ) -> Arc<dyn FunctionData> {
        let pg: Arc<dyn FunctionData> = Arc::new(PgFunctionData(reads.clone()));
        let fills: Arc<dyn FunctionData> = Arc::new(PgFunctionData(cache_fills_from.clone()));
        let redis = self.redis_function_data(settings, fills).map(|r| r as Arc<dyn FunctionData>);
        Arc::new(RoutedFunctionData::new(routes.clone(), pg, redis))
    }

    /// The function-data cache in Redis over `primary`, when this build has Redis.
    #[cfg(feature = "redis")]
    pub fn redis_function_data(
        &self,
        settings: &Settings,
        primary: Arc<dyn FunctionData>,
    ) -> Option<Arc<callplane_cache::RedisFunctionData>> {
        let ttl = Duration::from_secs(settings.redis.function_data_ttl_seconds.max(1));
        self.redis.as_ref().map(|redis| Arc::new(callplane_cache::RedisFunctionData::new(redis.clone(), primary, ttl)))
    }

    #[cfg(not(feature = "redis"))]
    pub fn redis_function_data(&self, _: &Settings, _: Arc<dyn FunctionData>) -> Option<Arc<dyn FunctionData>> {
        None
    }
}

#[cfg(feature = "temporal")]
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where transcripts are written, and read from. A build with an object store reads the
/// transcripts kept there whichever backend writes new ones, so switching the backend while
/// `callplane transcripts move` runs never hides one.
fn transcript_store(settings: &Settings, store: &PgStore) -> anyhow::Result<Arc<dyn TranscriptStore>> {
    #[cfg(feature = "object-store")]
    {
        use callplane_storage::{ObjectTranscriptStore, Objects};
        let objects = Objects::open(&settings.object_store_config())?;
        Ok(match settings.backends.transcripts {
            TranscriptBackend::ObjectStore => Arc::new(ObjectTranscriptStore::new(store.clone(), objects)),
            TranscriptBackend::Postgres => Arc::new(ObjectTranscriptStore::reading(store.clone(), objects)),
        })
    }
    #[cfg(not(feature = "object-store"))]
    match settings.backends.transcripts {
        TranscriptBackend::Postgres => Ok(Arc::new(callplane_storage::PgTranscriptStore(store.clone()))),
        // `Settings::validate` refuses it first.
        TranscriptBackend::ObjectStore => anyhow::bail!("this build has no object store (`--features phase3`)"),
    }
}

/// The backends of the seams, as configured: built in one place, which is given every client
/// a backend may need.
struct Backends {
    clients: Clients,
    routes: Arc<Routes>,
    /// Follows the database's routes and heartbeats, as `kind` ("serve", "worker", "cli").
    follower: Arc<crate::routes::Follower>,
    metering: Arc<Metering>,
    transcripts: Arc<dyn TranscriptStore>,
    function_data: Arc<dyn FunctionData>,
    bus: Arc<dyn RealtimeBus>,
    /// The same bus, whose announcements a read replica's router hears.
    pg_bus: PgRealtimeBus,
}

impl Backends {
    /// The one place configuration becomes backends. A later phase adds its arm (and the
    /// client it needs) under its feature.
    async fn build(settings: &Settings, store: &PgStore, kind: &'static str) -> anyhow::Result<Self> {
        let b = &settings.backends;
        let clients = Clients::connect(settings, store).await?;
        let routes = clients.routes(settings).await?;
        // Every process that counts usage follows the routes, and says so, so that a phase
        // move waits for it.
        let follower = Arc::new(crate::routes::Follower::new(kind, settings, store.clone(), routes.clone(), &clients));
        follower.clone().spawn();
        let pg_bus = match b.realtime {
            RealtimeBackend::Postgres => PgRealtimeBus::start(store.clone(), settings.realtime.queue).await?,
        };
        Ok(Self {
            metering: clients.metering(settings, &routes),
            transcripts: transcript_store(settings, store)?,
            function_data: clients.function_data(settings, store, &routes),
            bus: Arc::new(pg_bus.clone()),
            pg_bus,
            clients,
            routes,
            follower,
        })
    }

    /// The event processor, its dead letters, and the pipeline that runs them.
    fn pipeline(&self, settings: &Settings, store: &PgStore) -> anyhow::Result<Pipeline> {
        let processor = Processor::new(
            store.clone(),
            self.metering.clone(),
            self.transcripts.clone(),
            self.bus.clone(),
            App::pipeline_settings(settings),
        );
        let dead_letters = DeadLetters::new(store.clone(), processor.clone());
        // A build with Temporal always has its pipeline (it connects on first use), so a phase
        // move can route events to it while this process runs.
        #[cfg(feature = "temporal")]
        let temporal = Some(callplane_temporal::TemporalPipeline::new(
            settings.temporal_settings(),
            dead_letters.clone(),
            processor.stats(),
        ));
        let inline: Arc<dyn EventPipeline> = Arc::new(InlinePipeline::new(processor.clone(), dead_letters.clone()));
        #[allow(unused_mut)]
        let mut pipelines = vec![inline];
        #[cfg(feature = "temporal")]
        pipelines.extend(temporal.clone().map(|t| Arc::new(t) as Arc<dyn EventPipeline>));
        if settings.backends.event_pipeline == PipelineBackend::Temporal && pipelines.len() < 2 {
            anyhow::bail!("backends.event_pipeline = \"temporal\" needs the `temporal` feature");
        }
        let routed = Arc::new(RoutedPipeline::new(self.routes.clone(), pipelines));
        let pipeline: Arc<dyn EventPipeline> = routed.clone();
        Ok(Pipeline {
            pipeline,
            routed,
            dead_letters,
            processor,
            routes: self.routes.clone(),
            clients: self.clients.clone(),
            follower: self.follower.clone(),
            #[cfg(feature = "temporal")]
            temporal,
        })
    }
}

/// The configured pipeline, with what a worker needs to run its steps.
pub struct Pipeline {
    pub pipeline: Arc<dyn EventPipeline>,
    /// The same pipeline, with what it has in hand per backend.
    pub routed: Arc<RoutedPipeline>,
    pub dead_letters: DeadLetters,
    pub processor: Processor,
    /// The backend routes its processor follows.
    pub routes: Arc<Routes>,
    pub clients: Clients,
    /// Follows the routes and heartbeats for this process.
    pub follower: Arc<crate::routes::Follower>,
    /// The Temporal pipeline, when this process uses Temporal (its pipeline, or a worker).
    #[cfg(feature = "temporal")]
    pub temporal: Option<callplane_temporal::TemporalPipeline>,
}

/// The worker a `serve` runs: at start, or (`temporal.worker = "auto"`) from when a phase move
/// routes events to Temporal. Once started it keeps running, so the workflows in flight finish
/// when events are routed back.
#[cfg(feature = "temporal")]
pub type ServeWorker = Arc<std::sync::Mutex<Option<Arc<callplane_temporal::WorkerHandle>>>>;

impl Pipeline {
    /// Starts the worker `serve` runs when `temporal.worker` and the route say so, now or when
    /// the route changes.
    #[cfg(feature = "temporal")]
    pub fn serve_worker(&self, settings: &Settings) -> anyhow::Result<ServeWorker> {
        use crate::settings::WorkerMode;
        let worker: ServeWorker = Arc::default();
        let on_temporal =
            |routes: &Routes| routes.route(callplane_core::routes::Seam::EventPipeline).backend == "temporal";
        match settings.temporal.worker {
            WorkerMode::Off => {}
            WorkerMode::On => *lock(&worker) = Some(Arc::new(self.spawn_worker()?)),
            WorkerMode::Auto if on_temporal(&self.routes) => *lock(&worker) = Some(Arc::new(self.spawn_worker()?)),
            WorkerMode::Auto => {
                let (routes, held) = (self.routes.clone(), Arc::downgrade(&worker));
                let temporal = self.temporal.clone().context("Temporal is not configured for this process")?;
                let (processor, dead_letters) = (self.processor.clone(), self.dead_letters.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(crate::routes::FOLLOW_EVERY / 2).await;
                        // The server is gone: nothing to start.
                        let Some(held) = held.upgrade() else { return };
                        if !on_temporal(&routes) {
                            continue;
                        }
                        match callplane_temporal::spawn_worker(&temporal, processor.clone(), dead_letters.clone()) {
                            Ok(handle) => {
                                info!("events are routed to Temporal: this server runs a worker from now on");
                                *lock(&held) = Some(Arc::new(handle));
                                return;
                            }
                            Err(e) => warn!(error = %e, "starting the Temporal worker failed; trying again"),
                        }
                    }
                });
            }
        }
        Ok(worker)
    }

    /// Starts a Temporal worker running this pipeline's steps.
    #[cfg(feature = "temporal")]
    pub fn spawn_worker(&self) -> anyhow::Result<callplane_temporal::WorkerHandle> {
        let temporal = self.temporal.as_ref().context("Temporal is not configured for this process")?;
        callplane_temporal::spawn_worker(temporal, self.processor.clone(), self.dead_letters.clone())
            .context("starting the Temporal worker's thread")
    }
}

impl App {
    /// The primary, with its sessions on `database.direct_url` when that is set.
    pub async fn connect(settings: &Settings) -> anyhow::Result<PgStore> {
        let store = PgStore::connect(settings.database.url.expose_secret(), settings.database.max_connections)
            .await
            .context("connecting to the database (database.url)")?;
        match settings.database.direct_url() {
            None => Ok(store),
            Some(direct) => store.with_direct_url(direct).context("database.direct_url"),
        }
    }

    /// Builds every backend from configuration. Needs a migrated database.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let store = Self::connect(&settings).await?;
        Self::with_store(settings, store).await
    }

    /// The event pipeline and its dead letters alone (for commands that drain, replay or
    /// reconcile without serving).
    pub async fn pipeline(settings: &Settings, store: &PgStore, kind: &'static str) -> anyhow::Result<Pipeline> {
        Backends::build(settings, store, kind).await?.pipeline(settings, store)
    }

    fn pipeline_settings(settings: &Settings) -> PipelineSettings {
        PipelineSettings {
            rules: settings.billing_rules(),
            max_future_skew: chrono::Duration::hours(settings.partitions.max_future_skew_hours),
            max_past: chrono::Duration::days(settings.partitions.max_past_days),
            org_hint_key: settings.org_hint_key(),
        }
    }

    /// The reconciler of unfinished calls with the event processor it submits to, when VAPI's
    /// API key is configured.
    pub async fn reconciler(settings: &Settings, store: &PgStore) -> anyhow::Result<Option<Reconciler>> {
        let Some(vapi) = settings.vapi_calls()? else { return Ok(None) };
        let backends = Backends::build(settings, store, "cli").await?;
        let pipeline = backends.pipeline(settings, store)?.pipeline;
        let bus = backends.bus;
        Ok(Some(Reconciler::new(store.clone(), vapi, pipeline, bus, settings.reconcile_settings())))
    }

    /// Sweeps calls that never reached `ended` every `reconcile.interval_seconds`, when VAPI's
    /// API key is configured.
    pub fn spawn_reconciler(&self) -> anyhow::Result<()> {
        match self.settings.vapi_calls()? {
            Some(vapi) if self.settings.reconcile.interval_seconds > 0 => {
                let reconciler = Reconciler::new(
                    self.store.clone(),
                    vapi,
                    self.pipeline.clone(),
                    self.state.bus.clone(),
                    self.settings.reconcile_settings(),
                );
                spawn_sweeper(Arc::new(reconciler), Duration::from_secs(self.settings.reconcile.interval_seconds));
            }
            Some(_) => info!("reconcile.interval_seconds = 0: unfinished calls are not swept"),
            None => warn!(
                "vapi.api_key is not set: calls whose end-of-call report never arrives stay unfinished \
                 (set CALLPLANE__VAPI__API_KEY)"
            ),
        }
        Ok(())
    }

    /// Opens the inbox in `inbox.dir`; only one process may hold it.
    pub fn open_inbox(settings: &Settings) -> anyhow::Result<Inbox> {
        Inbox::open(&settings.inbox.dir, settings.inbox_limits()).with_context(|| {
            format!(
                "opening the inbox in inbox.dir {}: one process holds an inbox at a time, so each \
                 `callplane serve` needs a directory of its own; a running server's inbox figures \
                 are on its /readyz and /metrics",
                settings.inbox.dir.display()
            )
        })
    }

    pub async fn with_store(settings: Settings, store: PgStore) -> anyhow::Result<Self> {
        let backends = Backends::build(&settings, &store, "serve").await?;
        let built = backends.pipeline(&settings, &store)?;
        #[cfg(feature = "temporal")]
        let worker = built.serve_worker(&settings)?;
        let Pipeline { pipeline, routed, dead_letters, .. } = built;
        let Backends { clients, routes, follower, metering, transcripts, function_data, bus, pg_bus } = backends;
        let deadline = settings.answer_deadline();
        // Direct, past a pooler: its timeouts are session settings, and it must never queue.
        let answers =
            PgStore::answer_pool(settings.database.direct(), settings.database.answer_pool_connections, deadline)
                .context("the answer pool (database.direct_url or database.url)")?;
        let directory_data = clients.function_data(&settings, &answers, &routes);
        let agents = PgAgentDirectory::new(answers, store.clone(), directory_data, deadline / 4);
        let dashboard_auth = Arc::new(settings.dashboard_auth());
        let keys = dashboard_auth.clone();
        agents.on_keys_changed(move |org| keys.api_keys.recheck(org));
        agents.spawn_listener();
        let intake = LocalIntake::new(
            Self::open_inbox(&settings)?,
            pipeline.clone(),
            Arc::new(agents.clone()),
            settings.intake_settings(),
        );
        let fallback = settings.vapi.fallback_assistant_id.trim();
        let metrics = Arc::new(Metrics::new(settings.advisor_limits()));
        let sampler = Sampler::new(store.clone(), metrics.clone(), clients.memory_probe(&routes));
        sampler.spawn(Duration::from_secs(settings.advisor.sample_interval_seconds.max(1)));
        let advisor = Advisor::new(
            &settings,
            store.clone(),
            clients.memory_probe(&routes),
            Some(sampler.clone()),
            routes.clone(),
        );
        #[cfg(feature = "temporal")]
        let worker_state = {
            let (worker, idle) = (worker.clone(), settings.idle_worker_state());
            move || if lock(&worker).is_some() { "running" } else { idle }
        };
        #[cfg(not(feature = "temporal"))]
        let worker_state = || "off";
        follower.report_pipeline(routed, worker_state);
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let state = AppState {
            webhook_auth: Arc::new(settings.webhook_auth()),
            dashboard_auth,
            auth_throttle: Arc::new(settings.auth_throttle()),
            // Organizations are read from memory, kept current by change notifications.
            orgs: Arc::new(agents.clone()),
            admin: Arc::new(store.clone()),
            intake: Arc::new(intake.clone()),
            pipeline: pipeline.clone(),
            agents: Arc::new(agents.clone()),
            answer_deadline: deadline,
            inline_budget: Duration::from_millis(settings.inbox.inline_budget_ms),
            ready_max_backlog_seconds: settings.inbox.ready_max_age_seconds,
            reads: Self::reads(&settings, &store, &clients, &routes, transcripts, function_data.clone(), &pg_bus)?,
            function_data,
            metering,
            bus: bus.clone(),
            billing: match settings.stripe_settings() {
                Some(stripe) => Arc::new(StripeBilling::new(Arc::new(store.clone()), stripe)?),
                None => Arc::new(BillingOff),
            },
            billing_webhooks: Arc::new(StripeWebhooks::new(
                Arc::new(store.clone()),
                settings.stripe_webhook_secrets(),
                settings.stripe.webhook_tolerance_seconds,
                settings.plans_by_price(),
            )),
            plans: Arc::new(settings.plans()),
            agent: settings.agent(),
            fallback_assistant_id: (!fallback.is_empty()).then(|| fallback.to_owned()),
            public_url: settings.server.public_url.clone(),
            max_body_bytes: settings.server.max_body_bytes,
            max_function_data_bytes: settings.api.max_function_data_bytes,
            realtime: settings.realtime_settings(),
            metrics,
            metrics_token: settings.metrics_token(),
            readiness: Arc::new(PgReadiness { store: store.clone(), bus }),
            advice: Arc::new(advisor),
            shutdown,
        };
        // Whatever a previous process left in the inbox is drained from now on, and calls left
        // uncounted (the counter failed, or a process stopped before counting) are counted.
        intake.spawn_drainer();
        callplane_workflow::counting::spawn_counter_repair(
            state.metering.clone(),
            state.bus.clone(),
            COUNTER_REPAIR_EVERY,
        );
        Ok(Self {
            settings,
            store,
            pipeline,
            dead_letters,
            intake,
            agents,
            state,
            sampler,
            routes,
            follower,
            shutdown: Arc::new(shutdown_tx),
            #[cfg(feature = "temporal")]
            worker,
        })
    }

    /// The dashboard's reads: on the primary, or routed to `database.replica_url` with the
    /// organizations' marks raised by the changes `pg_bus` announces.
    fn reads(
        settings: &Settings,
        store: &PgStore,
        clients: &Clients,
        routes: &Arc<Routes>,
        transcripts: Arc<dyn TranscriptStore>,
        function_data: Arc<dyn FunctionData>,
        pg_bus: &PgRealtimeBus,
    ) -> anyhow::Result<Reads> {
        let search = |db: &PgStore| Arc::new(RoutedSearch::new(routes.clone(), vec![Arc::new(db.clone())]));
        let primary = Readers { calls: Arc::new(store.clone()), transcripts, search: search(store), function_data };
        let Some(url) = settings.database.replica() else { return Ok(Reads::primary(primary)) };
        let db = &settings.database;
        let replica =
            PgStore::connect_lazy(url, db.replica_connections, "callplane-reads").context("database.replica_url")?;
        let readers = Readers {
            calls: Arc::new(replica.clone()),
            transcripts: transcript_store(settings, &replica)?,
            search: search(&replica),
            function_data: clients.function_data_on(settings, &replica, routes),
        };
        let router = PgReplica::start(store.clone(), replica, db.replica_settings());
        let raise = router.clone();
        pg_bus.on_heard(move |org, lsn| raise.raise(org, lsn));
        info!(replica = %settings.replica_url_masked(), "dashboard reads go to the read replica when it is current");
        Ok(Reads::with_replica(primary, readers, Arc::new(router)))
    }

    pub fn router(&self) -> axum::Router {
        callplane_api::router(self.state.clone())
    }

    /// Keeps partitions `months_ahead` ahead, archives the months
    /// `partitions.archive_after_months` says are due (phase 3), and prunes realtime events
    /// past their retention: now, then every maintenance interval.
    pub fn spawn_maintenance(&self) {
        let store = self.store.clone();
        #[cfg(feature = "object-store")]
        let settings = self.settings.clone();
        let ahead = self.settings.partitions.months_ahead;
        let retention = chrono::Duration::hours(self.settings.realtime.retention_hours);
        let every = Duration::from_secs(self.settings.partitions.maintenance_interval_seconds.max(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match store.ensure_partitions(Utc::now(), ahead).await {
                    Ok(r) if !r.created.is_empty() => info!(created = ?r.created, "partition maintenance"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "partition maintenance failed; will retry"),
                }
                #[cfg(feature = "object-store")]
                match archive_due(&settings, store.clone()).await {
                    Ok(Some(r)) if !r.archived.is_empty() => {
                        let months: Vec<&str> = r.archived.iter().map(|m| m.month.as_str()).collect();
                        info!(?months, store = %r.store, "old months archived (partitions.archive_after_months)");
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %format!("{e:#}"), "archiving old months failed; will retry"),
                }
                if let Some(year_ago) = Utc::now().date_naive().checked_sub_days(chrono::Days::new(400))
                    && let Err(e) = store.prune_advisor_days(year_ago).await
                {
                    warn!(error = %e, "pruning the advisor's old figures failed; will retry");
                }
                match store.prune_realtime_events(Utc::now() - retention).await {
                    Ok(0) => {}
                    Ok(n) => info!(pruned = n, "realtime events past retention removed"),
                    Err(e) => warn!(error = %e, "realtime pruning failed; will retry"),
                }
            }
        });
    }

    /// Serves until `shutdown` resolves; then WebSocket sessions are closed (1001) and
    /// in-flight requests finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.shutdown.clone();
        let signal = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        // The peer address is what failed authentication is throttled by.
        let service = self.router().into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(listener, service).with_graceful_shutdown(signal).await.context("serving HTTP");
        // What was counted since the last write is kept for the advisor.
        if let Err(e) = self.sampler.flush().await {
            warn!(error = %e, "writing the advisor's last figures failed");
        }
        self.follower.goodbye().await;
        served
    }
}

/// The archive of old months, in `[object_store]`.
#[cfg(feature = "object-store")]
pub fn archiver(settings: &Settings, store: PgStore) -> anyhow::Result<callplane_storage::Archiver> {
    let objects = callplane_storage::Objects::open(&settings.object_store_config())?;
    Ok(callplane_storage::Archiver::new(store, objects))
}

/// Archives every month `partitions.archive_after_months` says is due, as
/// `callplane partitions archive` would; `None` when the setting is 0.
#[cfg(feature = "object-store")]
pub async fn archive_due(
    settings: &Settings,
    store: PgStore,
) -> anyhow::Result<Option<callplane_storage::ArchiveReport>> {
    let now = Utc::now();
    let Some(before) = settings.archive_before(now) else { return Ok(None) };
    let report = archiver(settings, store)?.archive(before, settings.stale_before(now), |_| {}).await?;
    Ok(Some(report))
}
