//! What one client may hold of the server through `GET /v1/realtime`: sockets capped per
//! credential and per organization (429 `too_many_connections` past the cap, the slot given
//! back when the socket closes), and a client that stops reading is cut off within the send
//! timeout even in the middle of a large catch-up.

use crate::helpers::TestApp;
use callplane_core::OrgId;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: &str) -> Result<Socket, WsError> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

/// Connects and waits for `{"type":"ready"}`, so the server counts the socket as open.
async fn open(app: &TestApp, token: &str) -> Socket {
    let mut ws = connect(&app.ws_url(""), token).await.expect("the connection is accepted");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("ready within 5 s") {
            Some(Ok(Message::Text(t))) if serde_json::from_str::<Value>(&t).unwrap()["type"] == "ready" => return ws,
            Some(Ok(_)) => continue,
            other => panic!("the socket ended before ready: {other:?}"),
        }
    }
}

/// What a refused upgrade answered: status, `Retry-After`, and the JSON body.
struct Refusal {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

fn refusal(err: WsError) -> Refusal {
    let WsError::Http(response) = err else { panic!("expected an HTTP refusal, got {err}") };
    Refusal {
        status: response.status().as_u16(),
        retry_after: response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()),
        body: serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null),
    }
}

async fn refused(app: &TestApp, query: &str, token: &str) -> Refusal {
    match connect(&app.ws_url(query), token).await {
        Ok(_) => panic!("a connection over the cap was accepted"),
        Err(e) => refusal(e),
    }
}

