//! The WebSocket stream with a real WebSocket client: order, resume without gap or
//! duplicate, isolation, two server processes on one database, lag and shutdown.

use crate::helpers::{SECRET, TestApp, lifecycle};
use callplane_core::seams::{Delivery, RealtimeBus, RealtimeEvent};
use callplane_storage::PgRealtimeBus;
use chrono::{Duration, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration as StdDuration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub(crate) type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn connect(url: &str, token: Option<&str>) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

/// The next JSON text frame (pings are skipped), or None on close/timeout.
async fn next_json(ws: &mut Socket, wait: StdDuration) -> Option<Value> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

/// Reads frames until `ready`, returning the events before it.
pub(crate) async fn until_ready(ws: &mut Socket) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let frame = next_json(ws, StdDuration::from_secs(5)).await.expect("a frame before ready");
        match frame["type"].as_str() {
            Some("ready") => return events,
            Some("event") => events.push(frame),
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
}

/// Collects events until `count` arrived (or 5 s of silence).
pub(crate) async fn events(ws: &mut Socket, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < count {
        let Some(frame) = next_json(ws, StdDuration::from_secs(5)).await else { break };
        assert_eq!(frame["type"], "event", "{frame}");
        out.push(frame);
    }
    out
}

fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn a_client_receives_events_in_order_and_resumes_exactly_where_it_left_off() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;

    let mut ws = connect(&app.ws_url(""), Some(&key)).await.unwrap();
    assert!(until_ready(&mut ws).await.is_empty());
    let created = Utc::now() - Duration::minutes(5);
    let first = lifecycle("first", created, 42.0);
    for e in &first {
        app.post_vapi_in_turn(org.id, e).await;
    }
    // created, ringing, in-progress, transcript (live), ended status, transcript (final),
    // call.ended, usage.changed.
    let got = events(&mut ws, 8).await;
    assert_eq!(seqs(&got), (1..=8).collect::<Vec<_>>(), "{got:?}");
    let kinds: Vec<&str> = got.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "call.created");
    assert!(
        kinds.contains(&"call.ended") && kinds.contains(&"usage.changed") && kinds.contains(&"call.transcript"),
        "{kinds:?}"
    );
    assert!(got.iter().all(|e| e["call_id"] == "first"));
    let last = got.last().unwrap()["seq"].as_i64().unwrap();
    ws.close(None).await.unwrap();

    // Missed while disconnected.
    for e in lifecycle("second", created, 10.0) {
        app.post_vapi_in_turn(org.id, &e).await;
    }
    let mut ws = connect(&app.ws_url(&format!("?after={last}")), Some(&key)).await.unwrap();
    let missed = until_ready(&mut ws).await;
    assert_eq!(seqs(&missed), (last + 1..=last + 8).collect::<Vec<_>>());
    assert!(missed.iter().all(|e| e["call_id"] == "second"));

    // Then live, continuing the sequence with no duplicate.
    app.post_vapi(
        org.id,
        &json!({"message": {"type": "status-update", "status": "ringing",
        "call": {"id": "third", "createdAt": crate::helpers::iso(Utc::now())}}}),
    )
    .await;
    let live = events(&mut ws, 2).await;
    assert_eq!(seqs(&live), vec![last + 9, last + 10]);
    assert!(next_json(&mut ws, StdDuration::from_millis(300)).await.is_none(), "a duplicate arrived");
}

