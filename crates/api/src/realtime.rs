//! `GET /v1/realtime`: the organization's live events over a WebSocket, resumable.
//!
//! Protocol (server to client, JSON text frames):
//! - `{"type":"ready","resumed_from":N|null}` once the subscription is live;
//! - `{"type":"event","seq":N,"kind":"call.status","call_id":"...","data":{...},"at":"..."}`,
//!   in strictly increasing `seq` per organization;
//! - `{"type":"gap","from":A,"to":B}` when events A..=B are past the retention window (the
//!   client should refetch state over REST);
//! - `{"type":"lagged","resume_after":N}` then a close, when the client fell behind: reconnect
//!   with `?after=N` and nothing is lost.
//!
//! Reconnect with `?after=<last seq seen>` to receive everything missed, then the live
//! stream, with no gap and no duplicate. The server pings every heartbeat interval and closes
//! with 1001 on shutdown. Browsers, which cannot set headers on a WebSocket, may pass the API
//! key or JWT as `?access_token=`.

use crate::auth::{authenticate, bearer};
use crate::extract::ValidQuery;
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use callplane_core::OrgId;
use callplane_core::seams::{Delivery, PublishedEvent};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;
use utoipa::IntoParams;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RealtimeQuery {
    /// The last sequence number received; everything after it is replayed first.
    pub after: Option<i64>,
    /// For browsers: the API key or JWT, when no Authorization header can be sent.
    pub access_token: Option<String>,
}

/// Upgrade to the organization's event stream.
#[utoipa::path(get, path = "/v1/realtime", tag = "realtime", params(RealtimeQuery),
    responses((status = 101, description = "WebSocket; see the protocol in the README"), (status = 401, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn realtime(
    State(s): State<AppState>,
    ValidQuery(q): ValidQuery<RealtimeQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let token = bearer(&headers).map(str::to_owned).or(q.access_token.clone());
    let org = authenticate(&s, token.as_deref()).await?;
    let ws = ws.map_err(|e| ApiError::client(StatusCode::BAD_REQUEST, "websocket_required", e.body_text()))?;
    Ok(ws.on_upgrade(move |socket| async move {
        if let Err(e) = session(s, org, q.after, socket).await {
            tracing::debug!(error = %e, "realtime session ended");
        }
    }))
}

fn event_frame(e: &PublishedEvent) -> Message {
    let v = json!({ "type": "event", "seq": e.seq, "kind": e.kind, "call_id": e.call_id, "data": e.data, "at": e.at });
    Message::Text(Utf8Bytes::from(v.to_string()))
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
}

async fn session(s: AppState, org: OrgId, after: Option<i64>, socket: WebSocket) -> Result<(), axum::Error> {
    let (mut tx, mut rx) = socket.split();
    // Subscribe before reading the history, so nothing published in between is missed;
    // duplicates are dropped by sequence number.
    let mut live = match s.bus.subscribe(org).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "realtime subscribe failed");
            return tx.send(Message::Close(Some(CloseFrame { code: 1011, reason: "unavailable".into() }))).await;
        }
    };
    let send_timeout = s.realtime.send_timeout;
    let mut last = after.unwrap_or(0);
    if after.is_some() && !catch_up(&s, org, &mut last, i64::MAX, &mut tx).await? {
        return tx.send(Message::Close(Some(CloseFrame { code: 1011, reason: "unavailable".into() }))).await;
    }
    tx.send(text(json!({ "type": "ready", "resumed_from": after }))).await?;

    let mut heartbeat = tokio::time::interval(s.realtime.heartbeat);
    heartbeat.tick().await;
    let mut shutdown = s.shutdown.clone();
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            delivery = live.next() => match delivery {
                Some(Delivery::Event(e)) => {
                    if e.seq <= last {
                        continue;
                    }
                    // Something between `last` and this event did not come live (a listener
                    // reconnect): send it from the history first.
                    if e.seq > last + 1 && last > 0 && !catch_up(&s, org, &mut last, e.seq - 1, &mut tx).await? {
                        return tx.send(Message::Close(Some(CloseFrame { code: 1011, reason: "unavailable".into() }))).await;
                    }
                    match tokio::time::timeout(send_timeout, tx.send(event_frame(&e))).await {
                        Ok(r) => r?,
                        Err(_) => {
                            s.metrics.realtime_lagged();
                            return Ok(());
                        }
                    }
                    last = e.seq;
                    s.metrics.realtime_delivered((Utc::now() - e.at).to_std().unwrap_or_default());
                }
                Some(Delivery::Lagged) | None => {
                    s.metrics.realtime_lagged();
                    tx.send(text(json!({ "type": "lagged", "resume_after": last }))).await?;
                    return tx.send(Message::Close(Some(CloseFrame { code: 1013, reason: "resume with ?after".into() }))).await;
                }
            },
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
            _ = heartbeat.tick() => {
                tx.send(Message::Ping(Default::default())).await?;
            }
            _ = &mut stop => {
                return tx.send(Message::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }))).await;
            }
        }
    }
}

/// Sends stored events after `last` up to `upto`, announcing any range no longer stored as a
/// `gap`. Returns false when the history cannot be read.
async fn catch_up(
    s: &AppState,
    org: OrgId,
    last: &mut i64,
    upto: i64,
    tx: &mut (impl SinkExt<Message, Error = axum::Error> + Unpin),
) -> Result<bool, axum::Error> {
    loop {
        let batch = match s.bus.history(org, *last, 500).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "realtime history failed");
                return Ok(false);
            }
        };
        let full = batch.len() == 500;
        for e in batch.iter().take_while(|e| e.seq <= upto) {
            if e.seq > *last + 1 {
                tx.send(text(json!({ "type": "gap", "from": *last + 1, "to": e.seq - 1 }))).await?;
            }
            tx.send(event_frame(e)).await?;
            *last = e.seq;
        }
        if !full || batch.last().is_some_and(|e| e.seq >= upto) {
            if upto != i64::MAX && *last < upto {
                tx.send(text(json!({ "type": "gap", "from": *last + 1, "to": upto }))).await?;
                *last = upto;
            }
            return Ok(true);
        }
    }
}

/// How the WebSocket stream behaves.
#[derive(Clone, Debug)]
pub struct RealtimeSettings {
    pub heartbeat: Duration,
    /// A client that cannot take a frame within this long is disconnected (it resumes later).
    pub send_timeout: Duration,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        Self { heartbeat: Duration::from_secs(20), send_timeout: Duration::from_secs(10) }
    }
}
