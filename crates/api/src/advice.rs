//! The phase advisor: every trigger of the plan, measured from what the servers counted day by
//! day and what the database holds, with the evidence beside each threshold; the phase to move
//! to and why; and what each phase costs a month.
//!
//! The figures are gathered elsewhere (`callplane serve` writes its counts to
//! `advisor_daily`; the server crate reads them with the database's own figures). This module
//! judges them: [`advise`] is a pure function, so `GET /admin/v1/advice` and `callplane
//! advise` say the same thing from the same figures.

use crate::auth::Admin;
use crate::{ApiError, AppState};
use async_trait::async_trait;
use axum::Json;
use axum::extract::State;
use callplane_core::seams::StoreError;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The plan's thresholds and each phase's monthly cost (`[advisor]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AdvisorSettings {
    /// The figures' window: the last this many UTC days, today included.
    pub window_days: u32,
    /// Fewer requests (or events) than this in the window are too few to judge a rate by.
    pub min_samples: u64,
    /// Phase 1 -> 2: the dashboard API's p95 above this.
    pub dashboard_p95_ms: u64,
    /// Phase 1 -> 2: an answer VAPI waits for is near its timeout past this share of
    /// `vapi.answer_deadline_ms`; the trigger fires when more than 1% are (their p99 is).
    pub answer_near_deadline: f64,
    /// Phase 1 -> 2: the share of webhook events that failed processing above this.
    pub webhook_failure_rate: f64,
    /// Phase 1 -> 2: this many calls in progress at once ...
    pub concurrent_calls: u64,
    /// ... on at least this many days of the window ("regularly").
    pub concurrent_days: u32,
    /// Phase 1 -> 2: at least this many searches asked for while search is off.
    pub searches_refused: u64,
    /// Phase 2 -> 3: the database's client connections at this share of what it allows.
    pub db_connections_share: f64,
    /// Phase 2 -> 3: Redis using more than this much memory.
    pub redis_memory_mb: f64,
    /// Phase 2 -> 3: the transcripts taking more than this on disk.
    pub transcripts_gb: f64,
    /// Phase 2 -> 3: at least this many live transcript messages from VAPI (sent only when an
    /// assistant is set up to stream them).
    pub live_transcript_messages: u64,
    /// Phase 2 -> 3: at least this many calls stored.
    pub calls_stored: u64,
    /// How often `serve` writes what it counted to `advisor_daily`.
    pub sample_interval_seconds: u64,
    /// What each phase costs a month, in US dollars (your own figures; the defaults are an
    /// estimate for managed services at the plan's scale).
    pub monthly_cost_usd: PhaseCosts,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PhaseCosts {
    pub phase1: f64,
    pub phase2: f64,
    pub phase3: f64,
}

/// One UTC day's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct DayFigures {
    #[schema(value_type = String, format = Date)]
    pub day: NaiveDate,
    pub dashboard_requests: u64,
    /// Dashboard requests slower than `dashboard_p95_ms`.
    pub dashboard_slow: u64,
    /// Answers VAPI waited for (assistant requests, tool calls, transfer destinations).
    pub answers: u64,
    /// Of those, the ones that took past `answer_near_deadline` of the deadline.
    pub answers_slow: u64,
    /// Webhook events that passed authentication.
    pub webhooks: u64,
    /// Events kept as dead letters (they could not be processed).
    pub failed_events: u64,
    pub searches_refused: u64,
    pub transcript_messages: u64,
    pub concurrent_calls_peak: u64,
    /// The highest share of the connections allowed that a server saw in use (0 to 1).
    pub db_connections_peak_share: f64,
    pub redis_memory_peak_bytes: u64,
}

/// Which backend serves each component, and the phase it belongs to.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Component {
    pub component: String,
    pub backend: String,
    pub phase: u8,
}

/// Redis's memory, as far as it is known now.
#[derive(Clone, Debug, Default)]
pub enum RedisMemory {
    /// No backend uses Redis.
    #[default]
    NotConfigured,
    Used(u64),
    /// Redis did not answer.
    Unreachable(String),
}

/// Everything the advisor judges.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// One entry per day of the window, oldest first.
    pub days: Vec<DayFigures>,
    pub db_connections_now: u64,
    pub db_connections_limit: u64,
    /// Whose limit binds: `server` (max_connections), `database` or `role` (CONNECTION LIMIT).
    pub db_connections_scope: String,
    /// Redis's `used_memory` now.
    pub redis_memory: RedisMemory,
    pub transcripts_bytes: u64,
    /// Counted up to one past the threshold.
    pub calls_stored: u64,
    pub answer_deadline_ms: u64,
    /// Whether transcript search is on (searches are then not refused).
    pub search_on: bool,
    pub components: Vec<Component>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Trigger {
    /// Stable: `dashboard_p95`, `answers_near_timeout`, `webhook_failures`,
    /// `concurrent_calls`, `search_demand`, `db_connections`, `redis_memory`,
    /// `transcripts_size`, `live_transcripts`, `calls_stored`.
    pub id: &'static str,
    /// The phase this trigger says to move to.
    pub phase: u8,
    pub title: &'static str,
    pub fired: bool,
    /// False when there was nothing (or too little) to measure.
    pub measured: bool,
    pub value: f64,
    pub threshold: f64,
    /// The figures behind `value`, in words.
    pub evidence: String,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PhaseCost {
    pub phase: u8,
    pub monthly_usd: f64,
    pub current: bool,
    pub recommended: bool,
}

/// What `GET /admin/v1/advice` and `callplane advise --json` answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Advice {
    pub generated_at: DateTime<Utc>,
    /// The phase every component is on (1 until all of phase 2's are moved).
    pub current_phase: u8,
    /// The phase to be on: the current one, or the one a fired trigger names.
    pub recommended_phase: u8,
    /// One line: move (and why), or stay.
    pub summary: String,
    pub components: Vec<Component>,
    pub triggers: Vec<Trigger>,
    pub costs: Vec<PhaseCost>,
    pub window_days: u32,
    /// The daily figures the triggers were judged on, oldest first.
    pub days: Vec<DayFigures>,
}

/// Where the advice comes from (the server gathers the figures).
#[async_trait]
pub trait AdviceSource: Send + Sync {
    async fn advice(&self) -> Result<Advice, StoreError>;
}

const MB: f64 = 1024.0 * 1024.0;
const GB: f64 = MB * 1024.0;

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GB { format!("{:.2} GB", b / GB) } else { format!("{:.1} MB", b / MB) }
}

fn percent(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// Judges `figures` against the plan's thresholds.
pub fn advise(settings: &AdvisorSettings, figures: &Figures, now: DateTime<Utc>) -> Advice {
    let t = settings;
    let sum = |f: fn(&DayFigures) -> u64| figures.days.iter().map(f).sum::<u64>();
    let days = figures.days.len();
    let window = format!("in the last {days} days");
    let mut triggers = Vec::new();

    // A rate: fired above `limit` once there are enough samples to judge.
    // `rule` says what the share means.
    let rate = |id, phase, title, part: u64, whole: u64, limit: f64, what: &str, part_what: &str, rule: &str| {
        let measured = whole >= t.min_samples && whole > 0;
        let value = share(part, whole);
        let evidence = if measured {
            format!("{part} of {whole} {what} {part_what} {window} ({}){rule}", percent(value))
        } else {
            format!("{whole} {what} {window}: fewer than the {} needed to judge", t.min_samples)
        };
        Trigger { id, phase, title, fired: measured && value > limit, measured, value, threshold: limit, evidence }
    };

    let (requests, slow) = (sum(|d| d.dashboard_requests), sum(|d| d.dashboard_slow));
    triggers.push(rate(
        "dashboard_p95",
        2,
        "dashboard queries p95 over the threshold",
        slow,
        requests,
        0.05,
        "dashboard requests",
        &format!("took over {} ms", t.dashboard_p95_ms),
        &format!("; p95 is over {} ms when more than 5% do", t.dashboard_p95_ms),
    ));
    let near_ms = (figures.answer_deadline_ms as f64 * t.answer_near_deadline).round();
    triggers.push(rate(
        "answers_near_timeout",
        2,
        "tool-call answers near VAPI's timeout",
        sum(|d| d.answers_slow),
        sum(|d| d.answers),
        0.01,
        "answers VAPI waited for",
        &format!(
            "took over {near_ms} ms ({} of the {} ms answer deadline)",
            percent(t.answer_near_deadline),
            figures.answer_deadline_ms
        ),
        "; p99 is near the timeout when more than 1% do",
    ));
    let (webhooks, failed) = (sum(|d| d.webhooks), sum(|d| d.failed_events));
    triggers.push(rate(
        "webhook_failures",
        2,
        "webhook processing failures",
        failed,
        webhooks.max(failed),
        t.webhook_failure_rate,
        "webhook events",
        "failed processing (kept as dead letters)",
        "",
    ));

    let busy: Vec<String> = figures
        .days
        .iter()
        .filter(|d| d.concurrent_calls_peak >= t.concurrent_calls)
        .map(|d| format!("{} ({})", d.day, d.concurrent_calls_peak))
        .collect();
    let peak = figures.days.iter().map(|d| d.concurrent_calls_peak).max().unwrap_or(0);
    triggers.push(Trigger {
        id: "concurrent_calls",
        phase: 2,
        title: "many concurrent calls, regularly",
        fired: busy.len() >= t.concurrent_days as usize,
        measured: true,
        value: busy.len() as f64,
        threshold: f64::from(t.concurrent_days),
        evidence: format!(
            "{} of {days} days had {}+ calls in progress at once (at least {} days fire it){}; the highest: {peak}",
            busy.len(),
            t.concurrent_calls,
            t.concurrent_days,
            if busy.is_empty() { String::new() } else { format!(": {}", busy.join(", ")) },
        ),
    });

    let refused = sum(|d| d.searches_refused);
    // Searches refused before search was turned on are no demand any more.
    triggers.push(at_least(
        "search_demand",
        2,
        "searches asked for while search is off",
        if figures.search_on { 0 } else { refused },
        t.searches_refused,
        if figures.search_on {
            format!("search is on; {refused} searches were refused {window}")
        } else {
            format!("{refused} searches were asked for and refused (search is off) {window}")
        },
    ));

    let limit = figures.db_connections_limit;
    let now_share = share(figures.db_connections_now, limit);
    let peak = figures.days.iter().map(|d| d.db_connections_peak_share).fold(now_share, f64::max);
    triggers.push(Trigger {
        id: "db_connections",
        phase: 3,
        title: "database connections near the limit",
        fired: limit > 0 && peak >= t.db_connections_share,
        measured: limit > 0,
        value: peak,
        threshold: t.db_connections_share,
        evidence: format!(
            "at most {} of the connections allowed were in use {window}; now {} of {} (the {} limit)",
            percent(peak),
            figures.db_connections_now,
            limit,
            figures.db_connections_scope
        ),
    });

    let redis_peak = figures.days.iter().map(|d| d.redis_memory_peak_bytes).max().unwrap_or(0);
    let (measured, bytes, evidence) = match &figures.redis_memory {
        RedisMemory::Used(now) => {
            let bytes = redis_peak.max(*now);
            (
                true,
                bytes,
                format!("Redis used at most {:.1} MB {window} (now {:.1} MB)", bytes as f64 / MB, *now as f64 / MB),
            )
        }
        RedisMemory::NotConfigured => (false, redis_peak, "no Redis is configured (phase 1)".to_owned()),
        RedisMemory::Unreachable(e) => (
            redis_peak > 0,
            redis_peak,
            format!("Redis did not answer ({e}); at most {:.1} MB seen {window}", redis_peak as f64 / MB),
        ),
    };
    let mb = bytes as f64 / MB;
    triggers.push(Trigger {
        id: "redis_memory",
        phase: 3,
        title: "Redis memory over the threshold",
        fired: mb > t.redis_memory_mb,
        measured,
        value: mb,
        threshold: t.redis_memory_mb,
        evidence,
    });

    let gb = figures.transcripts_bytes as f64 / GB;
    triggers.push(Trigger {
        id: "transcripts_size",
        phase: 3,
        title: "transcripts over the size threshold",
        fired: gb > t.transcripts_gb,
        measured: true,
        value: gb,
        threshold: t.transcripts_gb,
        evidence: format!("the transcripts take {} in the database", size(figures.transcripts_bytes)),
    });

    let live = sum(|d| d.transcript_messages);
    triggers.push(at_least(
        "live_transcripts",
        3,
        "live transcript streaming wanted",
        live,
        t.live_transcript_messages,
        format!(
            "VAPI sent {live} live transcript messages {window} (it sends them only to assistants set to stream them)"
        ),
    ));

    let calls = figures.calls_stored;
    triggers.push(at_least(
        "calls_stored",
        3,
        "calls stored over the threshold",
        calls,
        t.calls_stored,
        if calls > t.calls_stored {
            format!("more than {} calls are stored", t.calls_stored)
        } else {
            format!("{calls} calls are stored")
        },
    ));

    let current_phase = current_phase(&figures.components);
    let wanted = triggers.iter().filter(|t| t.fired).map(|t| t.phase).max().unwrap_or(1);
    let recommended_phase = current_phase.max(wanted);
    let summary = summary(current_phase, recommended_phase, &triggers);
    let costs = [(1, t.monthly_cost_usd.phase1), (2, t.monthly_cost_usd.phase2), (3, t.monthly_cost_usd.phase3)]
        .into_iter()
        .map(|(phase, monthly_usd)| PhaseCost {
            phase,
            monthly_usd,
            current: phase == current_phase,
            recommended: phase == recommended_phase,
        })
        .collect();
    Advice {
        generated_at: now,
        current_phase,
        recommended_phase,
        summary,
        components: figures.components.clone(),
        triggers,
        costs,
        window_days: t.window_days,
        days: figures.days.clone(),
    }
}

/// A trigger that fires once a count reaches its threshold.
fn at_least(id: &'static str, phase: u8, title: &'static str, count: u64, threshold: u64, evidence: String) -> Trigger {
    Trigger {
        id,
        phase,
        title,
        fired: count >= threshold,
        measured: true,
        value: count as f64,
        threshold: threshold as f64,
        evidence,
    }
}

/// The phase every component has reached: a phase is reached once each component that phase
/// moves is on its backend.
fn current_phase(components: &[Component]) -> u8 {
    components.iter().map(|c| c.phase).min().unwrap_or(1).max(1)
}

fn summary(current: u8, recommended: u8, triggers: &[Trigger]) -> String {
    let fired: Vec<&str> = triggers.iter().filter(|t| t.fired && t.phase > current).map(|t| t.id).collect();
    if recommended > current {
        let through = if recommended > current + 1 {
            format!(" (through phase {}'s steps first)", current + 1)
        } else {
            String::new()
        };
        format!("Move to phase {recommended}{through}: {} fired.", fired.join(", "))
    } else if current >= 3 {
        "Stay on phase 3, the last.".to_owned()
    } else {
        format!("Stay on phase {current}: no trigger for phase {} has fired.", current + 1)
    }
}

/// The phase advisor: every trigger of the plan, measured from the servers' daily figures and
/// the database, with the evidence beside each threshold, the phase to move to, and each
/// phase's monthly cost.
#[utoipa::path(
    get,
    path = "/admin/v1/advice",
    tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, body = Advice),
        (status = 401, body = crate::error::ErrorBody),
        (status = 503, description = "The database did not answer", body = crate::error::ErrorBody),
    )
)]
pub async fn advice(State(s): State<AppState>, _: Admin) -> Result<Json<Advice>, ApiError> {
    Ok(Json(s.advice.advice().await?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings() -> AdvisorSettings {
        AdvisorSettings {
            window_days: 7,
            min_samples: 100,
            dashboard_p95_ms: 200,
            answer_near_deadline: 0.5,
            webhook_failure_rate: 0.01,
            concurrent_calls: 50,
            concurrent_days: 3,
            searches_refused: 1,
            db_connections_share: 0.8,
            redis_memory_mb: 256.0,
            transcripts_gb: 10.0,
            live_transcript_messages: 1,
            calls_stored: 1_000_000,
            sample_interval_seconds: 60,
            monthly_cost_usd: PhaseCosts { phase1: 50.0, phase2: 250.0, phase3: 700.0 },
        }
    }

    fn figures() -> Figures {
        let day =
            |d| DayFigures { day: NaiveDate::from_ymd_opt(2026, 11, d).unwrap_or_default(), ..Default::default() };
        Figures {
            days: (24..=30).map(day).collect(),
            db_connections_limit: 97,
            answer_deadline_ms: 1000,
            components: vec![Component { component: "usage_counter".into(), backend: "postgres".into(), phase: 1 }],
            ..Default::default()
        }
    }

    fn fired(advice: &Advice) -> Vec<&'static str> {
        advice.triggers.iter().filter(|t| t.fired).map(|t| t.id).collect()
    }

    #[test]
    fn quiet_figures_say_stay_and_each_rate_fires_only_past_its_threshold_with_enough_samples() {
        let now = Utc::now();
        let mut f = figures();
        let quiet = advise(&settings(), &f, now);
        assert_eq!(fired(&quiet), Vec::<&str>::new());
        assert_eq!((quiet.current_phase, quiet.recommended_phase), (1, 1));
        assert_eq!(quiet.summary, "Stay on phase 1: no trigger for phase 2 has fired.");
        // 5% exactly is p95 at the line, not over it; one more slow request is over.
        f.days[0].dashboard_requests = 1000;
        f.days[0].dashboard_slow = 50;
        assert_eq!(fired(&advise(&settings(), &f, now)), Vec::<&str>::new());
        f.days[1].dashboard_slow = 1;
        let moved = advise(&settings(), &f, now);
        assert_eq!(fired(&moved), vec!["dashboard_p95"]);
        assert_eq!((moved.recommended_phase, moved.summary.as_str()), (2, "Move to phase 2: dashboard_p95 fired."));
        // Too few samples: not judged, however slow.
        let mut few = figures();
        few.days[0].answers = 99;
        few.days[0].answers_slow = 99;
        let advice = advise(&settings(), &few, now);
        let answers = advice.triggers.iter().find(|t| t.id == "answers_near_timeout").unwrap();
        assert!(!answers.fired && !answers.measured, "{answers:?}");
    }

    #[test]
    fn a_phase_3_trigger_from_phase_1_says_so_and_the_costs_mark_both_phases() {
        let mut f = figures();
        f.calls_stored = 1_000_000;
        let advice = advise(&settings(), &f, Utc::now());
        assert_eq!(fired(&advice), vec!["calls_stored"]);
        assert_eq!(advice.recommended_phase, 3);
        assert_eq!(advice.summary, "Move to phase 3 (through phase 2's steps first): calls_stored fired.");
        let marks: Vec<(u8, bool, bool)> = advice.costs.iter().map(|c| (c.phase, c.current, c.recommended)).collect();
        assert_eq!(marks, vec![(1, true, false), (2, false, false), (3, false, true)]);
    }
}
