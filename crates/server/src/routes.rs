//! Following the backend routes the database holds: each process reads them at start and then
//! every [`FOLLOW_EVERY`], takes each route it can serve, and heartbeats which version it has
//! applied (and what it could not take) to the `servers` table, which `callplane phase apply`
//! waits on.

use crate::settings::Settings;
use callplane_core::routes::{Route, Routes, Seam};
use callplane_storage::{PgStore, ServerBeat};
use chrono::Utc;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often a process reads the routes and heartbeats.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// A process not heard from for this long is taken to be gone.
pub const GONE_AFTER: Duration = Duration::from_secs(10);

/// The routes `[backends]` gives, before any move.
pub fn configured(settings: &Settings) -> BTreeMap<Seam, Route> {
    let b = &settings.backends;
    BTreeMap::from([
        (Seam::UsageCounter, Route::to(b.usage_counter.into())),
        (Seam::FunctionData, Route::to(b.function_data.into())),
        (Seam::Search, Route::to(b.search.into())),
        (Seam::EventPipeline, Route::to(b.event_pipeline.into())),
    ])
}

/// What a process can serve beyond Postgres: `{"redis": {"url", "answering"}}`, ...
#[derive(Clone, Debug, Default)]
pub struct Abilities {
    /// Redis's URL (password masked), when this build has Redis.
    pub redis: Option<String>,
    /// Temporal's address, namespace and task queue, when this build has Temporal.
    pub temporal: Option<String>,
}

impl Abilities {
    /// Why this process cannot serve `route` on `seam`, if it cannot.
    pub fn refuses(&self, seam: Seam, route: Route) -> Option<String> {
        let backends: &[&str] = match seam {
            Seam::UsageCounter | Seam::FunctionData => &["postgres", "redis"],
            Seam::Search => &["off", "postgres"],
            Seam::EventPipeline => &["inline", "temporal"],
        };
        for backend in std::iter::once(route.backend).chain(route.also) {
            if !backends.contains(&backend) {
                return Some(format!("{} has no backend {backend:?}", seam.name()));
            }
            let missing = match backend {
                "redis" => self.redis.is_none().then_some("redis"),
                "temporal" => self.temporal.is_none().then_some("temporal"),
                _ => None,
            };
            if let Some(feature) = missing {
                return Some(format!(
                    "{} = \"{backend}\" needs a build with the `{feature}` feature (`--features phase2`)",
                    seam.name()
                ));
            }
        }
        None
    }
}

/// The routes this process starts with: the database's where it has one for a seam (a move has
/// run), `[backends]` otherwise. When the database cannot be read now, `[backends]` serves until
/// the follower reads it.
pub async fn load(settings: &Settings, store: &PgStore, abilities: &Abilities) -> anyhow::Result<Arc<Routes>> {
    let routes = Routes::new(configured(settings));
    match store.stored_routes().await {
        Ok(stored) => {
            take(&routes, &stored, abilities, settings);
        }
        Err(e) => warn!(error = %callplane_core::error_chain(&e),
                        "could not read the backend routes; serving [backends] until the database answers"),
    }
    Ok(routes)
}

/// Takes every stored route this process can serve; returns seam -> why for those it cannot.
fn take(
    routes: &Routes,
    stored: &callplane_storage::StoredRoutes,
    abilities: &Abilities,
    settings: &Settings,
) -> Map<String, Value> {
    let mut problems = Map::new();
    for (seam, route) in &stored.routes {
        if routes.route(*seam) == *route {
            continue;
        }
        match abilities.refuses(*seam, *route) {
            Some(why) => {
                problems.insert(seam.name().to_owned(), Value::String(why));
            }
            None => {
                let configured = configured(settings).get(seam).copied();
                info!(seam = seam.name(), route = %route, configured = ?configured.map(|r| r.backend),
                      "following the database's backend route");
                routes.set(*seam, *route);
            }
        }
    }
    if routes.version() != stored.version {
        for (seam, why) in &problems {
            warn!(seam = %seam, problem = %why, "cannot take the database's backend route; keeping the current one");
        }
    }
    routes.set_version(stored.version);
    routes.mark_read();
    problems
}

/// Follows the routes while the process runs and heartbeats to `servers`.
pub struct Follower {
    pub id: uuid::Uuid,
    store: PgStore,
    routes: Arc<Routes>,
    abilities: Abilities,
    settings: Settings,
    kind: &'static str,
    #[cfg(feature = "redis")]
    redis: Option<callplane_cache::Redis>,
    /// The events the pipeline has in hand, per backend, and whether this process runs a
    /// Temporal worker ("running", "when routed" or "off"); set once the pipeline is built.
    pipeline: std::sync::OnceLock<PipelineState>,
}

