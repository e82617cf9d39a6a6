//! An experiment's findings: the figures gathered from the loadgen's summary, `GET /metrics`
//! and the books, the checks they must pass (each failure named by its check, e.g. `books:` or
//! `assistant-request:`), and the row of the results table. Pure: the experiments in the parent
//! module do the I/O.

use std::time::Duration;

use serde_json::{Value, json};

use crate::http;
use crate::util::format_duration;

/// The server's answer deadline (`[vapi] answer_deadline_ms`), set explicitly so that the check
/// and the server agree.
pub const ANSWER_DEADLINE_MS: u64 = 1000;
/// What the client's own overhead may add to the deadline (connection, signing, scheduling on a
/// machine it shares with the server).
pub const CLIENT_SLACK_MS: u64 = 250;
/// `/readyz` must answer within this long, whatever the database does (checked with the same
/// allowance for the client as the answer deadline).
pub const READYZ_LIMIT: Duration = Duration::from_secs(1);
pub const PEAK_RSS_LIMIT_MIB: f64 = 256.0;
pub const IDLE_RSS_LIMIT_MIB: f64 = 100.0;

/// What happened to the readiness probe during an experiment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeStats {
    pub answers: u64,
    pub slowest: Duration,
    /// Answers slower than [`READYZ_LIMIT`] plus [`CLIENT_SLACK_MS`].
    pub slow: u64,
    /// Connected, but no answer within the probe's timeout.
    pub unanswered: u64,
}

