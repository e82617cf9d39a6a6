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
use std::sync::Mutex;
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

#[derive(Debug, thiserror::Error)]
enum CacheError {
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
async fn round_trip<T, F, Fut>(conn: &ConnectionManager, op: F) -> Result<T, StoreError>
where
    F: Fn(ConnectionManager) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let tries = async {
        match op(conn.clone()).await {
            Err(e) if e.is_unrecoverable_error() => op(conn.clone()).await,
            done => done,
        }
    };
    match tokio::time::timeout(ROUND_TRIP, tries).await {
        Ok(result) => result.map_err(redis_error),
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
