//! A small Prometheus text registry: counters by label set. No global state; one per app.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    /// (message type, outcome) -> count.
    webhook_events: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    pub fn webhook_event(&self, message_type: &'static str, outcome: &'static str) {
        if let Ok(mut m) = self.webhook_events.lock() {
            *m.entry((message_type, outcome)).or_default() += 1;
        }
    }

    pub fn webhook_count(&self, message_type: &str, outcome: &str) -> u64 {
        self.webhook_events
            .lock()
            .map(|m| m.iter().filter(|((t, o), _)| *t == message_type && *o == outcome).map(|(_, n)| *n).sum())
            .unwrap_or(0)
    }

    /// Renders in the Prometheus text format, with gauges supplied by the caller.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP callplane_webhook_events_total VAPI webhook messages by type and outcome.\n");
        out.push_str("# TYPE callplane_webhook_events_total counter\n");
        if let Ok(m) = self.webhook_events.lock() {
            for ((t, o), n) in m.iter() {
                let _ = writeln!(out, "callplane_webhook_events_total{{type=\"{t}\",outcome=\"{o}\"}} {n}");
            }
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        out
    }
}
