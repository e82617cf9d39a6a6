//! `realtime`: how fast callplane's WebSocket stream delivers a webhook's effect to many
//! dashboard subscribers, and the raw baseline on the same machine.
//!
//! N subscribers connect to `GET /v1/realtime` of one organization and wait for
//! `{"type":"ready"}`. Then webhooks (`status-update` `queued`, each for a new call) are sent
//! at a steady rate; every subscriber times the `call.created` event of each call from the
//! moment its webhook was sent. Every subscriber must receive every event.
//!
//! The baseline does the least that can carry an event from Postgres to N WebSockets: a
//! `pg_notify` from the sender, one `LISTEN` connection, an in-memory broadcast and plain
//! tokio-tungstenite connections, measured the same way.
//!
//! [`hold`] measures what open sockets cost the server: it opens many idle subscribers spread
//! over many organizations (within the per-key and per-organization caps) and reads the
//! server process's RSS idle, with them open, and after they close.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use uuid::Uuid;

use crate::client::Server;
use crate::messages::{CallOwner, CallScript, EventSpec};
use crate::plan::{CallSpec, Lifecycle};
use crate::random::item_rng;
use crate::simulate::create_orgs;
use crate::stats::{LatencySummary, micros};

#[derive(Clone, Debug)]
pub struct RealtimeConfig {
    pub subscribers: usize,
    /// Webhooks sent (each produces one `call.created` per subscriber).
    pub events: usize,
    /// Webhooks per second.
    pub rate: f64,
    /// For the baseline's NOTIFY and LISTEN; the baseline is skipped without it.
    pub database_url: Option<String>,
    /// How long to wait for connections and for the last deliveries.
    pub timeout: Duration,
    pub quiet: bool,
}

/// One side's figures.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Deliveries {
    pub subscribers: usize,
    pub connected_in_seconds: f64,
    pub events: usize,
    pub expected: u64,
    pub delivered: u64,
    /// From sending the webhook (or NOTIFY) to the frame's arrival at the subscriber.
    pub latency: LatencySummary,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RealtimeSummary {
    pub callplane: Deliveries,
    pub baseline: Option<Deliveries>,
}

/// When each call's triggering message was sent, for the subscribers to look up.
type SendTimes = Arc<RwLock<HashMap<String, Instant>>>;

/// What a subscriber task brings back.
struct Received {
    delivered: u64,
    samples: Vec<u32>,
}

pub async fn run(server: Server, config: RealtimeConfig) -> Result<RealtimeSummary> {
    let callplane = run_callplane(&server, &config).await?;
    let baseline = match &config.database_url {
        Some(url) => Some(run_baseline(url, &config).await?),
        None => None,
    };
    let summary = RealtimeSummary { callplane, baseline };
    if !config.quiet {
        let line = |name: &str, d: &Deliveries| {
            eprintln!(
                "loadgen: {name:<9} {} subscribers (connected in {:.1}s): {}/{} events delivered, {}",
                d.subscribers,
                d.connected_in_seconds,
                d.delivered,
                d.expected,
                d.latency.line()
            );
        };
        line("callplane", &summary.callplane);
        if let Some(baseline) = &summary.baseline {
            line("baseline", baseline);
        }
    }
    Ok(summary)
}

/// Subscribes to callplane's stream and sends webhooks.
async fn run_callplane(server: &Server, config: &RealtimeConfig) -> Result<Deliveries> {
    let org = create_orgs(server, &["pro"], "realtime", config.quiet).await?.into_iter().next().context("no org")?;
    let ws_base = server.base.replacen("http", "ws", 1);
    let url = format!("{ws_base}/v1/realtime");
    let key = org.api_key.clone();
    let times: SendTimes = Arc::default();
    let owner = CallOwner { org_id: org.id.to_string(), org_name: org.name.clone(), assistant_id: org.assistant_id };
    let spec = CallSpec {
        index: 0,
        org: 0,
        duration_ms: 60_000,
        ended_reason: "customer-ended-call",
        turns: 2,
        tool_calls: 0,
        lifecycle: Lifecycle::Full,
    };
    let send_times = times.clone();
    let webhook_url = org.url.clone();
    let send = move |i: usize| {
        let (server, times, owner, spec, url) =
            (server.clone(), send_times.clone(), owner.clone(), spec.clone(), webhook_url.clone());
        async move {
            let mut rng = item_rng(1, 77, i as u64);
            let script = CallScript::new(&spec, Uuid::now_v7().to_string(), owner, Utc::now(), &mut rng);
            let body = script.render(EventSpec::Status("queued"))?;
            if let Ok(mut times) = times.write() {
                times.insert(script.call_id.clone(), Instant::now());
            }
            let delivery = server.post_webhook(&url, body).await?;
            if !delivery.status.is_success() {
                bail!("the webhook answered {}: {}", delivery.status, String::from_utf8_lossy(&delivery.body));
            }
            Ok(())
        }
    };
    let connect = move || {
        let mut request = url.as_str().into_client_request()?;
        request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {key}"))?);
        Ok(request)
    };
    measure(config, times, connect, send).await
}

