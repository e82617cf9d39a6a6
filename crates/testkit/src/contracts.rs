//! One contract suite per seam. Every backend of a seam must pass its suite; the suites take
//! the backend and two existing organizations, and check tenant isolation along the way.
//! Later phases (Redis, object storage, ...) run the same functions against their backends.

#![allow(clippy::expect_used)] // Contract suites are test code: a failed call is a failed test.
use callplane_core::metering::Metering;
use callplane_core::seams::{
    Delivery, FunctionData, RealtimeBus, RealtimeEvent, Transcript, TranscriptStore, UsageCounter,
};
use callplane_core::{OrgId, Organization};
use callplane_storage::PgStore;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
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

    // A duplicate delivery of the final transcript changes nothing.
    ts.put(a, call_a, created_at, &fin).await.expect("put final again");
    assert_eq!(ts.get(a, call_a).await.expect("get"), Some(fin.clone()));

    assert_eq!(ts.get(b, call_a).await.expect("get"), None, "org B read org A's transcript");
    let forged = Transcript { text: Some("forged".into()), messages: vec![], is_final: true };
    let _ = ts.put(b, call_a, created_at, &forged).await;
    assert_eq!(ts.get(a, call_a).await.expect("get"), Some(fin), "org B overwrote org A's transcript");

    // A call id from outside is only a name: separators and dots stay inside it.
    let odd = format!("{call_a}/../x.%2F");
    let long = Transcript {
        text: Some("User: ".repeat(2_000)),
        messages: (0..2_000)
            .map(|i| json!({"role": "user", "message": format!("message {i} \u{e9}\u{1F600}")}))
            .collect(),
        is_final: true,
    };
    ts.put(a, &odd, created_at, &long).await.expect("put a long transcript under an odd call id");
    assert_eq!(ts.get(a, &odd).await.expect("get"), Some(long), "a long transcript came back different");
    assert_eq!(ts.get(a, &format!("{call_a}/..")).await.expect("get"), None);
}

/// Writes an uncounted ledger row, as the pipeline does before it counts the call.
pub async fn ledger_row(store: &PgStore, org: OrgId, period_start: DateTime<Utc>, call_id: &str, seconds: i64) {
    sqlx::query(
        "INSERT INTO usage_ledger (call_id, organization_id, period_start, call_started_at, duration_seconds, \
                                   billable_seconds, counted) VALUES ($1, $2, $3, $3, $4, $4, false)",
    )
    .bind(call_id)
    .bind(org.0)
    .bind(period_start)
    .bind(seconds)
    .execute(store.pool())
    .await
    .expect("ledger row");
}

async fn alerts_recorded(store: &PgStore, org: OrgId, period_start: DateTime<Utc>) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT threshold FROM usage_alerts WHERE organization_id = $1 AND period_start = $2 ORDER BY threshold",
    )
    .bind(org.0)
    .bind(period_start)
    .fetch_all(store.pool())
    .await
    .expect("alerts")
}

