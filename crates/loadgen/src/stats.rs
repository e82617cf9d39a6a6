//! Latency samples and their percentiles.
//!
//! Samples are kept whole (microseconds as `u32`, four bytes each) rather than bucketed: a
//! benchmark run records at most a few million of them, and exact nearest-rank percentiles
//! are easier to trust than a histogram's approximations.
//!
//! Answers are also counted by class ([`StatusCounts`]: 2xx, 503s, other 5xx, connection errors)
//! per message kind, with the slowest answer of each kind ([`AnswerTally`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{AnswerClass, Attempt};

/// The nearest-rank percentile `p` (0 to 100) of sorted samples: the smallest sample such that
/// at least `p`% of the samples are less than or equal to it. `None` when there are no samples.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    // Rank is 1-based; p = 0 means the smallest sample.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted.get(index).copied()
}

/// A summary of latency samples, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises samples given in microseconds; sorts them in place.
    pub fn from_micros(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let ms = |p: f64| percentile(samples, p).map_or(0.0, |us| f64::from(us) / 1000.0);
        let total: u64 = samples.iter().map(|&us| u64::from(us)).sum();
        Self {
            count: samples.len(),
            mean_ms: total as f64 / samples.len() as f64 / 1000.0,
            p50_ms: ms(50.0),
            p95_ms: ms(95.0),
            p99_ms: ms(99.0),
            p999_ms: ms(99.9),
            max_ms: ms(100.0),
        }
    }

    /// One line for the console, e.g. `n=1000 p50=1.20ms p99=4.51ms p99.9=9.80ms`.
    pub fn line(&self) -> String {
        format!(
            "n={} p50={:.2}ms p95={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
            self.count, self.p50_ms, self.p95_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Converts a duration to whole microseconds, saturating at `u32::MAX` (71 minutes).
pub fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// A thread-safe collection of latency samples.
#[derive(Default)]
pub struct Recorder {
    samples: Mutex<Vec<u32>>,
}

impl Recorder {
    pub fn record(&self, duration: Duration) {
        if let Ok(mut samples) = self.samples.lock() {
            samples.push(micros(duration));
        }
    }

    /// Summarises what was recorded so far.
    pub fn summary(&self) -> LatencySummary {
        let mut samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        LatencySummary::from_micros(&mut samples)
    }
}

/// Delivery attempts by how they ended. Every attempt counts, retries included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusCounts {
    pub attempts: u64,
    pub ok_2xx: u64,
    /// Every 503, with or without `Retry-After`.
    pub status_503: u64,
    /// The 503s that carried no `Retry-After` (a subset of `status_503`).
    pub status_503_without_retry_after: u64,
    /// 5xx other than 503.
    pub other_5xx: u64,
    /// 1xx, 3xx and 4xx.
    pub other_status: u64,
    /// Refused, reset or closed connections.
    pub connection_errors: u64,
    pub timeouts: u64,
    /// Requests that could not be built or signed.
    pub unsent: u64,
}

impl StatusCounts {
    pub fn add(&mut self, class: AnswerClass) {
        self.attempts += 1;
        match class {
            AnswerClass::Success => self.ok_2xx += 1,
            AnswerClass::Shed => self.status_503 += 1,
            AnswerClass::ShedWithoutRetryAfter => {
                self.status_503 += 1;
                self.status_503_without_retry_after += 1;
            }
            AnswerClass::ServerError => self.other_5xx += 1,
            AnswerClass::OtherStatus => self.other_status += 1,
            AnswerClass::ConnectionError => self.connection_errors += 1,
            AnswerClass::Timeout => self.timeouts += 1,
            AnswerClass::Unsent => self.unsent += 1,
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.attempts += other.attempts;
        self.ok_2xx += other.ok_2xx;
        self.status_503 += other.status_503;
        self.status_503_without_retry_after += other.status_503_without_retry_after;
        self.other_5xx += other.other_5xx;
        self.other_status += other.other_status;
        self.connection_errors += other.connection_errors;
        self.timeouts += other.timeouts;
        self.unsent += other.unsent;
    }

    /// The sum of several (e.g. every message kind's).
    pub fn total<'a>(counts: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut total = Self::default();
        for counts in counts {
            total.merge(counts);
        }
        total
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        format!(
            "{} attempts: {} 2xx, {} 503 ({} without Retry-After), {} other 5xx, {} other, {} connection errors, {} timeouts",
            self.attempts,
            self.ok_2xx,
            self.status_503,
            self.status_503_without_retry_after,
            self.other_5xx,
            self.other_status,
            self.connection_errors,
            self.timeouts
        )
    }
}

/// Attempts by message kind: their classes and the slowest answer (timeouts included, since a
/// timeout is an answer at least that slow; connection errors are not answers); and the 2xx
/// answers VAPI could not use (an assistant refused, a tool call without a result).
#[derive(Default)]
pub struct AnswerTally {
    by_kind: Mutex<BTreeMap<&'static str, (StatusCounts, u32)>>,
    unusable: Mutex<BTreeMap<&'static str, u64>>,
}

impl AnswerTally {
    pub fn observe(&self, kind: &'static str, attempt: &Attempt) {
        if let Ok(mut map) = self.by_kind.lock() {
            let (counts, slowest) = map.entry(kind).or_default();
            counts.add(attempt.class);
            if attempt.class.answered() || attempt.class == AnswerClass::Timeout {
                *slowest = (*slowest).max(micros(attempt.elapsed));
            }
        }
    }

    /// Counts a 2xx answer of `kind` that VAPI could not use.
    pub fn unusable(&self, kind: &'static str) {
        if let Ok(mut map) = self.unusable.lock() {
            *map.entry(kind).or_default() += 1;
        }
    }

    /// Unusable answers per kind.
    pub fn unusable_answers(&self) -> BTreeMap<String, u64> {
        self.unusable.lock().map(|m| m.iter().map(|(k, n)| (k.to_string(), *n)).collect()).unwrap_or_default()
    }

    /// Counts per kind.
    pub fn statuses(&self) -> BTreeMap<String, StatusCounts> {
        self.by_kind.lock().map(|m| m.iter().map(|(k, (c, _))| (k.to_string(), *c)).collect()).unwrap_or_default()
    }

    /// The slowest answer per kind, in milliseconds.
    pub fn max_answer_ms(&self) -> BTreeMap<String, f64> {
        self.by_kind
            .lock()
            .map(|m| m.iter().map(|(k, (_, us))| (k.to_string(), f64::from(*us) / 1000.0)).collect())
            .unwrap_or_default()
    }

    /// Counts over every kind.
    pub fn total(&self) -> StatusCounts {
        StatusCounts::total(self.statuses().values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(50));
        assert_eq!(percentile(&sorted, 99.0), Some(99));
        assert_eq!(percentile(&sorted, 99.9), Some(100));
        assert_eq!(percentile(&sorted, 100.0), Some(100));
        assert_eq!(percentile(&sorted, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
        // One sample is every percentile.
        assert_eq!(percentile(&[7], 0.0), Some(7));
        assert_eq!(percentile(&[7], 99.9), Some(7));
        // Out-of-range requests are clamped rather than panicking.
        assert_eq!(percentile(&sorted, 150.0), Some(100));
        assert_eq!(percentile(&sorted, -3.0), Some(1));
    }

    #[test]
    fn small_sets_round_up_to_the_next_sample() {
        // With 10 samples, p95 is the 10th (rank ceil(9.5) = 10) and p50 the 5th.
        let sorted = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];
        assert_eq!(percentile(&sorted, 95.0), Some(100));
        assert_eq!(percentile(&sorted, 50.0), Some(50));
        assert_eq!(percentile(&sorted, 51.0), Some(60));
    }

    #[test]
    fn summary_sorts_and_converts_to_milliseconds() {
        let mut samples = vec![3000, 1000, 2000, 4000];
        let summary = LatencySummary::from_micros(&mut samples);
        assert_eq!(summary.count, 4);
        assert_eq!(summary.p50_ms, 2.0);
        assert_eq!(summary.max_ms, 4.0);
        assert!((summary.mean_ms - 2.5).abs() < 1e-9);
        assert_eq!(LatencySummary::from_micros(&mut []), LatencySummary::default());
    }

    #[test]
    fn recorder_collects_from_many_threads() {
        let recorder = std::sync::Arc::new(Recorder::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    for ms in 1..=25 {
                        recorder.record(Duration::from_millis(ms));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        let summary = recorder.summary();
        assert_eq!(summary.count, 100);
        assert_eq!(summary.max_ms, 25.0);
    }

    #[test]
    fn answers_are_counted_by_class_and_kind() {
        let tally = AnswerTally::default();
        let attempt = |class, ms| Attempt { class, elapsed: Duration::from_millis(ms) };
        tally.observe("assistant-request", &attempt(AnswerClass::Success, 12));
        tally.observe("assistant-request", &attempt(AnswerClass::Shed, 3));
        tally.observe("assistant-request", &attempt(AnswerClass::ConnectionError, 900));
        tally.observe("end-of-call-report", &attempt(AnswerClass::ShedWithoutRetryAfter, 5));
        tally.observe("end-of-call-report", &attempt(AnswerClass::ServerError, 40));
        tally.observe("end-of-call-report", &attempt(AnswerClass::Timeout, 2000));
        let statuses = tally.statuses();
        let ar = statuses["assistant-request"];
        assert_eq!((ar.attempts, ar.ok_2xx, ar.status_503, ar.connection_errors), (3, 1, 1, 1));
        let total = tally.total();
        assert_eq!((total.attempts, total.status_503, total.status_503_without_retry_after), (6, 2, 1));
        assert_eq!((total.other_5xx, total.timeouts), (1, 1));
        // The refused connection is not an answer; the timeout is the slowest one.
        let slowest = tally.max_answer_ms();
        assert_eq!(slowest["assistant-request"], 12.0);
        assert_eq!(slowest["end-of-call-report"], 2000.0);
        assert!(total.line().contains("2 503 (1 without Retry-After)"));
        tally.unusable("assistant-request");
        tally.unusable("assistant-request");
        assert_eq!(tally.unusable_answers()["assistant-request"], 2);
        assert_eq!(tally.unusable_answers().len(), 1);
    }
}
