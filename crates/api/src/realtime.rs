//! `GET /v1/realtime`: the organization's live events over a WebSocket, resumable.
//!
//! Protocol (server to client, JSON text frames):
//! - `{"type":"ready","resumed_from":N|null}` once the subscription is live;
//! - `{"type":"event","seq":N,"kind":"call.status","call_id":"...","data":{...},"at":"..."}`,
//!   in strictly increasing `seq` per organization;
//! - `{"type":"gap","from":A,"to":B}` when events A..=B are past the retention window (the
//!   client should refetch state over REST);
//! - `{"type":"lagged","resume_after":N}` then a close (1013), when the client fell behind
//!   the live stream: reconnect with `?after=N` and nothing is lost.
//!
//! Reconnect with `?after=<last seq seen>` to receive everything missed, then the live
//! stream, with no gap and no duplicate. The server pings every heartbeat interval and closes
//! with 1001 on shutdown. Browsers, which cannot set headers on a WebSocket, may pass the API
//! key or JWT as `?access_token=`.
//!
//! Limits, so that clients cannot hold the server's memory: at most
//! `max_connections_per_key` sockets per credential and `max_connections_per_org` per
//! organization in each process (more are refused with 429 `too_many_connections` and
//! `Retry-After`); every frame, ping and catch-up page included, must be taken by the client
//! within `send_timeout`, or the socket is closed (1008) and dropped — reconnect with
//! `?after=<last seq seen>`. The catch-up reads the history a bounded page at a time, and the
//! live stream's queue is the bus's bounded per-organization queue, so what one socket holds
//! is a page, a frame and its buffers, whatever the backlog.

use crate::auth::{authenticate_client, bearer};
use crate::extract::ValidQuery;
use crate::throttle::ClientAddr;
use crate::{ApiError, AppState};
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use callplane_core::ErrorCode;
use callplane_core::OrgId;
use callplane_core::seams::{Delivery, PublishedEvent};
use chrono::Utc;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use utoipa::IntoParams;

/// Events asked of the history per catch-up page; the store may return fewer to keep a page's
/// bytes bounded. A page is what a client that stops reading makes this process hold.
const CATCH_UP_PAGE: i64 = 100;

/// Clients only ever send pongs and a close, so their frames are small; this also caps the
/// read buffer every socket keeps (the default, 128 KiB zeroed on first read, was most of an
/// idle socket's memory).
const CLIENT_FRAME_BYTES: usize = 16 * 1024;
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How long a client refused for too many connections is asked to wait: slots free as soon
/// as a socket closes, so retrying soon is reasonable.
const RETRY_AFTER_SECONDS: u32 = 5;

/// After a send timed out, how long the close frame may take. A client that took nothing for
/// the whole send timeout will rarely take it; this only keeps the goodbye polite when it
/// has just resumed reading.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

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
    responses((status = 101, description = "WebSocket; see the protocol in the README"), (status = 401, body = crate::error::ErrorBody),
        (status = 429, description = "Too many open connections for this credential or organization (`too_many_connections`); see `Retry-After`", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn realtime(
    State(s): State<AppState>,
    client: ClientAddr,
    ValidQuery(q): ValidQuery<RealtimeQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let token = bearer(&headers).map(str::to_owned).or(q.access_token.clone()).unwrap_or_default();
    let org = match authenticate_client(&s, &client, Some(&token)).await {
        Ok(org) => org,
        Err(refused) => return Ok(refused.into_response()),
    };
    let ws = ws.map_err(|e| ApiError::client(ErrorCode::WebsocketRequired, e.body_text()))?;
    let slot = match s.realtime.open.take(&s.realtime, org, credential_id(&token)) {
        Ok(slot) => slot,
        Err(full) => return Ok(too_many_connections(full)),
    };
    let ws =
        ws.read_buffer_size(READ_BUFFER_BYTES).max_frame_size(CLIENT_FRAME_BYTES).max_message_size(CLIENT_FRAME_BYTES);
    Ok(ws.on_upgrade(move |socket| async move {
        // Held for the whole session: the slot is given back however the session ends.
        let _slot = slot;
        let (tx, rx) = socket.split();
        let mut out = Outbox { tx, timeout: s.realtime.send_timeout };
        match session(&s, org, q.after, &mut out, rx).await {
            Ok(()) => {}
            Err(SendError::TooSlow) => {
                s.metrics.realtime_lagged();
                tracing::debug!("realtime client did not read within the send timeout; closing");
                let close = out.tx.send(close(1008, "too slow to read; reconnect with ?after=<last seq>"));
                let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
            }
            Err(SendError::Socket(e)) => tracing::debug!(error = %e, "realtime session ended"),
        }
    }))
}

/// The 429 for a full cap. It goes through [`ApiError`] like every refusal (same body, same
/// log line) and gains the `Retry-After` header.
fn too_many_connections(full: Full) -> Response {
    let message = match full {
        Full::Credential(cap) => format!(
            "this API key or token already has {cap} realtime connections open, the most allowed; \
             close one or retry in {RETRY_AFTER_SECONDS} s"
        ),
        Full::Organization(cap) => format!(
            "this organization already has {cap} realtime connections open, the most allowed; \
             close one or retry in {RETRY_AFTER_SECONDS} s"
        ),
    };
    ApiError::too_many(ErrorCode::TooManyConnections, message, RETRY_AFTER_SECONDS.into()).into_response()
}

/// Counts a credential's sockets without keeping the credential: only its hash is held.
fn credential_id(token: &str) -> CredentialId {
    Sha256::digest(token.as_bytes()).into()
}

type CredentialId = [u8; 32];

/// Which cap refused a connection, and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Full {
    Credential(usize),
    Organization(usize),
}

/// The sockets open in this process, by organization and by credential.
#[derive(Default)]
pub struct OpenSockets {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_org: HashMap<OrgId, usize>,
    by_credential: HashMap<CredentialId, usize>,
}

impl std::fmt::Debug for OpenSockets {
    // Counts only: the map keys are credentials' hashes, which have no place in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open: usize = self.lock().by_org.values().sum();
        f.debug_struct("OpenSockets").field("open", &open).finish()
    }
}