/// Connects the subscribers, sends the events at the configured rate, collects what arrived.
async fn measure<C, S, F>(config: &RealtimeConfig, times: SendTimes, connect: C, send: S) -> Result<Deliveries>
where
    C: Fn() -> Result<tokio_tungstenite::tungstenite::handshake::client::Request>,
    S: Fn(usize) -> F,
    F: std::future::Future<Output = Result<()>>,
{
    let n = config.subscribers.max(1);
    let expected_per_subscriber = config.events as u64;
    let ready = Arc::new(Semaphore::new(0));
    let connecting = Arc::new(Semaphore::new(64));
    let started = Instant::now();
    let mut subscribers = tokio::task::JoinSet::new();
    for _ in 0..n {
        let request = connect()?;
        let (ready, connecting, times) = (ready.clone(), connecting.clone(), times.clone());
        let timeout = config.timeout;
        subscribers
            .spawn(async move { subscribe(request, ready, connecting, times, expected_per_subscriber, timeout).await });
    }
    // Every subscriber is live before the first event.
    let all_ready = tokio::time::timeout(config.timeout, ready.acquire_many(n as u32)).await;
    match all_ready {
        Ok(Ok(permit)) => permit.forget(),
        _ => bail!("only {} of {n} subscribers were ready after {:?}", ready.available_permits(), config.timeout),
    }
    let connected_in_seconds = started.elapsed().as_secs_f64();

    let sending = Instant::now();
    for i in 0..config.events {
        if config.rate > 0.0 {
            tokio::time::sleep_until((sending + Duration::from_secs_f64(i as f64 / config.rate)).into()).await;
        }
        send(i).await?;
    }

    let mut delivered = 0;
    let mut samples = Vec::with_capacity(n * config.events);
    while let Some(result) = subscribers.join_next().await {
        let received = result.context("a subscriber task failed")??;
        delivered += received.delivered;
        samples.extend(received.samples);
    }
    Ok(Deliveries {
        subscribers: n,
        connected_in_seconds,
        events: config.events,
        expected: expected_per_subscriber * n as u64,
        delivered,
        latency: LatencySummary::from_micros(&mut samples),
    })
}

/// One subscriber: connects, announces readiness on `{"type":"ready"}`, then times each
/// `call.created` until it has `expected` of them or the timeout passes.
async fn subscribe(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ready: Arc<Semaphore>,
    connecting: Arc<Semaphore>,
    times: SendTimes,
    expected: u64,
    timeout: Duration,
) -> Result<Received> {
    let permit = connecting.acquire().await.context("connection limiter closed")?;
    let (mut socket, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request))
        .await
        .context("connecting timed out")?
        .context("WebSocket connect")?;
    drop(permit);
    let mut received = Received { delivered: 0, samples: Vec::with_capacity(expected as usize) };
    let mut deadline: Option<Instant> = None;
    while received.delivered < expected {
        // The overall limit starts with the first event (connecting has its own).
        let wait = deadline.map_or(timeout * 4, |d| d.saturating_duration_since(Instant::now()));
        let frame = match tokio::time::timeout(wait, socket.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(error))) => return Err(error).context("WebSocket read"),
            Ok(None) | Err(_) => break,
        };
        let Message::Text(text) = frame else { continue };
        let arrived = Instant::now();
        let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else { continue };
        match value.get("type").and_then(Value::as_str) {
            Some("ready") => ready.add_permits(1),
            Some("event") if value.get("kind").and_then(Value::as_str) == Some("call.created") => {
                deadline.get_or_insert(arrived + timeout);
                let call_id = value.get("call_id").and_then(Value::as_str).unwrap_or_default();
                let sent = times.read().ok().and_then(|t| t.get(call_id).copied());
                if let Some(sent) = sent {
                    received.delivered += 1;
                    received.samples.push(micros(arrived.saturating_duration_since(sent)));
                }
            }
            Some("lagged") => bail!("a subscriber lagged: {value}"),
            _ => {}
        }
    }
    let _ = socket.close(None).await;
    Ok(received)
}

