//! `Metering`: what a usage counter means, on top of any counter backend.
//!
//! A backend only keeps a total per organization and period, adding each call once. The
//! rules are here, so choosing a backend never switches them off:
//! - each usage alert (80, 90 and 100% of the plan's included seconds) is recorded once per
//!   period, in the ledger's alert table, whichever add (or rebuild) reached it first;
//! - a call whose counter add failed after its ledger row committed stays uncounted in the
//!   ledger, and [`Metering::repair`] adds it later: never lost, never counted twice;
//! - admission for hard-limit plans asks the counter, with the last total this process saw
//!   as the answer when the counter cannot answer in time.

use crate::domain::{OrgId, UsageAlert};
use crate::seams::{Counted, StoreResult, UsageCounter, UsageLedger};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The usage alert thresholds, in percent of the included seconds.
pub const ALERT_THRESHOLDS: [i32; 3] = [80, 90, 100];

/// The thresholds a total of `after` has reached and `before` had not (`None`: unknown, every
/// threshold reached counts).
pub fn thresholds_reached(before: Option<i64>, after: i64, included: i64) -> impl Iterator<Item = i32> {
    let reached =
        move |used: i64, t: i32| included > 0 && i128::from(used) * 100 >= i128::from(included) * i128::from(t);
    ALERT_THRESHOLDS.into_iter().filter(move |t| reached(after, *t) && !before.is_some_and(|b| reached(b, *t)))
}

/// What counting a call produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallCounted {
    /// The period's total after the call (`None` when the counter failed: the call stays
    /// uncounted in the ledger and is repaired later).
    pub total: Option<i64>,
    /// Alerts recorded just now, to be published.
    pub alerts: Vec<UsageAlert>,
}

pub struct Metering {
    counter: Arc<dyn UsageCounter>,
    ledger: Arc<dyn UsageLedger>,
    /// Included seconds per plan name.
    included: HashMap<String, i64>,
    /// The last total seen per organization and period: admission's answer when the counter
    /// does not answer in time.
    last_seen: Mutex<HashMap<OrgId, (DateTime<Utc>, i64)>>,
}

impl Metering {
    pub fn new(counter: Arc<dyn UsageCounter>, ledger: Arc<dyn UsageLedger>, included: HashMap<String, i64>) -> Self {
        Self { counter, ledger, included, last_seen: Mutex::default() }
    }

    pub fn backend(&self) -> &'static str {
        self.counter.backend()
    }

    pub fn counter(&self) -> &Arc<dyn UsageCounter> {
        &self.counter
    }

    fn remember(&self, org: OrgId, period_start: DateTime<Utc>, total: i64) {
        let mut seen = self.last_seen.lock().unwrap_or_else(PoisonError::into_inner);
        match seen.get(&org) {
            Some((p, _)) if *p > period_start => {}
            _ => {
                seen.insert(org, (period_start, total));
            }
        }
    }

    /// The last total this process saw for the period, if any.
    pub fn last_seen(&self, org: OrgId, period_start: DateTime<Utc>) -> Option<i64> {
        let seen = self.last_seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.get(&org).filter(|(p, _)| *p == period_start).map(|(_, t)| *t)
    }

    /// Counts a billed call whose ledger row has committed: adds it once and records the
    /// alerts it reached. A counter failure is returned; the call stays uncounted in the
    /// ledger for [`Metering::repair`].
    pub async fn count_call(
        &self,
        org: OrgId,
        call_id: &str,
        period_start: DateTime<Utc>,
        seconds: i64,
        plan: &str,
    ) -> StoreResult<CallCounted> {
        let counted = self.counter.add_call(org, period_start, call_id, seconds).await?;
        self.remember(org, period_start, counted.after);
        let alerts = self.record_alerts(org, period_start, plan, counted).await?;
        Ok(CallCounted { total: Some(counted.after), alerts })
    }

    async fn record_alerts(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
        plan: &str,
        counted: Counted,
    ) -> StoreResult<Vec<UsageAlert>> {
        let included = self.included.get(plan).copied().unwrap_or(0);
        let mut fired = Vec::new();
        for threshold in thresholds_reached(counted.before, counted.after, included) {
            let alert = UsageAlert {
                threshold,
                period_start,
                seconds_used: counted.after,
                included_seconds: included,
                at: Utc::now(),
            };
            if self.ledger.record_alert(org, &alert).await? {
                fired.push(alert);
            }
        }
        Ok(fired)
    }

    /// The period's total, from the counter; from the ledger (the truth it is kept from) when
    /// the counter is unavailable.
    pub async fn used(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        let total = match self.counter.used(org, period_start).await {
            Ok(total) => total,
            Err(e) if e.is_transient() => self.ledger.total(org, period_start).await?,
            Err(e) => return Err(e),
        };
        self.remember(org, period_start, total);
        Ok(total)
    }

    /// Rebuilds the period's total from the ledger and records the alerts it has reached (each
    /// still once per period).
    pub async fn rebuild(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
        plan: &str,
    ) -> StoreResult<(i64, Vec<UsageAlert>)> {
        let total = self.counter.rebuild(org, period_start).await?;
        self.remember(org, period_start, total);
        let alerts =
            self.record_alerts(org, period_start, plan, Counted { before: None, after: total, new: false }).await?;
        Ok((total, alerts))
    }

    /// Adds the ledger rows whose counter add is not known done (it failed, or the process
    /// stopped between the ledger's commit and the add), oldest first, at most `limit`.
    /// Returns the calls counted and the alerts recorded; stops at the first counter failure.
    pub async fn repair(
        &self,
        older_than: std::time::Duration,
        limit: i64,
    ) -> StoreResult<(usize, Vec<(OrgId, String, UsageAlert)>)> {
        let pending = self.ledger.uncounted(older_than, limit).await?;
        let mut alerts = Vec::new();
        for (i, call) in pending.iter().enumerate() {
            match self.count_call(call.org, &call.call_id, call.period_start, call.seconds, &call.plan).await {
                Ok(counted) => alerts.extend(counted.alerts.into_iter().map(|a| (call.org, call.call_id.clone(), a))),
                Err(e) if i == 0 => return Err(e),
                Err(_) => return Ok((i, alerts)),
            }
        }
        Ok((pending.len(), alerts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_is_reached_by_the_add_that_crosses_it() {
        let r = |b, a| thresholds_reached(b, a, 1000).collect::<Vec<_>>();
        assert_eq!(r(Some(0), 799), Vec::<i32>::new());
        assert_eq!(r(Some(799), 800), vec![80]);
        assert_eq!(r(Some(800), 950), vec![90]);
        assert_eq!(r(Some(0), 1000), vec![80, 90, 100]);
        assert_eq!(r(Some(1000), 2000), Vec::<i32>::new());
        assert_eq!(r(None, 900), vec![80, 90]);
        assert_eq!(thresholds_reached(None, i64::MAX, 0).count(), 0, "a plan with nothing included has no alerts");
        assert_eq!(thresholds_reached(Some(0), i64::MAX, i64::MAX).collect::<Vec<_>>(), vec![80, 90, 100]);
    }
}