impl OpenSockets {
    // The counts stay consistent even if a holder panicked: every update is a whole
    // increment or decrement under the lock.
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for one socket, or says which cap is full.
    fn take(self: &Arc<Self>, caps: &RealtimeSettings, org: OrgId, credential: CredentialId) -> Result<Slot, Full> {
        let mut counts = self.lock();
        if counts.by_credential.get(&credential).copied().unwrap_or(0) >= caps.max_connections_per_key {
            return Err(Full::Credential(caps.max_connections_per_key));
        }
        if counts.by_org.get(&org).copied().unwrap_or(0) >= caps.max_connections_per_org {
            return Err(Full::Organization(caps.max_connections_per_org));
        }
        *counts.by_credential.entry(credential).or_default() += 1;
        *counts.by_org.entry(org).or_default() += 1;
        Ok(Slot { open: self.clone(), org, credential })
    }
}

/// One open socket's place in the counts, given back on drop, so no return path or panic
/// can leak it.
struct Slot {
    open: Arc<OpenSockets>,
    org: OrgId,
    credential: CredentialId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
            if let Some(n) = map.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
        let mut counts = self.open.lock();
        release(&mut counts.by_org, &self.org);
        release(&mut counts.by_credential, &self.credential);
    }
}

/// Why a session could not send.
enum SendError {
    /// The socket failed or the client went away.
    Socket(axum::Error),
    /// The client did not take a frame within the send timeout.
    TooSlow,
}

/// The sending half of a socket; every send is bounded by the send timeout, so a client that
/// stops reading cannot hold the session (and what it buffers) for longer than that.
struct Outbox {
    tx: SplitSink<WebSocket, Message>,
    timeout: Duration,
}

impl Outbox {
    async fn send(&mut self, message: Message) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, self.tx.send(message)).await {
            Ok(sent) => sent.map_err(SendError::Socket),
            Err(_) => Err(SendError::TooSlow),
        }
    }
}

fn event_frame(e: &PublishedEvent) -> Message {
    let v = json!({ "type": "event", "seq": e.seq, "kind": e.kind, "call_id": e.call_id, "data": e.data, "at": e.at });
    Message::Text(Utf8Bytes::from(v.to_string()))
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(v.to_string()))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

async fn session(
    s: &AppState,
    org: OrgId,
    after: Option<i64>,
    out: &mut Outbox,
    mut rx: SplitStream<WebSocket>,
) -> Result<(), SendError> {
    // Subscribe before reading the history, so nothing published in between is missed;
    // duplicates are dropped by sequence number.
    let mut live = match s.bus.subscribe(org).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "realtime subscribe failed");
            return out.send(close(1011, "unavailable")).await;
        }
    };
    let mut last = after.unwrap_or(0);
    if after.is_some() && !catch_up(s, org, &mut last, i64::MAX, out).await? {
        return out.send(close(1011, "unavailable")).await;
    }
    out.send(text(json!({ "type": "ready", "resumed_from": after }))).await?;

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
                    if e.seq > last + 1 && last > 0 && !catch_up(s, org, &mut last, e.seq - 1, out).await? {
                        return out.send(close(1011, "unavailable")).await;
                    }
                    out.send(event_frame(&e)).await?;
                    last = e.seq;
                    s.metrics.realtime_delivered((Utc::now() - e.at).to_std().unwrap_or_default());
                }
                Some(Delivery::Lagged) | None => {
                    out.send(text(json!({ "type": "lagged", "resume_after": last }))).await?;
                    out.send(close(1013, "resume with ?after")).await?;
                    // Counted once sent: a send that timed out is counted by the caller.
                    s.metrics.realtime_lagged();
                    return Ok(());
                }
            },
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                Some(Ok(_)) => {}
            },
            _ = heartbeat.tick() => out.send(Message::Ping(Default::default())).await?,
            _ = &mut stop => return out.send(close(1001, "server shutting down")).await,
        }
    }
}

