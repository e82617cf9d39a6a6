//! Plans, the billable-seconds rule and billing periods.
//!
//! The rule, in words: a call is billed from its duration (`durationSeconds`, else
//! `durationMs`, else `endedAt - startedAt`), rounded **up** to the configured increment
//! (1 second by default). Calls that never connected are not billed: an ended reason listed in
//! `unbilled_ended_reasons`, or starting with one of `unbilled_ended_reason_prefixes`
//! (e.g. `call.start.error-`), gives zero billable seconds. Usage belongs to the billing
//! period that contains the call's start.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub price_cents: i64,
    pub included_minutes: i64,
    /// A hard-limit plan refuses calls once its minutes are used up and caps each call to the
    /// minutes left; otherwise minutes over the plan are billed as overage.
    pub hard_limit: bool,
    pub overage_cents_per_minute: i64,
}

impl Plan {
    pub fn included_seconds(&self) -> i64 {
        self.included_minutes * 60
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BillingRules {
    /// Billable time is rounded up to a multiple of this many seconds (1 = per second,
    /// 60 = per started minute).
    pub rounding_increment_seconds: i64,
    pub unbilled_ended_reasons: Vec<String>,
    pub unbilled_ended_reason_prefixes: Vec<String>,
}

impl Default for BillingRules {
    fn default() -> Self {
        Self {
            rounding_increment_seconds: 1,
            unbilled_ended_reasons: [
                "customer-busy",
                "customer-did-not-answer",
                "customer-did-not-give-microphone-permission",
                "assistant-request-failed",
                "assistant-request-returned-error",
                "assistant-request-returned-unspeakable-error",
                "assistant-request-returned-invalid-assistant",
                "assistant-request-returned-no-assistant",
                "assistant-not-found",
                "assistant-not-valid",
                "call-start-error-neither-assistant-nor-server-set",
                "manually-canceled",
            ]
            .map(String::from)
            .to_vec(),
            unbilled_ended_reason_prefixes: ["call.start.error-", "call.ringing.", "call.in-progress.error-vapifault-"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl BillingRules {
    pub fn is_billed_reason(&self, ended_reason: Option<&str>) -> bool {
        let Some(reason) = ended_reason else { return true };
        !(self.unbilled_ended_reasons.iter().any(|r| r == reason)
            || self.unbilled_ended_reason_prefixes.iter().any(|p| reason.starts_with(p.as_str())))
    }

    /// Whole seconds billed for a call.
    pub fn billable_seconds(&self, duration_seconds: Option<f64>, ended_reason: Option<&str>) -> i64 {
        if !self.is_billed_reason(ended_reason) {
            return 0;
        }
        let d = match duration_seconds {
            Some(d) if d.is_finite() && d > 0.0 => d,
            _ => return 0,
        };
        // Guard against float noise such as 12.000000001 becoming 13. The parser refuses
        // durations over a week; the clamp keeps this total for any input all the same.
        let secs = (d - 1e-6).ceil().clamp(1.0, crate::vapi::MAX_CALL_DURATION_SECONDS as f64) as i64;
        let inc = self.rounding_increment_seconds.max(1);
        (secs / inc + i64::from(secs % inc != 0)).saturating_mul(inc)
    }
}

/// The billing period containing `t`, stepping whole months from `anchor` (a period start).
pub fn period_containing(anchor: DateTime<Utc>, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let months_between =
        |a: DateTime<Utc>, b: DateTime<Utc>| (b.year() - a.year()) * 12 + b.month() as i32 - a.month() as i32;
    let step = |n: i32| -> DateTime<Utc> {
        if n >= 0 {
            anchor.checked_add_months(Months::new(n as u32)).unwrap_or(anchor)
        } else {
            anchor.checked_sub_months(Months::new((-n) as u32)).unwrap_or(anchor)
        }
    };
    let mut n = months_between(anchor, t);
    while step(n) > t {
        n -= 1;
    }
    while step(n + 1) <= t {
        n += 1;
    }
    (step(n), step(n + 1))
}

/// The first instant of the month containing `t`: the partition a call lands in.
pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0).single().unwrap_or(t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn billable_seconds_round_up_and_skip_calls_that_never_connected() {
        let rules = BillingRules::default();
        assert_eq!(rules.billable_seconds(Some(61.2), Some("customer-ended-call")), 62);
        assert_eq!(rules.billable_seconds(Some(60.0), None), 60);
        assert_eq!(rules.billable_seconds(Some(0.2), None), 1);
        assert_eq!(rules.billable_seconds(Some(0.0), None), 0);
        assert_eq!(rules.billable_seconds(Some(30.0), Some("customer-did-not-answer")), 0);
        assert_eq!(rules.billable_seconds(Some(30.0), Some("call.start.error-get-org")), 0);
        let per_minute = BillingRules { rounding_increment_seconds: 60, ..BillingRules::default() };
        assert_eq!(per_minute.billable_seconds(Some(61.0), None), 120);
    }

    #[test]
    fn billable_seconds_never_overflow_whatever_the_duration_or_increment() {
        let huge = BillingRules { rounding_increment_seconds: i64::MAX, ..BillingRules::default() };
        for d in [1e300, f64::MAX, 9.3e18, -1e300, f64::NAN, f64::INFINITY] {
            let billed = BillingRules::default().billable_seconds(Some(d), None);
            assert!((0..=crate::vapi::MAX_CALL_DURATION_SECONDS).contains(&billed), "{d} -> {billed}");
            assert!(huge.billable_seconds(Some(d), None) >= 0);
        }
    }

    #[test]
    fn periods_step_by_whole_months_from_the_anchor() {
        let anchor = Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 3, 15, 11, 59, 59).unwrap();
        let (s, e) = period_containing(anchor, t);
        assert_eq!(s, Utc.with_ymd_and_hms(2026, 2, 15, 12, 0, 0).unwrap());
        assert_eq!(e, Utc.with_ymd_and_hms(2026, 3, 15, 12, 0, 0).unwrap());
        let (s, _) = period_containing(anchor, Utc.with_ymd_and_hms(2025, 12, 20, 0, 0, 0).unwrap());
        assert_eq!(s, Utc.with_ymd_and_hms(2025, 12, 15, 12, 0, 0).unwrap());
    }
}
