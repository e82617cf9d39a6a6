//! Configuration: `config/base.toml` (compiled in), then `config/<CALLPLANE_ENV>.toml`, then
//! `CALLPLANE__SECTION__KEY` environment variables. Validated as a whole before anything
//! starts, with errors that name the key.

use anyhow::{Context, bail};
use callplane_core::agent::AgentSettings;
use callplane_core::auth::{HmacAlgorithm, HmacSettings, WebhookAuth};
use callplane_core::billing::{BillingRules, Plan};
use chrono::{DateTime, Utc};
use config::{Config, Environment, File, FileFormat, Source, ValueKind};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

const BASE: &str = include_str!("../../../config/base.toml");

/// Keys holding lists; in the environment (and overrides) they are comma-separated.
const LIST_KEYS: &[&str] = &["vapi.extra_secrets", "vapi.hmac.secrets", "stripe.webhook_secrets"];

#[derive(Clone, Debug, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub vapi: VapiSettings,
    pub auth: AuthSettings,
    pub api: ApiSettings,
    pub realtime: RealtimeConfig,
    pub billing: BillingSettings,
    pub plans: BTreeMap<String, PlanSettings>,
    pub stripe: StripeConfig,
    pub partitions: PartitionSettings,
    pub inbox: InboxSettings,
    pub reconcile: ReconcileConfig,
    pub backends: BackendSettings,
    pub redis: RedisSettings,
    pub temporal: TemporalConfig,
    pub object_store: ObjectStoreSettings,
    pub advisor: callplane_api::advice::AdvisorSettings,
}

