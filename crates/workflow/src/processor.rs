//! `Processor`: what applying one VAPI event means, whichever pipeline runs it (inline in the
//! request, from the inbox, or a workflow's activity): the call, its ledger row, transcript
//! and realtime events in one transaction; the counter after that commit; and what is
//! published after it.

use callplane_core::billing::BillingRules;
use callplane_core::domain::{CallChange, UsageAlert};
use callplane_core::events;
use callplane_core::metering::Metering;
use callplane_core::seams::{
    InboundEvent, PipelineError, Processed, RealtimeBus, RealtimeEvent, StoreError, Transcript, TranscriptStore,
};
use callplane_core::vapi::MessageKind;
use callplane_core::{ErrorCode, OrgId};
use callplane_storage::{ApplyOptions, PgStore};
use chrono::{DateTime, Duration, Utc};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::warn;

#[derive(Clone, Debug)]
pub struct PipelineSettings {
    pub rules: BillingRules,
    /// A call created further than this in the future is refused: it would need a partition
    /// that should not exist yet.
    pub max_future_skew: Duration,
    /// A call created longer ago than this is refused: it would open a partition for a
    /// month long gone (and VAPI does not deliver such events).
    pub max_past: Duration,
    /// Verifies organization ids in call metadata when replaying events that had none.
    pub org_hint_key: Option<Vec<u8>>,
}

