//! What the Temporal pipeline and its worker did, for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of one process. The workflow's own counters (runs started and finished) are
/// process-wide statics, because workflow code has no handle to anything but its state; they
/// count only when the code is not replaying history, so a replay never counts twice.
#[derive(Debug, Default)]
pub struct TemporalStats {
    /// Events Temporal accepted (signals delivered to a call's workflow).
    pub handed_off: AtomicU64,
    /// Hand-overs that failed because Temporal did not answer: the event stayed in the inbox.
    pub handoff_failures: AtomicU64,
    /// Activity attempts, and those that were retries (attempt 2 or later).
    pub activity_attempts: AtomicU64,
    pub activity_retries: AtomicU64,
    /// Activity attempts that failed and will be retried by Temporal.
    pub activity_failures: AtomicU64,
    /// Time from an activity attempt being scheduled to a worker starting it.
    schedule_to_start_micros: AtomicU64,
}

pub(crate) static WORKFLOWS_STARTED: AtomicU64 = AtomicU64::new(0);
pub(crate) static WORKFLOWS_COMPLETED: AtomicU64 = AtomicU64::new(0);
pub(crate) static WORKFLOWS_CONTINUED: AtomicU64 = AtomicU64::new(0);
pub(crate) static WORKFLOWS_FAILED: AtomicU64 = AtomicU64::new(0);

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl TemporalStats {
    pub(crate) fn activity_started(&self, attempt: u32, waited: Option<Duration>) {
        bump(&self.activity_attempts);
        if attempt > 1 {
            bump(&self.activity_retries);
        }
        if let Some(waited) = waited {
            let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
            self.schedule_to_start_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// The figures in Prometheus's text format.
    pub fn render(&self, out: &mut String) {
        callplane_workflow::render_counters(out, &self.counters());
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "callplane_temporal_events_handed_off_total",
                "Events Temporal accepted for their call's workflow.",
                get(&self.handed_off),
            ),
            (
                "callplane_temporal_handoff_failures_total",
                "Hand-overs Temporal did not accept in time; the event stayed in the inbox for the next try.",
                get(&self.handoff_failures),
            ),
            (
                "callplane_temporal_workflows_started_total",
                "Call workflow runs this process's worker started.",
                get(&WORKFLOWS_STARTED),
            ),
            (
                "callplane_temporal_workflows_completed_total",
                "Call workflow runs completed (the call's report processed).",
                get(&WORKFLOWS_COMPLETED),
            ),
            (
                "callplane_temporal_workflows_continued_total",
                "Call workflow runs continued as new to keep their history short.",
                get(&WORKFLOWS_CONTINUED),
            ),
            (
                "callplane_temporal_workflows_failed_total",
                "Call workflow runs that failed (an activity failed for good). Should read 0.",
                get(&WORKFLOWS_FAILED),
            ),
            ("callplane_temporal_activity_attempts_total", "Activity attempts started.", get(&self.activity_attempts)),
            (
                "callplane_temporal_activity_retries_total",
                "Activity attempts that were retries of a failed attempt.",
                get(&self.activity_retries),
            ),
            (
                "callplane_temporal_activity_failures_total",
                "Activity attempts that failed and are retried with backoff (the database unavailable, ...).",
                get(&self.activity_failures),
            ),
            (
                "callplane_temporal_schedule_to_start_microseconds_sum",
                "Total time activity attempts waited between being scheduled and starting.",
                get(&self.schedule_to_start_micros),
            ),
        ]
    }
}
