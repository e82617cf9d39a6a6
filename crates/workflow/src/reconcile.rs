//! Calls that never finish: reconciled against VAPI's own record of the call.
//!
//! VAPI does not retry a webhook, so a call whose end-of-call report was lost would stay short
//! of `ended` for ever: never billed, always "live". Once a call is well past the longest
//! allowed call (`stale_after`), the [`Reconciler`] asks VAPI's REST API (`GET /call/{id}`)
//! for it:
//! - VAPI reports it ended: an `end-of-call-report` is built from the Call object and
//!   submitted through the event pipeline, so the call is finished and billed by the same code
//!   as a delivered report, exactly once (the ledger is unique per call; a late real report,
//!   or a second run, changes nothing).
//! - VAPI does not know it (404), or still reports it open past a hard ceiling: the call is
//!   marked ended without billing, and why is recorded on it (`calls.reconcile_note`).
//! - VAPI reports it open under the ceiling, or cannot be asked (network, timeout, 5xx): it
//!   is left for the next sweep and counted.

use callplane_core::ErrorCode;
use callplane_core::OrgId;
use callplane_core::error_chain;
use callplane_core::seams::{
    EventPipeline, InboundEvent, PipelineError, Processed, RealtimeBus, RealtimeEvent, StoreError,
};
use callplane_core::vapi::{ParseError, RawTime, parse_message, span};
use callplane_storage::{PgStore, UnfinishedCall, UnfinishedFilter};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

type UrlParseError = <reqwest::Url as std::str::FromStr>::Err;

