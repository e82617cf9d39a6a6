//! Tenant isolation in every storage function and through the webhook.

use crate::helpers::{TestApp, lifecycle};
use callplane_core::seams::{CallFilter, CallReads, TranscriptStore};
use callplane_storage::{DeadLetterFilter, PgTranscriptStore};
use chrono::{Duration, Utc};
use reqwest::StatusCode;

#[tokio::test]
async fn org_b_never_sees_or_changes_org_a_rows() {
    // The refusals below are answered once processing has decided; past the inline budget an
    // event is answered as queued (and refused later). A Temporal worker under CI load took
    // over the default 2 s, so the answer here waits as long as the tests wait for a worker.
    let app = TestApp::spawn_with(&[("inbox.inline_budget_ms", "10000")]).await;
    let a = app.org("pro").await;
    let b = app.org("pro").await;
    let created = Utc::now() - Duration::hours(1);
    for event in lifecycle("a-call", created, 90.0) {
        assert_eq!(app.post_vapi(a.id, &event).await.0, StatusCode::OK);
    }
    let a_row = app.call(a.id, "a-call").await.unwrap();
    let store = &app.db.store;

    assert_eq!(store.get_call(b.id, "a-call").await.unwrap(), None);
    let window = CallFilter {
        from: created - Duration::days(1),
        to: Utc::now(),
        status: None,
        ended_reason: None,
        assistant_id: None,
        customer_number: None,
    };
    assert!(store.list_calls(b.id, &window, None, 100).await.unwrap().calls.is_empty());
    assert_eq!(store.list_calls(a.id, &window, None, 100).await.unwrap().calls.len(), 1);
    assert!(store.live_calls(b.id, created - Duration::days(1)).await.unwrap().is_empty());
    assert!(
        store
            .daily_usage(b.id, (created - Duration::days(1)).date_naive(), Utc::now().date_naive())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.period_calls(b.id, b.period_start).await.unwrap(), 0);
    assert_eq!(store.period_calls(a.id, a.period_start).await.unwrap(), 1);
    assert!(store.ledger(b.id).await.unwrap().is_empty());
    assert_eq!(PgTranscriptStore(store.clone()).get(b.id, "a-call").await.unwrap(), None);
    assert_eq!(app.seconds_used(b.id).await, 0);
    assert_eq!(app.seconds_used(a.id).await, 90);

    // Org B replaying org A's call id through its own URL changes nothing of A's. Events that
    // change state are refused; an answer (from B's own data) does not wait to learn that its
    // event will be refused, which it is all the same (kept as a dead letter, below).
    for event in lifecycle("a-call", created, 5000.0) {
        let (status, body) = app.post_vapi(b.id, &event).await;
        let kind = event["message"]["type"].as_str().unwrap();
        if matches!(kind, "assistant-request" | "tool-calls" | "function-call" | "transfer-destination-request") {
            assert_eq!(status, StatusCode::OK, "{kind}: {body}");
            continue;
        }
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{kind}: {body}");
        assert_eq!(body["code"], "invalid_event");
    }
    assert_eq!(app.call(a.id, "a-call").await.unwrap(), a_row);
    assert_eq!(app.seconds_used(a.id).await, 90);
    assert_eq!(app.seconds_used(b.id).await, 0);
    assert!(store.ledger(b.id).await.unwrap().is_empty());

    // The refused events are kept, under B, for an operator to look at: the tools' ones too,
    // once processed.
    let refused = lifecycle("a-call", created, 5000.0).len();
    let filter = DeadLetterFilter { org: Some(b.id), ..Default::default() };
    crate::durability::eventually("every replayed event of A's call is kept under B", async || {
        store.dead_letters(&filter).await.unwrap().len() == refused
    })
    .await;
    assert!(store.dead_letters(&DeadLetterFilter { org: Some(a.id), ..Default::default() }).await.unwrap().is_empty());
}
