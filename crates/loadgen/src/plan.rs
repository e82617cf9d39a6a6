//! The shape of simulated traffic, decided before any request is sent: which plan each
//! organization is on, which organization each call belongs to, how long it lasts, how it
//! ends, and how VAPI's deliveries are duplicated and reordered. All of it follows from the
//! configuration and `--seed`, so the same command replays the same traffic.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use rand::Rng;

use crate::random::{chance, item_rng, log_normal, pick};

/// Streams of the seeded generator, one per kind of decision, so that changing one knob (say,
/// the duplicate rate) does not reshuffle every other decision.
pub mod stream {
    pub const CALLS: u64 = 1;
    pub const DELIVERY: u64 = 2;
    pub const SCRIPT: u64 = 3;
    pub const LOAD: u64 = 4;
}

/// The plans callplane ships with (configuration may add more; the simulator uses these).
pub const PLANS: [&str; 3] = ["starter", "pro", "business"];

/// Starter is a hard-limit plan of 100 minutes: its calls are refused once the minutes are
/// used. The simulator keeps each starter organization under 90 minutes so that nothing it
/// sends is refused and the books stay exact.
pub const STARTER_BUDGET_SECONDS: i64 = 90 * 60;

/// Ended reasons of calls that connected (billed), with their weights.
const BILLED_REASONS: &[(&str, u32)] = &[
    ("customer-ended-call", 60),
    ("assistant-ended-call", 20),
    ("assistant-said-end-call-phrase", 10),
    ("silence-timed-out", 6),
    ("assistant-forwarded-call", 4),
];

/// Ended reasons of calls that never connected; callplane's default configuration bills them
/// nothing.
const UNBILLED_REASONS: &[&str] = &["customer-did-not-answer", "customer-busy"];

/// Which webhooks a simulated call sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Lifecycle {
    /// `assistant-request`, status updates, transcripts, conversation updates, tool calls,
    /// the end-of-call report.
    #[default]
    Full,
    /// Only the end-of-call report (the ingest benchmarks).
    ReportOnly,
}

impl FromStr for Lifecycle {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "report-only" => Ok(Self::ReportOnly),
            other => bail!("unknown lifecycle {other:?}: use full or report-only"),
        }
    }
}

/// Relative weights of the plans across organizations, e.g. `starter=2,pro=2,business=1`.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanMix(pub Vec<(&'static str, f64)>);

impl Default for PlanMix {
    fn default() -> Self {
        Self(vec![("starter", 0.5), ("pro", 0.35), ("business", 0.15)])
    }
}

impl FromStr for PlanMix {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut weights = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, weight)) = part.split_once('=') else {
                bail!("expected plan=weight in {part:?}");
            };
            let Some(plan) = PLANS.iter().find(|p| **p == name.trim()) else {
                bail!("unknown plan {name:?}: use {}", PLANS.join(", "));
            };
            let weight: f64 = weight.trim().parse().map_err(|_| anyhow::anyhow!("bad weight in {part:?}"))?;
            if !(weight.is_finite() && weight >= 0.0) {
                bail!("weights must be zero or more, got {part:?}");
            }
            weights.push((*plan, weight));
        }
        if weights.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            bail!("the plan mix {s:?} gives no plan a positive weight");
        }
        Ok(Self(weights))
    }
}

impl fmt::Display for PlanMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(p, w)| format!("{p}={w}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl PlanMix {
    /// Assigns plans to `n` organizations in the mix's exact proportions (largest remainder),
    /// interleaved so that any prefix of the organizations is mixed too.
    pub fn assign(&self, n: usize) -> Vec<&'static str> {
        let total: f64 = self.0.iter().map(|(_, w)| w).sum();
        // Organization i takes the plan whose cumulative share covers the middle of its slot:
        // exact proportions, in contiguous blocks...
        let blocks = (0..n).map(|i| {
            let point = (i as f64 + 0.5) / n as f64 * total;
            let mut cumulative = 0.0;
            for (plan, weight) in &self.0 {
                cumulative += weight;
                if point < cumulative {
                    return *plan;
                }
            }
            self.0.last().map_or("pro", |(plan, _)| *plan)
        });
        // ...which a permutation then spreads out.
        let mut out = vec!["pro"; n];
        for (i, plan) in blocks.enumerate() {
            out[interleave(i, n)] = plan;
        }
        out
    }
}