/// Sends stored events after `last` up to `upto`, a page at a time, announcing any range no
/// longer stored as a `gap`. Returns false when the history cannot be read.
async fn catch_up(s: &AppState, org: OrgId, last: &mut i64, upto: i64, out: &mut Outbox) -> Result<bool, SendError> {
    while *last < upto {
        let page = match s.bus.history(org, *last, CATCH_UP_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(error = %e, "realtime history failed");
                return Ok(false);
            }
        };
        // The store may return fewer than asked (it bounds a page's bytes), so only an empty
        // page says the history is exhausted.
        let Some(first) = page.first() else { break };
        if first.seq > upto {
            break;
        }
        for e in page.iter().take_while(|e| e.seq <= upto) {
            if e.seq > *last + 1 {
                out.send(text(json!({ "type": "gap", "from": *last + 1, "to": e.seq - 1 }))).await?;
            }
            out.send(event_frame(e)).await?;
            *last = e.seq;
        }
    }
    if upto != i64::MAX && *last < upto {
        out.send(text(json!({ "type": "gap", "from": *last + 1, "to": upto }))).await?;
        *last = upto;
    }
    Ok(true)
}

/// How the WebSocket stream behaves, and the sockets this process has open against its caps.
#[derive(Clone, Debug)]
pub struct RealtimeSettings {
    pub heartbeat: Duration,
    /// A client that cannot take a frame within this long is disconnected (it resumes later).
    pub send_timeout: Duration,
    /// Open sockets allowed per organization, in each process.
    pub max_connections_per_org: usize,
    /// Open sockets allowed per API key or JWT, in each process.
    pub max_connections_per_key: usize,
    /// This process's open sockets: state rather than a setting, kept here so every clone of
    /// the app state counts against the same caps. `Default` starts it empty.
    pub open: Arc<OpenSockets>,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(20),
            send_timeout: Duration::from_secs(5),
            max_connections_per_org: 100,
            max_connections_per_key: 20,
            open: Arc::default(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn caps(per_org: usize, per_key: usize) -> RealtimeSettings {
        RealtimeSettings { max_connections_per_org: per_org, max_connections_per_key: per_key, ..Default::default() }
    }

    #[test]
    fn a_slot_is_given_back_when_dropped_even_by_a_panic() {
        let caps = caps(2, 1);
        let open = caps.open.clone();
        let org = OrgId(uuid::Uuid::new_v4());
        let key = credential_id("cp_one");
        let slot = open.take(&caps, org, key).unwrap();
        assert_eq!(open.take(&caps, org, key).err(), Some(Full::Credential(1)));
        drop(slot);
        let held = open.take(&caps, org, key).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = held;
            panic!("a session panicked");
        }));
        assert!(result.is_err());
        assert!(open.take(&caps, org, key).is_ok(), "the panicking holder's slot leaked");
        assert!(open.lock().by_org.is_empty() && open.lock().by_credential.is_empty(), "empty entries are removed");
    }

    #[test]
    fn the_organization_cap_counts_every_credential_and_no_other_organization() {
        let caps = caps(2, 5);
        let open = caps.open.clone();
        let (a, b) = (OrgId(uuid::Uuid::new_v4()), OrgId(uuid::Uuid::new_v4()));
        let _one = open.take(&caps, a, credential_id("k1")).unwrap();
        let _two = open.take(&caps, a, credential_id("k2")).unwrap();
        assert_eq!(open.take(&caps, a, credential_id("k3")).err(), Some(Full::Organization(2)));
        assert!(open.take(&caps, b, credential_id("k4")).is_ok());
    }

    #[test]
    fn the_debug_output_shows_counts_and_no_credential_hash() {
        let caps = caps(2, 2);
        let _slot = caps.open.take(&caps, OrgId(uuid::Uuid::new_v4()), credential_id("cp_secret")).unwrap();
        let printed = format!("{caps:?}");
        assert!(printed.contains("open: OpenSockets { open: 1 }"), "{printed}");
    }
}