/// Why one event could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("`{field}` {at} is more than {max_hours}h in the future")]
    FutureTimestamp { field: &'static str, at: DateTime<Utc>, max_hours: i64 },
    #[error("`{field}` {at} is more than {max_days} days in the past")]
    PastTimestamp { field: &'static str, at: DateTime<Utc>, max_days: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Failure {
    pub fn code(&self) -> ErrorCode {
        match self {
            Failure::FutureTimestamp { .. } => ErrorCode::FutureTimestamp,
            Failure::PastTimestamp { .. } => ErrorCode::StaleTimestamp,
            Failure::Store(StoreError::Refused { code, .. }) => *code,
            Failure::Store(StoreError::Backend { .. } | StoreError::Internal(_)) => ErrorCode::ProcessingFailed,
            Failure::Store(StoreError::Unavailable { .. }) => ErrorCode::Overloaded,
        }
    }

    /// Whether the sender should be told its event is wrong (4xx) rather than acknowledged:
    /// only when the event itself is at fault, never for the system's own failures.
    pub fn is_rejection(&self) -> bool {
        !matches!(
            self,
            Failure::Store(StoreError::Backend { .. } | StoreError::Unavailable { .. } | StoreError::Internal(_))
        )
    }
}

/// The transcript a message carries: the report's (final) or the live conversation.
fn carried_transcript(msg: &callplane_core::vapi::ServerMessage) -> Option<Transcript> {
    match (&msg.report, &msg.conversation) {
        (Some(r), _) => Some(Transcript {
            text: r.transcript.clone(),
            messages: r.messages.clone().unwrap_or_default(),
            is_final: true,
        }),
        (None, Some(messages)) => Some(Transcript { text: None, messages: messages.clone(), is_final: false }),
        _ => None,
    }
}

/// Applies events; cheap to clone.
#[derive(Clone)]
pub struct Processor {
    store: PgStore,
    metering: Arc<Metering>,
    transcripts: Arc<dyn TranscriptStore>,
    bus: Arc<dyn RealtimeBus>,
    settings: PipelineSettings,
    stats: Arc<ProcessingStats>,
}

impl Processor {
    pub fn new(
        store: PgStore,
        metering: Arc<Metering>,
        transcripts: Arc<dyn TranscriptStore>,
        bus: Arc<dyn RealtimeBus>,
        settings: PipelineSettings,
    ) -> Self {
        Self { store, metering, transcripts, bus, settings, stats: Arc::default() }
    }

    /// What this processor did, shared by whatever runs it.
    pub fn stats(&self) -> Arc<ProcessingStats> {
        self.stats.clone()
    }

    pub fn settings(&self) -> &PipelineSettings {
        &self.settings
    }

    pub fn metering(&self) -> Arc<Metering> {
        self.metering.clone()
    }

    pub fn bus(&self) -> Arc<dyn RealtimeBus> {
        self.bus.clone()
    }

    /// Times that would open partitions (or billing periods) far from now are refused.
    fn check_times(&self, ev: &InboundEvent) -> Result<(), Failure> {
        let msg = &ev.message;
        let report = msg.report.as_ref();
        let times = [
            ("call.createdAt", msg.call_created_at.or(msg.timestamp)),
            ("timestamp", msg.timestamp),
            ("startedAt", report.and_then(|r| r.started_at)),
            ("endedAt", report.and_then(|r| r.ended_at)),
        ];
        let latest = ev.received_at + self.settings.max_future_skew;
        let earliest = ev.received_at - self.settings.max_past;
        for (field, at) in times {
            match at {
                Some(at) if at > latest => {
                    return Err(Failure::FutureTimestamp {
                        field,
                        at,
                        max_hours: self.settings.max_future_skew.num_hours(),
                    });
                }
                Some(at) if at < earliest => {
                    return Err(Failure::PastTimestamp { field, at, max_days: self.settings.max_past.num_days() });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies one event, in three steps that a workflow can also run (and retry) one by one:
    /// [`apply`](Self::apply), [`count`](Self::count), [`finish`](Self::finish). Idempotent on
    /// the call: applying an event again changes nothing.
    pub async fn process(&self, ev: &InboundEvent) -> Result<Processed, Failure> {
        let Some(mut change) = self.apply(ev).await? else { return Ok(Processed::Ignored) };
        let alerts = self.count(ev.org_id, &change).await;
        self.finish(ev, &mut change, &alerts).await?;
        Ok(Self::outcome(&change))
    }

    /// What a change, once through every step, amounts to.
    pub fn outcome(change: &CallChange) -> Processed {
        let changed = change.inserted
            || change.status_changed.is_some()
            || change.billed.is_some()
            || change.transcript.is_some();
        if changed { Processed::Applied } else { Processed::NoChange }
    }

    /// Whether step 2 has anything to do for a change.
    pub fn counts(change: &CallChange) -> bool {
        change.billed.as_ref().is_some_and(|b| b.seconds > 0)
    }

    /// Whether step 3 has anything to do for an event, given whether step 2 reached alerts.
    pub fn finishes(&self, ev: &InboundEvent, alerts: bool) -> bool {
        alerts
            || !self.bus.queues_in_transaction()
            || (!self.transcripts.stores_in_transaction() && carried_transcript(&ev.message).is_some())
    }

    /// Step 1, one transaction: the call, its ledger row (for a report), its transcript (when
    /// the transcript store is the database) and its realtime events (queued, when the bus
    /// queues in the transaction). `None`: nothing to apply (no call id, an unknown message).
    pub async fn apply(&self, ev: &InboundEvent) -> Result<Option<CallChange>, Failure> {
        let msg = &ev.message;
        if msg.kind == MessageKind::Unknown || msg.call_id.is_none() {
            return Ok(None);
        }
        self.check_times(ev)?;
        let queue_events = self.bus.queues_in_transaction();
        let transcript = carried_transcript(msg).filter(|_| self.transcripts.stores_in_transaction());
        let change = self
            .store
            .apply_call_event(
                ev.org_id,
                msg,
                ev.received_at,
                &ApplyOptions { rules: &self.settings.rules, queue_events, transcript: transcript.as_ref() },
            )
            .await?;
        if change.is_some() && queue_events {
            self.bus.queued();
        }
        if change.as_ref().is_some_and(|c| c.billed.is_some()) {
            self.stats.ledger_written((Utc::now() - ev.received_at).to_std().unwrap_or_default());
        }
        if let Some(c) = change.as_ref().filter(|c| c.duration_unknown) {
            warn!(call_id = %c.call_id, "the call ended connected but no source gave its duration; \
                   not billed yet, marked for review (reconciliation asks VAPI)");
        }
        Ok(change)
    }

    /// Step 2, after step 1 committed: adds the seconds the change billed to the counter, and
    /// returns the usage alerts they reached. A counter that fails leaves the ledger row
    /// uncounted, and the repair loop adds it once the counter answers again: this step never
    /// fails the event.
    pub async fn count(&self, org: OrgId, change: &CallChange) -> Vec<UsageAlert> {
        let Some(billed) = change.billed.as_ref().filter(|_| Self::counts(change)) else { return Vec::new() };
        match self.metering.count_call(org, &change.call_id, billed.period_start, billed.seconds, &billed.plan).await {
            Ok(counted) => counted.alerts,
            Err(e) => {
                warn!(error = %callplane_core::error_chain(&e), call_id = %change.call_id,
                      "counting the call failed; it stays uncounted in the ledger and is added later");
                Vec::new()
            }
        }
    }

    /// Step 3: a transcript kept outside the database, then what is published after commit
    /// (the change's events when the bus does not queue them, the transcript's, the alerts).
    pub async fn finish(
        &self,
        ev: &InboundEvent,
        change: &mut CallChange,
        alerts: &[UsageAlert],
    ) -> Result<(), Failure> {
        let transcript_elsewhere = !self.transcripts.stores_in_transaction();
        if let Some(t) = carried_transcript(&ev.message).filter(|_| transcript_elsewhere) {
            self.transcripts.put(ev.org_id, &change.call_id, change.created_at, &t).await?;
            change.transcript = Some(t.is_final);
        }
        let mut after_commit = Vec::new();
        if !self.bus.queues_in_transaction() {
            after_commit = events::for_change(ev.org_id, change);
        } else if transcript_elsewhere {
            after_commit.extend(change.transcript.map(|f| events::transcript_changed(ev.org_id, &change.call_id, f)));
        }
        after_commit.extend(alerts.iter().map(|a| events::usage_alert(ev.org_id, &change.call_id, a)));
        self.publish(&after_commit).await;
        Ok(())
    }

    /// Events published after commit are best effort: the dashboard can always re-read.
    async fn publish(&self, events: &[RealtimeEvent]) {
        if events.is_empty() {
            return;
        }
        if let Err(err) = self.bus.publish(events).await {
            warn!(error = %err, events = events.len(), "realtime publish failed");
        }
    }
}

/// Counters, (name, help, value), in Prometheus's text format.
pub fn render_counters(out: &mut String, counters: &[(&str, &str, u64)]) {
    use std::fmt::Write;
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    }
}

/// Seconds from a report's arrival to its ledger row's commit: from the inline pipeline's few
/// milliseconds to a queue's backlog or an outage's minutes.
const LEDGER_BUCKETS: [f64; 15] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// How many events a processor finished processing, how many of those failed (kept as dead
/// letters, or lost): the share the advisor's "webhook processing failures" trigger reads; and
/// how long reports took from arrival to their ledger row.
#[derive(Debug, Default)]
pub struct ProcessingStats {
    processed: AtomicU64,
    failed: AtomicU64,
    ledger_buckets: [AtomicU64; LEDGER_BUCKETS.len()],
    ledger_count: AtomicU64,
    ledger_micros: AtomicU64,
}

impl ProcessingStats {
    /// Records a finished attempt; a backend being unavailable is not a result yet (the event
    /// is tried again), so it is not counted.
    pub fn record(&self, result: &Result<Processed, PipelineError>) {
        match result {
            Ok(Processed::Scheduled) | Err(PipelineError::Unavailable(_)) => {}
            Ok(_) => {
                self.processed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.processed.fetch_add(1, Ordering::Relaxed);
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A report's ledger row committed `took` after the report arrived.
    fn ledger_written(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        for (bucket, le) in self.ledger_buckets.iter().zip(LEDGER_BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ledger_count.fetch_add(1, Ordering::Relaxed);
        self.ledger_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The figures in Prometheus's text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters = [
            (
                "callplane_events_processed_total",
                "Events this process finished processing (applied, unchanged, ignored or failed).",
                get(&self.processed),
            ),
            (
                "callplane_events_failed_total",
                "Events this process failed to process: kept as dead letters (or lost, if even that failed).",
                get(&self.failed),
            ),
        ];
        render_counters(out, &counters);
        let name = "callplane_report_to_ledger_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From an end-of-call report's arrival to its ledger row's commit.\n# TYPE {name} histogram"
        );
        for (bucket, le) in self.ledger_buckets.iter().zip(LEDGER_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", get(bucket));
        }
        let count = get(&self.ledger_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", get(&self.ledger_micros) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}
