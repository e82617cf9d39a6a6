//! Phase moves with traffic running: `callplane phase plan` and `callplane phase apply`.
//!
//! A step moves one seam by changing its route in the database (`backend_routes`), in stages.
//! Every running process takes a new route within a second and heartbeats the version it
//! has applied; each stage waits until every live process has it before the next begins. So
//! at any moment the processes are at most one stage apart, and each pair of neighbouring
//! stages is safe to run side by side:
//!
//! - `counters`: writes go to both counters (reads stay on Postgres) -> Redis is seeded from
//!   the ledger -> reads come from Redis (writes still to both) -> Redis alone -> every
//!   organization's Redis counter is checked against the ledger, call by call.
//! - `function-data`: writes go through the Redis cache (which drops what they change) ->
//!   every organization's map is warmed into it -> reads come from it -> checked.
//! - `search`: the GIN index is built (concurrently, with progress) -> search is on.
//!
//! `--rollback` walks back the same way. Every step starts from where the route is, so
//! running it twice, or again after an interruption, finishes the move or confirms it.

use crate::app::Clients;
use crate::routes::{Abilities, GONE_AFTER, configured};
use crate::settings::Settings;
use anyhow::{Context, bail};
use callplane_core::Organization;
use callplane_core::routes::{Route, Seam};
use callplane_core::seams::UsageCounter;
use callplane_storage::{PgStore, PgUsageCounter, ServerBeat};
use serde::Serialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// How long a stage waits for every live process to take its route.
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A step of a phase move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Counters,
    FunctionData,
    Search,
    Pipeline,
}

impl Step {
    pub const PHASE2: [Step; 4] = [Step::Counters, Step::FunctionData, Step::Search, Step::Pipeline];

    pub fn name(self) -> &'static str {
        match self {
            Step::Counters => "counters",
            Step::FunctionData => "function-data",
            Step::Search => "search",
            Step::Pipeline => "pipeline",
        }
    }

    pub fn seam(self) -> Seam {
        match self {
            Step::Counters => Seam::UsageCounter,
            Step::FunctionData => Seam::FunctionData,
            Step::Search => Seam::Search,
            Step::Pipeline => Seam::EventPipeline,
        }
    }

    /// The backend the step moves the seam to, and back.
    fn ends(self) -> (&'static str, &'static str) {
        match self {
            Step::Counters | Step::FunctionData => ("postgres", "redis"),
            Step::Search => ("off", "postgres"),
            Step::Pipeline => ("inline", "temporal"),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Step::Counters => "usage counters in Redis, seeded from the ledger",
            Step::FunctionData => "function data cached in Redis, warmed before reads switch",
            Step::Search => "transcript search on Postgres's GIN index (GET /v1/search)",
            Step::Pipeline => "webhook events processed by Temporal workflows",
        }
    }
}

/// One stage done.
#[derive(Clone, Debug, Serialize)]
pub struct StageDone {
    pub stage: String,
    pub took_ms: u64,
    /// Live processes that took the stage's route (for a route change).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<usize>,
}

/// What `phase apply` did.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: Step,
    pub rollback: bool,
    pub seam: &'static str,
    pub from: String,
    pub to: String,
    /// True when the seam was there already: nothing moved, the check ran again.
    pub already: bool,
    pub stages: Vec<StageDone>,
    /// What the final check found.
    pub verified: Value,
    pub took_ms: u64,
}

/// Runs steps against the database and the services, reporting progress on the way.
pub struct Mover {
    settings: Settings,
    store: PgStore,
    clients: Clients,
    /// Redraws a progress line.
    progress: Box<dyn Fn(&str) + Send + Sync>,
    /// Prints a line that stays (a stage done).
    say: Box<dyn Fn(&str) + Send + Sync>,
}

fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Mover {
    pub async fn new(
        settings: &Settings,
        store: PgStore,
        progress: Box<dyn Fn(&str) + Send + Sync>,
        say: Box<dyn Fn(&str) + Send + Sync>,
    ) -> anyhow::Result<Self> {
        if !store.migrations_current().await? {
            bail!("the database is not migrated; run `callplane migrate` first");
        }
        let clients = Clients::connect(settings, &store).await?;
        Ok(Self { settings: settings.clone(), store, clients, progress, say })
    }

    /// A seam's route now: the database's once a move has set it; before that, what the live
    /// `serve` processes say they serve (their `[backends]`) when they agree, else this
    /// command's `[backends]`.
    async fn current(&self, seam: Seam) -> anyhow::Result<Route> {
        let stored = self.store.stored_routes().await?;
        if let Some(route) = stored.routes.get(&seam) {
            return Ok(*route);
        }
        let live = self.store.live_servers(GONE_AFTER).await?;
        let served: std::collections::BTreeSet<&str> = live
            .iter()
            .filter(|s| s.kind == "serve")
            .filter_map(|s| s.capabilities["routes"][seam.name()].as_str())
            .collect();
        match served.into_iter().collect::<Vec<_>>()[..] {
            [one] => Ok(callplane_core::routes::backend_name(one).map_or(configured(&self.settings)[&seam], Route::to)),
            _ => Ok(configured(&self.settings)[&seam]),
        }
    }

    fn abilities(&self) -> Abilities {
        self.clients.abilities(&self.settings)
    }

    /// Why the step cannot run now, if it cannot: a feature not compiled in, a service down, a
    /// live process that cannot serve the target.
    pub async fn refusal(&self, step: Step, rollback: bool) -> anyhow::Result<Option<String>> {
        let (from, to) = step.ends();
        let abilities = self.abilities();
        if let Some(why) = abilities.refuses(step.seam(), Route::to(if rollback { from } else { to })) {
            return Ok(Some(format!("this callplane cannot: {why}")));
        }
        // Back to phase 1's backend needs nothing: it is how a move away from a service in
        // trouble is undone.
        if rollback {
            return Ok(None);
        }
        let service = to;
        let refused = match service {
            "redis" => self.redis_refusal().await,
            "temporal" => self.temporal_refusal().await,
            _ => None,
        };
        if refused.is_some() {
            return Ok(refused);
        }
        let live = self.store.live_servers(GONE_AFTER).await?;
        for server in &live {
            if let Some(why) = server_refusal(server, service, &abilities) {
                return Ok(Some(why));
            }
        }
        if service == "redis"
            && let Some(why) = self.same_redis_everywhere().await?
        {
            return Ok(Some(why));
        }
        // Events routed to Temporal need a worker: a `serve` that starts one when routed there,
        // or a `callplane worker`.
        if service == "temporal"
            && !rollback
            && !live.is_empty()
            && !live.iter().any(|s| s.capabilities["temporal"]["worker"].as_str().is_some_and(|w| w != "off"))
        {
            return Ok(Some(
                "no running process would run a Temporal worker (each `serve` has temporal.worker = \"off\"): \
                 start `callplane worker` first"
                    .into(),
            ));
        }
        Ok(None)
    }

    /// Whether every live process reaches this command's Redis, and not another one at the
    /// same address (each host's own `127.0.0.1:6379`): a fresh value is written to it and
    /// each process must read it back in its heartbeat.
    async fn same_redis_everywhere(&self) -> anyhow::Result<Option<String>> {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.clients.redis {
            let token = uuid::Uuid::new_v4().simple().to_string();
            redis.set_string(crate::routes::REDIS_IDENTITY_KEY, &token, Duration::from_secs(600)).await?;
            let started = Instant::now();
            loop {
                let live = self.store.live_servers(GONE_AFTER).await?;
                let others: Vec<String> = live
                    .iter()
                    .filter(|s| s.capabilities["redis"]["identity"].as_str() != Some(token.as_str()))
                    .map(|s| format!("{} {} pid {}", s.kind, s.host, s.pid))
                    .collect();
                if others.is_empty() {
                    return Ok(None);
                }
                if started.elapsed() > Duration::from_secs(5) {
                    return Ok(Some(format!(
                        "{} did not read back a value this command wrote to Redis at {}: they use another Redis \
                         (every process must share one)",
                        others.join(", "),
                        self.settings.redis_url_masked()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(None)
    }

    async fn temporal_refusal(&self) -> Option<String> {
        #[cfg(feature = "temporal")]
        {
            let settings = self.settings.temporal_settings();
            return match tokio::time::timeout(Duration::from_secs(5), callplane_temporal::connect(&settings)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!(
                    "Temporal at {} does not answer ({}): start it, or set temporal.address",
                    settings.address,
                    callplane_core::error_chain(&e)
                )),
                Err(_) => Some(format!("Temporal at {} did not answer within 5 s", settings.address)),
            };
        }
        #[allow(unreachable_code)]
        Some("this callplane was built without Temporal: build it with `--features phase2`".into())
    }

    async fn redis_refusal(&self) -> Option<String> {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.clients.redis {
            return redis.ping().await.err().map(|e| {
                format!(
                    "Redis at {} does not answer ({}): start it, or set redis.url (CALLPLANE__REDIS__URL)",
                    self.settings.redis_url_masked(),
                    callplane_core::error_chain(&e)
                )
            });
        }
        Some("this callplane was built without Redis: build it with `--features phase2`".into())
    }

    /// Runs a step (or its rollback) to the end, or stops with why.
    pub async fn apply(&self, step: Step, rollback: bool) -> anyhow::Result<StepReport> {
        // One move at a time: held on a connection of its own until this returns (or the
        // process dies, which closes the connection).
        match self.store.exclusively("callplane_phase_apply", self.apply_locked(step, rollback)).await? {
            Some(applied) => applied,
            None => bail!("another `callplane phase apply` is running against this database; wait for it to finish"),
        }
    }

    async fn apply_locked(&self, step: Step, rollback: bool) -> anyhow::Result<StepReport> {
        if let Some(why) = self.refusal(step, rollback).await? {
            bail!("cannot {} `{}`: {why}", if rollback { "roll back" } else { "apply" }, step.name());
        }
        let started = Instant::now();
        let seam = step.seam();
        let from = self.current(seam).await?;
        let (start, end) = step.ends();
        let target = if rollback { start } else { end };
        let mut stages = Vec::new();
        let already = from == Route::to(target);
        if !already {
            match (step, rollback) {
                (Step::Counters, false) => self.counters_forward(from, &mut stages).await?,
                (Step::Counters, true) => self.counters_back(from, &mut stages).await?,
                (Step::FunctionData, false) => self.function_data_forward(from, &mut stages).await?,
                (Step::Search, false) => {
                    let at = Instant::now();
                    let index = self.build_search_index().await?;
                    stages.push(StageDone {
                        stage: format!(
                            "search index built on {} of {} partitions",
                            index.built.len(),
                            index.partitions
                        ),
                        took_ms: ms(at),
                        processes: None,
                    });
                    self.route(seam, Route::to(target), "search on", &mut stages).await?;
                }
                // Postgres is the truth of function data: writes drop the cache until every
                // process reads Postgres, then the cache is left alone.
                (Step::FunctionData, true) => {
                    if from.backend == "redis" {
                        let dual = Route::with_also("postgres", "redis");
                        self.route(seam, dual, "writes dropping the cache", &mut stages).await?;
                    }
                    self.route(seam, Route::to(target), "Postgres alone", &mut stages).await?;
                }
                // Search has no state: the route alone moves back.
                (Step::Search, true) => self.route(seam, Route::to(target), "back", &mut stages).await?,
                (Step::Pipeline, false) => {
                    self.route(seam, Route::to(target), "events to Temporal", &mut stages).await?;
                    self.pipeline_drained(&mut stages).await?;
                }
                // A worker keeps running where one was started, so the workflows in flight finish.
                (Step::Pipeline, true) => self.route(seam, Route::to(target), "events inline", &mut stages).await?,
            }
        }
        let at = Instant::now();
        let verified = self.verify(step, target).await?;
        stages.push(StageDone { stage: "verified".into(), took_ms: ms(at), processes: None });
        Ok(StepReport {
            step,
            rollback,
            seam: seam.name(),
            from: from.to_string(),
            to: target.to_owned(),
            already,
            stages,
            verified,
            took_ms: ms(started),
        })
    }

    /// Sets a route and waits until every live process has taken it. A process that cannot
    /// take it puts the previous route back and stops the step.
    async fn route(&self, seam: Seam, route: Route, stage: &str, stages: &mut Vec<StageDone>) -> anyhow::Result<()> {
        let at = Instant::now();
        let before = self.current(seam).await?;
        let by = format!("phase apply: {} {stage}", seam.name());
        let version = self.store.set_route(seam, route, &by).await?;
        let processes = match self.wait_for(seam, version).await {
            Ok(n) => n,
            Err(e) => {
                if let Ok(v) = self.store.set_route(seam, before, &format!("{by}: put back")).await {
                    let _ = self.wait_for(seam, v).await;
                }
                return Err(e);
            }
        };
        (self.progress)("");
        (self.say)(&format!("{}: {route} ({processes} processes took it, {} ms)", seam.name(), ms(at)));
        stages.push(StageDone { stage: format!("{stage}: {route}"), took_ms: ms(at), processes: Some(processes) });
        Ok(())
    }

    /// Waits until every live process has applied `version`; returns how many there are.
    async fn wait_for(&self, seam: Seam, version: i64) -> anyhow::Result<usize> {
        let started = Instant::now();
        loop {
            let live = self.store.live_servers(GONE_AFTER).await?;
            if let Some((s, why)) = live.iter().find_map(|s| Some((s, s.problems.get(seam.name())?.as_str()?))) {
                bail!("{} {} pid {} cannot take the route: {why}", s.kind, s.host, s.pid);
            }
            let behind: Vec<&ServerBeat> = live.iter().filter(|s| s.route_version < version).collect();
            if behind.is_empty() {
                return Ok(live.len());
            }
            if started.elapsed() > STAGE_TIMEOUT {
                let names: Vec<String> =
                    behind.iter().map(|s| format!("{} {} pid {}", s.kind, s.host, s.pid)).collect();
                bail!(
                    "{} of {} processes did not take the route within {:?}: {}. Stop them (a process not heard \
                     from for {:?} is left out) or wait, then run the step again: it goes on from where it is",
                    behind.len(),
                    live.len(),
                    STAGE_TIMEOUT,
                    names.join(", "),
                    GONE_AFTER
                );
            }
            (self.progress)(&format!("waiting for {} of {} processes to take the route", behind.len(), live.len()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn organizations(&self) -> anyhow::Result<Vec<Organization>> {
        Ok(self.store.organizations(i64::MAX).await?)
    }

    /// Runs `each` on every organization with progress; returns what it summed.
    async fn each_org<F, Fut>(&self, what: &str, each: F) -> anyhow::Result<(usize, i64)>
    where
        F: Fn(Organization) -> Fut,
        Fut: Future<Output = anyhow::Result<i64>>,
    {
        let orgs = self.organizations().await?;
        let mut sum = 0i64;
        for (i, org) in orgs.iter().enumerate() {
            sum = sum.saturating_add(each(org.clone()).await?);
            if i % 50 == 0 || i + 1 == orgs.len() {
                (self.progress)(&format!("{what}: {}/{} organizations", i + 1, orgs.len()));
            }
        }
        (self.progress)("");
        Ok((orgs.len(), sum))
    }

    async fn counters_forward(&self, from: Route, stages: &mut Vec<StageDone>) -> anyhow::Result<()> {
        let seam = Seam::UsageCounter;
        if from.backend == "postgres" {
            self.route(seam, Route::with_also("postgres", "redis"), "writing both", stages).await?;
            // Every process now adds each call to Redis too. Seeding from the ledger brings in
            // every call before that; a call both brings in counts once (a union on call ids).
            let at = Instant::now();
            let (orgs, seconds) = self.seed_redis_counters().await?;
            (self.say)(&format!("usage_counter: Redis seeded from the ledger: {orgs} organizations, {seconds} s"));
            stages.push(StageDone {
                stage: format!("seeded {orgs} organizations ({seconds} s) from the ledger"),
                took_ms: ms(at),
                processes: None,
            });
            self.route(seam, Route::with_also("redis", "postgres"), "reading Redis", stages).await?;
        }
        self.route(seam, Route::to("redis"), "Redis alone", stages).await
    }

    async fn counters_back(&self, from: Route, stages: &mut Vec<StageDone>) -> anyhow::Result<()> {
        let seam = Seam::UsageCounter;
        if from.backend == "redis" {
            // With Redis answering, both are written while Postgres is recounted, so no process
            // reads a Postgres total that is behind. With Redis away, straight to Postgres, then
            // the recount (exact once every process adds there).
            let redis_down = self.redis_refusal().await;
            if let Some(why) = &redis_down {
                (self.say)(&format!("usage_counter: {why}; moving straight to Postgres, then recounting"));
                self.route(seam, Route::to("postgres"), "Postgres alone (Redis away)", stages).await?;
            } else {
                self.route(seam, Route::with_also("redis", "postgres"), "writing both", stages).await?;
            }
            // Postgres was not written while Redis counted alone: each organization's total is
            // recounted from the ledger's counted rows, under its row's lock (as adds take it).
            let at = Instant::now();
            let pg = PgUsageCounter(self.store.clone());
            let (orgs, seconds) = self
                .each_org("recounting Postgres", |o| {
                    let pg = pg.clone();
                    async move { Ok(pg.rebuild(o.id, o.period_start).await?) }
                })
                .await?;
            (self.say)(&format!(
                "usage_counter: Postgres recounted from the ledger: {orgs} organizations, {seconds} s"
            ));
            stages.push(StageDone {
                stage: format!("recounted {orgs} organizations ({seconds} s) in Postgres"),
                took_ms: ms(at),
                processes: None,
            });
            if redis_down.is_some() {
                return Ok(());
            }
        }
        self.route(seam, Route::to("postgres"), "Postgres alone", stages).await
    }

    async fn function_data_forward(&self, from: Route, stages: &mut Vec<StageDone>) -> anyhow::Result<()> {
        let seam = Seam::FunctionData;
        if from.backend == "postgres" {
            self.route(seam, Route::with_also("postgres", "redis"), "writes dropping the cache", stages).await?;
            let at = Instant::now();
            let (orgs, keys) = self.warm_function_data().await?;
            (self.say)(&format!("function_data: Redis warmed: {orgs} organizations, {keys} keys"));
            stages.push(StageDone {
                stage: format!("warmed {orgs} organizations ({keys} keys)"),
                took_ms: ms(at),
                processes: None,
            });
        }
        self.route(seam, Route::to("redis"), "reading Redis", stages).await
    }

    /// Waits until no live `serve` has an event in hand inline (those it was processing when
    /// the route changed have finished; the inbox's waiting events go to Temporal on their next
    /// attempt) and a worker runs.
    async fn pipeline_drained(&self, stages: &mut Vec<StageDone>) -> anyhow::Result<()> {
        let at = Instant::now();
        // A heartbeat taken before now may predate the last inline event's end (the database's
        // clock, which stamps heartbeats).
        let since: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT now()").fetch_one(self.store.pool()).await?;
        loop {
            let live = self.store.live_servers(GONE_AFTER).await?;
            let fresh = live.iter().all(|s| s.seen_at > since);
            let inline: i64 = live.iter().filter_map(|s| s.capabilities["in_hand"]["inline"].as_i64()).sum();
            let workers = live.iter().filter(|s| s.capabilities["temporal"]["worker"] == "running").count();
            if fresh && inline == 0 && (workers > 0 || live.is_empty()) {
                (self.progress)("");
                (self.say)(&format!("event_pipeline: inline events drained, {workers} Temporal workers running"));
                stages.push(StageDone {
                    stage: format!("inline events drained; {workers} Temporal workers running"),
                    took_ms: ms(at),
                    processes: Some(live.len()),
                });
                return Ok(());
            }
            if at.elapsed() > STAGE_TIMEOUT {
                bail!(
                    "after {STAGE_TIMEOUT:?}, {inline} events are still in hand inline and {workers} workers run: \
                     run the step again to go on waiting"
                );
            }
            (self.progress)(&format!("waiting: {inline} events in hand inline, {workers} Temporal workers running"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn verify_pipeline(&self, backend: &str) -> anyhow::Result<Value> {
        let live = self.store.live_servers(GONE_AFTER).await?;
        let on = live.iter().filter(|s| s.kind == "serve").count();
        let workers = live.iter().filter(|s| s.capabilities["temporal"]["worker"] == "running").count();
        if backend == "temporal" {
            if let Some(why) = self.temporal_refusal().await {
                bail!("{why}");
            }
            if workers == 0 && !live.is_empty() {
                bail!("no Temporal worker is running: events wait in Temporal until one is (`callplane worker`)");
            }
        }
        Ok(json!({ "serving": on, "workers_running": workers, "pipeline": backend }))
    }

    /// The checks a step ends with.
    async fn verify(&self, step: Step, backend: &str) -> anyhow::Result<Value> {
        match (step, backend) {
            (Step::Counters, "redis") => self.verify_redis_counters().await,
            (Step::Counters, _) => self.verify_pg_counters().await,
            (Step::FunctionData, "redis") => self.verify_function_data().await,
            (Step::FunctionData, _) => Ok(json!({ "function_data": "postgres, the truth: nothing to check" })),
            (Step::Search, "postgres") => {
                let valid = self.store.search_index_valid().await?;
                if !valid {
                    bail!("the transcript search index is not valid; run `callplane search index`");
                }
                Ok(json!({ "index_valid": valid }))
            }
            (Step::Search, _) => Ok(json!({ "search": "off" })),
            (Step::Pipeline, backend) => self.verify_pipeline(backend).await,
        }
    }

    /// Checks every organization's Postgres counter against the ledger's counted rows, exactly
    /// (under the row's lock); a difference is recounted.
    async fn verify_pg_counters(&self) -> anyhow::Result<Value> {
        let pg = PgUsageCounter(self.store.clone());
        let repaired = std::sync::atomic::AtomicUsize::new(0);
        let (orgs, seconds) = self
            .each_org("checking Postgres counters", |o| {
                let (pg, store, repaired) = (pg.clone(), self.store.clone(), &repaired);
                async move {
                    match store.check_pg_counter(o.id, o.period_start).await? {
                        Some((counter, ledger)) if counter == ledger => Ok(counter),
                        Some(_) => {
                            repaired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            Ok(pg.rebuild(o.id, o.period_start).await?)
                        }
                        None => Ok(0),
                    }
                }
            })
            .await?;
        Ok(json!({ "organizations": orgs, "seconds": seconds, "repaired": repaired.into_inner() }))
    }
}

/// Why a live process cannot take a step to `service`, if it cannot: it lacks the service, or
/// uses another instance of it than this command.
fn server_refusal(server: &ServerBeat, service: &str, ours: &Abilities) -> Option<String> {
    let who = format!("{} {} pid {}", server.kind, server.host, server.pid);
    let (theirs, ours) = match service {
        "redis" => (server.capabilities["redis"]["url"].as_str(), ours.redis.as_deref()),
        "temporal" => (server.capabilities["temporal"]["target"].as_str(), ours.temporal.as_deref()),
        _ => return None,
    };
    let Some(theirs) = theirs else {
        return Some(format!("{who} was built without {service} (the `{service}` feature): upgrade it first"));
    };
    if Some(theirs) != ours {
        return Some(format!(
            "{who} uses {service} at {theirs}, this command at {}: every process must share one",
            ours.unwrap_or("none")
        ));
    }
    if service == "redis" && server.capabilities["redis"]["answering"] != Value::Bool(true) {
        return Some(format!("{who} cannot reach Redis at {theirs}"));
    }
    None
}

#[cfg(feature = "redis")]
use {callplane_core::seams::FunctionData, callplane_storage::PgFunctionData, std::collections::HashMap};

#[cfg(feature = "redis")]
impl Mover {
    fn redis_counter(&self) -> anyhow::Result<callplane_cache::RedisCounter> {
        let redis = self.clients.redis.clone().context("no Redis client")?;
        Ok(callplane_cache::RedisCounter::new(redis, std::sync::Arc::new(self.store.clone())))
    }

    fn redis_function_data(&self) -> anyhow::Result<std::sync::Arc<callplane_cache::RedisFunctionData>> {
        let pg: std::sync::Arc<dyn FunctionData> = std::sync::Arc::new(PgFunctionData(self.store.clone()));
        self.clients.redis_function_data(&self.settings, pg).context("no Redis client")
    }

    /// Forgets every counter Redis holds (one kept from an earlier time on Redis misses what
    /// Postgres counted since), then builds each organization's current period from the ledger.
    async fn seed_redis_counters(&self) -> anyhow::Result<(usize, i64)> {
        let redis = self.redis_counter()?.leaving_the_ledger_unmarked();
        let forgotten = redis.forget_all().await?;
        if forgotten > 0 {
            (self.say)(&format!("usage_counter: {forgotten} counters Redis held from before were dropped"));
        }
        self.each_org("seeding Redis from the ledger", |o| {
            let redis = &redis;
            async move { Ok(redis.rebuild(o.id, o.period_start).await?) }
        })
        .await
    }

    /// Checks every organization's Redis counter against the ledger, call by call: every call
    /// the ledger marks counted is in it with its seconds, it holds no call the ledger lacks,
    /// and its total is their sum. Read in that order, a call counted while the check runs
    /// cannot make it fail. A counter that fails is rebuilt from the ledger and checked again.
    async fn verify_redis_counters(&self) -> anyhow::Result<Value> {
        let redis = self.redis_counter()?.leaving_the_ledger_unmarked();
        let repaired = std::sync::atomic::AtomicUsize::new(0);
        let store = &self.store;
        let check = async |o: &Organization| -> anyhow::Result<Option<i64>> {
            let counted = store.counted_calls_in_period(o.id, o.period_start).await?;
            let Some((total, calls)) = redis.snapshot(o.id, o.period_start).await? else { return Ok(None) };
            let ledger: HashMap<String, i64> =
                callplane_core::seams::UsageLedger::calls_in_period(store, o.id, o.period_start)
                    .await?
                    .into_iter()
                    .collect();
            let sound = counted.iter().all(|(c, s)| calls.get(c) == Some(s))
                && calls.iter().all(|(c, s)| ledger.get(c) == Some(s))
                && calls.values().sum::<i64>() == total;
            Ok(sound.then_some(total))
        };
        let (orgs, seconds) = self
            .each_org("checking Redis counters against the ledger", |o| {
                let (redis, repaired, check) = (&redis, &repaired, &check);
                async move {
                    if let Some(total) = check(&o).await? {
                        return Ok(total);
                    }
                    // Not there (it is built on first use) or not sound: build it now.
                    repaired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    redis.rebuild(o.id, o.period_start).await?;
                    check(&o).await?.with_context(|| {
                        format!("organization {}'s Redis counter differs from the ledger after a rebuild", o.id)
                    })
                }
            })
            .await?;
        Ok(json!({ "organizations": orgs, "seconds": seconds, "rebuilt": repaired.into_inner() }))
    }

    async fn warm_function_data(&self) -> anyhow::Result<(usize, i64)> {
        let cache = self.redis_function_data()?;
        self.each_org("warming function data", |o| {
            let cache = cache.clone();
            async move { Ok(cache.warm(o.id).await? as i64) }
        })
        .await
    }

    /// Checks every organization's cached map against Postgres. A map differing is read again a
    /// little later (a write racing the check drops it twice, a second apart), then warmed anew.
    async fn verify_function_data(&self) -> anyhow::Result<Value> {
        let cache = self.redis_function_data()?;
        let pg = PgFunctionData(self.store.clone());
        let rewarmed = std::sync::atomic::AtomicUsize::new(0);
        let (orgs, keys) = self
            .each_org("checking cached function data", |o| {
                let (cache, pg, rewarmed) = (cache.clone(), pg.clone(), &rewarmed);
                async move {
                    for attempt in 0..3 {
                        let truth = pg.preload(o.id).await?;
                        match cache.cached(o.id).await? {
                            Some(cached) if cached == truth => return Ok(truth.len() as i64),
                            // A miss is filled from Postgres on first read: nothing stale.
                            None => return Ok(truth.len() as i64),
                            Some(_) if attempt < 2 => tokio::time::sleep(Duration::from_millis(1500)).await,
                            Some(_) => {}
                        }
                    }
                    rewarmed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(cache.warm(o.id).await? as i64)
                }
            })
            .await?;
        Ok(json!({ "organizations": orgs, "keys": keys, "rewarmed": rewarmed.into_inner() }))
    }
}

#[cfg(not(feature = "redis"))]
impl Mover {
    async fn seed_redis_counters(&self) -> anyhow::Result<(usize, i64)> {
        bail!("this callplane was built without Redis")
    }
    async fn verify_redis_counters(&self) -> anyhow::Result<Value> {
        bail!("this callplane was built without Redis")
    }
    async fn warm_function_data(&self) -> anyhow::Result<(usize, i64)> {
        bail!("this callplane was built without Redis")
    }
    async fn verify_function_data(&self) -> anyhow::Result<Value> {
        bail!("this callplane was built without Redis")
    }
}

impl Mover {
    /// The transcript search index on every partition that lacks it, with progress.
    pub async fn build_search_index(&self) -> anyhow::Result<callplane_storage::SearchIndexReport> {
        let started = Instant::now();
        let report = self
            .store
            .build_search_index(|step| {
                if step.done < step.of {
                    (self.progress)(&format!(
                        "search index: partition {}/{} {} (~{} rows), {:.0?} so far",
                        step.done + 1,
                        step.of,
                        step.partition,
                        step.rows,
                        started.elapsed()
                    ));
                }
            })
            .await
            .context("building the transcript search index")?;
        (self.progress)("");
        Ok(report)
    }

    /// What moving to `phase` takes: each step, where its seam is, what it needs, and whether
    /// this build, this configuration and the running processes can take it now.
    pub async fn plan(&self, phase: u8) -> anyhow::Result<Value> {
        let live = self.store.live_servers(GONE_AFTER).await?;
        let processes: Vec<Value> = live
            .iter()
            .map(|s| {
                json!({ "kind": s.kind, "host": s.host, "pid": s.pid, "route_version": s.route_version,
                             "capabilities": s.capabilities })
            })
            .collect();
        let mut steps = Vec::new();
        if phase >= 2 {
            for step in Step::PHASE2 {
                let now = self.current(step.seam()).await?;
                let target = step.ends().1;
                let done = now == Route::to(target);
                let refusal = if done { None } else { self.refusal(step, false).await? };
                let needs: Vec<&str> = match step {
                    Step::Counters | Step::FunctionData => {
                        vec![
                            "a build with the `redis` feature (--features phase2)",
                            "Redis at redis.url, shared by every process",
                        ]
                    }
                    Step::Search => vec!["nothing beyond Postgres; the index build takes a while on a large table"],
                    Step::Pipeline => vec![
                        "a build with the `temporal` feature (--features phase2)",
                        "Temporal at temporal.address, shared by every process",
                        "a Temporal worker: each `serve` starts one (temporal.worker = \"auto\"), or `callplane worker`",
                    ],
                };
                steps.push(json!({
                    "step": step.name(), "seam": step.seam().name(), "what": step.what(),
                    "now": now.to_string(), "target": target, "needs": needs,
                    "status": if done { "done" } else if refusal.is_some() { "blocked" } else { "ready" },
                    "blocked_by": refusal,
                    "command": format!("callplane phase apply 2 --step {}", step.name()),
                }));
            }
        }
        if phase >= 3 {
            // A setting, not a move: new transcripts go to objects, and every transcript is
            // read from wherever its row says.
            let blocked_by = (!cfg!(feature = "object-store"))
                .then_some("needs a build with the `object-store` feature (--features phase3)");
            let done = self.settings.backends.transcripts == crate::settings::TranscriptBackend::ObjectStore;
            steps.push(json!({
                "step": "new transcripts in object storage",
                "status": if done { "done" } else if blocked_by.is_some() { "blocked" } else { "ready" },
                "command": "backends.transcripts = \"object-store\" with [object_store] (restart each process)",
                "blocked_by": blocked_by,
            }));
            // The transcripts stored before the switch: done when no row holds its messages.
            let in_rows: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM call_transcripts WHERE object_key IS NULL)")
                    .fetch_one(self.store.pool())
                    .await?;
            let move_blocked_by = blocked_by.or((!done).then_some("new transcripts in object storage first"));
            steps.push(json!({
                "step": "existing transcripts moved to object storage",
                "status": if done && !in_rows { "done" } else if move_blocked_by.is_some() { "blocked" } else { "ready" },
                "command": "callplane transcripts move --to object-store",
                "blocked_by": move_blocked_by,
            }));
            // Old months: `serve` archives them once `partitions.archive_after_months` is set;
            // done when no month before its cut-off is left in the database.
            let cut_off = self.settings.archive_before(chrono::Utc::now());
            let old_left = match cut_off {
                Some(before) => self.store.partition_months().await?.first().is_some_and(|oldest| *oldest < before),
                None => true,
            };
            steps.push(json!({
                "step": "old call partitions archived to object storage",
                "status": if blocked_by.is_some() { "blocked" } else if !old_left { "done" } else { "ready" },
                "command": "partitions.archive_after_months = N (serve archives on schedule), \
                            or callplane partitions archive --before YYYY-MM",
                "archive_before": cut_off.map(|m| m.format("%Y-%m").to_string()),
                "blocked_by": blocked_by,
            }));
            for (what, command) in [
                ("realtime over Redis pub/sub with live transcripts", "backends.realtime = \"redis\""),
                ("dashboard reads on a read replica behind a pooler", "database.replica_url"),
            ] {
                steps.push(json!({ "step": what, "status": "blocked", "command": command,
                                   "blocked_by": "not in this version of callplane yet" }));
            }
        }
        let ready = steps.iter().all(|s| s["status"] != "blocked");
        Ok(json!({ "phase": phase, "processes": processes, "steps": steps, "ready": ready }))
    }
}
