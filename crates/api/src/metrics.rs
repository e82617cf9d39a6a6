//! A small Prometheus text registry: counters and latency histograms by label. No global
//! state; one per app. These are the figures the phase advisor reads.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Seconds; from sub-millisecond answers up to VAPI's 7.5 s assistant-request limit.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5];

#[derive(Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

#[derive(Default)]
struct Histograms(Mutex<BTreeMap<&'static str, Histogram>>);

impl Histograms {
    fn observe(&self, label: &'static str, d: Duration) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(label).or_default().observe(d.as_secs_f64());
        }
    }

    fn render(&self, out: &mut String, name: &str, label: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let Ok(m) = self.0.lock() else { return };
        for (value, h) in m.iter() {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"{b}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {}", h.count);
        }
    }
}

/// The message types VAPI waits for an answer to.
const ANSWERED: [&str; 4] = ["assistant-request", "tool-calls", "function-call", "transfer-destination-request"];

/// Webhook outcomes of requests that never reached callplane's processing (not counted as
/// webhooks by the advisor).
const TURNED_AWAY: [&str; 4] = ["unauthorized", "throttled", "shed", "too_large"];

/// What the phase advisor counts, since the process started (see [`Metrics::advisor_counts`]).
#[derive(Default)]
struct AdvisorCounts {
    dashboard_requests: AtomicU64,
    /// Dashboard requests slower than the advisor's p95 threshold.
    dashboard_slow: AtomicU64,
    answers: AtomicU64,
    /// Answers VAPI waited for that took past the advisor's "near the timeout".
    answers_slow: AtomicU64,
    webhooks: AtomicU64,
    transcript_messages: AtomicU64,
}

/// Where the advisor's counts draw their lines.
#[derive(Clone, Copy, Debug)]
pub struct AdvisorLimits {
    /// A dashboard request slower than this counts against the p95 threshold.
    pub dashboard_slow: Duration,
    /// An answer slower than this is near VAPI's timeout.
    pub answer_slow: Duration,
}

impl Default for AdvisorLimits {
    fn default() -> Self {
        Self { dashboard_slow: Duration::from_millis(200), answer_slow: Duration::from_millis(500) }
    }
}

#[derive(Default)]
pub struct Metrics {
    limits: AdvisorLimits,
    advisor: AdvisorCounts,
    /// (message type, outcome) -> count.
    webhook_events: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    webhook_latency: Histograms,
    api_latency: Histograms,
    realtime_delivery: Histograms,
    realtime_lagged: Mutex<u64>,
    panics: AtomicU64,
    search_refused: AtomicU64,
}

impl Metrics {
    pub fn new(limits: AdvisorLimits) -> Self {
        Self { limits, ..Self::default() }
    }

    /// The advisor's counts since the process started: (figure, count). The sampler writes
    /// what they grew by to `advisor_daily`.
    pub fn advisor_counts(&self) -> [(&'static str, u64); 7] {
        let a = &self.advisor;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("dashboard_requests", n(&a.dashboard_requests)),
            ("dashboard_slow", n(&a.dashboard_slow)),
            ("answers", n(&a.answers)),
            ("answers_slow", n(&a.answers_slow)),
            ("webhooks", n(&a.webhooks)),
            ("transcript_messages", n(&a.transcript_messages)),
            ("searches_refused", n(&self.search_refused)),
        ]
    }

    /// A request handler panicked (answered 500; a webhook's body was kept).
    pub fn panicked(&self) {
        self.panics.fetch_add(1, Ordering::Relaxed);
    }

    /// A search asked for while search is off (the advisor reads it as demand).
    pub fn search_refused(&self) {
        self.search_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    pub fn webhook_event(&self, message_type: &'static str, outcome: &'static str, took: Duration) {
        if let Ok(mut m) = self.webhook_events.lock() {
            *m.entry((message_type, outcome)).or_default() += 1;
        }
        let a = &self.advisor;
        if !TURNED_AWAY.contains(&outcome) {
            a.webhooks.fetch_add(1, Ordering::Relaxed);
        }
        if ANSWERED.contains(&message_type) {
            a.answers.fetch_add(1, Ordering::Relaxed);
            if took > self.limits.answer_slow {
                a.answers_slow.fetch_add(1, Ordering::Relaxed);
            }
        }
        if message_type == "transcript" {
            a.transcript_messages.fetch_add(1, Ordering::Relaxed);
        }
        self.webhook_latency.observe(message_type, took);
    }

    pub fn webhook_count(&self, message_type: &str, outcome: &str) -> u64 {
        self.webhook_events
            .lock()
            .map(|m| m.iter().filter(|((t, o), _)| *t == message_type && *o == outcome).map(|(_, n)| *n).sum())
            .unwrap_or(0)
    }

    pub fn api_query(&self, route: &'static str, took: Duration) {
        self.api_latency.observe(route, took);
        self.advisor.dashboard_requests.fetch_add(1, Ordering::Relaxed);
        if took > self.limits.dashboard_slow {
            self.advisor.dashboard_slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn realtime_delivered(&self, lag: Duration) {
        self.realtime_delivery.observe("event", lag);
    }

    pub fn realtime_lagged(&self) {
        if let Ok(mut n) = self.realtime_lagged.lock() {
            *n += 1;
        }
    }

    /// Renders in the Prometheus text format, with gauges and counters supplied by the caller.
    pub fn render(&self, gauges: &[(&str, &str, f64)], counters: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP callplane_webhook_events_total VAPI webhook messages by type and outcome.\n");
        out.push_str("# TYPE callplane_webhook_events_total counter\n");
        if let Ok(m) = self.webhook_events.lock() {
            for ((t, o), n) in m.iter() {
                let _ = writeln!(out, "callplane_webhook_events_total{{type=\"{t}\",outcome=\"{o}\"}} {n}");
            }
        }
        self.webhook_latency.render(
            &mut out,
            "callplane_webhook_seconds",
            "type",
            "Time to answer a VAPI webhook, by message type.",
        );
        self.api_latency.render(&mut out, "callplane_api_seconds", "route", "Dashboard API latency, by route.");
        self.realtime_delivery.render(
            &mut out,
            "callplane_realtime_delivery_seconds",
            "stream",
            "From publish to WebSocket send.",
        );
        let lagged = self.realtime_lagged.lock().map(|n| *n).unwrap_or(0);
        let _ = writeln!(
            out,
            "# HELP callplane_realtime_lagged_total Subscribers told to resume because they fell behind.\n\
             # TYPE callplane_realtime_lagged_total counter\ncallplane_realtime_lagged_total {lagged}"
        );
        let refused = self.search_refused.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP callplane_search_refused_total Searches asked for while transcript search is off.\n\
             # TYPE callplane_search_refused_total counter\ncallplane_search_refused_total {refused}"
        );
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        out
    }
}
