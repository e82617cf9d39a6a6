//! The seams: one narrow trait per capability, organization id first. Each phase plugs a
//! backend in behind these; `api` and the pipeline only ever see `Arc<dyn Trait>`.

use crate::ErrorCode;
use crate::domain::{CallRecord, OrgId, Organization};
use crate::vapi::ServerMessage;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A backend failure. Driver errors are kept as the source, never stringified.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{backend} backend failed")]
    Backend {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend could not be reached or did not answer in time (connection refused or
    /// lost, a pool or statement timeout, a lock wait given up). Trying again later can
    /// succeed; nothing about the request itself is wrong.
    #[error("{backend} backend unavailable")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request itself is wrong (the caller's fault): refused with this code; no retry
    /// helps, and nothing about the system is broken.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The system's own state is wrong (a poisoned lock, a value in the database this build
    /// does not know): not the caller's fault.
    #[error("{0}")]
    Internal(String),
}

impl BillingError {
    /// The provider's error, kept whole as the source.
    pub fn provider(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BillingError::Provider { message: e.to_string(), source: Some(Box::new(e)) }
    }
}

impl StoreError {
    pub fn backend(backend: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend { backend, source: Box::new(e) }
    }

    pub fn unavailable(backend: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Unavailable { backend, source: Box::new(e) }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Organizations and the registries that map VAPI ids to them. Postgres in every phase.
#[async_trait]
pub trait OrgDirectory: Send + Sync {
    async fn get(&self, org: OrgId) -> StoreResult<Option<Organization>>;
    /// The organization that registered this VAPI phone-number id.
    async fn by_phone_number(&self, vapi_phone_number_id: &str) -> StoreResult<Option<OrgId>>;
    /// The organization that registered this VAPI assistant id.
    async fn by_assistant(&self, vapi_assistant_id: &str) -> StoreResult<Option<OrgId>>;
    /// The organization a VAPI call id is registered to, once seen.
    async fn by_call(&self, vapi_call_id: &str) -> StoreResult<Option<OrgId>>;
    /// The organization an unrevoked API key belongs to (recording its use).
    async fn by_api_key(&self, secret: &str) -> StoreResult<Option<OrgId>>;
}

/// What the agent's answers are read from (`assistant-request`, `tool-calls`): the
/// organization directory and function data, kept in memory so an answer never waits on a
/// database in trouble. Reads are current when the database answers in time and the last
/// known state otherwise.
#[async_trait]
pub trait AgentDirectory: OrgDirectory {
    /// The organization's function data.
    async fn function_data(&self, org: OrgId) -> StoreResult<std::sync::Arc<Map<String, Value>>>;
    /// Forgets what is known of an organization: it changed here, read it again.
    fn invalidate(&self, org: OrgId);
    /// Forgets what is known of every organization.
    fn invalidate_all(&self);
}

/// What adding a call to a counter did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    /// The period's total before the add; `None` when the counter had no total for the period
    /// and rebuilt it from the ledger on the way (the total may then have passed thresholds
    /// without any add seeing it).
    pub before: Option<i64>,
    /// The period's total after it.
    pub after: i64,
    /// False when the call had been counted before: nothing changed.
    pub new: bool,
}

/// A ledger row whose counter add is not known to be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UncountedCall {
    pub org: OrgId,
    pub call_id: String,
    pub period_start: DateTime<Utc>,
    pub seconds: i64,
    /// The organization's plan, for the usage alerts.
    pub plan: String,
}

/// The usage ledger as counters see it: one row per billed call, the truth every counter is
/// checked against and rebuilt from; and the usage alerts, recorded once per period.
#[async_trait]
pub trait UsageLedger: Send + Sync {
    /// The calls of an organization's period with their billable seconds.
    async fn calls_in_period(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>>;
    /// The period's total billable seconds.
    async fn total(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64>;
    /// Marks calls as counted: their counter add is done.
    async fn mark_counted(&self, org: OrgId, call_ids: &[String]) -> StoreResult<()>;
    /// Ledger rows written more than `older_than` ago and not yet counted, oldest first.
    async fn uncounted(&self, older_than: std::time::Duration, limit: i64) -> StoreResult<Vec<UncountedCall>>;
    /// Records a usage alert unless the period has it already; true when recorded now.
    async fn record_alert(&self, org: OrgId, alert: &crate::domain::UsageAlert) -> StoreResult<bool>;
}

/// Billed seconds per organization and billing period: a total kept apart from the ledger
/// so it can be read (admission, the dashboard) without summing. Rules every backend keeps:
/// a call is added after its ledger row commits, once (a second add of it changes nothing);
/// a period starts from zero; a counter with no total for a period (new, flushed, evicted)
/// rebuilds it from the ledger before use. Alerts and admission live in
/// [`crate::metering::Metering`], on top of any backend.
#[async_trait]
pub trait UsageCounter: Send + Sync {
    fn backend(&self) -> &'static str;
    /// Adds a call's billable seconds to its organization's period once, and marks its
    /// ledger row counted.
    async fn add_call(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
        call_id: &str,
        seconds: i64,
    ) -> StoreResult<Counted>;
    /// The period's total.
    async fn used(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64>;
    /// Sets the period's total from the ledger, safely against concurrent adds (none is lost
    /// or counted twice). Returns the total.
    async fn rebuild(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64>;
}

/// A call's transcript and conversation messages.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub text: Option<String>,
    pub messages: Vec<Value>,
    /// From the end-of-call report. A final transcript is never replaced by a live one, and
    /// a live one only by one with at least as many messages, so any arrival order of a
    /// call's events leaves the same transcript.
    pub is_final: bool,
}

#[async_trait]
pub trait TranscriptStore: Send + Sync {
    fn backend(&self) -> &'static str;
    /// True when the store keeps transcripts in the database that holds the calls (Postgres):
    /// the pipeline then writes a call's transcript in the transaction that changes the call,
    /// one commit per event. Other backends are written to with `put` after that commit.
    fn stores_in_transaction(&self) -> bool {
        false
    }
    /// Stores (replaces) the transcript of a call created at `call_created_at`.
    async fn put(&self, org: OrgId, call_id: &str, call_created_at: DateTime<Utc>, t: &Transcript) -> StoreResult<()>;
    async fn get(&self, org: OrgId, call_id: &str) -> StoreResult<Option<Transcript>>;
}

/// The data an organization's agent uses during calls: preloaded into the call at
/// `assistant-request`, and what `tool-calls` are answered from.
#[async_trait]
pub trait FunctionData: Send + Sync {
    fn backend(&self) -> &'static str;
    async fn preload(&self, org: OrgId) -> StoreResult<Map<String, Value>>;
    async fn get(&self, org: OrgId, key: &str) -> StoreResult<Option<Value>>;
    async fn put(&self, org: OrgId, key: &str, value: &Value) -> StoreResult<()>;
    /// Returns whether the key existed.
    async fn delete(&self, org: OrgId, key: &str) -> StoreResult<bool>;
}

/// What the dashboard is told about an organization's calls and usage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RealtimeEvent {
    pub org_id: OrgId,
    /// `call.created`, `call.status`, `call.transcript`, `call.ended`, `usage.changed`.
    pub kind: String,
    pub call_id: Option<String>,
    pub data: Value,
}

/// An event as published: numbered in its organization's sequence, so a client that
/// reconnects with the last number it saw can be sent exactly what it missed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PublishedEvent {
    pub org_id: OrgId,
    pub seq: i64,
    pub kind: String,
    pub call_id: Option<String>,
    pub data: Value,
    pub at: DateTime<Utc>,
}

/// What a live subscription yields.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    Event(std::sync::Arc<PublishedEvent>),
    /// The subscriber fell behind and events were dropped for it; it must resume from the
    /// last sequence it saw (the history has them).
    Lagged,
}

#[async_trait]
pub trait RealtimeBus: Send + Sync {
    fn backend(&self) -> &'static str;
    /// True when the store queues a call's events inside the transaction that changes the call
    /// (Postgres's outbox): an event is published only once its change has committed, and
    /// every committed one is. Tell the bus with `queued` after such a commit. Other backends
    /// are published to after commit.
    fn queues_in_transaction(&self) -> bool;
    /// A transaction that queued events has committed: publish them now.
    fn queued(&self);
    /// Publishes events, in order, each in its organization's stream. Returns once they are
    /// kept; they are numbered and delivered right after.
    async fn publish(&self, events: &[RealtimeEvent]) -> StoreResult<()>;
    /// The organization's live events, and nobody else's, in sequence order.
    async fn subscribe(&self, org: OrgId) -> StoreResult<BoxStream<'static, Delivery>>;
    /// Stored events after `after_seq`, oldest first, at most `limit`.
    async fn history(&self, org: OrgId, after_seq: i64, limit: i64) -> StoreResult<Vec<PublishedEvent>>;
    /// Live subscriptions in this process.
    fn subscribers(&self) -> usize;
}

/// Which calls a dashboard asks for. Every read is bounded in time so the planner prunes
/// partitions.
#[derive(Clone, Debug, PartialEq)]
pub struct CallFilter {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub status: Option<String>,
    pub ended_reason: Option<String>,
    pub assistant_id: Option<String>,
    pub customer_number: Option<String>,
}

/// A position in the newest-first order of calls: `(created_at, id)` of the last call seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CallPage {
    pub calls: Vec<CallRecord>,
    /// Where the next page starts; `None` when there is none.
    pub next: Option<CallCursor>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DailyUsage {
    pub day: chrono::NaiveDate,
    pub calls: i64,
    /// The calls' durations.
    pub seconds: f64,
    pub billable_seconds: i64,
}

/// The dashboard's reads of calls and usage. Postgres (primary, later a replica).
#[async_trait]
pub trait CallReads: Send + Sync {
    async fn list_calls(
        &self,
        org: OrgId,
        filter: &CallFilter,
        after: Option<&CallCursor>,
        limit: i64,
    ) -> StoreResult<CallPage>;
    async fn get_call(&self, org: OrgId, call_id: &str) -> StoreResult<Option<CallRecord>>;
    /// The month (`YYYY-MM`) a call of the organization was archived with (phase 3's
    /// `callplane partitions archive`), when it was.
    async fn archived_month(&self, org: OrgId, call_id: &str) -> StoreResult<Option<String>> {
        let _ = (org, call_id);
        Ok(None)
    }
    /// Calls not yet ended, created since `since`.
    async fn live_calls(&self, org: OrgId, since: DateTime<Utc>) -> StoreResult<Vec<CallRecord>>;
    /// The organization's billing time zone and what day it is there; `None`: no such
    /// organization.
    async fn billing_day(&self, org: OrgId) -> StoreResult<Option<(String, chrono::NaiveDate)>>;
    /// Billed usage per day of the call's start in the organization's billing time zone, for
    /// `[from, to]`: the daily roll-up kept with the ledger.
    async fn daily_usage(
        &self,
        org: OrgId,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> StoreResult<Vec<DailyUsage>>;
    /// Calls in the ledger for a billing period.
    async fn period_calls(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64>;
    /// The usage alerts (80/90/100%) reached in a billing period.
    async fn usage_alerts(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<Vec<crate::domain::UsageAlert>>;
}

/// A verified VAPI message, attributed to an organization, ready for processing.
#[derive(Clone, Debug)]
pub struct InboundEvent {
    pub org_id: OrgId,
    pub received_at: DateTime<Utc>,
    pub message: ServerMessage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// The event changed stored state.
    Applied,
    /// A duplicate or stale event: nothing changed.
    NoChange,
    /// The message carries no call; it was acknowledged only.
    Ignored,
    /// Handed to a durable pipeline (a workflow) that processes it later: its effects are
    /// not committed yet, but the event can no longer be lost.
    Scheduled,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The event can never be processed as sent (e.g. a far-future `createdAt`). It was kept
    /// in the dead-letter table; the sender gets a 4xx.
    #[error("{message}")]
    Rejected { code: ErrorCode, message: String, dead_letter_id: i64 },
    /// Processing failed; the event was kept in the dead-letter table for replay.
    #[error("processing failed and the event was dead-lettered (id {dead_letter_id})")]
    DeadLettered {
        dead_letter_id: i64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A backend was unavailable (the database down, a timeout): nothing was changed or
    /// kept. Whoever holds the event keeps it and tries again later.
    #[error("processing is unavailable for now")]
    Unavailable(#[source] StoreError),
    /// Processing failed and even the dead-letter write failed.
    #[error("processing failed and the event could not be dead-lettered")]
    Lost(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Processes verified VAPI events: inline in phase 1, through durable workflows later.
#[async_trait]
pub trait EventPipeline: Send + Sync {
    fn backend(&self) -> &'static str;
    /// Applies the event. Idempotent on the call: applying an event again changes nothing.
    async fn submit(&self, event: InboundEvent) -> Result<Processed, PipelineError>;
    /// Keeps an authenticated message that could not be routed or parsed (unknown
    /// organization, a field VAPI sent in a shape we do not read yet) in the dead-letter
    /// table, so it can be replayed once the cause is fixed. `raw` is the body's exact bytes,
    /// when at hand (a webhook's; not a record callplane built). Returns its id.
    async fn keep_unprocessed(
        &self,
        org: Option<OrgId>,
        body: &Value,
        raw: Option<&[u8]>,
        code: &str,
        error: &str,
        received_at: DateTime<Utc>,
    ) -> StoreResult<i64>;
    /// Appends the pipeline's figures to `/metrics`, in Prometheus's text format.
    fn render_metrics(&self, _out: &mut String) {}
}

/// Operators' changes to organizations and their API keys (the admin surface and the CLI).
#[async_trait]
pub trait OrgAdmin: Send + Sync {
    async fn create(&self, new: &crate::domain::NewOrganization) -> StoreResult<Organization>;
    async fn list(&self, limit: i64) -> StoreResult<Vec<Organization>>;
    /// Returns false when there is no such organization.
    async fn set_plan(&self, org: OrgId, plan: &str) -> StoreResult<bool>;
    async fn set_status(&self, org: OrgId, status: crate::domain::OrgStatus) -> StoreResult<bool>;
    /// Sets the organization's billing time zone and recounts its daily usage in it.
    async fn set_billing_timezone(&self, org: OrgId, time_zone: &str) -> StoreResult<TimeZoneChange>;
    async fn create_api_key(&self, org: OrgId, name: &str) -> StoreResult<crate::domain::NewApiKey>;
    async fn api_keys(&self, org: OrgId) -> StoreResult<Vec<crate::domain::ApiKeyInfo>>;
    async fn revoke_api_key(&self, org: OrgId, key_id: uuid::Uuid) -> StoreResult<bool>;
}

/// A transcript matching a search.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    pub call_id: String,
    pub created_at: DateTime<Utc>,
    /// The match's rank (`ts_rank`): higher is better.
    pub rank: f32,
    /// Fragments of the transcript around the matches, each match between `\u{1}` and
    /// `\u{2}` (the API turns them into HTML).
    pub snippet: String,
}

/// Where a page of results continues: after this hit, in rank order.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchCursor {
    pub rank: f32,
    pub created_at: DateTime<Utc>,
    pub call_id: String,
}

/// A search of one organization's transcripts of calls created in `[from, to)`.
#[derive(Clone, Debug)]
pub struct SearchRequest {
    pub org: OrgId,
    /// `websearch_to_tsquery` syntax: words, `"a phrase"`, `or`, `-excluded`.
    pub query: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub limit: i64,
    pub after: Option<SearchCursor>,
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("transcript search is off on this server (backends.search = \"off\")")]
    Off,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Searching transcripts: `off`, or `postgres` (full-text search on `call_transcripts`).
/// Typesense comes in phase 3.
#[async_trait]
pub trait TranscriptSearch: Send + Sync {
    fn backend(&self) -> &'static str;
    /// The best matches first, at most `limit`.
    async fn search(&self, request: &SearchRequest) -> Result<Vec<SearchHit>, SearchError>;
}

/// Search switched off: every search is refused (and counted by the API).
pub struct SearchOff;

#[async_trait]
impl TranscriptSearch for SearchOff {
    fn backend(&self) -> &'static str {
        "off"
    }

    async fn search(&self, _request: &SearchRequest) -> Result<Vec<SearchHit>, SearchError> {
        Err(SearchError::Off)
    }
}

/// What became of setting a billing time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeZoneChange {
    Set,
    /// Not an IANA time zone the database knows.
    UnknownTimeZone,
    NoOrganization,
}

/// A change to an organization's subscription, as the billing provider reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionChange {
    pub org: OrgId,
    /// The plan, when the subscription's price maps to a configured plan.
    pub plan: Option<String>,
    pub status: crate::domain::OrgStatus,
    /// The billing period, when the event carries one.
    pub period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub customer_id: Option<String>,
    pub subscription_id: Option<String>,
    /// When the provider created the event; older events never roll an organization back.
    pub event_at: DateTime<Utc>,
}

/// What became of a billing event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingOutcome {
    Applied,
    /// Seen before (same event id): acknowledged, not applied again.
    Duplicate,
    /// Older than what the organization already reflects.
    Stale,
    /// A type callplane does not act on, or no organization matched.
    Ignored,
}

impl BillingOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingOutcome::Applied => "applied",
            BillingOutcome::Duplicate => "duplicate",
            BillingOutcome::Stale => "stale",
            BillingOutcome::Ignored => "ignored",
        }
    }
}