type PipelineState = (Arc<callplane_core::routes::RoutedPipeline>, Box<dyn Fn() -> &'static str + Send + Sync>);

/// The Redis key a phase move writes a fresh value to, which every process reads back in its
/// heartbeat: processes that read another value use another Redis.
pub const REDIS_IDENTITY_KEY: &str = "callplane:identity";

impl Follower {
    pub fn new(
        kind: &'static str,
        settings: &Settings,
        store: PgStore,
        routes: Arc<Routes>,
        clients: &crate::app::Clients,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4(),
            store,
            routes,
            abilities: clients.abilities(settings),
            settings: settings.clone(),
            kind,
            #[cfg(feature = "redis")]
            redis: clients.redis.clone(),
            pipeline: std::sync::OnceLock::new(),
        }
    }

    /// Reports what the pipeline has in hand, and the worker's state, in each heartbeat.
    pub fn report_pipeline(
        &self,
        pipeline: Arc<callplane_core::routes::RoutedPipeline>,
        worker: impl Fn() -> &'static str + Send + Sync + 'static,
    ) {
        let _ = self.pipeline.set((pipeline, Box::new(worker)));
    }

    /// The worker a `serve` will run, from its settings, while its pipeline is still being
    /// built: its first heartbeat can come before, and a phase move reading that beat must not
    /// conclude that no process would run a worker.
    fn planned_worker(&self) -> &'static str {
        if self.kind == "serve" { self.settings.idle_worker_state() } else { "off" }
    }

    async fn capabilities(&self) -> Value {
        let mut caps = Map::new();
        #[cfg(feature = "redis")]
        if let (Some(url), Some(redis)) = (&self.abilities.redis, &self.redis) {
            let identity = redis.get_string(REDIS_IDENTITY_KEY).await;
            let answering = identity.is_ok();
            let identity = identity.ok().flatten();
            caps.insert(
                "redis".into(),
                serde_json::json!({ "url": url, "answering": answering, "identity": identity }),
            );
        }
        if let Some(target) = &self.abilities.temporal {
            let worker = match self.pipeline.get() {
                Some((_, w)) => w(),
                None => self.planned_worker(),
            };
            caps.insert("temporal".into(), serde_json::json!({ "target": target, "worker": worker }));
        }
        if let Some((pipeline, _)) = self.pipeline.get() {
            caps.insert("in_hand".into(), serde_json::json!(pipeline.in_hand()));
        }
        // The backend each seam reads from now.
        let routes: Map<String, Value> =
            self.routes.all().into_iter().map(|(seam, r)| (seam.name().to_owned(), Value::from(r.backend))).collect();
        caps.insert("routes".into(), Value::Object(routes));
        Value::Object(caps)
    }

    /// Reads and heartbeats every [`FOLLOW_EVERY`] until the process ends; the heartbeat row is
    /// removed by [`Follower::goodbye`].
    pub fn spawn(self: Arc<Self>) {
        let started_at = Utc::now();
        tokio::spawn(async move {
            let host = hostname();
            let mut tick = tokio::time::interval(FOLLOW_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let problems = match self.store.stored_routes().await {
                    Ok(stored) => take(&self.routes, &stored, &self.abilities, &self.settings),
                    // Routes this build cannot read: say so, and count nothing by stale ones.
                    Err(e @ callplane_core::seams::StoreError::Internal(_)) => {
                        let mut problems = Map::new();
                        problems.insert("routes".into(), Value::String(e.to_string()));
                        problems
                    }
                    Err(_) => continue,
                };
                let beat = ServerBeat {
                    id: self.id,
                    kind: self.kind.to_owned(),
                    host: host.clone(),
                    pid: std::process::id() as i32,
                    started_at,
                    seen_at: Utc::now(),
                    route_version: self.routes.version(),
                    capabilities: self.capabilities().await,
                    problems: Value::Object(problems),
                };
                if let Err(e) = self.store.heartbeat(&beat).await {
                    warn!(error = %callplane_core::error_chain(&e), "could not record this process's heartbeat");
                }
            }
        });
    }

    pub async fn goodbye(&self) {
        if let Err(e) = self.store.forget_server(self.id).await {
            warn!(error = %callplane_core::error_chain(&e), "could not remove this process's heartbeat");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
