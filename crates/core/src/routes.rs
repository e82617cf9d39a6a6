//! Backend routes: which backend serves each seam right now, changeable while the process runs.
//!
//! A phase move (`callplane phase apply`) changes a seam's route in the database; every
//! running process follows it within a second (`Routes::set`). While a move is under way a
//! route names a second backend, `also`, that writes go to as well, so no process that is a
//! second behind loses a write to the backend the others read.
//!
//! The routed seams below hold every backend this process has and ask the routes on each
//! call. They keep each backend's own rules: the rules that matter across backends (alerts,
//! admission, repair) live in [`crate::metering::Metering`] above them.

use crate::OrgId;
use crate::seams::{
    Counted, EventPipeline, FunctionData, InboundEvent, PipelineError, Processed, SearchError, SearchHit,
    SearchRequest, StoreResult, TranscriptSearch, UsageCounter,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// A process whose last read of the routes is older than this does not count usage (the calls
/// stay uncounted in the ledger and are counted once it has read them again): a move may have
/// gone on without it. Phase moves wait for a process for twice as long before leaving it out.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// The routes were not read recently enough to count by them.
#[derive(Debug, thiserror::Error)]
#[error(
    "the backend routes were last read {0:?} ago (a phase move may have changed them); counting waits until they are read again"
)]
pub struct StaleRoutes(pub Duration);

/// A seam whose backend can move while callplane runs. Named as in `[backends]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seam {
    UsageCounter,
    FunctionData,
    Search,
    EventPipeline,
}

impl Seam {
    pub const ALL: [Seam; 4] = [Seam::UsageCounter, Seam::FunctionData, Seam::Search, Seam::EventPipeline];

    pub fn name(self) -> &'static str {
        match self {
            Seam::UsageCounter => "usage_counter",
            Seam::FunctionData => "function_data",
            Seam::Search => "search",
            Seam::EventPipeline => "event_pipeline",
        }
    }

    pub fn parse(name: &str) -> Option<Seam> {
        Seam::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Every backend name a route may give.
pub const BACKEND_NAMES: [&str; 5] = ["postgres", "redis", "off", "inline", "temporal"];

/// A backend name as the static string this build knows it by.
pub fn backend_name(name: &str) -> Option<&'static str> {
    BACKEND_NAMES.into_iter().find(|n| *n == name)
}

/// Where a seam's calls go: reads to `backend`, writes to `backend` and, while a move is under
/// way, to `also` as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub backend: &'static str,
    pub also: Option<&'static str>,
}

impl Route {
    pub const fn to(backend: &'static str) -> Self {
        Self { backend, also: None }
    }

    pub const fn with_also(backend: &'static str, also: &'static str) -> Self {
        Self { backend, also: Some(also) }
    }

    /// Whether writes go to `backend` (read from it, or written to on the way to it).
    pub fn writes_to(&self, backend: &str) -> bool {
        self.backend == backend || self.also == Some(backend)
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.also {
            None => f.write_str(self.backend),
            Some(also) => write!(f, "{} (writing {} too)", self.backend, also),
        }
    }
}

/// The routes this process follows, and the version of the database's routes they came from
/// (0: none read yet, configuration only).
pub struct Routes {
    routes: RwLock<BTreeMap<Seam, Route>>,
    version: AtomicI64,
    /// When the database's routes were last read.
    read_at: Mutex<Option<Instant>>,
}

impl Routes {
    /// Routes not read from the database yet (stale until [`Routes::mark_read`]).
    pub fn new(routes: BTreeMap<Seam, Route>) -> Arc<Self> {
        Arc::new(Self { routes: RwLock::new(routes), version: AtomicI64::new(0), read_at: Mutex::new(None) })
    }