/// The raw path: NOTIFY → one LISTEN connection → broadcast → plain WebSockets.
async fn run_baseline(database_url: &str, config: &RealtimeConfig) -> Result<Deliveries> {
    const CHANNEL: &str = "loadgen_raw_baseline";
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the baseline WebSocket server")?;
    let address = listener.local_addr()?;
    let (tx, _) = broadcast::channel::<Arc<str>>(4096);

    // LISTEN, and forward every notification to every connected client.
    let mut pg_listener = sqlx::postgres::PgListener::connect(database_url).await.context("baseline LISTEN")?;
    pg_listener.listen(CHANNEL).await?;
    let forward_tx = tx.clone();
    let forwarder = tokio::spawn(async move {
        while let Ok(notification) = pg_listener.recv().await {
            let _ = forward_tx.send(Arc::from(notification.payload()));
        }
    });
    let accept_tx = tx.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mut rx = accept_tx.subscribe();
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else { return };
                if socket.send(Message::text(json!({ "type": "ready" }).to_string())).await.is_err() {
                    return;
                }
                loop {
                    tokio::select! {
                        event = rx.recv() => match event {
                            Ok(payload) => {
                                if socket.send(Message::text(payload.to_string())).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        },
                        incoming = socket.next() => match incoming {
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                            Some(Ok(_)) => {}
                        },
                    }
                }
            });
        }
    });

    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(database_url).await?;
    let times: SendTimes = Arc::default();
    let send_times = times.clone();
    let send = move |_: usize| {
        let (pool, times) = (pool.clone(), send_times.clone());
        async move {
            let call_id = Uuid::now_v7().to_string();
            let at: DateTime<Utc> = Utc::now();
            let payload = json!({ "type": "event", "kind": "call.created", "call_id": call_id, "at": at }).to_string();
            if let Ok(mut times) = times.write() {
                times.insert(call_id, Instant::now());
            }
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(&pool).await?;
            Ok(())
        }
    };
    let url = format!("ws://{address}/");
    let connect = move || Ok(url.as_str().into_client_request()?);
    let result = measure(config, times, connect, send).await;
    forwarder.abort();
    acceptor.abort();
    result
}