/// A permutation of `0..n` that spreads consecutive indices apart (stride by a number coprime
/// with `n`), so that contiguous runs of one plan end up interleaved.
fn interleave(i: usize, n: usize) -> usize {
    if n <= 2 {
        return i;
    }
    let mut stride = (n as f64 * 0.618).round() as usize;
    while gcd(stride, n) != 1 {
        stride += 1;
    }
    (i * stride) % n
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// How long calls last: a log-normal distribution, clamped.
#[derive(Clone, Debug, PartialEq)]
pub struct DurationDist {
    pub mean_seconds: f64,
    /// Shape: 0 makes every call last the mean; 0.8 gives a realistic long tail.
    pub sigma: f64,
    pub min_seconds: f64,
    pub max_seconds: f64,
}

impl Default for DurationDist {
    fn default() -> Self {
        Self { mean_seconds: 180.0, sigma: 0.8, min_seconds: 5.0, max_seconds: 1800.0 }
    }
}

impl DurationDist {
    /// A duration in whole milliseconds.
    pub fn sample_ms(&self, rng: &mut impl Rng) -> u64 {
        let seconds =
            if self.sigma <= 0.0 { self.mean_seconds } else { log_normal(rng, self.mean_seconds, self.sigma) };
        let seconds = seconds.clamp(self.min_seconds.max(0.001), self.max_seconds.max(self.min_seconds));
        (seconds * 1000.0).round() as u64
    }
}

/// Everything that shapes the simulated traffic.
#[derive(Clone, Debug)]
pub struct TrafficConfig {
    pub orgs: usize,
    pub plans: PlanMix,
    pub calls: usize,
    pub durations: DurationDist,
    /// Share of calls sent to one hot organization (0 to 1); the rest spread evenly.
    pub skew: f64,
    /// Share of calls that are never answered (busy, no answer).
    pub unanswered_rate: f64,
    /// Probability that any one delivery is sent twice.
    pub duplicate_rate: f64,
    /// Probability that a delivery swaps places with the next one.
    pub out_of_order_rate: f64,
    pub max_turns: u32,
    pub lifecycle: Lifecycle,
    pub seed: u64,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            orgs: 10,
            plans: PlanMix::default(),
            calls: 100,
            durations: DurationDist::default(),
            skew: 0.0,
            unanswered_rate: 0.05,
            duplicate_rate: 0.02,
            out_of_order_rate: 0.05,
            max_turns: 60,
            lifecycle: Lifecycle::Full,
            seed: 1,
        }
    }
}

/// One planned call.
#[derive(Clone, Debug, PartialEq)]
pub struct CallSpec {
    pub index: usize,
    /// Index into the organizations.
    pub org: usize,
    /// 0 for calls that never connected.
    pub duration_ms: u64,
    pub ended_reason: &'static str,
    /// Assistant and caller turns (0 for unanswered calls).
    pub turns: u32,
    /// How many times the model calls tools.
    pub tool_calls: u32,
    pub lifecycle: Lifecycle,
}

impl CallSpec {
    /// What callplane bills with its default rules: the duration rounded up to a whole second
    /// (as `ceil(durationSeconds)`), nothing for calls that never connected.
    pub fn billable_seconds(&self) -> i64 {
        if UNBILLED_REASONS.contains(&self.ended_reason) || self.duration_ms == 0 {
            0
        } else {
            self.duration_ms.div_ceil(1000) as i64
        }
    }
}

/// The whole plan: each organization's plan and every call.
#[derive(Clone, Debug)]
pub struct TrafficPlan {
    pub org_plans: Vec<&'static str>,
    /// The organization that takes `skew` of the traffic.
    pub hot_org: usize,
    pub calls: Vec<CallSpec>,
}