/// Temporal (phase 2): the event pipeline's workflows, when `backends.event_pipeline =
/// "temporal"`.
#[derive(Clone, Debug, Deserialize)]
pub struct TemporalConfig {
    /// The frontend's gRPC address, `http://host:port`.
    pub address: String,
    pub namespace: String,
    pub task_queue: String,
    /// Whether `serve` runs a worker: `auto` (when the pipeline is Temporal), `on` (also with
    /// the inline pipeline, to finish the workflows in flight after switching back), `off`
    /// (workers run apart, `callplane worker`).
    pub worker: WorkerMode,
    /// Activities a worker runs at once (each may hold a database connection).
    pub max_concurrent_activities: usize,
    /// How long a webhook's answer waits for its event to be processed by a worker in the
    /// same process; 0 answers once Temporal has accepted the event.
    pub answer_wait_ms: u64,
    /// Where `callplane worker` serves its `/metrics` and `/healthz` (empty: nowhere).
    pub worker_metrics_addr: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ReconcileConfig {
    pub interval_seconds: u64,
    pub grace_seconds: i64,
    pub ceiling_hours: i64,
    pub lookback_hours: i64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InboxSettings {
    pub dir: PathBuf,
    pub max_events: u64,
    pub max_megabytes: u64,
    pub workers: usize,
    pub inline_budget_ms: u64,
    pub max_attempts: u32,
    pub max_backoff_seconds: u64,
    pub ready_max_age_seconds: f64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StripeConfig {
    pub secret_key: SecretString,
    pub api_base: String,
    pub webhook_secrets: Vec<SecretString>,
    pub webhook_tolerance_seconds: i64,
    pub currency: String,
    pub meter_event_name: String,
    pub checkout_success_url: String,
    pub checkout_cancel_url: String,
    pub portal_return_url: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServerSettings {
    pub addr: String,
    pub public_url: String,
    pub max_body_bytes: usize,
    pub log_format: String,
    pub metrics_token: SecretString,
}

/// Redis (phase 2): the usage counter and the function-data cache, when the backends say so.
#[derive(Clone, Debug, Deserialize)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port/db`; may carry a password, so it is a secret.
    pub url: SecretString,
    /// How long function data stays in Redis before it is read from Postgres again.
    pub function_data_ttl_seconds: u64,
}

/// Object storage (phase 3): transcripts with `backends.transcripts = "object-store"`.
#[derive(Clone, Debug, Deserialize)]
pub struct ObjectStoreSettings {
    /// `s3://bucket/prefix`, `file:///dir`, or a directory path.
    pub url: String,
    /// An S3-compatible server's address; empty for AWS.
    pub endpoint: String,
    pub region: String,
    pub access_key_id: SecretString,
    pub secret_access_key: SecretString,
    /// How long one request to the store may take.
    pub timeout_seconds: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub max_connections: u32,
    pub answer_pool_connections: u32,
    /// Straight to the database, past the transaction-mode pooler `url` goes through: for
    /// what needs a session (LISTEN, session locks, migrations) and the answer pool. Empty:
    /// `url` is direct.
    pub direct_url: SecretString,
    /// A streaming replica of the primary for the dashboard's reads (`read-replica`). Empty:
    /// every read on the primary.
    pub replica_url: SecretString,
    pub replica_connections: u32,
    /// Further behind than this, the replica gets no reads.
    pub replica_max_lag_ms: u64,
    /// How long a read waits for the replica to replay what its reader must see.
    pub replica_wait_ms: u64,
    /// How often the replica's position is compared with the primary's.
    pub replica_check_ms: u64,
}

impl DatabaseSettings {
    /// `direct_url` when set, else `url`.
    pub fn direct(&self) -> &str {
        self.direct_url().unwrap_or(self.url.expose_secret())
    }

    /// `direct_url`, when set.
    pub fn direct_url(&self) -> Option<&str> {
        set(&self.direct_url)
    }

    pub fn replica(&self) -> Option<&str> {
        set(&self.replica_url)
    }

    /// How the replica is used.
    pub fn replica_settings(&self) -> callplane_storage::ReplicaSettings {
        callplane_storage::ReplicaSettings {
            max_lag: std::time::Duration::from_millis(self.replica_max_lag_ms),
            wait: std::time::Duration::from_millis(self.replica_wait_ms),
            check_every: std::time::Duration::from_millis(self.replica_check_ms),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct VapiSettings {
    pub secret: SecretString,
    pub extra_secrets: Vec<SecretString>,
    pub allow_unauthenticated: bool,
    pub fallback_assistant_id: String,
    pub max_call_seconds: i64,
    pub answer_deadline_ms: u64,
    pub api_key: SecretString,
    pub api_url: String,
    pub api_timeout_seconds: u64,
    pub hmac: HmacConfig,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HmacConfig {
    pub secrets: Vec<SecretString>,
    pub algorithm: String,
    pub signature_header: String,
    pub timestamp_header: String,
    pub signature_prefix: String,
    pub payload_format: String,
    pub max_skew_seconds: i64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AuthSettings {
    pub jwt_secret: SecretString,
    pub jwt_org_claim: String,
    pub jwt_audience: String,
    pub jwt_leeway_seconds: i64,
    pub jwt_max_lifetime_seconds: i64,
    pub admin_token: SecretString,
    pub failure_limit: u32,
    pub failure_window_seconds: u64,
    pub failure_table_entries: usize,
    pub trust_forwarded_for: bool,
    pub api_key_cache_seconds: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ApiSettings {
    pub max_function_data_bytes: usize,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RealtimeConfig {
    pub retention_hours: i64,
    pub heartbeat_seconds: u64,
    pub send_timeout_ms: u64,
    pub queue: usize,
    pub max_connections_per_org: usize,
    pub max_connections_per_key: usize,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BillingSettings {
    pub rounding_increment_seconds: i64,
    pub unbilled_ended_reasons: Vec<String>,
    pub unbilled_ended_reason_prefixes: Vec<String>,
    pub past_due_grace_hours: i64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PlanSettings {
    pub price_cents: i64,
    pub included_minutes: i64,
    pub hard_limit: bool,
    pub overage_cents_per_minute: i64,
    pub stripe_price_id: String,
    pub stripe_overage_price_id: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PartitionSettings {
    pub months_ahead: u32,
    pub max_future_skew_hours: i64,
    pub max_past_days: i64,
    pub maintenance_interval_seconds: u64,
    /// `serve` archives each month this many months old to object storage (phase 3); 0 never.
    #[serde(default)]
    pub archive_after_months: u32,
}

/// Which backend serves each seam. Each seam's choices are an enum: a name the build does not
/// know is refused when the configuration is read, naming the key and the choices. A later
/// phase adds its variant (and the feature that compiles it) to the seam it serves.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct BackendSettings {
    pub usage_counter: CounterBackend,
    pub transcripts: TranscriptBackend,
    pub event_pipeline: PipelineBackend,
    pub function_data: FunctionDataBackend,
    pub realtime: RealtimeBackend,
    pub search: SearchBackend,
}

/// A seam's backend choices: an enum whose config names are listed, so a name this build does
/// not have is refused naming the choices.
macro_rules! backend_choices {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl From<$name> for &'static str {
            fn from(b: $name) -> &'static str {
                match b {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(name: String) -> Result<Self, String> {
                match name.as_str() {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!(
                        "{other:?} is not a backend this build has; choices: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

backend_choices! {
    /// `backends.usage_counter`: where each organization's seconds per billing period are counted.
    CounterBackend {
        /// `organizations.seconds_used`.
        Postgres = "postgres",
        /// One Redis hash per organization and period (the `redis` feature).
        Redis = "redis",
    }
}

backend_choices! {
    /// `backends.transcripts`: where transcripts are kept.
    TranscriptBackend {
        /// `call_transcripts`, partitioned with the calls.
        Postgres = "postgres",
        /// One compressed object per transcript in `[object_store]`, the row keeping the text
        /// and the object's key (the `object-store` feature).
        ObjectStore = "object-store",
    }
}

backend_choices! {
    /// `backends.event_pipeline`: how a webhook's event is processed.
    PipelineBackend {
        /// In the serving process, out of the durable inbox.
        Inline = "inline",
        /// A Temporal workflow per call, its steps retried as activities (the `temporal`
        /// feature).
        Temporal = "temporal",
    }
}

backend_choices! {
    /// `temporal.worker`: whether `serve` runs a Temporal worker.
    WorkerMode {
        /// When `backends.event_pipeline = "temporal"`.
        Auto = "auto",
        /// Always (while switching back to inline, until the workflows in flight finish).
        On = "on",
        /// Never: workers run apart (`callplane worker`).
        Off = "off",
    }
}

backend_choices! {
    /// `backends.search`: transcript search (`GET /v1/search`).
    SearchBackend {
        /// No search: the endpoint answers 409 `search_off`, and the attempt is counted.
        Off = "off",
        /// Full-text search on `call_transcripts` with its GIN index.
        Postgres = "postgres",
    }
}

backend_choices! {
    /// `backends.function_data`: where the tool answers' data is read from.
    FunctionDataBackend {
        Postgres = "postgres",
        /// A Redis read-through cache over Postgres (the `redis` feature).
        Redis = "redis",
    }
}

backend_choices! {
    /// `backends.realtime`: how live events reach every serving process.
    RealtimeBackend {
        /// LISTEN/NOTIFY, with the events kept in `realtime_events` for resuming.
        Postgres = "postgres",
    }
}

fn non_empty(s: &SecretString) -> Option<Vec<u8>> {
    let v = s.expose_secret().trim();
    (!v.is_empty()).then(|| v.as_bytes().to_vec())
}

/// The environment's file, `<CALLPLANE_CONFIG_DIR>/<CALLPLANE_ENV>.toml` (`config/local.toml` by
/// default). The default may be absent, as the compiled-in base is complete; a file either
/// variable names must exist.
fn env_file(env: Option<String>, dir: Option<String>) -> anyhow::Result<Option<PathBuf>> {
    let named = env.is_some() || dir.is_some();
    let env = env.unwrap_or_else(|| "local".into());
    let dir = PathBuf::from(dir.unwrap_or_else(|| "config".into()));
    let path = dir.join(format!("{env}.toml"));
    if path.is_file() {
        return Ok(Some(path));
    }
    if !named {
        return Ok(None);
    }
    let mut available: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.strip_suffix(".toml").map(str::to_owned))
        .filter(|name| name != "base")
        .collect();
    available.sort();
    let available = if available.is_empty() { "none".to_owned() } else { available.join(", ") };
    bail!("CALLPLANE_ENV={env}: {} does not exist (environments in {}: {available})", path.display(), dir.display())
}

/// Every key `config/base.toml` sets, in the form `key_pattern` gives.
fn known_keys() -> anyhow::Result<BTreeSet<String>> {
    let base = File::from_str(BASE, FileFormat::Toml).collect().context("reading config/base.toml")?;
    Ok(dotted_keys(base).iter().map(|key| key_pattern(key)).collect())
}

/// The dotted keys (`vapi.hmac.secrets`) of a configuration tree's values.
fn dotted_keys(table: config::Map<String, config::Value>) -> Vec<String> {
    let mut keys = Vec::new();
    let mut tables = vec![(String::new(), table)];
    while let Some((prefix, table)) = tables.pop() {
        for (name, value) in table {
            let key = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
            match value.kind {
                ValueKind::Table(inner) => tables.push((key, inner)),
                _ => keys.push(key),
            }
        }
    }
    keys.sort();
    keys
}

/// Plans are named freely, so `plans.enterprise.price_cents` is checked as `plans.*.price_cents`.
fn key_pattern(key: &str) -> String {
    match key.split_once('.') {
        Some(("plans", rest)) => {
            rest.split_once('.').map_or_else(|| key.to_owned(), |(_, field)| format!("plans.*.{field}"))
        }
        _ => key.to_owned(),
    }
}

/// The `CALLPLANE__*` variables among `names` that name no key, each said with the key it
/// stands for and, when one is close, the variable probably meant. Other variables are ignored.
fn unknown_variables(known: &BTreeSet<String>, names: impl Iterator<Item = String>) -> Vec<String> {
    let mut unknown: Vec<String> = names
        .filter_map(|name| {
            // Matched as the config crate does: case-insensitively.
            let key = name.to_lowercase().strip_prefix("callplane__")?.replace("__", ".");
            if known.contains(&key_pattern(&key)) {
                return None;
            }
            let hint = closest_key(known, &key)
                .map(|close| format!("; did you mean CALLPLANE__{}?", close.replace('.', "__").to_uppercase()))
                .unwrap_or_default();
            Some(format!("{name}: there is no key `{key}`{hint}"))
        })
        .collect();
    unknown.sort();
    unknown
}

/// The keys in a configuration file that are not configuration keys, said with the file.
fn unknown_file_keys(known: &BTreeSet<String>, path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let table = File::from(path).collect().with_context(|| format!("reading {}", path.display()))?;
    Ok(dotted_keys(table)
        .into_iter()
        .filter(|key| !known.contains(&key_pattern(key)))
        .map(|key| {
            let hint = closest_key(known, &key).map(|close| format!("; did you mean `{close}`?")).unwrap_or_default();
            format!("{}: there is no key `{key}`{hint}", path.display())
        })
        .collect())
}

/// The known key a few typos away from `key`, if any (a plan's name kept as given).
fn closest_key(known: &BTreeSet<String>, key: &str) -> Option<String> {
    let pattern = key_pattern(key);
    let (distance, close) = known.iter().map(|k| (strsim::levenshtein(k, &pattern), k)).min()?;
    let plan = key.split('.').nth(1).filter(|_| close.starts_with("plans.*."));
    (distance <= 3).then(|| plan.map_or_else(|| close.clone(), |plan| close.replacen('*', plan, 1)))
}

impl Settings {
    /// Loads from the compiled-in base, the environment file and the environment.
    /// Refuses, naming them, `CALLPLANE__*` variables and keys in the environment's file that
    /// are not configuration keys, and a `CALLPLANE_ENV` whose file does not exist: a typo
    /// would otherwise start the server on a default.
    pub fn load() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        let env_file = env_file(var("CALLPLANE_ENV"), var("CALLPLANE_CONFIG_DIR"))?;
        let known = known_keys()?;
        let variables = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
        let mut unknown = unknown_variables(&known, variables);
        if let Some(path) = &env_file {
            unknown.extend(unknown_file_keys(&known, path)?);
        }
        if !unknown.is_empty() {
            bail!("unknown configuration keys (config/base.toml lists every key):\n  {}", unknown.join("\n  "));
        }
        let mut builder = Config::builder().add_source(File::from_str(BASE, FileFormat::Toml));
        if let Some(path) = env_file {
            builder = builder.add_source(File::from(path));
        }
        builder = builder.add_source(
            Environment::with_prefix("CALLPLANE")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key(LIST_KEYS[0])
                .with_list_parse_key(LIST_KEYS[1])
                .with_list_parse_key(LIST_KEYS[2])
                .try_parsing(true),
        );
        if std::env::var_os("CALLPLANE__DATABASE__URL").is_none()
            && let Ok(url) = std::env::var("DATABASE_URL")
        {
            builder = builder.set_override("database.url", url)?;
        }
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("configuration does not match the expected keys (see config/base.toml)")?;
        settings.validate()?;
        Ok(settings)
    }

    /// The compiled-in defaults with `overrides` (dotted keys) on top, ignoring the
    /// environment and config files. For tests and tools that must not pick up local state.
    pub fn defaults_with(overrides: &[(&str, &str)]) -> anyhow::Result<Self> {
        let known = known_keys()?;
        if let Some((key, _)) = overrides.iter().find(|(key, _)| !known.contains(&key_pattern(key))) {
            bail!("{key}: there is no such configuration key (config/base.toml lists every key)");
        }
        let mut builder = Config::builder().add_source(File::from_str(BASE, FileFormat::Toml));
        for (key, value) in overrides {
            builder = if LIST_KEYS.contains(key) {
                builder.set_override(*key, value.split(',').map(str::to_owned).collect::<Vec<_>>())?
            } else {
                builder.set_override(*key, *value)?
            };
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the whole configuration; every error names its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if self.server.addr.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!("server.addr: {:?} is not a socket address like 127.0.0.1:8080", self.server.addr));
        }
        if !self.server.public_url.starts_with("http://") && !self.server.public_url.starts_with("https://") {
            errors.push(format!("server.public_url: {:?} must start with http:// or https://", self.server.public_url));
        }
        if !matches!(self.server.log_format.as_str(), "pretty" | "json") {
            errors.push("server.log_format: expected \"pretty\" or \"json\"".into());
        }
        if self.server.max_body_bytes < 1024 {
            errors.push("server.max_body_bytes: must be at least 1024".into());
        }
        if self.plans.is_empty() {
            errors.push("plans: at least one plan is needed".into());
        }
        errors.extend(self.redis_problems());
        errors.extend(self.temporal_problems());
        errors.extend(self.object_store_problems());
        errors.extend(self.advisor_problems());
        for (name, p) in &self.plans {
            if p.included_minutes < 0 || p.price_cents < 0 || p.overage_cents_per_minute < 0 {
                errors.push(format!("plans.{name}: prices and minutes cannot be negative"));
            }
        }
        if HmacAlgorithm::parse(&self.vapi.hmac.algorithm).is_none() {
            errors.push(format!("vapi.hmac.algorithm: {:?} is not sha256 or sha512", self.vapi.hmac.algorithm));
        }
        if self.vapi.max_call_seconds <= 0 {
            errors.push("vapi.max_call_seconds: must be positive".into());
        }
        if !(50..=7000).contains(&self.vapi.answer_deadline_ms) {
            errors.push("vapi.answer_deadline_ms: must be between 50 and 7000 (VAPI gives up at 7500)".into());
        }
        if !self.vapi.api_url.starts_with("http://") && !self.vapi.api_url.starts_with("https://") {
            errors.push(format!("vapi.api_url: {:?} must start with http:// or https://", self.vapi.api_url));
        }
        if !(1..=120).contains(&self.vapi.api_timeout_seconds) {
            errors.push("vapi.api_timeout_seconds: must be between 1 and 120".into());
        }
        if self.reconcile.grace_seconds < 0 {
            errors.push("reconcile.grace_seconds: cannot be negative".into());
        }
        if self.reconcile.ceiling_hours.saturating_mul(3600)
            <= self.vapi.max_call_seconds.saturating_add(self.reconcile.grace_seconds)
        {
            errors.push(
                "reconcile.ceiling_hours: must be longer than vapi.max_call_seconds plus reconcile.grace_seconds"
                    .into(),
            );
        }
        if self.reconcile.lookback_hours < self.reconcile.ceiling_hours {
            errors.push("reconcile.lookback_hours: must be at least reconcile.ceiling_hours".into());
        }
        if self.database.answer_pool_connections == 0 {
            errors.push("database.answer_pool_connections: must be at least 1".into());
        }
        if self.database.replica().is_some() {
            if !cfg!(feature = "read-replica") {
                errors.push(
                    "database.replica_url: this build has no read replica routing (`--features phase3` or \
                     `read-replica`)"
                        .into(),
                );
            }
            if self.database.replica_connections == 0 {
                errors.push("database.replica_connections: must be at least 1".into());
            }
            if !(10..=60_000).contains(&self.database.replica_check_ms) {
                errors.push("database.replica_check_ms: must be between 10 and 60000".into());
            }
            if self.database.replica_wait_ms > 5_000 {
                errors.push(
                    "database.replica_wait_ms: at most 5000 (a read waits this long before the primary answers it)"
                        .into(),
                );
            }
        }
        if self.inbox.dir.as_os_str().is_empty() {
            errors.push("inbox.dir: must name a directory".into());
        }
        if self.inbox.max_events == 0 || self.inbox.max_megabytes == 0 {
            errors.push("inbox.max_events, inbox.max_megabytes: must be positive".into());
        }
        if self.inbox.workers == 0 {
            errors.push("inbox.workers: must be at least 1".into());
        }
        if self.inbox.max_attempts == 0 {
            errors.push("inbox.max_attempts: must be at least 1".into());
        }
        if self.auth.jwt_org_claim.trim().is_empty() {
            errors.push("auth.jwt_org_claim: must name a claim".into());
        }
        let jwt_secret_len = self.auth.jwt_secret.expose_secret().len();
        if jwt_secret_len > 0 && jwt_secret_len < 32 {
            errors.push("auth.jwt_secret: must be at least 32 characters".into());
        }
        if self.auth.jwt_max_lifetime_seconds < 60 {
            errors.push("auth.jwt_max_lifetime_seconds: must be at least 60".into());
        }
        if self.auth.failure_limit == 0 {
            errors.push("auth.failure_limit: must be at least 1".into());
        }
        if !(1..=86_400).contains(&self.auth.failure_window_seconds) {
            errors.push("auth.failure_window_seconds: must be between 1 and 86400".into());
        }
        if self.auth.failure_table_entries < 1000 {
            errors.push("auth.failure_table_entries: must be at least 1000".into());
        }
        if self.auth.api_key_cache_seconds > 300 {
            errors.push("auth.api_key_cache_seconds: at most 300 (a revoked key works this long)".into());
        }
        if self.realtime.retention_hours < 1 {
            errors.push("realtime.retention_hours: must be at least 1".into());
        }
        if !(10..=600_000).contains(&self.realtime.send_timeout_ms) {
            errors.push("realtime.send_timeout_ms: must be between 10 and 600000".into());
        }
        if self.realtime.max_connections_per_org == 0 {
            errors.push("realtime.max_connections_per_org: must be at least 1".into());
        }
        if self.realtime.max_connections_per_key == 0 {
            errors.push("realtime.max_connections_per_key: must be at least 1".into());
        }
        if self.billing.rounding_increment_seconds < 1 {
            errors.push("billing.rounding_increment_seconds: must be at least 1".into());
        }
        if errors.is_empty() { Ok(()) } else { bail!("invalid configuration:\n  {}", errors.join("\n  ")) }
    }

    /// Refuses to serve webhooks nobody can authenticate, unless explicitly allowed.
    /// The backends that need Redis, by key.
    pub fn redis_backends(&self) -> Vec<&'static str> {
        let b = &self.backends;
        let mut keys = Vec::new();
        if b.usage_counter == CounterBackend::Redis {
            keys.push("backends.usage_counter");
        }
        if b.function_data == FunctionDataBackend::Redis {
            keys.push("backends.function_data");
        }
        keys
    }

    fn advisor_problems(&self) -> Vec<String> {
        let a = &self.advisor;
        let mut errors = Vec::new();
        if !(1..=366).contains(&a.window_days) {
            errors.push("advisor.window_days: must be between 1 and 366".into());
        }
        if a.concurrent_days == 0 || a.concurrent_days > a.window_days {
            errors.push("advisor.concurrent_days: must be between 1 and advisor.window_days".into());
        }
        for (key, v) in [
            ("answer_near_deadline", a.answer_near_deadline),
            ("webhook_failure_rate", a.webhook_failure_rate),
            ("db_connections_share", a.db_connections_share),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                errors.push(format!("advisor.{key}: must be a share above 0 and at most 1"));
            }
        }
        for (key, v) in [
            ("redis_memory_mb", a.redis_memory_mb),
            ("transcripts_gb", a.transcripts_gb),
            ("monthly_cost_usd.phase1", a.monthly_cost_usd.phase1),
            ("monthly_cost_usd.phase2", a.monthly_cost_usd.phase2),
            ("monthly_cost_usd.phase3", a.monthly_cost_usd.phase3),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                errors.push(format!("advisor.{key}: must be a number, 0 or more"));
            }
        }
        if a.sample_interval_seconds == 0 {
            errors.push("advisor.sample_interval_seconds: must be at least 1".into());
        }
        errors
    }

    /// Where the advisor's counts draw their lines, for the metrics registry.
    pub fn advisor_limits(&self) -> callplane_api::AdvisorLimits {
        let deadline = self.answer_deadline().as_secs_f64() * self.advisor.answer_near_deadline;
        callplane_api::AdvisorLimits {
            dashboard_slow: std::time::Duration::from_millis(self.advisor.dashboard_p95_ms),
            answer_slow: std::time::Duration::try_from_secs_f64(deadline).unwrap_or_default(),
        }
    }

    fn redis_problems(&self) -> Vec<String> {
        let keys = self.redis_backends();
        if keys.is_empty() {
            return Vec::new();
        }
        if !cfg!(feature = "redis") {
            return vec![format!(
                "{} = \"redis\": this build has no Redis backends; build with the `redis` feature \
                 (`--features phase2`)",
                keys.join(", ")
            )];
        }
        let url = self.redis.url.expose_secret();
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return vec![format!(
                "redis.url: {} need a Redis URL like redis://127.0.0.1:6379/ (CALLPLANE__REDIS__URL)",
                keys.join(", ")
            )];
        }
        Vec::new()
    }

    fn object_store_problems(&self) -> Vec<String> {
        let archiving = self.partitions.archive_after_months > 0;
        if self.backends.transcripts != TranscriptBackend::ObjectStore && !archiving {
            return Vec::new();
        }
        if !cfg!(feature = "object-store") {
            let user =
                if archiving { "partitions.archive_after_months" } else { "backends.transcripts = \"object-store\"" };
            return vec![format!(
                "{user}: this build has no object store; build with the `object-store` feature (`--features phase3`)"
            )];
        }
        let o = &self.object_store;
        let mut errors = Vec::new();
        if o.url.trim().is_empty() {
            errors.push(
                "object_store.url: empty; use s3://bucket/prefix or a directory (CALLPLANE__OBJECT_STORE__URL)".into(),
            );
        }
        if o.access_key_id.expose_secret().is_empty() != o.secret_access_key.expose_secret().is_empty() {
            errors.push("object_store.access_key_id and object_store.secret_access_key go together".into());
        }
        if o.timeout_seconds == 0 {
            errors.push("object_store.timeout_seconds: must be at least 1".into());
        }
        errors
    }

    /// The oldest creation time an event may still have (`partitions.max_past_days` before
    /// `now`): older months receive nothing more, so they may be archived.
    pub fn stale_before(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::days(self.partitions.max_past_days)
    }

    /// The first month `serve` keeps when `partitions.archive_after_months` is set: every
    /// month before it is archived, but never one that can still receive events.
    pub fn archive_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let months = self.partitions.archive_after_months;
        if months == 0 {
            return None;
        }
        let by_age = callplane_core::billing::month_start(now).checked_sub_months(chrono::Months::new(months))?;
        Some(by_age.min(callplane_core::billing::month_start(self.stale_before(now))))
    }

    /// Where objects are kept, for the storage crate.
    #[cfg(feature = "object-store")]
    pub fn object_store_config(&self) -> callplane_storage::ObjectStoreConfig {
        let o = &self.object_store;
        let secret = |s: &SecretString| Some(s.expose_secret().to_owned()).filter(|s| !s.is_empty());
        callplane_storage::ObjectStoreConfig {
            url: o.url.clone(),
            endpoint: Some(o.endpoint.clone()).filter(|e| !e.is_empty()),
            region: Some(o.region.clone()).filter(|r| !r.is_empty()),
            access_key_id: secret(&o.access_key_id),
            secret_access_key: secret(&o.secret_access_key),
            timeout: std::time::Duration::from_secs(o.timeout_seconds.max(1)),
        }
    }

    /// The Temporal pipeline's settings.
    #[cfg(feature = "temporal")]
    pub fn temporal_settings(&self) -> callplane_temporal::TemporalSettings {
        let t = &self.temporal;
        callplane_temporal::TemporalSettings {
            address: t.address.clone(),
            namespace: t.namespace.clone(),
            task_queue: t.task_queue.clone(),
            answer_wait: std::time::Duration::from_millis(t.answer_wait_ms),
            max_concurrent_activities: t.max_concurrent_activities,
        }
    }

    /// Whether this process uses Temporal at all (its pipeline, or a worker it runs).
    pub fn uses_temporal(&self) -> bool {
        self.backends.event_pipeline == PipelineBackend::Temporal || self.temporal.worker == WorkerMode::On
    }

    /// What a heartbeat says of `serve`'s Temporal worker while none is running: whether one
    /// would start when events are routed to Temporal.
    pub fn idle_worker_state(&self) -> &'static str {
        match self.temporal.worker {
            WorkerMode::Off => "off",
            WorkerMode::Auto | WorkerMode::On => "when routed",
        }
    }

    /// Whether `serve` runs a Temporal worker.
    pub fn serves_worker(&self) -> bool {
        match self.temporal.worker {
            WorkerMode::Auto => self.backends.event_pipeline == PipelineBackend::Temporal,
            WorkerMode::On => true,
            WorkerMode::Off => false,
        }
    }

    fn temporal_problems(&self) -> Vec<String> {
        if !self.uses_temporal() {
            return Vec::new();
        }
        if !cfg!(feature = "temporal") {
            return vec![
                "backends.event_pipeline = \"temporal\" (or temporal.worker = \"on\"): this build has no \
                         Temporal pipeline; build with the `temporal` feature (`--features phase2`)"
                    .into(),
            ];
        }
        let t = &self.temporal;
        let mut errors = Vec::new();
        if !t.address.starts_with("http://") && !t.address.starts_with("https://") {
            errors.push(format!(
                "temporal.address: {:?} is not a URL like http://127.0.0.1:7233 (CALLPLANE__TEMPORAL__ADDRESS)",
                t.address
            ));
        }
        if t.namespace.trim().is_empty() || t.task_queue.trim().is_empty() {
            errors.push("temporal.namespace and temporal.task_queue: must not be empty".into());
        }
        if t.max_concurrent_activities == 0 {
            errors.push("temporal.max_concurrent_activities: must be at least 1".into());
        }
        if !t.worker_metrics_addr.is_empty() && t.worker_metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!(
                "temporal.worker_metrics_addr: {:?} is not an address like 127.0.0.1:8081 (or empty for none)",
                t.worker_metrics_addr
            ));
        }
        errors
    }

    /// The Redis URL with any password masked.
    pub fn redis_url_masked(&self) -> String {
        let url = self.redis.url.expose_secret();
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}://********{}", &url[..scheme], &url[at..]),
            _ => url.to_owned(),
        }
    }

    pub fn validate_for_serving(&self) -> anyhow::Result<()> {
        let auth = self.webhook_auth();
        if auth.shared_secrets.is_empty() && auth.hmac.is_none() && !auth.allow_unauthenticated {
            bail!(
                "vapi.secret: no VAPI secret is configured, so no webhook could be authenticated. \
                 Set CALLPLANE__VAPI__SECRET (or vapi.hmac.secrets), or vapi.allow_unauthenticated = true for local use"
            );
        }
        Ok(())
    }

    pub fn webhook_auth(&self) -> WebhookAuth {
        let shared_secrets =
            std::iter::once(&self.vapi.secret).chain(&self.vapi.extra_secrets).filter_map(non_empty).collect();
        let hmac_secrets: Vec<Vec<u8>> = self.vapi.hmac.secrets.iter().filter_map(non_empty).collect();
        let h = &self.vapi.hmac;
        WebhookAuth {
            shared_secrets,
            hmac: (!hmac_secrets.is_empty()).then(|| HmacSettings {
                secrets: hmac_secrets,
                algorithm: HmacAlgorithm::parse(&h.algorithm).unwrap_or(HmacAlgorithm::Sha256),
                signature_header: h.signature_header.to_ascii_lowercase(),
                timestamp_header: h.timestamp_header.to_ascii_lowercase(),
                signature_prefix: h.signature_prefix.clone(),
                payload_format: h.payload_format.clone(),
                max_skew_seconds: h.max_skew_seconds,
            }),
            allow_unauthenticated: self.vapi.allow_unauthenticated,
        }
    }

    pub fn dashboard_auth(&self) -> callplane_api::DashboardAuth {
        callplane_api::DashboardAuth {
            jwt: non_empty(&self.auth.jwt_secret).map(|secret| callplane_core::jwt::JwtSettings {
                secret,
                org_claim: self.auth.jwt_org_claim.clone(),
                audience: (!self.auth.jwt_audience.is_empty()).then(|| self.auth.jwt_audience.clone()),
                leeway_seconds: self.auth.jwt_leeway_seconds,
                max_lifetime_seconds: self.auth.jwt_max_lifetime_seconds,
            }),
            admin_token: non_empty(&self.auth.admin_token),
            api_keys: callplane_api::ApiKeyCache::new(std::time::Duration::from_secs(self.auth.api_key_cache_seconds)),
        }
    }

    pub fn auth_throttle(&self) -> callplane_api::AuthThrottle {
        callplane_api::AuthThrottle::new(callplane_api::ThrottleSettings {
            failure_limit: self.auth.failure_limit,
            window: std::time::Duration::from_secs(self.auth.failure_window_seconds),
            max_entries: self.auth.failure_table_entries,
            trust_forwarded_for: self.auth.trust_forwarded_for,
        })
    }

    /// The bearer token `/metrics` requires, when set.
    pub fn metrics_token(&self) -> Option<Vec<u8>> {
        non_empty(&self.server.metrics_token)
    }

    /// Stripe, when a secret key is configured.
    pub fn stripe_settings(&self) -> Option<callplane_billing::StripeSettings> {
        let key = self.stripe.secret_key.expose_secret().trim();
        if key.is_empty() {
            return None;
        }
        let ids = |f: fn(&PlanSettings) -> &String| {
            self.plans.iter().filter(|(_, p)| !f(p).is_empty()).map(|(n, p)| (n.clone(), f(p).clone())).collect()
        };
        Some(callplane_billing::StripeSettings {
            secret_key: key.to_owned(),
            api_base: self.stripe.api_base.clone(),
            checkout_success_url: self.stripe.checkout_success_url.clone(),
            checkout_cancel_url: self.stripe.checkout_cancel_url.clone(),
            portal_return_url: self.stripe.portal_return_url.clone(),
            plan_prices: ids(|p| &p.stripe_price_id),
            overage_prices: ids(|p| &p.stripe_overage_price_id),
        })
    }

    pub fn stripe_webhook_secrets(&self) -> Vec<Vec<u8>> {
        self.stripe.webhook_secrets.iter().filter_map(non_empty).collect()
    }

    /// Stripe price id -> plan name.
    pub fn plans_by_price(&self) -> HashMap<String, String> {
        self.plans
            .iter()
            .filter(|(_, p)| !p.stripe_price_id.is_empty())
            .map(|(n, p)| (p.stripe_price_id.clone(), n.clone()))
            .collect()
    }

    pub fn realtime_settings(&self) -> callplane_api::RealtimeSettings {
        callplane_api::RealtimeSettings {
            heartbeat: std::time::Duration::from_secs(self.realtime.heartbeat_seconds.max(1)),
            send_timeout: std::time::Duration::from_millis(self.realtime.send_timeout_ms),
            max_connections_per_org: self.realtime.max_connections_per_org,
            max_connections_per_key: self.realtime.max_connections_per_key,
            ..Default::default()
        }
    }

    pub fn plans(&self) -> HashMap<String, Plan> {
        self.plans
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    Plan {
                        name: name.clone(),
                        price_cents: p.price_cents,
                        included_minutes: p.included_minutes,
                        hard_limit: p.hard_limit,
                        overage_cents_per_minute: p.overage_cents_per_minute,
                    },
                )
            })
            .collect()
    }

    pub fn billing_rules(&self) -> BillingRules {
        BillingRules {
            rounding_increment_seconds: self.billing.rounding_increment_seconds,
            unbilled_ended_reasons: self.billing.unbilled_ended_reasons.clone(),
            unbilled_ended_reason_prefixes: self.billing.unbilled_ended_reason_prefixes.clone(),
        }
    }

    pub fn agent(&self) -> AgentSettings {
        AgentSettings {
            max_call_seconds: self.vapi.max_call_seconds,
            past_due_grace: chrono::Duration::hours(self.billing.past_due_grace_hours),
            org_hint_key: self.org_hint_key(),
        }
    }

    /// The key that signs organization ids in call metadata, derived from the first webhook
    /// secret so every process agrees on it without another setting.
    pub fn org_hint_key(&self) -> Option<Vec<u8>> {
        let auth = self.webhook_auth();
        let secret = auth.shared_secrets.first().or(auth.hmac.as_ref().and_then(|h| h.secrets.first()))?;
        Some(
            callplane_core::agent::org_hint_signature(secret, callplane_core::OrgId(uuid::Uuid::nil()), "org-hint-key")
                .into_bytes(),
        )
    }

    /// VAPI's API, when a key is configured.
    pub fn vapi_calls(&self) -> anyhow::Result<Option<callplane_workflow::reconcile::VapiCalls>> {
        if self.vapi.api_key.expose_secret().trim().is_empty() {
            return Ok(None);
        }
        let client = callplane_workflow::reconcile::VapiCalls::new(
            &self.vapi.api_url,
            self.vapi.api_key.clone(),
            std::time::Duration::from_secs(self.vapi.api_timeout_seconds),
        )
        .context("vapi.api_url / vapi.api_key")?;
        Ok(Some(client))
    }

    pub fn reconcile_settings(&self) -> callplane_workflow::reconcile::ReconcileSettings {
        callplane_workflow::reconcile::ReconcileSettings {
            ceiling: chrono::Duration::hours(self.reconcile.ceiling_hours),
            sweep_lookback: chrono::Duration::hours(self.reconcile.lookback_hours),
            ..callplane_workflow::reconcile::ReconcileSettings::new(chrono::Duration::seconds(
                self.vapi.max_call_seconds + self.reconcile.grace_seconds,
            ))
        }
    }

    pub fn answer_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.vapi.answer_deadline_ms)
    }

    pub fn inbox_limits(&self) -> callplane_workflow::InboxLimits {
        callplane_workflow::InboxLimits {
            max_events: self.inbox.max_events,
            max_bytes: self.inbox.max_megabytes.saturating_mul(1 << 20),
        }
    }

    pub fn intake_settings(&self) -> callplane_workflow::IntakeSettings {
        callplane_workflow::IntakeSettings {
            workers: self.inbox.workers,
            max_attempts: self.inbox.max_attempts,
            max_backoff: std::time::Duration::from_secs(self.inbox.max_backoff_seconds.max(1)),
            org_hint_key: self.org_hint_key(),
        }
    }

    pub fn vapi_server_url(&self, org: &callplane_core::OrgId) -> String {
        format!("{}/vapi/{org}", self.server.public_url.trim_end_matches('/'))
    }

    /// `database.url` with the host and database visible and any password masked, for messages
    /// and `callplane config`.
    pub fn database_url_masked(&self) -> String {
        masked_url(self.database.url.expose_secret())
    }

    /// `database.replica_url`, masked the same way.
    pub fn replica_url_masked(&self) -> String {
        masked_url(self.database.replica_url.expose_secret())
    }

    /// The resolved configuration with every secret masked, for `callplane config`.
    pub fn redacted(&self) -> Value {
        let mask = |s: &SecretString| if s.expose_secret().is_empty() { "" } else { "********" };
        let shown_url = self.database_url_masked();
        json!({
            "server": { "addr": self.server.addr, "public_url": self.server.public_url,
                        "max_body_bytes": self.server.max_body_bytes, "log_format": self.server.log_format,
                        "metrics_token": mask(&self.server.metrics_token) },
            "database": { "url": shown_url, "max_connections": self.database.max_connections,
                          "answer_pool_connections": self.database.answer_pool_connections,
                          "direct_url": masked_url(self.database.direct_url.expose_secret()),
                          "replica_url": masked_url(self.database.replica_url.expose_secret()),
                          "replica_connections": self.database.replica_connections,
                          "replica_max_lag_ms": self.database.replica_max_lag_ms,
                          "replica_wait_ms": self.database.replica_wait_ms,
                          "replica_check_ms": self.database.replica_check_ms },
            "vapi": {
                "secret": mask(&self.vapi.secret),
                "extra_secrets": self.vapi.extra_secrets.iter().map(mask).collect::<Vec<_>>(),
                "allow_unauthenticated": self.vapi.allow_unauthenticated,
                "fallback_assistant_id": self.vapi.fallback_assistant_id,
                "max_call_seconds": self.vapi.max_call_seconds,
                "answer_deadline_ms": self.vapi.answer_deadline_ms,
                "api_key": mask(&self.vapi.api_key),
                "api_url": self.vapi.api_url,
                "api_timeout_seconds": self.vapi.api_timeout_seconds,
                "hmac": {
                    "secrets": self.vapi.hmac.secrets.iter().map(mask).collect::<Vec<_>>(),
                    "algorithm": self.vapi.hmac.algorithm,
                    "signature_header": self.vapi.hmac.signature_header,
                    "timestamp_header": self.vapi.hmac.timestamp_header,
                    "signature_prefix": self.vapi.hmac.signature_prefix,
                    "payload_format": self.vapi.hmac.payload_format,
                    "max_skew_seconds": self.vapi.hmac.max_skew_seconds,
                },
            },
            "auth": {
                "jwt_secret": mask(&self.auth.jwt_secret),
                "jwt_org_claim": self.auth.jwt_org_claim,
                "jwt_audience": self.auth.jwt_audience,
                "jwt_leeway_seconds": self.auth.jwt_leeway_seconds,
                "jwt_max_lifetime_seconds": self.auth.jwt_max_lifetime_seconds,
                "admin_token": mask(&self.auth.admin_token),
                "failure_limit": self.auth.failure_limit,
                "failure_window_seconds": self.auth.failure_window_seconds,
                "failure_table_entries": self.auth.failure_table_entries,
                "trust_forwarded_for": self.auth.trust_forwarded_for,
                "api_key_cache_seconds": self.auth.api_key_cache_seconds,
            },
            "api": { "max_function_data_bytes": self.api.max_function_data_bytes },
            "realtime": {
                "retention_hours": self.realtime.retention_hours,
                "heartbeat_seconds": self.realtime.heartbeat_seconds,
                "send_timeout_ms": self.realtime.send_timeout_ms,
                "queue": self.realtime.queue,
                "max_connections_per_org": self.realtime.max_connections_per_org,
                "max_connections_per_key": self.realtime.max_connections_per_key,
            },
            "billing": {
                "rounding_increment_seconds": self.billing.rounding_increment_seconds,
                "unbilled_ended_reasons": self.billing.unbilled_ended_reasons,
                "unbilled_ended_reason_prefixes": self.billing.unbilled_ended_reason_prefixes,
                "past_due_grace_hours": self.billing.past_due_grace_hours,
            },
            "plans": self.plans.iter().map(|(n, p)| (n.clone(), json!({
                "price_cents": p.price_cents, "included_minutes": p.included_minutes,
                "hard_limit": p.hard_limit, "overage_cents_per_minute": p.overage_cents_per_minute,
                "stripe_price_id": p.stripe_price_id, "stripe_overage_price_id": p.stripe_overage_price_id,
            }))).collect::<serde_json::Map<_, _>>(),
            "stripe": {
                "secret_key": mask(&self.stripe.secret_key),
                "api_base": self.stripe.api_base,
                "webhook_secrets": self.stripe.webhook_secrets.iter().map(mask).collect::<Vec<_>>(),
                "webhook_tolerance_seconds": self.stripe.webhook_tolerance_seconds,
                "currency": self.stripe.currency,
                "meter_event_name": self.stripe.meter_event_name,
                "checkout_success_url": self.stripe.checkout_success_url,
                "checkout_cancel_url": self.stripe.checkout_cancel_url,
                "portal_return_url": self.stripe.portal_return_url,
            },
            "partitions": {
                "months_ahead": self.partitions.months_ahead,
                "max_future_skew_hours": self.partitions.max_future_skew_hours,
                "max_past_days": self.partitions.max_past_days,
                "maintenance_interval_seconds": self.partitions.maintenance_interval_seconds,
                "archive_after_months": self.partitions.archive_after_months,
            },
            "reconcile": {
                "interval_seconds": self.reconcile.interval_seconds,
                "grace_seconds": self.reconcile.grace_seconds,
                "ceiling_hours": self.reconcile.ceiling_hours,
                "lookback_hours": self.reconcile.lookback_hours,
            },
            "inbox": {
                "dir": self.inbox.dir,
                "max_events": self.inbox.max_events,
                "max_megabytes": self.inbox.max_megabytes,
                "workers": self.inbox.workers,
                "inline_budget_ms": self.inbox.inline_budget_ms,
                "max_attempts": self.inbox.max_attempts,
                "max_backoff_seconds": self.inbox.max_backoff_seconds,
                "ready_max_age_seconds": self.inbox.ready_max_age_seconds,
            },
            "redis": { "url": self.redis_url_masked(),
                       "function_data_ttl_seconds": self.redis.function_data_ttl_seconds },
            "temporal": {
                "address": self.temporal.address,
                "namespace": self.temporal.namespace,
                "task_queue": self.temporal.task_queue,
                "worker": self.temporal.worker,
                "max_concurrent_activities": self.temporal.max_concurrent_activities,
                "answer_wait_ms": self.temporal.answer_wait_ms,
                "worker_metrics_addr": self.temporal.worker_metrics_addr,
            },
            "object_store": {
                "url": self.object_store.url,
                "endpoint": self.object_store.endpoint,
                "region": self.object_store.region,
                "access_key_id": if self.object_store.access_key_id.expose_secret().is_empty() { "" } else { "********" },
                "secret_access_key": if self.object_store.secret_access_key.expose_secret().is_empty() { "" } else { "********" },
                "timeout_seconds": self.object_store.timeout_seconds,
            },
            "backends": {
                "usage_counter": self.backends.usage_counter,
                "transcripts": self.backends.transcripts,
                "search": self.backends.search,
                "event_pipeline": self.backends.event_pipeline,
                "function_data": self.backends.function_data,
                "realtime": self.backends.realtime,
            },
            "advisor": self.advisor,
            "compiled_features": compiled_features(),
        })
    }
}

