//! The composition root: configuration in, a running callplane out.

use crate::settings::Settings;
use anyhow::{Context, bail};
use async_trait::async_trait;
use callplane_api::{AppState, Metrics, Readiness};
use callplane_core::seams::{FunctionData, RealtimeBus, TranscriptStore, UsageCounter};
use callplane_storage::{PgFunctionData, PgRealtimeBus, PgStore, PgTranscriptStore, PgUsageCounter};
use callplane_workflow::{InlinePipeline, PipelineSettings};
use chrono::Utc;
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// A built application: its store, its pipeline and the HTTP state.
#[derive(Clone)]
pub struct App {
    pub settings: Settings,
    pub store: PgStore,
    pub pipeline: Arc<InlinePipeline>,
    pub state: AppState,
}

struct PgReadiness(PgStore);

#[async_trait]
impl Readiness for PgReadiness {
    async fn check(&self) -> Result<(), String> {
        match self.0.migrations_current().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("migrations are not all applied; run `callplane migrate`".into()),
            Err(e) => Err(format!("database unreachable: {e}")),
        }
    }

    async fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        let pool = self.0.pool();
        let mut g = vec![
            ("callplane_db_pool_connections", "Open database connections.", pool.size() as f64),
            ("callplane_db_pool_idle", "Idle database connections.", pool.num_idle() as f64),
        ];
        if let Ok(n) = self.0.open_dead_letter_count().await {
            g.push(("callplane_dead_letters_open", "Dead-lettered events not yet replayed.", n as f64));
        }
        g
    }
}

// The factories: the one place configuration becomes backends. Names were validated in
// `Settings::validate`; a later phase adds its arm under its feature.
fn usage_counter(name: &str, store: &PgStore) -> anyhow::Result<Arc<dyn UsageCounter>> {
    match name {
        "postgres" => Ok(Arc::new(PgUsageCounter(store.clone()))),
        other => bail!("backends.usage_counter: {other:?} is not compiled into this build"),
    }
}

fn transcripts(name: &str, store: &PgStore) -> anyhow::Result<Arc<dyn TranscriptStore>> {
    match name {
        "postgres" => Ok(Arc::new(PgTranscriptStore(store.clone()))),
        other => bail!("backends.transcripts: {other:?} is not compiled into this build"),
    }
}

fn function_data(name: &str, store: &PgStore) -> anyhow::Result<Arc<dyn FunctionData>> {
    match name {
        "postgres" => Ok(Arc::new(PgFunctionData(store.clone()))),
        other => bail!("backends.function_data: {other:?} is not compiled into this build"),
    }
}

fn realtime(name: &str, store: &PgStore) -> anyhow::Result<Arc<dyn RealtimeBus>> {
    match name {
        "postgres" => Ok(Arc::new(PgRealtimeBus::start(store.clone()))),
        other => bail!("backends.realtime: {other:?} is not compiled into this build"),
    }
}

impl App {
    pub async fn connect(settings: &Settings) -> anyhow::Result<PgStore> {
        PgStore::connect(settings.database.url.expose_secret(), settings.database.max_connections)
            .await
            .context("connecting to the database (database.url)")
    }

    /// Builds every backend from configuration. Needs a migrated database.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let store = Self::connect(&settings).await?;
        Self::with_store(settings, store)
    }

    pub fn with_store(settings: Settings, store: PgStore) -> anyhow::Result<Self> {
        let b = &settings.backends;
        if b.event_pipeline != "inline" {
            bail!("backends.event_pipeline: {:?} is not compiled into this build", b.event_pipeline);
        }
        let pipeline = Arc::new(InlinePipeline::new(
            store.clone(),
            usage_counter(&b.usage_counter, &store)?,
            transcripts(&b.transcripts, &store)?,
            realtime(&b.realtime, &store)?,
            PipelineSettings {
                rules: settings.billing_rules(),
                max_future_skew: chrono::Duration::hours(settings.partitions.max_future_skew_hours),
            },
        ));
        let fallback = settings.vapi.fallback_assistant_id.trim();
        let state = AppState {
            webhook_auth: Arc::new(settings.webhook_auth()),
            orgs: Arc::new(store.clone()),
            pipeline: pipeline.clone(),
            function_data: function_data(&b.function_data, &store)?,
            plans: Arc::new(settings.plans()),
            agent: settings.agent(),
            fallback_assistant_id: (!fallback.is_empty()).then(|| fallback.to_owned()),
            max_body_bytes: settings.server.max_body_bytes,
            metrics: Arc::new(Metrics::default()),
            readiness: Arc::new(PgReadiness(store.clone())),
        };
        Ok(Self { settings, store, pipeline, state })
    }

    pub fn router(&self) -> axum::Router {
        callplane_api::router(self.state.clone())
    }

    /// Keeps partitions `months_ahead` ahead: now, then every maintenance interval.
    pub fn spawn_partition_maintenance(&self) {
        let store = self.store.clone();
        let ahead = self.settings.partitions.months_ahead;
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
            }
        });
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await.context("serving HTTP")
    }
}
