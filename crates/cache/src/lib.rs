//! callplane-cache: the Redis backends of phase 2 (usage counters, the function-data cache)
//! and, later, phase 3 (pub/sub). The seams these backends implement live in
//! `callplane-core`. Depends on `core` and the Redis driver only; never on `api` or
//! `storage`.
//!
//! Redis is never the truth here: counters are rebuilt from the usage ledger and function data
//! is read from its primary store, so every call into Redis is bounded in time and a Redis
//! that is down costs speed, never data.

mod counter;
mod function_data;

pub use counter::RedisCounter;
pub use function_data::RedisFunctionData;

use callplane_core::seams::StoreError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The backend name in errors and metrics.
const BACKEND: &str = "redis";

/// How long Redis may take to answer one command once connected.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The bound on one round trip as the caller sees it, both tries and any wait for a
/// reconnection included: a stopped or hung Redis fails a call in this time, never hangs it.
const ROUND_TRIP: Duration = Duration::from_millis(500);

/// Connects to Redis. The manager reconnects by itself: after a failed command it makes one
/// connection attempt (no backoff, so a command during an outage fails at once rather than
/// wait on retries) and the next command after a failed attempt starts another, so the
/// connection comes back with the first command after Redis does.
pub async fn connect(url: &str) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url).map_err(|e| StoreError::backend(BACKEND, e))?;
    connect_client(client).await
}

async fn connect_client(client: redis::Client) -> Result<ConnectionManager, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let connecting = ConnectionManager::new_with_config(client, config);
    match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(redis_error(e)),
        Err(_) => Err(StoreError::unavailable(BACKEND, CacheError::TimedOut(CONNECT_TIMEOUT + RESPONSE_TIMEOUT))),
    }
}

/// A Redis the backends share, connected on first use: a `serve` started while Redis is down
/// runs on its fallbacks (the ledger, Postgres) and uses Redis from the first call after it
/// answers. While no connection was ever made, a failed attempt is not repeated for a second,
/// so an outage costs callers nothing but the fallback.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<RedisInner>,
}

struct RedisInner {
    client: redis::Client,
    conn: std::sync::RwLock<Option<ConnectionManager>>,
    /// Held while a first connection is attempted; its value is when the last attempt failed.
    connecting: tokio::sync::Mutex<Option<Instant>>,
}

/// After a failed first connection, how long callers fail at once before the next attempt.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

impl Redis {
    /// A client for `url` (checked now); nothing is connected until first use.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::backend(BACKEND, e))?;
        let inner = RedisInner { client, conn: Default::default(), connecting: Default::default() };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The connection manager (which reconnects by itself once made), made now if need be.
    pub async fn manager(&self) -> Result<ConnectionManager, StoreError> {
        let made = |r: &Self| r.inner.conn.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(conn) = made(self) {
            return Ok(conn);
        }
        let mut last_failure = self.inner.connecting.lock().await;
        if let Some(conn) = made(self) {
            return Ok(conn);
        }
        if last_failure.is_some_and(|at| at.elapsed() < RECONNECT_PAUSE) {
            return Err(StoreError::unavailable(BACKEND, CacheError::NotConnected));
        }
        match connect_client(self.inner.client.clone()).await {
            Ok(conn) => {
                *self.inner.conn.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn.clone());
                *last_failure = None;
                Ok(conn)
            }
            Err(e) => {
                *last_failure = Some(Instant::now());
                Err(e)
            }
        }
    }
}

impl Redis {
    /// Whether Redis answers a `PING` within a round trip.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let ping = redis::cmd("PING");
        let ping = &ping;
        round_trip(self, |mut c| async move { ping.query_async::<String>(&mut c).await }).await.map(drop)
    }

    /// The string at `key`, if any.
    pub async fn get_string(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(key);
        let get = &get;
        round_trip(self, |mut c| async move { get.query_async::<Option<String>>(&mut c).await }).await
    }

    /// Sets `key` to `value` for `ttl`.
    pub async fn set_string(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(key).arg(value).arg("EX").arg(ttl.as_secs().max(1));
        let set = &set;
        round_trip(self, |mut c| async move { set.exec_async(&mut c).await }).await
    }

    /// The memory Redis uses now (`INFO memory`'s `used_memory`), for the phase advisor.
    pub async fn used_memory(&self) -> Result<u64, StoreError> {
        let mut conn = self.manager().await?;
        let info = tokio::time::timeout(ROUND_TRIP, redis::cmd("INFO").arg("memory").query_async::<String>(&mut conn))
            .await
            .map_err(|_| StoreError::unavailable(BACKEND, CacheError::TimedOut(ROUND_TRIP)))?
            .map_err(redis_error)?;
        info.lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| StoreError::backend(BACKEND, CacheError::UnexpectedInfo))
    }
}

#[derive(Debug, thiserror::Error)]
enum CacheError {
    #[error("INFO memory did not say used_memory")]
    UnexpectedInfo,
    #[error("redis has not been reachable since this process started; retrying")]
    NotConnected,
    #[error("redis did not answer within {0:?}")]
    TimedOut(Duration),
    /// A rebuild's earlier chunks were gone when a later one ran (FLUSHALL, eviction), again
    /// and again.
    #[error("the usage counter was flushed or evicted while it was being rebuilt")]
    Vanished,
    #[error("the counter script answered {0:?}")]
    UnexpectedReply(Vec<i64>),
}

/// Connection trouble (refused, dropped, timed out) and a Redis that is loading or failing
/// over are `Unavailable`; anything else (a script error, a wrong reply) is a backend fault.
fn redis_error(e: redis::RedisError) -> StoreError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || matches!(e.retry_method(), redis::RetryMethod::WaitAndRetry);
    if transient { StoreError::unavailable(BACKEND, e) } else { StoreError::backend(BACKEND, e) }
}

/// Runs one Redis round trip within [`ROUND_TRIP`]. A command that failed because the
/// connection was lost (Redis restarted) is sent once more on the connection the manager
/// opens in its place; every command sent through here is idempotent, so that is safe.
async fn round_trip<T, F, Fut>(redis: &Redis, op: F) -> Result<T, StoreError>
where
    F: Fn(ConnectionManager) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let tries = async {
        let conn = redis.manager().await?;
        match op(conn.clone()).await {
            Err(e) if e.is_unrecoverable_error() => op(conn).await,
            done => done,
        }
        .map_err(redis_error)
    };
    match tokio::time::timeout(ROUND_TRIP, tries).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::unavailable(BACKEND, CacheError::TimedOut(ROUND_TRIP))),
    }
}

/// Lets a warning through at most once per interval, so an outage hit by every request logs
/// a line every few seconds instead of one per request.
struct WarnEvery {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl WarnEvery {
    const fn new(interval: Duration) -> Self {
        Self { interval, last: Mutex::new(None) }
    }

    fn ready(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return false;
        }
        *last = Some(now);
        true
    }
}