impl TrafficPlan {
    pub fn new(config: &TrafficConfig) -> Result<Self> {
        if config.orgs == 0 {
            bail!("at least one organization is needed");
        }
        let org_plans = config.plans.assign(config.orgs);
        // The hot organization must be able to take unlimited minutes.
        let hot_org = org_plans.iter().position(|p| *p != "starter").unwrap_or(0);
        let mut used = vec![0_i64; config.orgs];
        let non_starter: Vec<usize> = (0..config.orgs).filter(|&i| org_plans[i] != "starter").collect();

        let mut calls = Vec::with_capacity(config.calls);
        for index in 0..config.calls {
            let mut rng = item_rng(config.seed, stream::CALLS, index as u64);
            let mut org = if chance(&mut rng, config.skew) { hot_org } else { rng.random_range(0..config.orgs) };
            let answered = !chance(&mut rng, config.unanswered_rate);
            let mut duration_ms = if answered { config.durations.sample_ms(&mut rng) } else { 0 };
            let mut ended_reason =
                if answered { weighted(&mut rng, BILLED_REASONS) } else { *pick(&mut rng, UNBILLED_REASONS) };

            // Keep starter organizations inside their minutes: move the call to an organization
            // on an unlimited plan, or shorten it, or (with no minutes left) let it go unanswered.
            let billable = duration_ms.div_ceil(1000) as i64;
            if org_plans[org] == "starter" && used[org] + billable > STARTER_BUDGET_SECONDS {
                if non_starter.is_empty() {
                    let left = STARTER_BUDGET_SECONDS - used[org];
                    if left >= 5 {
                        duration_ms = (left as u64 - 1) * 1000 + rng.random_range(0..1000);
                    } else {
                        duration_ms = 0;
                        ended_reason = "customer-did-not-answer";
                    }
                } else {
                    org = *pick(&mut rng, &non_starter);
                }
            }

            let turns = if duration_ms == 0 {
                0
            } else {
                // About one turn every nine seconds, never fewer than two.
                let jitter: f64 = rng.random_range(0.7..1.3);
                ((duration_ms as f64 / 9_000.0 * jitter).round() as u32).clamp(2, config.max_turns.max(2))
            };
            let tool_calls = match rng.random_range(0..10) {
                _ if turns < 4 => 0,
                0..=2 => 0,
                3..=7 => 1,
                _ => 2,
            };
            let spec =
                CallSpec { index, org, duration_ms, ended_reason, turns, tool_calls, lifecycle: config.lifecycle };
            used[org] += spec.billable_seconds();
            calls.push(spec);
        }
        Ok(Self { org_plans, hot_org, calls })
    }

    /// Billable seconds per organization, over every planned call.
    pub fn seconds_per_org(&self) -> Vec<i64> {
        let mut seconds = vec![0; self.org_plans.len()];
        for call in &self.calls {
            seconds[call.org] += call.billable_seconds();
        }
        seconds
    }
}