/// One experiment's findings: a row of the table.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub experiment: String,
    pub calls: Option<u64>,
    pub reports: Option<u64>,
    pub fault: String,
    pub lost_metric: Option<f64>,
    pub unbilled_calls: Option<u64>,
    pub double_billed_calls: Option<u64>,
    pub over_counted_seconds: Option<i64>,
    pub other_5xx: u64,
    pub status_503: u64,
    pub status_503_without_retry_after: u64,
    pub connection_errors: u64,
    pub timeouts: u64,
    pub shed_metric: Option<f64>,
    pub assistant_max_ms: Option<f64>,
    /// The server's own view, from its `callplane_webhook_seconds` histogram: the bucket bound
    /// (in seconds) under which every `assistant-request` it answered fell (since its last
    /// start).
    pub server_assistant_bound: Option<f64>,
    pub readyz: ProbeStats,
    pub rss_peak_kb: Option<u64>,
    pub rss_idle_kb: Option<u64>,
    pub books_balanced: Option<bool>,
    pub books_line: String,
    /// The checks that failed, each naming itself first.
    pub failures: Vec<String>,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "experiment": self.experiment, "calls": self.calls, "reports": self.reports, "fault": self.fault,
            "events_lost_total": self.lost_metric, "unbilled_calls": self.unbilled_calls,
            "double_billed_calls": self.double_billed_calls, "over_counted_seconds": self.over_counted_seconds,
            "other_5xx": self.other_5xx, "status_503": self.status_503,
            "status_503_without_retry_after": self.status_503_without_retry_after,
            "connection_errors": self.connection_errors, "timeouts": self.timeouts,
            "webhook_shed_total": self.shed_metric, "assistant_request_max_ms": self.assistant_max_ms,
            "assistant_request_server_bound_seconds": self.server_assistant_bound.filter(|b| b.is_finite()),
            "readyz_max_ms": self.readyz.slowest.as_secs_f64() * 1000.0, "readyz_slow": self.readyz.slow,
            "readyz_unanswered": self.readyz.unanswered,
            "rss_peak_mib": self.rss_peak_kb.map(mib), "rss_idle_mib": self.rss_idle_kb.map(mib),
            "books_balanced": self.books_balanced, "books": self.books_line, "failures": self.failures,
        })
    }

    /// Reads the loadgen's summary (`simulate` or `burst`): answers by class, the slowest
    /// `assistant-request`, and the checks on the answers themselves.
    pub fn record_traffic(&mut self, summary: &Value) {
        let total = summary.get("status_total").cloned().unwrap_or(Value::Null);
        let count = |field: &str| total.get(field).and_then(Value::as_u64).unwrap_or(0);
        self.other_5xx = count("other_5xx");
        self.status_503 = count("status_503");
        self.status_503_without_retry_after = count("status_503_without_retry_after");
        self.connection_errors = count("connection_errors");
        self.timeouts = count("timeouts");
        self.reports = summary.get("reports").and_then(Value::as_u64);
        self.assistant_max_ms = summary.pointer("/max_answer_ms/assistant-request").and_then(Value::as_f64);

        let ar = summary.pointer("/statuses/assistant-request").cloned().unwrap_or(Value::Null);
        let ar_count = |field: &str| ar.get(field).and_then(Value::as_u64).unwrap_or(0);
        let not_ok = ar_count("status_503") + ar_count("other_5xx") + ar_count("other_status") + ar_count("timeouts");
        if not_ok > 0 {
            self.failures.push(format!(
                "assistant-request: {not_ok} answers were not 200 ({} 503, {} other 5xx, {} other statuses, {} timeouts)",
                ar_count("status_503"),
                ar_count("other_5xx"),
                ar_count("other_status"),
                ar_count("timeouts")
            ));
        }
        // Answered 200, but not an answer VAPI can use: the caller hears a refusal, or a tool
        // gets no result.
        let samples: Vec<&str> = summary
            .get("error_samples")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut unusable_total = 0;
        if let Some(unusable) = summary.get("unusable_answers").and_then(Value::as_object) {
            for (kind, count) in unusable {
                let count = count.as_u64().unwrap_or(0);
                if count == 0 {
                    continue;
                }
                unusable_total += count;
                let sample = samples.iter().find(|s| s.starts_with(&format!("{kind} of call"))).copied().unwrap_or("");
                let what = if kind == "assistant-request" { "refused the call" } else { "gave no result" };
                self.failures.push(format!("{kind}: {count} answers were 200 but {what} (first: {sample})"));
            }
        }
        let errors = summary.get("errors").and_then(Value::as_u64).unwrap_or(0).saturating_sub(unusable_total);
        if errors > 0 {
            let first = samples
                .iter()
                .find(|s| !s.contains(": refused:") && !s.contains("tool call"))
                .or(samples.first())
                .copied()
                .unwrap_or("");
            self.failures.push(format!("deliveries: {errors} failed for good (first: {first})"));
        }
    }

    /// Reads `callplane_events_lost_total`, `callplane_webhook_shed_total` and the server's own
    /// `assistant-request` latencies from the text of `GET /metrics`.
    pub fn record_metrics(&mut self, text: &str) {
        self.lost_metric = http::metric(text, "callplane_events_lost_total");
        self.server_assistant_bound =
            http::histogram_bound(text, "callplane_webhook_seconds", "type", "assistant-request");
        self.shed_metric = http::metric(text, "callplane_webhook_shed_total");
        match self.lost_metric {
            None => self.failures.push("lost: callplane_events_lost_total is not on /metrics".into()),
            Some(lost) if lost != 0.0 => self.failures.push(format!("lost: callplane_events_lost_total = {lost}")),
            Some(_) => {}
        }
    }

    /// Reads the output of `callplane-loadgen books`.
    pub fn record_books(&mut self, books: &Value) {
        let number = |field: &str| books.get(field).and_then(Value::as_u64);
        self.calls = number("expected_calls");
        self.unbilled_calls = number("unbilled_calls");
        self.double_billed_calls = number("double_billed_calls");
        self.over_counted_seconds = books.get("over_counted_seconds").and_then(Value::as_i64);
        let problems = number("problem_count").unwrap_or(u64::MAX);
        let database = books.get("database_checked").and_then(Value::as_bool) == Some(true);
        let balanced = problems == 0 && database;
        self.books_balanced = Some(balanced);
        self.books_line = format!(
            "{}/{} calls, {} ledger rows; seconds: simulated {}, ledger {}, counters {}",
            number("calls_found").unwrap_or(0),
            self.calls.unwrap_or(0),
            number("ledger_rows").unwrap_or(0),
            books.get("expected_seconds").and_then(Value::as_i64).unwrap_or(0),
            books.get("ledger_seconds").and_then(Value::as_i64).unwrap_or(0),
            books.get("counter_seconds").and_then(Value::as_i64).unwrap_or(0),
        );
        if !balanced {
            let first = books.pointer("/problems/0").and_then(Value::as_str).unwrap_or("the database was not read");
            self.failures.push(format!("books: do not balance ({problems} problems; first: {first})"));
        }
        if let Some(n) = self.unbilled_calls.filter(|n| *n > 0) {
            self.failures.push(format!("lost: {n} simulated calls were never billed"));
        }
        let double = self.double_billed_calls.unwrap_or(0);
        let over = self.over_counted_seconds.unwrap_or(0);
        if double > 0 || over > 0 {
            self.failures.push(format!("double-billed: {double} calls billed twice, {over} seconds counted twice"));
        }
    }

    /// The checks that need the whole row; `idle_wait` is how long a burst's server was left
    /// idle before its RSS was read.
    pub fn check(&mut self, idle_wait: Option<Duration>) {
        let limit = (ANSWER_DEADLINE_MS + CLIENT_SLACK_MS) as f64;
        match self.assistant_max_ms {
            None => self.failures.push("assistant-request: none was answered".into()),
            Some(ms) if ms > limit => {
                let server = match self.server_assistant_bound {
                    Some(bound) if bound.is_finite() => {
                        format!("; the server's histogram puts them all under {bound} s")
                    }
                    Some(_) => "; the server's histogram has some beyond its last bucket".to_string(),
                    None => String::new(),
                };
                self.failures.push(format!(
                    "assistant-request: the slowest answer took {ms:.0} ms, over the {ANSWER_DEADLINE_MS} ms deadline \
                     (+{CLIENT_SLACK_MS} ms for the client){server}"
                ));
            }
            Some(_) => {}
        }
        if self.other_5xx > 0 {
            self.failures.push(format!("5xx: {} answers were 5xx other than 503", self.other_5xx));
        }
        if self.status_503_without_retry_after > 0 {
            self.failures
                .push(format!("5xx: {} 503 answers carried no Retry-After", self.status_503_without_retry_after));
        }
        if self.readyz.slow > 0 || self.readyz.unanswered > 0 {
            self.failures.push(format!(
                "readyz: {} answers slower than {} ms (+{CLIENT_SLACK_MS} ms for the client) and {} probes \
                 unanswered within 3 s (slowest {:.0} ms)",
                self.readyz.slow,
                READYZ_LIMIT.as_millis(),
                self.readyz.unanswered,
                self.readyz.slowest.as_secs_f64() * 1000.0
            ));
        }
        if let Some(idle_wait) = idle_wait {
            match self.rss_peak_kb.map(mib) {
                Some(peak) if peak >= PEAK_RSS_LIMIT_MIB => self
                    .failures
                    .push(format!("rss-peak: {peak:.0} MiB during the burst (limit {PEAK_RSS_LIMIT_MIB} MiB)")),
                None | Some(0.0) => self.failures.push("rss-peak: not measured".into()),
                Some(_) => {}
            }
            match self.rss_idle_kb.map(mib) {
                Some(idle) if idle >= IDLE_RSS_LIMIT_MIB => self.failures.push(format!(
                    "rss-idle: {idle:.0} MiB {} after the burst (limit {IDLE_RSS_LIMIT_MIB} MiB)",
                    format_duration(idle_wait)
                )),
                None => self.failures.push("rss-idle: not measured".into()),
                Some(_) => {}
            }
        }
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub fn table_header() -> String {
    "| Experiment | Calls | End-of-call reports sent | Fault | Lost | Double-billed | 5xx | 503s | assistant-request max \
     | /readyz max | Server RSS peak / idle | Books | Result |\n\
     |---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
        .to_string()
}

pub fn table_line(row: &Row) -> String {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "—".to_string());
    let metric = row.lost_metric.map_or_else(|| "metric missing".to_string(), |m| format!("{m}"));
    let lost = match row.unbilled_calls {
        Some(n) if n > 0 => format!("{metric}; {n} calls unbilled"),
        _ => metric,
    };
    let double = row.double_billed_calls.map(|d| match row.over_counted_seconds {
        Some(over) if over > 0 => format!("{d} (+{over} s counted)"),
        _ => d.to_string(),
    });
    let five_xx = if row.status_503_without_retry_after > 0 {
        format!("{} (+{} 503 without Retry-After)", row.other_5xx, row.status_503_without_retry_after)
    } else {
        row.other_5xx.to_string()
    };
    let shed = match row.shed_metric {
        Some(metric) => format!("{} (server: {metric})", row.status_503),
        None => row.status_503.to_string(),
    };
    let rss = match (row.rss_peak_kb, row.rss_idle_kb) {
        (Some(peak), Some(idle)) => format!("{:.0} / {:.0} MiB", mib(peak), mib(idle)),
        (Some(peak), None) => format!("{:.0} MiB / —", mib(peak)),
        _ => "—".to_string(),
    };
    let books = match row.books_balanced {
        Some(true) => "balanced".to_string(),
        Some(false) => "DO NOT BALANCE".to_string(),
        None => "—".to_string(),
    };
    let result = if row.passed() {
        "pass".to_string()
    } else {
        let names: Vec<&str> = row.failures.iter().map(|f| f.split(':').next().unwrap_or(f)).collect();
        let mut unique: Vec<&str> = Vec::new();
        for name in names {
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        format!("FAIL: {}", unique.join(", "))
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} ms | {} | {} | {} |",
        row.experiment,
        or_dash(row.calls.map(|c| c.to_string())),
        or_dash(row.reports.map(|r| r.to_string())),
        if row.fault.is_empty() { "—" } else { &row.fault },
        lost,
        or_dash(double),
        five_xx,
        shed,
        or_dash(row.assistant_max_ms.map(|ms| format!("{ms:.0} ms"))),
        row.readyz.slowest.as_secs_f64() * 1000.0,
        rss,
        books,
        result,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_name_their_failed_checks() {
        let mut row = Row {
            experiment: "db-stop".into(),
            calls: Some(48),
            reports: Some(48),
            fault: "PostgreSQL down 5.1 s".into(),
            lost_metric: Some(0.0),
            unbilled_calls: Some(0),
            double_billed_calls: Some(0),
            over_counted_seconds: Some(0),
            status_503: 3,
            shed_metric: Some(3.0),
            assistant_max_ms: Some(12.4),
            rss_peak_kb: Some(40 * 1024),
            books_balanced: Some(true),
            ..Row::default()
        };
        let line = table_line(&row);
        assert!(
            line.starts_with("| db-stop | 48 | 48 | PostgreSQL down 5.1 s | 0 | 0 | 0 | 3 (server: 3) | 12 ms |"),
            "{line}"
        );
        assert!(line.ends_with("| 40 MiB / — | balanced | pass |"), "{line}");
        row.failures = vec!["books: do not balance".into(), "lost: 2 simulated calls".into(), "books: again".into()];
        row.lost_metric = None;
        let line = table_line(&row);
        assert!(line.ends_with("| FAIL: books, lost |"), "{line}");
        assert!(line.contains("| metric missing |"), "{line}");
        // The header and a line have the same number of columns.
        let columns = |s: &str| s.matches('|').count();
        assert_eq!(columns(table_header().lines().next().unwrap()), columns(&line));
    }

    fn summary() -> Value {
        json!({
            "reports": 41,
            "errors": 3,
            "error_samples": [
                "assistant-request of call a: refused: \"Sorry, we cannot take your call right now.\"",
                "status-update of call b answered 500 Internal Server Error: {}",
                "assistant-request of call c: refused: \"Sorry\"",
            ],
            "unusable_answers": {"assistant-request": 2},
            "status_total": {"attempts": 400, "ok_2xx": 395, "status_503": 4, "status_503_without_retry_after": 1,
                             "other_5xx": 1, "connection_errors": 3},
            "statuses": {"assistant-request": {"attempts": 40, "ok_2xx": 39, "status_503": 1}},
            "max_answer_ms": {"assistant-request": 1400.5},
        })
    }

    fn names(row: &Row) -> Vec<&str> {
        row.failures.iter().map(|f| f.split(':').next().unwrap_or_default()).collect()
    }

    #[test]
    fn traffic_is_counted_and_bad_answers_are_named() {
        let mut row = Row::default();
        row.record_traffic(&summary());
        assert_eq!((row.reports, row.status_503, row.status_503_without_retry_after), (Some(41), 4, 1));
        assert_eq!((row.other_5xx, row.connection_errors), (1, 3));
        let text = row.failures.join("\n");
        assert!(text.contains("assistant-request: 1 answers were not 200 (1 503"), "{text}");
        assert!(
            text.contains(
                "assistant-request: 2 answers were 200 but refused the call (first: assistant-request of call a"
            ),
            "{text}"
        );
        // The refusals are not counted again as failed deliveries; the 500 is.
        assert!(text.contains("deliveries: 1 failed for good (first: status-update of call b"), "{text}");
    }

    #[test]
    fn the_whole_row_is_checked() {
        let mut row = Row::default();
        row.record_traffic(&summary());
        row.record_metrics(
            "callplane_events_lost_total 0\ncallplane_webhook_shed_total 3\n\
             callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"1\"} 30\n\
             callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"2.5\"} 40\n\
             callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"+Inf\"} 40\n",
        );
        row.readyz = ProbeStats { answers: 10, slowest: Duration::from_millis(1300), slow: 1, unanswered: 0 };
        row.rss_peak_kb = Some(300 * 1024);
        row.rss_idle_kb = Some(50 * 1024);
        row.check(Some(Duration::from_secs(60)));
        assert_eq!(row.shed_metric, Some(3.0));
        let text = row.failures.join("\n");
        assert!(text.contains("took 1400 ms, over the 1000 ms deadline"), "{text}");
        assert!(text.contains("the server's histogram puts them all under 2.5 s"), "{text}");
        assert!(text.contains("5xx: 1 answers were 5xx other than 503"), "{text}");
        assert!(text.contains("5xx: 1 503 answers carried no Retry-After"), "{text}");
        assert!(text.contains("readyz: 1 answers slower than 1000 ms"), "{text}");
        assert!(text.contains("rss-peak: 300 MiB"), "{text}");
        assert!(!text.contains("rss-idle"), "{text}");
        assert!(!names(&row).contains(&"lost"));
        // Without the metrics the server promised, the checks say so.
        let mut bare = Row::default();
        bare.record_metrics("callplane_webhook_events_total{type=\"x\",outcome=\"ok\"} 1\n");
        assert_eq!(bare.failures, vec!["lost: callplane_events_lost_total is not on /metrics".to_string()]);
    }

    #[test]
    fn books_are_read_and_judged() {
        let mut row = Row::default();
        row.record_books(&json!({
            "expected_calls": 56, "calls_found": 56, "ledger_rows": 56, "expected_seconds": 1962,
            "ledger_seconds": 1962, "counter_seconds": 1962, "problem_count": 0, "database_checked": true,
            "unbilled_calls": 0, "double_billed_calls": 0, "over_counted_seconds": 0,
        }));
        assert_eq!((row.calls, row.books_balanced), (Some(56), Some(true)));
        assert!(row.passed(), "{:?}", row.failures);
        let mut bad = Row::default();
        bad.record_books(&json!({
            "expected_calls": 56, "problem_count": 4, "database_checked": true, "unbilled_calls": 3,
            "double_billed_calls": 1, "over_counted_seconds": 75, "problems": ["call x is missing from calls"],
        }));
        assert_eq!(names(&bad), vec!["books", "lost", "double-billed"]);
        assert!(bad.failures[0].contains("first: call x is missing"), "{:?}", bad.failures);
        // Books read through the API alone do not count as balanced.
        let mut api_only = Row::default();
        api_only.record_books(&json!({"expected_calls": 1, "problem_count": 0, "database_checked": false}));
        assert_eq!(api_only.books_balanced, Some(false));
    }
}