/// Usage counters, with their rules (`Metering`) on top. `a` and `b` are organizations on
/// `plan`, which includes `included` seconds; their current periods are used.
/// - a call is added once, however often and however concurrently it is added;
/// - each alert threshold fires exactly once per period under concurrent adds;
/// - a rebuild equals the ledger, also with adds running alongside it;
/// - org B's total never moves with org A's calls.
pub async fn usage_counter(
    counter: Arc<dyn UsageCounter>,
    store: &PgStore,
    a: &Organization,
    b: &Organization,
    included: i64,
) {
    let plan = a.plan.clone();
    let metering = Metering::new(counter.clone(), Arc::new(store.clone()), HashMap::from([(plan.clone(), included)]));
    let (pa, pb) = (a.period_start, b.period_start);
    let before_b = metering.used(b.id, pb).await.expect("used");
    let tag = uuid::Uuid::new_v4().simple().to_string();

    // Once per call: 40 calls of included/40 seconds, each counted three times at once.
    let share = included / 40;
    for i in 0..40 {
        ledger_row(store, a.id, pa, &format!("{tag}-{i}"), share).await;
    }
    let adds = (0..40).flat_map(|i| std::iter::repeat_n(i, 3)).map(|i| {
        let (metering, call, plan) = (&metering, format!("{tag}-{i}"), plan.clone());
        async move { metering.count_call(a.id, &call, pa, share, &plan).await.expect("count_call") }
    });
    let results = futures::future::join_all(adds).await;
    assert_eq!(
        metering.used(a.id, pa).await.expect("used"),
        share * 40,
        "{} counted a call more than once",
        counter.backend()
    );
    let fired: Vec<i32> = results.iter().flat_map(|r| r.alerts.iter().map(|a| a.threshold)).collect();
    let mut sorted = fired.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [80, 90, 100], "each threshold fires once ({} counter); fired {fired:?}", counter.backend());
    assert_eq!(alerts_recorded(store, a.id, pa).await, [80, 90, 100]);

    // A rebuild equals the ledger, with adds of new calls running alongside it.
    for i in 40..60 {
        ledger_row(store, a.id, pa, &format!("{tag}-{i}"), 7).await;
    }
    let more = (40..60).map(|i| {
        let (metering, call, plan) = (&metering, format!("{tag}-{i}"), plan.clone());
        async move { metering.count_call(a.id, &call, pa, 7, &plan).await.expect("count_call") }
    });
    let (_, rebuilt) = tokio::join!(futures::future::join_all(more), metering.rebuild(a.id, pa, &plan));
    let (_, again) = rebuilt.expect("rebuild");
    assert!(again.is_empty(), "a rebuild fired alerts again: {again:?}");
    let ledger = store.ledger_total(a.id, pa).await.expect("ledger");
    assert_eq!(ledger, share * 40 + 20 * 7);
    assert_eq!(
        metering.used(a.id, pa).await.expect("used"),
        ledger,
        "{} counter differs from the ledger",
        counter.backend()
    );
    assert_eq!(metering.rebuild(a.id, pa, &plan).await.expect("rebuild").0, ledger);

    // A row whose add never happened is counted by the repair pass, once.
    ledger_row(store, a.id, pa, &format!("{tag}-late"), 11).await;
    let (repaired, _) = metering.repair(Duration::ZERO, 100).await.expect("repair");
    assert!(repaired >= 1);
    assert_eq!(metering.used(a.id, pa).await.expect("used"), ledger + 11);
    assert_eq!(metering.repair(Duration::ZERO, 100).await.expect("repair").0, 0, "the repaired row is still pending");

    assert_eq!(metering.used(b.id, pb).await.expect("used"), before_b, "org A's usage leaked into org B's counter");
    assert!(alerts_recorded(store, b.id, pb).await.is_empty(), "org A's alerts were recorded for org B");
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
    bus.publish(&[ev(a, "a-1"), ev(b, "b-1")]).await.expect("publish");
    bus.publish(&[ev(b, "b-2")]).await.expect("publish");
    bus.publish(&[ev(a, "a-2")]).await.expect("publish");
    for (seq, want) in [(1, "b-1"), (2, "b-2")] {
        let got = tokio::time::timeout(Duration::from_secs(5), sub_b.next())
            .await
            .expect("an event within 5s")
            .expect("stream open");
        let Delivery::Event(e) = got else { panic!("lagged on an idle bus") };
        assert_eq!(
            (e.org_id, e.seq, e.call_id.as_deref()),
            (b, seq, Some(want)),
            "org B's subscriber got another organization's or an out-of-order event, or a gap in its numbers"
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
    // Org A's stream is numbered on its own: 1, 2, with no number taken by B's events.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let history = bus.history(a, 0, 100).await.expect("history");
        let got: Vec<_> = history.iter().map(|e| (e.org_id, e.seq, e.call_id.clone().unwrap_or_default())).collect();
        if got == vec![(a, 1, "a-1".to_owned()), (a, 2, "a-2".to_owned())] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "org A's history after 5s: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A call's lifecycle as VAPI sends it, without the noise: three status updates and the
/// end-of-call report (billed `ceil(seconds)`), with the report's transcript.
pub fn call_lifecycle(call_id: &str, created_at: DateTime<Utc>, seconds: f64) -> Vec<serde_json::Value> {
    let at = |s: i64| (created_at + chrono::Duration::seconds(s)).to_rfc3339();
    let call = json!({ "id": call_id, "createdAt": created_at.to_rfc3339() });
    let status =
        |status: &str, s: i64| json!({ "type": "status-update", "status": status, "timestamp": at(s), "call": call });
    let ended = (seconds.ceil() as i64) + 2;
    vec![
        status("ringing", 0),
        status("in-progress", 1),
        status("ended", ended),
        json!({
            "type": "end-of-call-report", "timestamp": at(ended + 1), "call": call,
            "startedAt": at(1), "endedAt": at(ended), "durationSeconds": seconds,
            "endedReason": "customer-ended-call", "transcript": format!("AI: Hello from {call_id}"),
            "messages": [{ "role": "bot", "message": format!("Hello from {call_id}") }],
        }),
    ]
}

/// What a pipeline left of a call, for comparing runs: status, duration, billed seconds, its
/// ledger rows, and its transcript.
#[derive(Clone, Debug, PartialEq)]
pub struct CallOutcome {
    pub status: String,
    pub duration_seconds: Option<f64>,
    pub billable_seconds: Option<i64>,
    pub ledger_rows: Vec<(String, i64)>,
    pub transcript: Option<(Option<String>, bool)>,
}

pub async fn call_outcome(store: &PgStore, org: OrgId, call_id: &str) -> Option<CallOutcome> {
    use callplane_core::seams::CallReads;
    let call = store.get_call(org, call_id).await.expect("get call")?;
    let ledger_rows = store
        .ledger(org)
        .await
        .expect("ledger")
        .into_iter()
        .filter(|r| r.call_id == call_id)
        .map(|r| (r.call_id, r.billable_seconds))
        .collect();
    let transcript = callplane_storage::PgTranscriptStore(store.clone())
        .get(org, call_id)
        .await
        .expect("transcript")
        .map(|t| (t.text, t.is_final));
    Some(CallOutcome {
        status: call.status,
        duration_seconds: call.duration_seconds,
        billable_seconds: call.billable_seconds,
        ledger_rows,
        transcript,
    })
}

fn inbound(org: OrgId, message: serde_json::Value) -> callplane_core::seams::InboundEvent {
    callplane_core::seams::InboundEvent {
        org_id: org,
        received_at: Utc::now(),
        message: callplane_core::vapi::parse_message(message).expect("a valid VAPI message"),
    }
}

/// The event pipeline: applying an event twice changes nothing; any order and any number of
/// duplicates of a call's events leave the same call, billed once; another organization's
/// event for the call is refused and kept, and changes nothing of it; an event that cannot be
/// processed is kept as a dead letter with its reason. `submit` must have applied an event
/// when it returns (a pipeline that runs events elsewhere waits for them here).
pub async fn event_pipeline(pipeline: &dyn callplane_core::seams::EventPipeline, store: &PgStore, a: OrgId, b: OrgId) {
    use callplane_core::seams::{PipelineError, Processed};
    let now = Utc::now() - chrono::Duration::minutes(10);
    let tag = uuid::Uuid::new_v4().simple().to_string();

    // In order, each event once: the reference outcome.
    let reference = format!("pipe-ref-{tag}");
    for m in call_lifecycle(&reference, now, 61.2) {
        let p = pipeline.submit(inbound(a, m)).await.expect("submit");
        assert_eq!(p, Processed::Applied, "a new event of the call changed nothing");
    }
    let want = call_outcome(store, a, &reference).await.expect("the call is stored");
    assert_eq!(want.status, "ended");
    assert_eq!(want.billable_seconds, Some(62));
    assert_eq!(want.ledger_rows, vec![(reference.clone(), 62)]);
    assert_eq!(want.transcript.as_ref().map(|t| t.1), Some(true), "the report's transcript is final");

    // Again, every event: nothing changes.
    for m in call_lifecycle(&reference, now, 61.2) {
        let p = pipeline.submit(inbound(a, m)).await.expect("submit");
        assert_eq!(p, Processed::NoChange, "an event applied twice changed the call");
    }
    assert_eq!(call_outcome(store, a, &reference).await.as_ref(), Some(&want));

    // Any order, with duplicates: the same call, billed once.
    let orders: [&[usize]; 4] = [&[3, 2, 1, 0], &[3, 3, 0, 1, 2, 3], &[1, 3, 0, 1, 2, 2], &[2, 0, 3, 1, 0]];
    for (i, order) in orders.iter().enumerate() {
        let call_id = format!("pipe-order-{i}-{tag}");
        let events = call_lifecycle(&call_id, now, 61.2);
        for &n in order.iter() {
            pipeline.submit(inbound(a, events[n].clone())).await.expect("submit");
        }
        let got = call_outcome(store, a, &call_id).await.expect("the call is stored");
        let same = CallOutcome {
            ledger_rows: vec![(call_id.clone(), 62)],
            transcript: Some((Some(format!("AI: Hello from {call_id}")), true)),
            ..want.clone()
        };
        assert_eq!(got, same, "order {order:?} left another call");
    }

    // Another organization's event for the call: refused, kept, and the call untouched.
    let before = call_outcome(store, a, &reference).await;
    let stolen = call_lifecycle(&reference, now, 500.0).pop().expect("a report");
    match pipeline.submit(inbound(b, stolen)).await {
        Err(PipelineError::Rejected { dead_letter_id, .. }) => assert!(dead_letter_id > 0),
        other => panic!("org B's event for org A's call was not refused: {other:?}"),
    }
    assert_eq!(call_outcome(store, a, &reference).await, before, "org B's event changed org A's call");
    assert!(call_outcome(store, b, &reference).await.is_none(), "org B can read org A's call");
    assert!(store.ledger(b).await.expect("ledger").iter().all(|r| r.call_id != reference));

    // An event that cannot be processed (a call made a year from now) is kept with its reason.
    let future = format!("pipe-future-{tag}");
    let far = Utc::now() + chrono::Duration::days(365);
    let event = call_lifecycle(&future, far, 10.0).remove(0);
    match pipeline.submit(inbound(a, event)).await {
        Err(PipelineError::Rejected { code, dead_letter_id, .. }) => {
            assert_eq!(code, callplane_core::ErrorCode::FutureTimestamp);
            let kept = store
                .dead_letters(&callplane_storage::DeadLetterFilter { org: Some(a), ..Default::default() })
                .await
                .expect("dead letters");
            let letter = kept.iter().find(|d| d.id == dead_letter_id).expect("the refused event is kept");
            assert_eq!(letter.call_id.as_deref(), Some(future.as_str()));
        }
        other => panic!("an event a year ahead was not refused: {other:?}"),
    }
    assert!(call_outcome(store, a, &future).await.is_none());
}