/// A weighted choice from a constant table.
fn weighted(rng: &mut impl Rng, table: &[(&'static str, u32)]) -> &'static str {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut point = rng.random_range(0..total.max(1));
    for (item, weight) in table {
        if point < *weight {
            return item;
        }
        point -= weight;
    }
    table.first().map_or("customer-ended-call", |(item, _)| item)
}

/// The order in which a call's `events` (numbered `0..events`) are delivered: some swapped
/// with their successor (out of order) and some sent twice (the copy arrives a little later).
/// The first event, the `assistant-request`, always comes first: VAPI waits for its answer
/// before anything else happens.
pub fn deliveries(events: usize, duplicate_rate: f64, out_of_order_rate: f64, rng: &mut impl Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..events).collect();
    let mut i = 1;
    while i + 1 < events {
        if chance(rng, out_of_order_rate) {
            order.swap(i, i + 1);
            i += 2;
        } else {
            i += 1;
        }
    }
    // Each delivery gets a position; a duplicate lands 0.5 to 3.5 positions after its original.
    let mut keyed: Vec<(f64, usize)> = Vec::with_capacity(events + events / 8 + 1);
    for (position, &event) in order.iter().enumerate() {
        keyed.push((position as f64, event));
        if chance(rng, duplicate_rate) {
            keyed.push((position as f64 + rng.random_range(0.5..3.5), event));
        }
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    keyed.into_iter().map(|(_, event)| event).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn plan_mix_parses_and_assigns_exact_proportions() {
        let mix: PlanMix = "starter=2, pro=1,business=1".parse().unwrap();
        let plans = mix.assign(100);
        let count = |p: &str| plans.iter().filter(|x| **x == p).count();
        assert_eq!((count("starter"), count("pro"), count("business")), (50, 25, 25));
        // Interleaved: the first ten organizations are not all starter.
        assert!(plans[..10].iter().any(|p| *p != "starter"));
        assert!("gold=1".parse::<PlanMix>().is_err());
        assert!("starter=0".parse::<PlanMix>().is_err());
        assert!("starter".parse::<PlanMix>().is_err());
        assert_eq!(PlanMix::default().assign(1).len(), 1);
    }

    #[test]
    fn plans_are_reproducible_from_the_seed() {
        let config = TrafficConfig { calls: 500, ..TrafficConfig::default() };
        let a = TrafficPlan::new(&config).unwrap();
        let b = TrafficPlan::new(&config).unwrap();
        assert_eq!(a.calls, b.calls);
        let c = TrafficPlan::new(&TrafficConfig { seed: 2, ..config }).unwrap();
        assert_ne!(a.calls, c.calls);
    }

    #[test]
    fn starter_organizations_stay_within_their_minutes() {
        // Long calls, mostly starter organizations: the plan must move or shorten calls.
        let config = TrafficConfig {
            orgs: 4,
            plans: "starter=3,pro=1".parse().unwrap(),
            calls: 400,
            durations: DurationDist { mean_seconds: 600.0, ..DurationDist::default() },
            ..TrafficConfig::default()
        };
        let plan = TrafficPlan::new(&config).unwrap();
        for (org, seconds) in plan.seconds_per_org().iter().enumerate() {
            if plan.org_plans[org] == "starter" {
                assert!(*seconds <= STARTER_BUDGET_SECONDS, "org {org}: {seconds}s");
            }
        }
        // With only starter organizations, calls are shortened instead.
        let all_starter = TrafficConfig { plans: "starter=1".parse().unwrap(), ..config };
        let plan = TrafficPlan::new(&all_starter).unwrap();
        assert!(plan.seconds_per_org().iter().all(|s| *s <= STARTER_BUDGET_SECONDS));
        assert_eq!(plan.calls.len(), 400);
    }

    #[test]
    fn skew_sends_traffic_to_one_unlimited_organization() {
        let config = TrafficConfig { orgs: 20, calls: 1000, skew: 0.8, ..TrafficConfig::default() };
        let plan = TrafficPlan::new(&config).unwrap();
        assert_ne!(plan.org_plans[plan.hot_org], "starter");
        let hot = plan.calls.iter().filter(|c| c.org == plan.hot_org).count();
        assert!(hot > 780, "{hot} calls on the hot organization");
        let all = TrafficPlan::new(&TrafficConfig { skew: 1.0, ..config }).unwrap();
        assert!(all.calls.iter().all(|c| c.org == all.hot_org));
    }

    #[test]
    fn billable_seconds_round_up_and_skip_unanswered_calls() {
        let call = |duration_ms, ended_reason| CallSpec {
            index: 0,
            org: 0,
            duration_ms,
            ended_reason,
            turns: 2,
            tool_calls: 0,
            lifecycle: Lifecycle::Full,
        };
        assert_eq!(call(74_033, "customer-ended-call").billable_seconds(), 75);
        assert_eq!(call(74_000, "customer-ended-call").billable_seconds(), 74);
        assert_eq!(call(1, "silence-timed-out").billable_seconds(), 1);
        assert_eq!(call(0, "customer-did-not-answer").billable_seconds(), 0);
        assert_eq!(call(30_000, "customer-busy").billable_seconds(), 0);
    }

    #[test]
    fn durations_and_turns_stay_in_range() {
        let config = TrafficConfig { calls: 2000, unanswered_rate: 0.1, ..TrafficConfig::default() };
        let plan = TrafficPlan::new(&config).unwrap();
        for call in &plan.calls {
            if call.duration_ms == 0 {
                assert_eq!(call.turns, 0);
                assert!(UNBILLED_REASONS.contains(&call.ended_reason));
            } else {
                assert!((5_000..=1_800_000).contains(&call.duration_ms), "{call:?}");
                assert!((2..=60).contains(&call.turns), "{call:?}");
            }
        }
        let unanswered = plan.calls.iter().filter(|c| c.duration_ms == 0).count();
        assert!((120..280).contains(&unanswered), "{unanswered}");
    }

    #[test]
    fn deliveries_keep_every_event_and_the_assistant_request_first() {
        let mut rng = StdRng::seed_from_u64(9);
        assert_eq!(deliveries(6, 0.0, 0.0, &mut rng), vec![0, 1, 2, 3, 4, 5]);
        for _ in 0..200 {
            let order = deliveries(20, 0.2, 0.3, &mut rng);
            assert_eq!(order[0], 0);
            let mut seen = order.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..20).collect::<Vec<_>>());
            // Only the duplicates make it longer.
            assert!(order.len() >= 20);
        }
        // Every delivery duplicated, none reordered: each event appears exactly twice.
        let doubled = deliveries(10, 1.0, 0.0, &mut rng);
        assert_eq!(doubled.len(), 20);
        assert!((0..10).all(|e| doubled.iter().filter(|&&x| x == e).count() == 2));
        // Reordering happens when asked for.
        let swapped = deliveries(10, 0.0, 1.0, &mut rng);
        assert_ne!(swapped, (0..10).collect::<Vec<_>>());
        assert_eq!(deliveries(0, 0.5, 0.5, &mut rng), Vec::<usize>::new());
    }
}