/// The phase features this binary was built with.
pub fn compiled_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "phase1") {
        f.push("phase1");
    }
    if cfg!(feature = "phase2") {
        f.push("phase2");
    }
    if cfg!(feature = "phase3") {
        f.push("phase3");
    }
    for (on, name) in [
        (cfg!(feature = "redis"), "redis"),
        (cfg!(feature = "temporal"), "temporal"),
        (cfg!(feature = "object-store"), "object-store"),
    ] {
        if on {
            f.push(name);
        }
    }
    f
}

/// A secret setting's value, unless it is left empty.
fn set(secret: &SecretString) -> Option<&str> {
    Some(secret.expose_secret()).filter(|v| !v.is_empty())
}

/// A database URL with the host and database visible and any password masked.
fn masked_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { format!("{user}:********") } else { user.to_owned() };
            format!("{}{masked}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings::defaults_with(&[]).expect("base.toml deserializes and validates")
    }

    /// Run by `cargo xtask test` under every phase feature combination.
    #[test]
    fn default_configuration_is_valid_in_this_feature_combination() {
        let settings = base();
        assert_eq!(settings.plans().len(), 3);
        assert_eq!(settings.plans()["starter"].included_minutes, 100);
    }

    #[test]
    fn a_backend_not_compiled_in_is_refused_by_name() {
        let err = Settings::defaults_with(&[("backends.usage_counter", "memcached")]).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("backends.usage_counter") && err.contains("memcached"), "{err}");
        assert!(err.contains("postgres"), "the choices are named: {err}");
    }

    #[test]
    fn a_redis_backend_needs_the_redis_feature_and_a_redis_url() {
        let chosen =
            Settings::defaults_with(&[("backends.usage_counter", "redis"), ("backends.function_data", "redis")]);
        if cfg!(feature = "redis") {
            let settings = chosen.expect("a redis build takes the redis backends");
            assert_eq!(settings.redis_backends(), ["backends.usage_counter", "backends.function_data"]);
            let err = Settings::defaults_with(&[("backends.usage_counter", "redis"), ("redis.url", "localhost:6379")])
                .unwrap_err();
            assert!(format!("{err:#}").contains("redis.url"), "{err:#}");
        } else {
            let err = format!("{:#}", chosen.unwrap_err());
            assert!(err.contains("backends.usage_counter, backends.function_data"), "{err}");
            assert!(err.contains("`redis` feature") && err.contains("--features phase2"), "{err}");
        }
    }

    #[test]
    fn the_object_store_backend_needs_its_feature_and_both_credentials() {
        let chosen = Settings::defaults_with(&[("backends.transcripts", "object-store")]);
        if cfg!(feature = "object-store") {
            chosen.expect("an object-store build takes the object-store backend on the default directory");
            let err = Settings::defaults_with(&[
                ("backends.transcripts", "object-store"),
                ("object_store.access_key_id", "only-the-id"),
            ])
            .unwrap_err();
            assert!(format!("{err:#}").contains("secret_access_key"), "{err:#}");
        } else {
            let err = format!("{:#}", chosen.unwrap_err());
            assert!(err.contains("`object-store` feature") && err.contains("--features phase3"), "{err}");
        }
    }

    #[test]
    fn a_replica_needs_a_build_that_routes_reads_to_it() {
        let mut settings = base();
        settings.database.replica_url = SecretString::from("postgres://app@replica:5432/callplane");
        let refused = settings.validate().err().map(|e| format!("{e:#}"));
        if cfg!(feature = "read-replica") {
            assert_eq!(refused, None);
            settings.database.replica_check_ms = 0;
            assert!(format!("{:#}", settings.validate().unwrap_err()).contains("database.replica_check_ms"));
        } else {
            assert!(refused.is_some_and(|e| e.contains("database.replica_url") && e.contains("phase3")));
        }
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let mut settings = base();
        settings.object_store.secret_access_key = SecretString::from("s3-secret-value");
        settings.object_store.access_key_id = SecretString::from("s3-key-id");
        settings.vapi.secret = SecretString::from("super-secret-value");
        settings.vapi.api_key = SecretString::from("vapi-private-key");
        settings.database.url = SecretString::from("postgres://app:hunter2@db:5432/callplane");
        settings.redis.url = SecretString::from("redis://:redis-pass@cache:6379/0");
        settings.database.direct_url = SecretString::from("postgres://app:direct-pass@primary:5432/callplane");
        settings.database.replica_url = SecretString::from("postgres://app:replica-pass@replica:5432/callplane");
        let printed = settings.redacted().to_string();
        assert!(!printed.contains("direct-pass") && !printed.contains("replica-pass"), "{printed}");
        assert!(printed.contains("postgres://app:********@replica:5432/callplane"), "{printed}");
        assert!(!printed.contains("redis-pass") && printed.contains("redis://********@cache:6379/0"), "{printed}");
        assert!(!printed.contains("super-secret-value") && !printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("s3-secret-value") && !printed.contains("s3-key-id"), "{printed}");
        assert!(!printed.contains("vapi-private-key"), "{printed}");
        assert!(printed.contains("postgres://app:********@db:5432/callplane"), "{printed}");
    }

    #[test]
    fn auth_limits_that_would_disable_the_protection_are_refused_by_key_and_the_metrics_token_is_masked() {
        let mut settings = base();
        settings.auth.failure_limit = 0;
        settings.auth.failure_window_seconds = 0;
        settings.auth.api_key_cache_seconds = 3600;
        settings.auth.jwt_max_lifetime_seconds = 0;
        let err = settings.validate().unwrap_err().to_string();
        for key in [
            "auth.failure_limit",
            "auth.failure_window_seconds",
            "auth.api_key_cache_seconds",
            "auth.jwt_max_lifetime_seconds",
        ] {
            assert!(err.contains(key), "{key}: {err}");
        }
        settings.server.metrics_token = SecretString::from("scrape-token-value");
        assert!(!settings.redacted().to_string().contains("scrape-token-value"));
    }

    fn known() -> BTreeSet<String> {
        known_keys().unwrap()
    }

    /// A fresh directory under the system's temporary directory holding `files`.
    fn config_dir(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("callplane-config-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_misspelt_variable_is_refused_with_the_variable_it_meant() {
        let names = ["CALLPLANE__DATABSE__URL", "CALLPLANE__DATABASE__URL", "CALLPLANE_ENV", "PATH", "DATABASE_URL"];
        let unknown = unknown_variables(&known(), names.iter().map(|n| n.to_string()));
        assert_eq!(
            unknown,
            ["CALLPLANE__DATABSE__URL: there is no key `databse.url`; did you mean CALLPLANE__DATABASE__URL?"]
        );
        let far = unknown_variables(&known(), std::iter::once("CALLPLANE__COLOUR".to_owned()));
        assert_eq!(far, ["CALLPLANE__COLOUR: there is no key `colour`"]);
    }

    /// What the xtask, the test suites, the load generator and the README set must stay keys.
    #[test]
    fn every_variable_the_tools_and_the_readme_use_is_a_key() {
        let readme = include_str!("../../../README.md");
        let mut names: Vec<String> = readme
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| {
                word.starts_with("CALLPLANE__") && !word.ends_with('_') && *word != "CALLPLANE__SECTION__KEY"
            })
            .map(str::to_owned)
            .collect();
        assert!(names.len() >= 10, "the README names its variables: {names:?}");
        names.extend(
            [
                "DATABASE__URL",
                "SERVER__ADDR",
                "SERVER__PUBLIC_URL",
                "VAPI__SECRET",
                "VAPI__HMAC__SECRETS",
                "VAPI__API_KEY",
                "VAPI__API_URL",
                "AUTH__ADMIN_TOKEN",
                "INBOX__DIR",
                "STRIPE__API_BASE",
            ]
            .map(|key| format!("CALLPLANE__{key}")),
        );
        assert_eq!(unknown_variables(&known(), names.into_iter()), Vec::<String>::new());
    }

    #[test]
    fn plans_are_named_freely_but_their_keys_are_checked() {
        let names = ["CALLPLANE__PLANS__ENTERPRISE__PRICE_CENTS", "CALLPLANE__PLANS__PRO__PRICE_CENT"];
        let unknown = unknown_variables(&known(), names.iter().map(|n| n.to_string()));
        assert_eq!(
            unknown,
            ["CALLPLANE__PLANS__PRO__PRICE_CENT: there is no key `plans.pro.price_cent`; \
              did you mean CALLPLANE__PLANS__PRO__PRICE_CENTS?"]
        );
    }

    #[test]
    fn an_environment_file_that_is_named_must_exist() {
        let dir = config_dir(&[("base.toml", ""), ("production.toml", ""), ("test.toml", "")]);
        let dir_name = dir.to_string_lossy().into_owned();
        let err = env_file(Some("prod".into()), Some(dir_name.clone())).unwrap_err().to_string();
        assert!(err.starts_with("CALLPLANE_ENV=prod: ") && err.contains("prod.toml does not exist"), "{err}");
        assert!(err.ends_with(&format!("environments in {dir_name}: production, test)")), "{err}");
        assert_eq!(env_file(Some("test".into()), Some(dir_name.clone())).unwrap(), Some(dir.join("test.toml")));
        // `local`, the default, is optional unless a directory was named.
        assert!(env_file(None, Some(dir_name)).is_err());
        assert_eq!(env_file(None, None).unwrap(), None, "crates/server has no config/local.toml");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_the_environment_file_misspells_is_refused() {
        let dir = config_dir(&[("prod.toml", "[server]\nlog_format = \"json\"\n[databse]\nurl = \"x\"\n")]);
        let path = dir.join("prod.toml");
        let unknown = unknown_file_keys(&known(), &path).unwrap();
        assert_eq!(
            unknown,
            [format!("{}: there is no key `databse.url`; did you mean `database.url`?", path.display())]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_repository_environment_files_hold_only_keys() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config");
        for env in ["local", "test", "production"] {
            let path = dir.join(format!("{env}.toml"));
            assert_eq!(unknown_file_keys(&known(), &path).unwrap(), Vec::<String>::new());
        }
    }

    #[test]
    fn an_override_that_is_not_a_key_is_refused() {
        let err = Settings::defaults_with(&[("vapi.secrets", "x")]).unwrap_err().to_string();
        assert!(err.starts_with("vapi.secrets: there is no such configuration key"), "{err}");
        assert!(Settings::defaults_with(&[("plans.pro.stripe_price_id", "price_1")]).is_ok());
    }
}