#[derive(Clone, Debug)]
pub struct HoldConfig {
    /// Sockets to open in all.
    pub sockets: usize,
    /// Organizations they are spread over, one API key each (round robin).
    pub orgs: usize,
    /// The server process, for its RSS (`/proc/<pid>/status`; the loadgen must run on the
    /// same machine). Without it only the connection counts are reported.
    pub server_pid: Option<u32>,
    /// How long to let the server settle before each RSS reading. After the close this gives
    /// the allocator's decay time to hand freed pages back.
    pub settle: Duration,
    pub timeout: Duration,
    pub quiet: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HoldSummary {
    pub sockets: usize,
    pub orgs: usize,
    /// Sockets that reached `{"type":"ready"}`.
    pub opened: usize,
    /// Upgrades refused with 429 `too_many_connections`.
    pub refused: usize,
    /// Sockets that failed otherwise.
    pub failed: usize,
    pub connected_in_seconds: f64,
    /// The server's RSS before opening, with every socket open, and after they closed.
    pub rss_idle_kib: Option<u64>,
    pub rss_open_kib: Option<u64>,
    pub rss_closed_kib: Option<u64>,
    /// (RSS open − RSS idle) / sockets opened.
    pub kib_per_socket: Option<f64>,
}

/// How one held socket ended up.
enum Held {
    Open,
    Refused,
    Failed(anyhow::Error),
}

/// Opens `sockets` idle subscribers over `orgs` organizations, reads the server's RSS, closes
/// them and reads it again.
pub async fn hold(server: Server, config: HoldConfig) -> Result<HoldSummary> {
    let plans = vec!["pro"; config.orgs.max(1)];
    let orgs = create_orgs(&server, &plans, "hold", config.quiet).await?;
    let rss = || config.server_pid.and_then(server_rss_kib);
    tokio::time::sleep(config.settle).await;
    let rss_idle_kib = rss();

    let url = format!("{}/v1/realtime", server.base.replacen("http", "ws", 1));
    let (close_tx, _) = broadcast::channel::<()>(1);
    let ready = Arc::new(Semaphore::new(0));
    let connecting = Arc::new(Semaphore::new(64));
    let started = Instant::now();
    let mut sockets = tokio::task::JoinSet::new();
    for i in 0..config.sockets {
        let mut request = url.as_str().into_client_request()?;
        let key = &orgs[i % orgs.len()].api_key;
        request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {key}"))?);
        let (ready, connecting, close) = (ready.clone(), connecting.clone(), close_tx.subscribe());
        sockets.spawn(hold_one(request, ready, connecting, close, config.timeout));
    }
    // Every socket is open (or refused) before the reading.
    let settled = tokio::time::timeout(config.timeout, ready.acquire_many(config.sockets as u32)).await;
    match settled {
        Ok(Ok(permit)) => permit.forget(),
        _ => {
            bail!("only {} of {} sockets settled after {:?}", ready.available_permits(), config.sockets, config.timeout)
        }
    }
    let connected_in_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(config.settle).await;
    let rss_open_kib = rss();

    let _ = close_tx.send(());
    let (mut opened, mut refused, mut failed) = (0, 0, 0);
    while let Some(result) = sockets.join_next().await {
        match result.context("a socket task failed")? {
            Held::Open => opened += 1,
            Held::Refused => refused += 1,
            Held::Failed(error) => {
                if failed == 0 && !config.quiet {
                    eprintln!("loadgen: a socket failed: {error:#}");
                }
                failed += 1;
            }
        }
    }
    tokio::time::sleep(config.settle).await;
    let rss_closed_kib = rss();
    let kib_per_socket = match (rss_idle_kib, rss_open_kib) {
        (Some(idle), Some(open)) if opened > 0 => Some(open.saturating_sub(idle) as f64 / opened as f64),
        _ => None,
    };
    let summary = HoldSummary {
        sockets: config.sockets,
        orgs: orgs.len(),
        opened,
        refused,
        failed,
        connected_in_seconds,
        rss_idle_kib,
        rss_open_kib,
        rss_closed_kib,
        kib_per_socket,
    };
    if !config.quiet {
        let mib = |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        eprintln!(
            "loadgen: {opened} of {} sockets open over {} organizations ({refused} refused, {failed} failed) in {:.1}s; \
             server RSS idle {}, open {}, closed {}",
            summary.sockets,
            summary.orgs,
            summary.connected_in_seconds,
            mib(rss_idle_kib),
            mib(rss_open_kib),
            mib(rss_closed_kib),
        );
    }
    Ok(summary)
}

/// One idle subscriber: connects, waits for `ready`, then keeps reading (answering pings)
/// until told to close. Always adds one permit to `ready` once it is open or has failed.
async fn hold_one(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ready: Arc<Semaphore>,
    connecting: Arc<Semaphore>,
    mut close: broadcast::Receiver<()>,
    timeout: Duration,
) -> Held {
    let permit = connecting.acquire().await;
    let connected = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await;
    drop(permit);
    let mut socket = match connected {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) if response.status().as_u16() == 429 => {
            ready.add_permits(1);
            return Held::Refused;
        }
        Ok(Err(error)) => {
            ready.add_permits(1);
            return Held::Failed(error.into());
        }
        Err(_) => {
            ready.add_permits(1);
            return Held::Failed(anyhow::anyhow!("connecting timed out"));
        }
    };
    let mut announced = false;
    loop {
        tokio::select! {
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(text))) if !announced && text.contains(r#""type":"ready""#) => {
                    announced = true;
                    ready.add_permits(1);
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    if !announced {
                        ready.add_permits(1);
                    }
                    return Held::Failed(error.into());
                }
                None => {
                    if !announced {
                        ready.add_permits(1);
                    }
                    return Held::Failed(anyhow::anyhow!("the server closed the socket"));
                }
            },
            _ = close.recv() => break,
        }
    }
    let _ = socket.close(None).await;
    // Until the server's close arrives, so the server has let go when this returns.
    while let Some(Ok(_)) = socket.next().await {}
    if announced { Held::Open } else { Held::Failed(anyhow::anyhow!("closed before ready")) }
}

/// `VmRSS` of a process in KiB.
fn server_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}