    /// The database's routes were read just now.
    pub fn mark_read(&self) {
        *self.read_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Why the routes are too old to count by, if they are.
    pub fn stale(&self) -> Option<StaleRoutes> {
        let read_at = *self.read_at.lock().unwrap_or_else(PoisonError::into_inner);
        match read_at.map(|at| at.elapsed()) {
            Some(age) if age <= STALE_AFTER => None,
            age => Some(StaleRoutes(age.unwrap_or(Duration::MAX))),
        }
    }

    pub fn route(&self, seam: Seam) -> Route {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        routes.get(&seam).copied().unwrap_or(Route::to("postgres"))
    }

    pub fn all(&self) -> BTreeMap<Seam, Route> {
        self.routes.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Takes a seam's new route.
    pub fn set(&self, seam: Seam, route: Route) {
        self.routes.write().unwrap_or_else(PoisonError::into_inner).insert(seam, route);
    }

    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn set_version(&self, version: i64) {
        self.version.store(version, Ordering::Release);
    }
}

/// The usage counter, routed. While a move is under way each add goes to both counters: to the
/// Redis counter first, without marking the ledger row counted, then to the Postgres counter,
/// whose flip of that mark is what makes its add happen once. So a failure anywhere leaves the
/// row uncounted and the repair loop adds it again: Redis changes nothing the second time (its
/// adds are a union on call ids), Postgres adds it once.
pub struct RoutedCounter {
    routes: Arc<Routes>,
    postgres: Arc<dyn UsageCounter>,
    redis: Option<RedisCounters>,
}

/// The Redis counter, and the same counter leaving the ledger's mark to Postgres.
pub type RedisCounters = (Arc<dyn UsageCounter>, Arc<dyn UsageCounter>);

impl RoutedCounter {
    pub fn new(routes: Arc<Routes>, postgres: Arc<dyn UsageCounter>, redis: Option<RedisCounters>) -> Self {
        Self { routes, postgres, redis }
    }

    fn redis(&self) -> Option<&RedisCounters> {
        self.redis.as_ref()
    }

    /// The counter reads come from.
    fn reads(&self) -> &Arc<dyn UsageCounter> {
        match (self.routes.route(Seam::UsageCounter).backend, self.redis()) {
            ("redis", Some((redis, _))) => redis,
            _ => &self.postgres,
        }
    }

    /// Whether adds go to both counters now.
    fn both(&self) -> Option<&Arc<dyn UsageCounter>> {
        let route = self.routes.route(Seam::UsageCounter);
        let (_, unmarked) = self.redis()?;
        (route.writes_to("redis") && route.writes_to("postgres")).then_some(unmarked)
    }
}

#[async_trait]
impl UsageCounter for RoutedCounter {
    fn backend(&self) -> &'static str {
        self.reads().backend()
    }

    /// Refused while the routes are stale: the call stays uncounted in the ledger and the
    /// repair loop counts it by the routes read next.
    async fn add_call(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
        call_id: &str,
        seconds: i64,
    ) -> StoreResult<Counted> {
        if let Some(stale) = self.routes.stale() {
            return Err(crate::seams::StoreError::unavailable("routes", stale));
        }
        let Some(redis_unmarked) = self.both() else {
            return self.reads().add_call(org, period_start, call_id, seconds).await;
        };
        let reads_redis = self.reads().backend() == "redis";
        match redis_unmarked.add_call(org, period_start, call_id, seconds).await {
            Ok(in_redis) => {
                let in_postgres = self.postgres.add_call(org, period_start, call_id, seconds).await?;
                Ok(if reads_redis { in_redis } else { in_postgres })
            }
            // Reads are on Postgres: it goes on counting while Redis is away. The move's
            // final check, call by call, rebuilds what Redis missed.
            Err(e) if e.is_transient() && !reads_redis => {
                self.postgres.add_call(org, period_start, call_id, seconds).await
            }
            Err(e) => Err(e),
        }
    }

    async fn used(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        self.reads().used(org, period_start).await
    }

    async fn rebuild(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        if let Some(redis_unmarked) = self.both() {
            let redis = redis_unmarked.rebuild(org, period_start).await?;
            let postgres = self.postgres.rebuild(org, period_start).await?;
            return Ok(if self.reads().backend() == "redis" { redis } else { postgres });
        }
        self.reads().rebuild(org, period_start).await
    }
}

/// Function data, routed. The Redis backend is a cache over Postgres whose writes go to
/// Postgres and then drop the cached map: while a move is under way writes go through it, so
/// a cache being warmed never keeps a map a write has changed.
pub struct RoutedFunctionData {
    routes: Arc<Routes>,
    postgres: Arc<dyn FunctionData>,
    redis: Option<Arc<dyn FunctionData>>,
}

impl RoutedFunctionData {
    pub fn new(routes: Arc<Routes>, postgres: Arc<dyn FunctionData>, redis: Option<Arc<dyn FunctionData>>) -> Self {
        Self { routes, postgres, redis }
    }

