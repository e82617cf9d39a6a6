//! One contract suite per seam. Every backend of a seam must pass its suite; the suites take
//! the backend and two existing organizations, and check tenant isolation along the way.
//! Later phases (Redis, object storage, ...) run the same functions against their backends.

#![allow(clippy::expect_used)] // Contract suites are test code: a failed call is a failed test.
use callplane_core::OrgId;
use callplane_core::seams::{
    Delivery, FunctionData, RealtimeBus, RealtimeEvent, Transcript, TranscriptStore, UsageCounter,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;

/// Function data: put, get, preload, overwrite, delete, and org B never sees org A's keys.
pub async fn function_data(fd: &dyn FunctionData, a: OrgId, b: OrgId) {
    fd.put(a, "hours", &json!("9-5")).await.expect("put");
    fd.put(a, "prices", &json!({"drain": 149})).await.expect("put");
    assert_eq!(fd.get(a, "hours").await.expect("get"), Some(json!("9-5")));
    fd.put(a, "hours", &json!("8-6")).await.expect("overwrite");
    assert_eq!(fd.get(a, "hours").await.expect("get"), Some(json!("8-6")));
    let all = fd.preload(a).await.expect("preload");
    assert_eq!(all.len(), 2);
    assert_eq!(all["prices"], json!({"drain": 149}));

    assert_eq!(fd.get(b, "hours").await.expect("get"), None, "org B read org A's function data");
    assert!(fd.preload(b).await.expect("preload").is_empty(), "org B preloaded org A's function data");
    assert!(!fd.delete(b, "hours").await.expect("delete"), "org B deleted org A's key");
    assert_eq!(fd.get(a, "hours").await.expect("get"), Some(json!("8-6")));

    assert!(fd.delete(a, "hours").await.expect("delete"));
    assert_eq!(fd.get(a, "hours").await.expect("get"), None);
}

/// Transcripts: a final transcript wins over live ones in any order; live ones only grow;
/// org B never reads or overwrites org A's.
pub async fn transcript_store(ts: &dyn TranscriptStore, a: OrgId, b: OrgId, call_a: &str, created_at: DateTime<Utc>) {
    let live = |n: usize| Transcript {
        text: None,
        messages: (0..n).map(|i| json!({"role": "user", "message": format!("m{i}")})).collect(),
        is_final: false,
    };
    let fin = Transcript {
        text: Some("AI: hello\nUser: bye\n".into()),
        messages: vec![json!({"role": "bot"})],
        is_final: true,
    };

    ts.put(a, call_a, created_at, &live(2)).await.expect("put live");
    ts.put(a, call_a, created_at, &live(1)).await.expect("put shorter live");
    assert_eq!(ts.get(a, call_a).await.expect("get"), Some(live(2)), "a shorter live transcript replaced a longer one");
    ts.put(a, call_a, created_at, &fin).await.expect("put final");
    ts.put(a, call_a, created_at, &live(5)).await.expect("late live");
    assert_eq!(ts.get(a, call_a).await.expect("get"), Some(fin.clone()), "a live transcript replaced the final one");

    assert_eq!(ts.get(b, call_a).await.expect("get"), None, "org B read org A's transcript");
    let forged = Transcript { text: Some("forged".into()), messages: vec![], is_final: true };
    let _ = ts.put(b, call_a, created_at, &forged).await;
    assert_eq!(ts.get(a, call_a).await.expect("get"), Some(fin), "org B overwrote org A's transcript");
}

/// Usage counters: add accumulates per org and period; org B's total is its own.
pub async fn usage_counter(c: &dyn UsageCounter, a: OrgId, b: OrgId, period_a: DateTime<Utc>, period_b: DateTime<Utc>) {
    let before_a = c.used(a, period_a).await.expect("used");
    let before_b = c.used(b, period_b).await.expect("used");
    assert_eq!(c.add(a, period_a, 61).await.expect("add"), before_a + 61);
    assert_eq!(c.add(a, period_a, 30).await.expect("add"), before_a + 91);
    assert_eq!(c.used(a, period_a).await.expect("used"), before_a + 91);
    assert_eq!(c.used(b, period_b).await.expect("used"), before_b, "org A's usage leaked into org B's counter");
}

/// Realtime: each organization's events are numbered 1, 2, 3, ... in its own sequence; a
/// subscriber of org B receives B's events in order and never A's; the history returns what
/// a reconnecting client missed.
pub async fn realtime_bus(bus: &dyn RealtimeBus, a: OrgId, b: OrgId) {
    let mut sub_b = bus.subscribe(b).await.expect("subscribe");
    let ev = |org: OrgId, call: &str| RealtimeEvent {
        org_id: org,
        kind: "call.status".into(),
        call_id: Some(call.into()),
        data: json!({"status": "ringing"}),
    };
    assert_eq!(bus.publish(&ev(a, "a-1")).await.expect("publish"), 1);
    assert_eq!(bus.publish(&ev(b, "b-1")).await.expect("publish"), 1);
    assert_eq!(bus.publish(&ev(b, "b-2")).await.expect("publish"), 2);
    assert_eq!(bus.publish(&ev(a, "a-2")).await.expect("publish"), 2);
    for want in ["b-1", "b-2"] {
        let got = tokio::time::timeout(Duration::from_secs(5), sub_b.next())
            .await
            .expect("an event within 5s")
            .expect("stream open");
        let Delivery::Event(e) = got else { panic!("lagged on an idle bus") };
        assert_eq!(
            (e.org_id, e.call_id.as_deref()),
            (b, Some(want)),
            "org B's subscriber got another organization's or an out-of-order event"
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub_b.next()).await.is_err(),
        "org B's subscriber received a third event"
    );
    let history = bus.history(b, 1, 100).await.expect("history");
    assert_eq!(
        history.iter().map(|e| (e.seq, e.call_id.clone().unwrap_or_default())).collect::<Vec<_>>(),
        vec![(2, "b-2".to_owned())]
    );
    assert!(bus.history(a, 0, 100).await.expect("history").iter().all(|e| e.org_id == a));
}