#[tokio::test]
async fn a_subscriber_never_sees_another_organizations_events_and_needs_credentials() {
    let app = TestApp::spawn().await;
    let a = app.org("pro").await;
    let b = app.org("pro").await;
    let key_b = app.api_key(b.id).await;
    let err = connect(&app.ws_url(""), None).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let err = connect(&app.ws_url(""), Some("cp_wrongwrongwrongwrongwrongwrongwrongwrong")).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    // Browsers pass the key in the query string.
    let mut ws_b = connect(&app.ws_url(&format!("?access_token={key_b}&after=0")), None).await.unwrap();
    until_ready(&mut ws_b).await;
    for e in lifecycle("a-call", Utc::now() - Duration::minutes(1), 5.0) {
        app.post_vapi_in_turn(a.id, &e).await;
    }
    assert!(next_json(&mut ws_b, StdDuration::from_millis(800)).await.is_none(), "org B received org A's event");
    app.post_vapi(
        b.id,
        &json!({"message": {"type": "status-update", "status": "ringing",
        "call": {"id": "b-call", "createdAt": crate::helpers::iso(Utc::now())}}}),
    )
    .await;
    let got = events(&mut ws_b, 2).await;
    assert!(got.iter().all(|e| e["call_id"] == "b-call"), "{got:?}");
    assert_eq!(seqs(&got), vec![1, 2], "org B's sequence is its own");
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_told_it_lagged_and_the_history_fills_the_gap() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let bus = PgRealtimeBus::start(app.db.store.clone(), 16).await.unwrap();
    let mut slow = bus.subscribe(org.id).await.unwrap();
    for i in 0..100 {
        bus.publish(&[status_event(org.id, &format!("c{i}"))]).await.unwrap();
    }
    // Give the listener time to fan out past the 16-event queue.
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    let mut seen = Vec::new();
    while let Some(d) = slow.next().await {
        match d {
            Delivery::Event(e) => seen.push(e.seq),
            Delivery::Lagged => break,
        }
    }
    assert!(seen.len() < 100, "the slow subscriber was never told it lagged");
    let resume_after = seen.last().copied().unwrap_or(0);
    let rest = bus.history(org.id, resume_after, 1000).await.unwrap();
    let all: Vec<i64> = seen.iter().copied().chain(rest.iter().map(|e| e.seq)).collect();
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn shutting_down_closes_websockets_with_going_away() {
    let mut app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let mut ws = connect(&app.ws_url(""), Some(&key)).await.unwrap();
    until_ready(&mut ws).await;
    let _ = app.shutdown.take().unwrap().send(());
    let close = tokio::time::timeout(StdDuration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed within 5s");
    assert_eq!(close, Some(1001));
}

#[tokio::test]
async fn an_event_ingested_by_one_server_process_reaches_a_subscriber_on_another() {
    let cli = crate::cli::Cli::new().await;
    cli.json(&["migrate", "--json"]);
    let org = cli.json(&["org", "create", "--name", "Two Servers", "--plan", "pro", "--json"]);
    let org_id = org["id"].as_str().unwrap().to_owned();
    let key = cli.json(&["apikey", "create", "--org", &org_id, "--json"])["key"].as_str().unwrap().to_owned();
    let one = cli.serve().await;
    let other = crate::cli::Cli { addr: crate::cli::free_addr(), ..cli.clone() };
    let two = other.serve().await;

    let mut ws = connect(&format!("ws://{}/v1/realtime", other.addr), Some(&key)).await.unwrap();
    until_ready(&mut ws).await;
    let event = json!({"message": {"type": "status-update", "status": "in-progress",
        "call": {"id": "cross-process", "createdAt": crate::helpers::iso(Utc::now())}}});
    let r = reqwest::Client::new()
        .post(format!("http://{}/vapi/{org_id}", cli.addr))
        .bearer_auth(SECRET)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = events(&mut ws, 2).await;
    assert_eq!(
        got.iter().map(|e| e["kind"].as_str().unwrap()).collect::<Vec<_>>(),
        vec!["call.created", "call.status"]
    );
    assert!(got.iter().all(|e| e["call_id"] == "cross-process"));
    drop((one, two));
}

fn status_event(org: callplane_core::OrgId, call: &str) -> RealtimeEvent {
    RealtimeEvent { org_id: org, kind: "call.status".into(), call_id: Some(call.into()), data: json!({}) }
}

/// Events queued in a change's transaction: nothing is delivered before the commit, nothing of a
/// rolled-back change ever is, and its numbers are not skipped.
#[tokio::test]
async fn queued_events_are_published_only_after_their_transaction_commits_and_never_after_a_rollback() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let bus = PgRealtimeBus::start(app.db.store.clone(), 64).await.unwrap();
    let mut sub = bus.subscribe(org.id).await.unwrap();

    let mut open = app.db.store.pool().begin().await.unwrap();
    callplane_storage::queue_realtime_events(&mut open, &[status_event(org.id, "committed-later")]).await.unwrap();
    let mut doomed = app.db.store.pool().begin().await.unwrap();
    callplane_storage::queue_realtime_events(&mut doomed, &[status_event(org.id, "rolled-back")]).await.unwrap();
    bus.queued();
    assert!(
        tokio::time::timeout(StdDuration::from_millis(500), sub.next()).await.is_err(),
        "an event was delivered before its transaction committed"
    );
    assert!(bus.history(org.id, 0, 10).await.unwrap().is_empty());

    doomed.rollback().await.unwrap();
    open.commit().await.unwrap();
    bus.queued();
    bus.publish(&[status_event(org.id, "published-after")]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(StdDuration::from_secs(5), sub.next()).await.expect("an event within 5s");
        let Some(Delivery::Event(e)) = d else { panic!("lagged on an idle bus") };
        got.push((e.seq, e.call_id.clone().unwrap()));
    }
    assert_eq!(got, vec![(1, "committed-later".to_owned()), (2, "published-after".to_owned())]);
    assert!(
        tokio::time::timeout(StdDuration::from_millis(300), sub.next()).await.is_err(),
        "the rolled-back change's event was delivered"
    );
}

/// A process that commits and stops before publishing leaves its events queued; another
/// process's publisher publishes them (at start and on its sweep), so none is lost.
#[tokio::test]
async fn events_left_queued_by_a_stopped_process_are_published_by_another() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    // Holding the publishers' lock keeps this app's own publisher off the queue while it is
    // counted.
    let mut turn = app.db.store.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('callplane_publish_outbox'))").execute(&mut *turn).await.unwrap();
    let mut tx = app.db.store.pool().begin().await.unwrap();
    let events: Vec<_> = (0..3).map(|i| status_event(org.id, &format!("orphan-{i}"))).collect();
    callplane_storage::queue_realtime_events(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(app.db.store.realtime_queued().await.unwrap(), 3, "three events queued (in one row)");
    sqlx::query("SELECT pg_advisory_unlock(hashtext('callplane_publish_outbox'))").execute(&mut *turn).await.unwrap();
    // Nobody was told: this bus finds them by itself.
    let bus = PgRealtimeBus::start(app.db.store.clone(), 64).await.unwrap();
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(5);
    loop {
        let history = bus.history(org.id, 0, 10).await.unwrap();
        let got: Vec<_> = history.iter().map(|e| (e.seq, e.call_id.clone().unwrap())).collect();
        if got.len() == 3 {
            assert_eq!(got, (0..3).map(|i| (i + 1, format!("orphan-{i}"))).collect::<Vec<_>>());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "queued events not published after 5s: {got:?}");
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    assert_eq!(app.db.store.realtime_queued().await.unwrap(), 0);
}

#[tokio::test]
async fn a_batch_of_interleaved_organizations_is_numbered_gaplessly_in_queue_order() {
    let app = TestApp::spawn().await;
    let pool = app.db.store.pool();
    let orgs = [app.org("pro").await.id, app.org("pro").await.id, app.org("pro").await.id];
    // The first organization has published before: its numbers go on from its cursor.
    sqlx::query(
        "INSERT INTO realtime_cursors (organization_id, last_seq) VALUES ($1, 41) \
                 ON CONFLICT (organization_id) DO UPDATE SET last_seq = 41",
    )
    .bind(orgs[0].0)
    .execute(pool)
    .await
    .unwrap();
    let already: i64 = sqlx::query_scalar("SELECT count(*) FROM realtime_events").fetch_one(pool).await.unwrap();
    // 200 events, the organizations interleaved unevenly, in one queue. Runs of one to four
    // events are queued by turns as one change (one row per run of an organization's events)
    // and as rows of the shape a process of the previous version queues (one event each).
    let org_of = |i: usize| orgs[(i * i) % 3];
    let (mut i, mut run) = (0usize, 0usize);
    while i < 200 {
        let end = (i + run % 4 + 1).min(200);
        if run % 2 == 0 {
            let events: Vec<RealtimeEvent> = (i..end)
                .map(|i| RealtimeEvent {
                    org_id: org_of(i),
                    kind: "test".into(),
                    call_id: Some(format!("call-{i}")),
                    data: json!({ "i": i }),
                })
                .collect();
            let mut tx = pool.begin().await.unwrap();
            callplane_storage::queue_realtime_events(&mut tx, &events).await.unwrap();
            tx.commit().await.unwrap();
        } else {
            for i in i..end {
                sqlx::query(
                    "INSERT INTO realtime_outbox (organization_id, kind, call_id, data) VALUES ($1, 'test', $2, $3)",
                )
                .bind(org_of(i).0)
                .bind(format!("call-{i}"))
                .bind(json!({ "i": i }))
                .execute(pool)
                .await
                .unwrap();
            }
        }
        (i, run) = (end, run + 1);
    }
    // Published in batches of 64 (the publisher running beside may take some first).
    while sqlx::query_scalar::<_, i32>("SELECT callplane_publish_outbox(64)").fetch_one(pool).await.unwrap() > 0 {}
    let published: i64 = sqlx::query_scalar("SELECT count(*) FROM realtime_events").fetch_one(pool).await.unwrap();
    assert_eq!(published - already, 200);
    for (n, org) in orgs.iter().enumerate() {
        let rows: Vec<(i64, Value)> = sqlx::query_as(
            "SELECT seq, data FROM realtime_events WHERE organization_id = $1 AND kind = 'test' ORDER BY seq",
        )
        .bind(org.0)
        .fetch_all(pool)
        .await
        .unwrap();
        let first = if n == 0 { 42 } else { 1 };
        let seqs: Vec<i64> = rows.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (first..first + rows.len() as i64).collect::<Vec<_>>(), "org {n}: no gap, no duplicate");
        let order: Vec<u64> = rows.iter().map(|(_, d)| d["i"].as_u64().unwrap()).collect();
        let expected: Vec<u64> = (0..200u64).filter(|&i| org_of(i as usize) == *org).collect();
        assert_eq!(order, expected, "org {n}: numbered in queue order");
    }
}