    fn reads(&self) -> &Arc<dyn FunctionData> {
        match (self.routes.route(Seam::FunctionData).backend, &self.redis) {
            ("redis", Some(redis)) => redis,
            _ => &self.postgres,
        }
    }

    fn writes(&self) -> &Arc<dyn FunctionData> {
        match (self.routes.route(Seam::FunctionData).writes_to("redis"), &self.redis) {
            (true, Some(redis)) => redis,
            _ => &self.postgres,
        }
    }
}

#[async_trait]
impl FunctionData for RoutedFunctionData {
    fn backend(&self) -> &'static str {
        self.reads().backend()
    }

    async fn preload(&self, org: OrgId) -> StoreResult<Map<String, Value>> {
        self.reads().preload(org).await
    }

    async fn get(&self, org: OrgId, key: &str) -> StoreResult<Option<Value>> {
        self.reads().get(org, key).await
    }

    async fn put(&self, org: OrgId, key: &str, value: &Value) -> StoreResult<()> {
        self.writes().put(org, key, value).await
    }

    async fn delete(&self, org: OrgId, key: &str) -> StoreResult<bool> {
        self.writes().delete(org, key).await
    }
}

/// Transcript search, routed: off, or one of the search backends this process has.
pub struct RoutedSearch {
    routes: Arc<Routes>,
    backends: Vec<Arc<dyn TranscriptSearch>>,
    off: Arc<dyn TranscriptSearch>,
}

impl RoutedSearch {
    pub fn new(routes: Arc<Routes>, backends: Vec<Arc<dyn TranscriptSearch>>) -> Self {
        Self { routes, backends, off: Arc::new(crate::seams::SearchOff) }
    }

    fn current(&self) -> &Arc<dyn TranscriptSearch> {
        let backend = self.routes.route(Seam::Search).backend;
        self.backends.iter().find(|b| b.backend() == backend).unwrap_or(&self.off)
    }
}

#[async_trait]
impl TranscriptSearch for RoutedSearch {
    fn backend(&self) -> &'static str {
        self.current().backend()
    }

    async fn search(&self, request: &SearchRequest) -> Result<Vec<SearchHit>, SearchError> {
        self.current().search(request).await
    }
}

/// The event pipeline, routed: each event goes to the pipeline the route names when it is
/// submitted. An event already being processed inline finishes there; the events still waiting
/// in the inbox are submitted again, to the new pipeline, on their next attempt. Counts the
/// events each pipeline has in hand, so a move can wait until none is left inline.
pub struct RoutedPipeline {
    routes: Arc<Routes>,
    pipelines: Vec<(Arc<dyn EventPipeline>, AtomicI64)>,
}

impl RoutedPipeline {
    pub fn new(routes: Arc<Routes>, pipelines: Vec<Arc<dyn EventPipeline>>) -> Self {
        Self { routes, pipelines: pipelines.into_iter().map(|p| (p, AtomicI64::new(0))).collect() }
    }

    fn current(&self) -> &(Arc<dyn EventPipeline>, AtomicI64) {
        let backend = self.routes.route(Seam::EventPipeline).backend;
        self.pipelines.iter().find(|(p, _)| p.backend() == backend).unwrap_or(&self.pipelines[0])
    }

    /// Events each pipeline has in hand now, by backend.
    pub fn in_hand(&self) -> BTreeMap<&'static str, i64> {
        self.pipelines.iter().map(|(p, n)| (p.backend(), n.load(Ordering::Acquire))).collect()
    }
}

/// Counts an event in hand until dropped (the submit's future may be dropped part way).
struct InHand<'a>(&'a AtomicI64);

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait]
impl EventPipeline for RoutedPipeline {
    fn backend(&self) -> &'static str {
        self.current().0.backend()
    }

    async fn submit(&self, event: InboundEvent) -> Result<Processed, PipelineError> {
        let (pipeline, count) = self.current();
        count.fetch_add(1, Ordering::AcqRel);
        let _in_hand = InHand(count);
        pipeline.submit(event).await
    }

    async fn keep_unprocessed(
        &self,
        org: Option<OrgId>,
        body: &Value,
        raw: Option<&[u8]>,
        code: &str,
        error: &str,
        received_at: DateTime<Utc>,
    ) -> StoreResult<i64> {
        self.current().0.keep_unprocessed(org, body, raw, code, error, received_at).await
    }

    fn render_metrics(&self, out: &mut String) {
        self.current().0.render_metrics(out);
    }
}