/// Why VAPI's API could not answer about a call.
#[derive(Debug, thiserror::Error)]
pub enum VapiError {
    #[error("vapi.api_key is empty: reconciling calls needs VAPI's private API key")]
    MissingKey,
    #[error("vapi.api_url {url:?} is not a URL")]
    UnparsableUrl {
        url: String,
        #[source]
        source: UrlParseError,
    },
    #[error("vapi.api_url {url:?} must be an http:// or https:// URL")]
    InvalidUrl { url: String },
    #[error("the HTTP client for VAPI could not be built")]
    Client(#[source] reqwest::Error),
    #[error("VAPI could not be reached or did not answer in time")]
    Request(#[source] reqwest::Error),
    #[error("VAPI refused the API key (HTTP {status}); check vapi.api_key")]
    Unauthorized { status: u16 },
    #[error("VAPI is rate limiting requests (HTTP 429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("VAPI answered HTTP {status}")]
    Status { status: u16 },
    #[error("VAPI's answer could not be read as JSON")]
    Body(#[source] reqwest::Error),
    #[error("VAPI's answer is not a Call object")]
    NotACall,
}

/// What VAPI knows about a call.
#[derive(Clone, Debug, PartialEq)]
pub enum CallLookup {
    /// VAPI's Call object, as sent.
    Found(Value),
    /// 404: VAPI has no such call.
    NotFound,
}

/// A client for VAPI's REST API about calls. The API key is sent as a bearer token, marked
/// sensitive, and never logged (`Debug` masks it).
#[derive(Clone, Debug)]
pub struct VapiCalls {
    http: reqwest::Client,
    base: reqwest::Url,
    api_key: SecretString,
}

impl VapiCalls {
    /// `api_url` is VAPI's API root (`https://api.vapi.ai`); every request gives up after
    /// `timeout`.
    pub fn new(api_url: &str, api_key: SecretString, timeout: Duration) -> Result<Self, VapiError> {
        if api_key.expose_secret().trim().is_empty() {
            return Err(VapiError::MissingKey);
        }
        let base = reqwest::Url::parse(api_url)
            .map_err(|source| VapiError::UnparsableUrl { url: api_url.to_owned(), source })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(VapiError::InvalidUrl { url: api_url.to_owned() });
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("callplane/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(VapiError::Client)?;
        Ok(Self { http, base, api_key })
    }

    fn call_url(&self, call_id: &str) -> Result<reqwest::Url, VapiError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| VapiError::InvalidUrl { url: self.base.to_string() })?
            .pop_if_empty()
            .push("call")
            .push(call_id);
        Ok(url)
    }

    /// `GET /call/{id}`: VAPI's record of a call.
    pub async fn get_call(&self, call_id: &str) -> Result<CallLookup, VapiError> {
        let response = self
            .http
            .get(self.call_url(call_id)?)
            .bearer_auth(self.api_key.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(VapiError::Request)?;
        match response.status() {
            s if s.is_success() => match response.json::<Value>().await.map_err(VapiError::Body)? {
                call @ Value::Object(_) => Ok(CallLookup::Found(call)),
                _ => Err(VapiError::NotACall),
            },
            StatusCode::NOT_FOUND => Ok(CallLookup::NotFound),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                Err(VapiError::Unauthorized { status: s.as_u16() })
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Err(VapiError::RateLimited { retry_after })
            }
            s => Err(VapiError::Status { status: s.as_u16() }),
        }
    }
}

/// How the reconciler judges calls.
#[derive(Clone, Debug)]
pub struct ReconcileSettings {
    /// A call is asked about once it was created this long ago: well past the longest allowed
    /// call (`vapi.max_call_seconds` plus a grace for VAPI's post-processing).
    pub stale_after: chrono::Duration,
    /// A call VAPI still reports open this long after its creation is marked ended.
    pub ceiling: chrono::Duration,
    /// How far back the periodic sweep looks; older calls need `reconcile calls --since`.
    pub sweep_lookback: chrono::Duration,
    /// Calls read per query.
    pub page_size: i64,
    /// How often one call is asked again after a 429 before the run stops.
    pub rate_limit_retries: u32,
}

impl ReconcileSettings {
    /// The defaults around `stale_after`: a 24 h ceiling and a week of lookback.
    pub fn new(stale_after: chrono::Duration) -> Self {
        Self {
            stale_after,
            ceiling: chrono::Duration::hours(24),
            sweep_lookback: chrono::Duration::days(7),
            page_size: 200,
            rate_limit_retries: 3,
        }
    }
}

/// Which calls a run looks at: created in `[since, until)`, never later than `stale_after`
/// before the run, of one organization or of all.
#[derive(Clone, Debug)]
pub struct ReconcileScope {
    pub org: Option<OrgId>,
    pub since: DateTime<Utc>,
    pub until: Option<DateTime<Utc>>,
}

impl ReconcileScope {
    /// Every organization's calls since `since`.
    pub fn since(since: DateTime<Utc>) -> Self {
        Self { org: None, since, until: None }
    }
}

/// What a run did, in counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Calls looked at.
    pub examined: usize,
    /// Finished from VAPI's record (billed through the pipeline), or by their own report
    /// while the run looked at them.
    pub finished: usize,
    /// Moved to ended without billing: VAPI does not know them, or they stayed open past
    /// the ceiling, or VAPI's record could not be applied (kept as a dead letter).
    pub marked: usize,
    /// VAPI still reports them in progress; left for the next run.
    pub still_open: usize,
    /// Calls waiting for review (ended connected, duration unknown) that VAPI's record
    /// could not settle either; left for the next run and for operators.
    pub left_for_review: usize,
    /// VAPI or the database could not be asked; left for the next run.
    pub failed: usize,
    /// Why the run stopped before the end (VAPI refused the key, or kept rate limiting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// What became of one call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CallOutcome {
    Finished,
    Marked { note: String },
    StillOpen { vapi_status: Option<String> },
    LeftForReview { why: String },
    Failed { error: String },
}

/// One call's outcome, given to the progress callback with the run's totals so far.
#[derive(Clone, Copy, Debug)]
pub struct CallReconciled<'a> {
    pub call: &'a UnfinishedCall,
    pub outcome: &'a CallOutcome,
    pub report: &'a ReconcileReport,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("listing the unfinished calls failed")]
    List(#[source] StoreError),
}

/// Why one call could not be reconciled this time.
#[derive(Debug, thiserror::Error)]
enum CallFailure {
    #[error(transparent)]
    Vapi(#[from] VapiError),
    #[error("the pipeline could not apply VAPI's record of the call")]
    Pipeline(#[source] PipelineError),
    #[error("the pipeline ignored VAPI's record of the call")]
    Ignored,
    #[error("recording the outcome failed")]
    Store(#[source] StoreError),
}

impl CallFailure {
    /// Failures every later call of the run would hit too.
    fn stops_run(&self) -> bool {
        matches!(self, CallFailure::Vapi(VapiError::Unauthorized { .. } | VapiError::RateLimited { .. }))
    }
}

/// Why a call is marked ended without billing; the note recorded on it.
enum MarkReason {
    UnknownToVapi,
    OpenPastCeiling { vapi_status: Option<String>, hours: i64 },
    RecordRefused { code: ErrorCode, dead_letter_id: i64 },
    RecordUnreadable { code: ErrorCode, dead_letter_id: i64 },
}

impl MarkReason {
    fn note(&self) -> String {
        match self {
            MarkReason::UnknownToVapi => "not-found-at-vapi: VAPI has no record of this call (HTTP 404)".to_owned(),
            MarkReason::OpenPastCeiling { vapi_status, hours } => format!(
                "open-past-ceiling: VAPI still reported the call {} {hours}h after it was created",
                vapi_status.as_deref().unwrap_or("without a status")
            ),
            MarkReason::RecordRefused { code, dead_letter_id } => format!(
                "record-refused: VAPI ended the call but its record was refused ({code}); \
                 dead letter {dead_letter_id} keeps it for replay"
            ),
            MarkReason::RecordUnreadable { code, dead_letter_id } => format!(
                "record-unreadable: VAPI ended the call but its record could not be read ({code}); \
                 dead letter {dead_letter_id} keeps it for replay"
            ),
        }
    }
}

const REVIEWED_NOTE: &str = "duration-from-vapi: the report gave no duration; billed from VAPI's call record";

const FINISHED_NOTE: &str = "finished-from-vapi: the end-of-call report never arrived; billed from VAPI's call record";

/// The statuses of a call VAPI has not finished (SPEC §3.1).
const OPEN_STATUSES: [&str; 5] = ["scheduled", "queued", "ringing", "in-progress", "forwarding"];

/// Longest wait after a 429 before asking again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Finds calls short of `ended` and settles each against VAPI's record.
pub struct Reconciler {
    store: PgStore,
    vapi: VapiCalls,
    pipeline: Arc<dyn EventPipeline>,
    bus: Arc<dyn RealtimeBus>,
    settings: ReconcileSettings,
}

impl Reconciler {
    pub fn new(
        store: PgStore,
        vapi: VapiCalls,
        pipeline: Arc<dyn EventPipeline>,
        bus: Arc<dyn RealtimeBus>,
        settings: ReconcileSettings,
    ) -> Self {
        Self { store, vapi, pipeline, bus, settings }
    }

    pub fn settings(&self) -> &ReconcileSettings {
        &self.settings
    }

    /// Reconciles the calls in `scope` created before `now - stale_after`, oldest first,
    /// calling `progress` after each.
    pub async fn run(
        &self,
        scope: &ReconcileScope,
        now: DateTime<Utc>,
        mut progress: impl FnMut(&CallReconciled<'_>),
    ) -> Result<ReconcileReport, ReconcileError> {
        let stale_before = now - self.settings.stale_after;
        let mut filter = UnfinishedFilter {
            org: scope.org,
            created_from: scope.since,
            created_before: scope.until.map_or(stale_before, |u| u.min(stale_before)),
            after: None,
            limit: self.settings.page_size.max(1),
        };
        let mut report = ReconcileReport::default();
        if filter.created_from >= filter.created_before {
            return Ok(report);
        }
        // First the calls short of `ended`, then the ended ones waiting for review.
        for review in [false, true] {
            filter.after = None;
            loop {
                let page = if review {
                    self.store.calls_for_review(&filter).await
                } else {
                    self.store.unfinished_calls(&filter).await
                }
                .map_err(ReconcileError::List)?;
                for call in &page {
                    let result =
                        if review { self.review_call(call).await } else { self.reconcile_call(call, now).await };
                    let (outcome, stop) = match result {
                        Ok(outcome) => (outcome, None),
                        Err(failure) => {
                            warn!(org_id = %call.organization_id, call_id = %call.id, error = ?failure,
                                  "could not reconcile call; left for the next run");
                            let error = error_chain(&failure);
                            let stop = failure.stops_run().then(|| error.clone());
                            (CallOutcome::Failed { error }, stop)
                        }
                    };
                    report.count(&outcome);
                    progress(&CallReconciled { call, outcome: &outcome, report: &report });
                    if stop.is_some() {
                        report.stopped = stop;
                        return Ok(report);
                    }
                }
                match page.last() {
                    Some(last) if page.len() as i64 >= filter.limit => {
                        filter.after = Some((last.created_at, last.id.clone()));
                    }
                    _ => break,
                }
            }
        }
        Ok(report)
    }

    /// A call that ended connected without a known duration: billed from VAPI's record when
    /// that has one (through the pipeline, exactly once: the ledger row is written now),
    /// else left for review.
    async fn review_call(&self, call: &UnfinishedCall) -> Result<CallOutcome, CallFailure> {
        let record = match self.ask_vapi(&call.id).await? {
            CallLookup::Found(record) if has_ended(&record) => record,
            CallLookup::Found(record) => {
                let status = record.get("status").and_then(Value::as_str).unwrap_or("no status");
                return Ok(CallOutcome::LeftForReview { why: format!("VAPI reports the call {status}") });
            }
            CallLookup::NotFound => {
                return Ok(CallOutcome::LeftForReview { why: "VAPI has no record of the call (HTTP 404)".into() });
            }
        };
        let org = call.organization_id;
        let received_at = Utc::now();
        let message = end_of_call_report(&call.id, &record, received_at);
        let parsed = match parse_message(message) {
            Ok(parsed) => parsed,
            Err(e) => return Ok(CallOutcome::LeftForReview { why: format!("VAPI's record is unreadable: {e}") }),
        };
        let event = InboundEvent { org_id: org, received_at, message: parsed };
        if let Err(e) = self.pipeline.submit(event).await {
            return match e {
                PipelineError::Rejected { code, message, .. } => {
                    Ok(CallOutcome::LeftForReview { why: format!("VAPI's record was refused ({code}): {message}") })
                }
                e => Err(CallFailure::Pipeline(e)),
            };
        }
        match self.store.review_reason(org, &call.id, call.created_at).await.map_err(CallFailure::Store)? {
            Some(_) => Ok(CallOutcome::LeftForReview { why: "VAPI's record has no duration either".into() }),
            None => {
                if let Err(e) = self.store.note_call_reconciled(org, &call.id, call.created_at, REVIEWED_NOTE).await {
                    warn!(org_id = %org, call_id = %call.id, error = ?e, "could not note the reconciliation");
                }
                info!(org_id = %org, call_id = %call.id, "call of unknown duration billed from VAPI's record");
                Ok(CallOutcome::Finished)
            }
        }
    }

    async fn reconcile_call(&self, call: &UnfinishedCall, now: DateTime<Utc>) -> Result<CallOutcome, CallFailure> {
        let record = match self.ask_vapi(&call.id).await? {
            CallLookup::NotFound => return self.mark(call, MarkReason::UnknownToVapi).await,
            CallLookup::Found(record) => record,
        };
        let vapi_status = record.get("status").and_then(Value::as_str).map(str::to_owned);
        if vapi_status.as_deref() == Some("not-found") {
            return self.mark(call, MarkReason::UnknownToVapi).await;
        }
        if has_ended(&record) {
            return self.finish(call, &record).await;
        }
        let age = now - call.created_at;
        if age >= self.settings.ceiling.max(self.settings.stale_after) {
            return self.mark(call, MarkReason::OpenPastCeiling { vapi_status, hours: age.num_hours() }).await;
        }
        debug!(org_id = %call.organization_id, call_id = %call.id, vapi_status = ?vapi_status,
               "VAPI still reports the call open; left for the next run");
        Ok(CallOutcome::StillOpen { vapi_status })
    }

    /// Asks VAPI, waiting as it says (or backing off) when it rate limits.
    async fn ask_vapi(&self, call_id: &str) -> Result<CallLookup, VapiError> {
        let mut attempt = 0;
        loop {
            match self.vapi.get_call(call_id).await {
                Err(VapiError::RateLimited { retry_after }) if attempt < self.settings.rate_limit_retries => {
                    attempt += 1;
                    let wait = retry_after.unwrap_or(Duration::from_secs(1 << attempt)).min(MAX_BACKOFF);
                    debug!(call_id, wait_ms = wait.as_millis() as u64, "VAPI rate limited; waiting");
                    tokio::time::sleep(wait).await;
                }
                answer => return answer,
            }
        }
    }

    /// Submits VAPI's record as the end-of-call report that never arrived.
    async fn finish(&self, call: &UnfinishedCall, record: &Value) -> Result<CallOutcome, CallFailure> {
        let org = call.organization_id;
        let received_at = Utc::now();
        let message = end_of_call_report(&call.id, record, received_at);
        let parsed = match parse_message(message.clone()) {
            Ok(parsed) => parsed,
            Err(e) => return self.keep_unreadable(call, &message, &e, received_at).await,
        };
        let event = InboundEvent { org_id: org, received_at, message: parsed };
        match self.pipeline.submit(event).await {
            Ok(Processed::Applied) => {
                if let Err(e) = self.store.note_call_reconciled(org, &call.id, call.created_at, FINISHED_NOTE).await {
                    // The call is finished and billed; only the note is missing.
                    warn!(org_id = %org, call_id = %call.id, error = ?e, "could not note the reconciliation");
                }
                info!(org_id = %org, call_id = %call.id, "unfinished call finished from VAPI's record");
                Ok(CallOutcome::Finished)
            }
            // Its own report was applied meanwhile; or the report is in a workflow now, which
            // finishes the call (the next sweep sees it finished, or submits it again, which
            // changes nothing).
            Ok(Processed::NoChange | Processed::Scheduled) => Ok(CallOutcome::Finished),
            Ok(Processed::Ignored) => Err(CallFailure::Ignored),
            // The pipeline kept the report as a dead letter; asking VAPI again would only add
            // more. The call stops being live; replaying the dead letter still bills it.
            Err(PipelineError::Rejected { code, dead_letter_id, .. }) => {
                self.mark(call, MarkReason::RecordRefused { code, dead_letter_id }).await
            }
            Err(e) => Err(CallFailure::Pipeline(e)),
        }
    }

    /// VAPI sent a field in a shape callplane does not read: the report is kept for replay
    /// once the parser is fixed, and the call stops being live.
    async fn keep_unreadable(
        &self,
        call: &UnfinishedCall,
        message: &Value,
        error: &ParseError,
        received_at: DateTime<Utc>,
    ) -> Result<CallOutcome, CallFailure> {
        let body = json!({ "message": message });
        let dead_letter_id = self
            .pipeline
            .keep_unprocessed(
                Some(call.organization_id),
                &body,
                None,
                error.code().as_str(),
                &error.to_string(),
                received_at,
            )
            .await
            .map_err(CallFailure::Store)?;
        self.mark(call, MarkReason::RecordUnreadable { code: error.code(), dead_letter_id }).await
    }

    async fn mark(&self, call: &UnfinishedCall, reason: MarkReason) -> Result<CallOutcome, CallFailure> {
        let org = call.organization_id;
        let note = reason.note();
        let marked =
            self.store.mark_call_unfinished(org, &call.id, call.created_at, &note).await.map_err(CallFailure::Store)?;
        if !marked {
            // Its own report ended it meanwhile.
            return Ok(CallOutcome::Finished);
        }
        info!(org_id = %org, call_id = %call.id, note = %note, "unfinished call marked ended without billing");
        let event = RealtimeEvent {
            org_id: org,
            kind: "call.status".to_owned(),
            call_id: Some(call.id.clone()),
            data: json!({ "status": "ended", "reconciled": true }),
        };
        // Best effort, like every publish after commit: the dashboard can always re-read.
        if let Err(e) = self.bus.publish(std::slice::from_ref(&event)).await {
            warn!(org_id = %org, call_id = %call.id, error = %e, "realtime publish failed");
        }
        Ok(CallOutcome::Marked { note })
    }
}

impl ReconcileReport {
    fn count(&mut self, outcome: &CallOutcome) {
        self.examined += 1;
        match outcome {
            CallOutcome::Finished => self.finished += 1,
            CallOutcome::Marked { .. } => self.marked += 1,
            CallOutcome::StillOpen { .. } => self.still_open += 1,
            CallOutcome::LeftForReview { .. } => self.left_for_review += 1,
            CallOutcome::Failed { .. } => self.failed += 1,
        }
    }
}

/// The advisory lock that lets one process sweep at a time.
pub const SWEEP_LOCK: &str = "callplane_reconcile_sweep";

/// Reconciles every organization's stale calls (within the sweep lookback) every `interval`,
/// starting now, logging what each run did. With several processes, one sweeps at a time
/// (the others skip a tick while it does).
pub fn spawn_sweeper(reconciler: Arc<Reconciler>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Utc::now();
            let scope = ReconcileScope::since(now - reconciler.settings.sweep_lookback);
            let run = reconciler.store.exclusively(SWEEP_LOCK, reconciler.run(&scope, now, |_| {})).await;
            let result = match run {
                Ok(Some(result)) => result,
                Ok(None) => {
                    debug!("another process is sweeping unfinished calls");
                    continue;
                }
                Err(e) => {
                    warn!(error = ?e, "could not take the sweep's lock; will retry");
                    continue;
                }
            };
            match result {
                Ok(r) if r.examined == 0 => debug!("no unfinished calls to reconcile"),
                Ok(r) if r.failed > 0 || r.stopped.is_some() => warn!(
                    examined = r.examined,
                    finished = r.finished,
                    marked = r.marked,
                    still_open = r.still_open,
                    left_for_review = r.left_for_review,
                    failed = r.failed,
                    stopped = r.stopped.as_deref().unwrap_or(""),
                    "unfinished calls reconciled; some could not be and are left for the next run"
                ),
                Ok(r) => info!(
                    examined = r.examined,
                    finished = r.finished,
                    marked = r.marked,
                    still_open = r.still_open,
                    left_for_review = r.left_for_review,
                    "unfinished calls reconciled"
                ),
                Err(e) => warn!(error = ?e, "reconciling unfinished calls failed; will retry"),
            }
        }
    })
}

/// Whether VAPI's Call object says the call is over.
fn has_ended(record: &Value) -> bool {
    match record.get("status").and_then(Value::as_str) {
        Some("ended") => true,
        Some(s) if OPEN_STATUSES.contains(&s) => false,
        // No status, or one this build does not know: over once it has an end.
        _ => record.get("endedAt").is_some_and(|v| !v.is_null()),
    }
}

fn time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    serde_json::from_value::<RawTime>(v?.clone()).ok()?.to_utc()
}

/// The `end-of-call-report` VAPI would have sent, from its Call object: the report's own
/// fields at the top level (SPEC §5.5), the legacy top-level copies the parser also reads, and
/// the object itself as `call`.
fn end_of_call_report(call_id: &str, record: &Value, at: DateTime<Utc>) -> Value {
    let present = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    let field = |key: &str| present(record.get(key));
    let artifact = record.get("artifact").filter(|a| a.is_object());
    let from_artifact = |key: &str| present(artifact.and_then(|a| a.get(key)));

    let mut m = Map::new();
    m.insert("type".into(), json!("end-of-call-report"));
    m.insert("timestamp".into(), json!(at.timestamp_millis()));
    for key in ["endedReason", "startedAt", "endedAt", "cost", "costs", "costBreakdown", "analysis", "artifact"] {
        if let Some(v) = field(key) {
            m.insert(key.into(), v);
        }
    }
    for key in ["customer", "phoneNumber", "assistant", "destination"] {
        if let Some(v) = field(key) {
            m.insert(key.into(), v);
        }
    }
    let duration = field("durationSeconds")
        .and_then(|d| d.as_f64())
        .or_else(|| span(time(record.get("startedAt")), time(record.get("endedAt"))));
    if let Some(d) = duration {
        m.insert("durationSeconds".into(), json!(d));
    }
    if let Some(summary) = present(record.get("analysis").and_then(|a| a.get("summary"))) {
        m.insert("summary".into(), summary);
    }
    if let Some(transcript) = from_artifact("transcript") {
        m.insert("transcript".into(), transcript);
    }
    if let Some(messages) = from_artifact("messages").or_else(|| field("messages")) {
        m.insert("messages".into(), messages);
    }
    if let Some(url) = from_artifact("recordingUrl") {
        m.insert("recordingUrl".into(), url);
    }
    let mut call = record.clone();
    if let Some(obj) = call.as_object_mut() {
        obj.entry("id").or_insert_with(|| json!(call_id));
    }
    m.insert("call".into(), call);
    Value::Object(m)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use callplane_core::vapi::MessageKind;
    use chrono::TimeZone;

    fn ended_record() -> Value {
        json!({
            "id": "019cd8a1-3b2e-7c4d-9f1a-6e5b4c3d2a10",
            "orgId": "7f3b2c1a-9d4e-4b8f-a6c2-5e1d0f9a8b7c",
            "createdAt": "2026-03-10T17:02:11.482Z",
            "updatedAt": "2026-03-10T17:03:40.001Z",
            "type": "inboundPhoneCall",
            "status": "ended",
            "endedReason": "customer-ended-call",
            "startedAt": "2026-03-10T17:02:13.353Z",
            "endedAt": "2026-03-10T17:03:27.386Z",
            "cost": 0.1174,
            "costs": [{ "type": "vapi", "subType": "normal", "minutes": 1.2339, "cost": 0.0617 }],
            "customer": { "number": "+14155550123" },
            "artifact": {
                "transcript": "AI: Hello\nUser: Bye\n",
                "messages": [{ "role": "bot", "message": "Hello", "time": 1773162134265.0, "secondsFromStart": 0.9 }],
                "recordingUrl": "https://storage.vapi.ai/rec-mono.wav"
            },
            "analysis": { "summary": "A short call.", "successEvaluation": "true" }
        })
    }

    #[test]
    fn a_report_built_from_an_ended_call_object_parses_with_its_duration_computed() {
        let at = Utc.with_ymd_and_hms(2026, 3, 10, 18, 0, 0).unwrap();
        let msg = parse_message(end_of_call_report("ignored", &ended_record(), at)).unwrap();
        assert_eq!(msg.kind, MessageKind::EndOfCallReport);
        assert_eq!(msg.call_id.as_deref(), Some("019cd8a1-3b2e-7c4d-9f1a-6e5b4c3d2a10"));
        assert_eq!(msg.timestamp, Some(at));
        let report = msg.report.unwrap();
        assert_eq!(report.duration_seconds, Some(74.033));
        assert_eq!(report.ended_reason.as_deref(), Some("customer-ended-call"));
        assert_eq!(report.summary.as_deref(), Some("A short call."));
        assert_eq!(report.transcript.as_deref(), Some("AI: Hello\nUser: Bye\n"));
        assert_eq!(report.messages.map(|m| m.len()), Some(1));
        assert_eq!(report.recording_url.as_deref(), Some("https://storage.vapi.ai/rec-mono.wav"));
        assert_eq!(report.cost, Some(0.1174));
        assert!(report.costs.is_some() && report.analysis.is_some());
    }

    #[test]
    fn a_call_object_without_an_id_is_given_the_reconciled_calls_id() {
        let mut record = ended_record();
        record.as_object_mut().unwrap().remove("id");
        let msg = parse_message(end_of_call_report("ours", &record, Utc::now())).unwrap();
        assert_eq!(msg.call_id.as_deref(), Some("ours"));
    }

    #[test]
    fn only_an_ended_status_or_an_end_time_under_an_unknown_status_counts_as_ended() {
        assert!(has_ended(&json!({ "status": "ended" })));
        assert!(!has_ended(&json!({ "status": "in-progress", "endedAt": "2026-03-10T17:03:27.386Z" })));
        assert!(has_ended(&json!({ "status": "deletion-failed", "endedAt": "2026-03-10T17:03:27.386Z" })));
        assert!(!has_ended(&json!({ "status": "something-new" })));
    }

    #[test]
    fn the_api_key_never_appears_in_debug_output() {
        let vapi =
            VapiCalls::new("https://api.vapi.ai", SecretString::from("vapi-private-key-123"), Duration::from_secs(5))
                .unwrap();
        let shown = format!("{vapi:?}");
        assert!(!shown.contains("vapi-private-key-123"), "{shown}");
    }

    #[test]
    fn call_ids_are_one_escaped_path_segment_under_the_api_root() {
        let vapi = VapiCalls::new("http://127.0.0.1:9/api/", SecretString::from("k"), Duration::from_secs(1)).unwrap();
        assert_eq!(vapi.call_url("a/b c").unwrap().as_str(), "http://127.0.0.1:9/api/call/a%2Fb%20c");
        let root = VapiCalls::new("https://api.vapi.ai", SecretString::from("k"), Duration::from_secs(1)).unwrap();
        assert_eq!(root.call_url("019c").unwrap().as_str(), "https://api.vapi.ai/call/019c");
    }

    #[test]
    fn an_empty_key_or_a_non_http_url_is_refused_by_name() {
        let empty = VapiCalls::new("https://api.vapi.ai", SecretString::from(" "), Duration::from_secs(1));
        assert!(matches!(empty, Err(VapiError::MissingKey)));
        let ftp = VapiCalls::new("ftp://api.vapi.ai", SecretString::from("k"), Duration::from_secs(1));
        assert!(ftp.unwrap_err().to_string().contains("vapi.api_url"));
    }
}