/// Connects as soon as a slot is free, waiting at most `within`; refusals meanwhile must be
/// the cap's 429. Returns the socket and how long it took.
async fn connect_when_free(app: &TestApp, token: &str, within: Duration) -> (Socket, Duration) {
    let started = Instant::now();
    loop {
        match connect(&app.ws_url(""), token).await {
            Ok(ws) => return (ws, started.elapsed()),
            Err(e) => {
                let r = refusal(e);
                assert_eq!((r.status, r.body["code"].as_str()), (429, Some("too_many_connections")), "{}", r.body);
            }
        }
        assert!(started.elapsed() < within, "the slot was not given back within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads until the server closes or drops the socket; returns the events read and the close
/// code, if a close frame arrived. Panics if the socket is still open after `within`.
async fn drain(ws: &mut Socket, within: Duration) -> (usize, Option<u16>) {
    let deadline = Instant::now() + within;
    let mut events = 0;
    loop {
        let frame = tokio::time::timeout_at(deadline.into(), ws.next()).await.expect("the server closed the socket");
        match frame {
            Some(Ok(Message::Text(t))) => events += usize::from(t.contains(r#""type":"event""#)),
            Some(Ok(Message::Close(frame))) => return (events, frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            // A reset, or the stream cut mid-frame when the server dropped it.
            Some(Err(_)) | None => return (events, None),
        }
    }
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

#[tokio::test]
async fn the_connection_past_the_per_key_cap_is_refused_with_429_and_a_stable_code() {
    let app = TestApp::spawn_with(&[("realtime.max_connections_per_key", "3")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open(&app, &key).await);
    }

    let r = refused(&app, "", &key).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["code"], "too_many_connections", "{}", r.body);
    let message = r.body["message"].as_str().unwrap();
    assert!(message.contains("API key") && message.contains('3'), "{message}");
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    assert!(!message.contains(&key), "the credential is echoed back");
    // The same key in the query string, as browsers send it, is the same credential.
    let r = refused(&app, &format!("?access_token={key}"), "").await;
    assert_eq!((r.status, r.body["code"].as_str()), (429, Some("too_many_connections")));

    // Another key of the same organization has its own count.
    let other = app.api_key(org.id).await;
    let _other = open(&app, &other).await;
    assert_eq!(metric(&app, "callplane_realtime_subscribers").await, 4.0);
}

#[tokio::test]
async fn a_closed_socket_gives_its_slot_back_whether_closed_politely_or_dropped() {
    let app = TestApp::spawn_with(&[("realtime.max_connections_per_key", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;

    let mut ws = open(&app, &key).await;
    assert_eq!(refused(&app, "", &key).await.status, 429);
    ws.close(None).await.unwrap();
    drain(&mut ws, Duration::from_secs(5)).await;
    let (ws, _) = connect_when_free(&app, &key, Duration::from_secs(2)).await;

    // The TCP connection dropped without a closing handshake.
    drop(ws);
    let (_ws, _) = connect_when_free(&app, &key, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_per_organization_cap_counts_every_key_of_the_organization_and_no_other() {
    let app =
        TestApp::spawn_with(&[("realtime.max_connections_per_org", "3"), ("realtime.max_connections_per_key", "2")])
            .await;
    let org = app.org("pro").await;
    let (k1, k2) = (app.api_key(org.id).await, app.api_key(org.id).await);
    let _held = [open(&app, &k1).await, open(&app, &k1).await, open(&app, &k2).await];

    let r = refused(&app, "", &k2).await;
    assert_eq!((r.status, r.body["code"].as_str()), (429, Some("too_many_connections")), "{}", r.body);
    assert!(r.body["message"].as_str().unwrap().contains("organization"), "{}", r.body);
    assert!(r.retry_after.is_some());

    let other = app.org("pro").await;
    let _other = open(&app, &app.api_key(other.id).await).await;
}

/// `count` events of about `bytes` each, stored as if published, for a catch-up to replay.
async fn backlog(app: &TestApp, org: OrgId, count: i64, bytes: i32) {
    sqlx::query(
        "INSERT INTO realtime_events (organization_id, seq, kind, call_id, data) \
         SELECT $1, g, 'call.status', 'backlog-' || g, jsonb_build_object('pad', repeat('x', $3)) \
         FROM generate_series(1, $2) g",
    )
    .bind(org.0)
    .bind(count)
    .bind(bytes)
    .execute(app.db.store.pool())
    .await
    .unwrap();
    sqlx::query("INSERT INTO realtime_cursors (organization_id, last_seq) VALUES ($1, $2)")
        .bind(org.0)
        .bind(count)
        .execute(app.db.store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_a_large_catch_up_is_cut_off_within_the_send_timeout() {
    let app =
        TestApp::spawn_with(&[("realtime.send_timeout_ms", "300"), ("realtime.max_connections_per_key", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    // 40 MB: far more than the loopback socket buffers of both ends hold.
    let total = 5_000;
    backlog(&app, org.id, total, 8_000).await;

    let mut stuck = connect(&app.ws_url("?after=0"), &key).await.unwrap();
    // Not reading: the server's sends block once the buffers are full, and within the send
    // timeout (plus the time to fill them) it drops the socket and gives the slot back.
    let (_fresh, took) = connect_when_free(&app, &key, Duration::from_secs(10)).await;
    eprintln!("the slot was free again after {took:?}");
    assert_eq!(metric(&app, "callplane_realtime_lagged_total").await, 1.0);
    assert_eq!(metric(&app, "callplane_realtime_subscribers").await, 1.0, "only the fresh socket is subscribed");

    // What the stuck client finds when it finally reads: part of the backlog, then the end.
    let (events, code) = drain(&mut stuck, Duration::from_secs(10)).await;
    assert!(events > 0 && events < total as usize, "{events} of {total} events arrived");
    assert!(code.is_none_or(|c| c == 1008), "closed with {code:?}");
}

#[tokio::test]
async fn a_reading_client_receives_a_whole_large_catch_up_in_order() {
    let app = TestApp::spawn_with(&[("realtime.send_timeout_ms", "2000")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    // More than one page by count and by bytes.
    let total = 1_200;
    backlog(&app, org.id, total, 4_000).await;

    let mut ws = connect(&app.ws_url("?after=0"), &key).await.unwrap();
    let mut seqs = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame within 10 s");
        let Some(Ok(Message::Text(t))) = frame else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str() {
            Some("event") => seqs.push(v["seq"].as_i64().unwrap()),
            Some("ready") => break,
            _ => panic!("unexpected frame {v}"),
        }
    }
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_client_that_sends_an_oversized_frame_is_disconnected_and_frees_its_slot() {
    let app = TestApp::spawn_with(&[("realtime.max_connections_per_key", "1")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let mut ws = open(&app, &key).await;
    // The server may drop the socket before the whole frame is written.
    let _ = ws.send(Message::text("x".repeat(1 << 20))).await;
    drain(&mut ws, Duration::from_secs(5)).await;
    connect_when_free(&app, &key, Duration::from_secs(2)).await;
}