/// Billing state in Postgres: event deduplication and subscription changes.
#[async_trait]
pub trait BillingStore: Send + Sync {
    /// Records a provider event id; false when it was recorded before.
    async fn record_event(&self, id: &str, event_type: &str, created: DateTime<Utc>) -> StoreResult<bool>;
    async fn finish_event(&self, id: &str, org: Option<OrgId>, outcome: BillingOutcome) -> StoreResult<()>;
    /// Applies a subscription change unless the organization already reflects a newer event.
    async fn apply_subscription(&self, change: &SubscriptionChange) -> StoreResult<BillingOutcome>;
    /// The organization that owns a provider customer id.
    async fn org_by_customer(&self, customer_id: &str) -> StoreResult<Option<OrgId>>;
    async fn set_customer(&self, org: OrgId, customer_id: &str) -> StoreResult<()>;
    async fn customer_of(&self, org: OrgId) -> StoreResult<Option<String>>;
}

/// Why a billing webhook was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Receives the billing provider's webhooks: verifies, deduplicates and applies them.
#[async_trait]
pub trait BillingWebhooks: Send + Sync {
    /// `signature` is the provider's signature header; `body` the raw bytes.
    async fn receive(
        &self,
        signature: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<BillingOutcome, WebhookError>;
}

/// A hosted page the organization is sent to.
#[derive(Clone, Debug, PartialEq)]
pub struct BillingLink {
    pub url: String,
    pub customer_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing is not configured: {0}")]
    NotConfigured(String),
    /// The provider refused or failed; its own error is kept as the source.
    #[error("the billing provider refused the request: {message}")]
    Provider {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The billing provider's hosted pages: subscribe or change plan (checkout), manage the
/// subscription (portal).
#[async_trait]
pub trait BillingProvider: Send + Sync {
    fn backend(&self) -> &'static str;
    async fn checkout(&self, org: &Organization, plan: &str) -> Result<BillingLink, BillingError>;
    async fn portal(&self, org: &Organization) -> Result<BillingLink, BillingError>;
}

/// Phase 3: usage reported to the provider's meters (Stripe Billing Meter events) with
/// deterministic identifiers, so a resend is never counted twice, and a reconciliation of
/// our totals against the provider's. Phase 1 and 2 keep usage in Postgres only.
#[async_trait]
pub trait BillingSync: Send + Sync {
    fn backend(&self) -> &'static str;
    /// Reports `seconds` of usage for an organization's customer, identified by
    /// `identifier` (e.g. `org:period:hour`), idempotently.
    async fn report_usage(
        &self,
        customer_id: &str,
        identifier: &str,
        seconds: i64,
        at: DateTime<Utc>,
    ) -> Result<(), BillingError>;
}

/// An authenticated VAPI webhook as it arrived, before anything that can fail: what the
/// intake keeps until its effects have committed.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedWebhook {
    pub received_at: DateTime<Utc>,
    /// The organization segment of the URL (`/vapi/{org_id}`), as sent.
    pub path_org: Option<String>,
    /// The organization, when the receiver resolved it already.
    pub org: Option<OrgId>,
    /// The body, byte for byte (shared, not copied, between the request and the intake).
    pub body: bytes::Bytes,
    /// Set when the body can never be processed as sent (unparseable, no organization): it
    /// is to be kept as a dead letter with this code and reason.
    pub unprocessable: Option<Unprocessable>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unprocessable {
    pub code: String,
    pub reason: String,
}

/// What became of an accepted webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Processed at once; its effects are committed.
    Processed(Processed),
    /// Stored durably; it will be processed (or dead-lettered) later.
    Queued,
    /// Processing failed for a reason retrying will not fix; the event is kept as a dead
    /// letter in the database, to be replayed once the cause is mended.
    DeadLettered,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The event can never be processed as sent; it was kept as a dead letter (or is being
    /// kept) and the sender is told so.
    #[error("{message}")]
    Rejected { code: ErrorCode, message: String },
    /// No durable store could take the event (the inbox full or its disk failing, and the
    /// database unavailable): the sender should retry after a pause.
    #[error("cannot take the event now")]
    Overloaded {
        retry_after_seconds: u32,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// What the intake holds now, for metrics, `/readyz` and `callplane inbox status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IntakeStatus {
    pub backend: &'static str,
    /// Events stored and not yet processed.
    pub depth: u64,
    pub bytes: u64,
    /// Age in seconds of the oldest stored event.
    pub oldest_age_seconds: f64,
    /// Events processed (or dead-lettered) out of the store since this process started.
    pub drained_total: u64,
    /// Events acknowledged to VAPI that could be stored nowhere. Should read 0.
    pub lost_total: u64,
    /// Events refused with 503 because nothing could take them.
    pub shed_total: u64,
    /// Whether the store can take more.
    pub accepting: bool,
}

/// Takes every authenticated webhook that changes state and makes sure its effects happen:
/// stored durably outside the database first (a local inbox in phase 1, Temporal in phase
/// 2), processed at once when there is capacity, drained later otherwise.
#[async_trait]
pub trait EventIntake: Send + Sync {
    fn backend(&self) -> &'static str;
    /// Stores `webhook` durably, then processes it at once when capacity allows, waiting at
    /// most `budget` for the outcome (the processing goes on after that). `event` is the
    /// parsed message when the caller has it with its organization. `acknowledged` says the
    /// sender is answered 200 whatever this returns (an answer VAPI waits for): if the event
    /// can be stored nowhere, it is counted as lost.
    async fn accept(
        &self,
        webhook: ReceivedWebhook,
        event: Option<InboundEvent>,
        budget: std::time::Duration,
        acknowledged: bool,
    ) -> Result<Accepted, IntakeError>;
    fn status(&self) -> IntakeStatus;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_billing_providers_error_is_kept_whole_as_the_source() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "stripe: connection reset");
        let e = BillingError::provider(cause);
        assert_eq!(
            crate::error_chain(&e),
            "the billing provider refused the request: stripe: connection reset: stripe: connection reset"
        );
        assert!(std::error::Error::source(&e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()));
    }
}
