//! `RedisCounter`: billed seconds per organization and period in Redis, rebuilt from the
//! usage ledger whenever Redis has lost them.
//!
//! One hash per organization and period, `callplane:usage:{org}:{period_start}`, holds the
//! total (`total`), one field per call counted (`c:{call_id}` = its seconds) and `ready` once
//! it holds every call the ledger had when it was rebuilt. Keeping it all in one key means an
//! eviction or a FLUSHALL removes it whole, never half: a hash without `ready` is rebuilt
//! before use. Every write is a union on the call fields (HSETNX, then add the seconds only if
//! the field is new), so a call added twice, or by an add and a rebuild racing, counts once.

use crate::{BACKEND, CacheError, Redis, round_trip};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{Counted, StoreError, StoreResult, UsageCounter, UsageLedger};
use chrono::{DateTime, Duration, Utc};
use redis::Script;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use tracing::instrument;

/// Calls sent to Redis per rebuild script: small enough that one script never holds Redis
/// for long, large enough that a busy period takes few round trips.
const REBUILD_CHUNK: usize = 1000;
/// How long a period's hash outlives its start: a month, plus the time late calls and
/// dashboards still read the previous period.
const KEEP_FOR: Duration = Duration::days(70);
/// Rebuilds a counter may take when its hash keeps vanishing under it.
const ATTEMPTS: usize = 3;

/// KEYS[1] the hash; ARGV: the call's field, its seconds, the expiry (unix seconds).
/// Returns {-1} when the hash is not ready, {0, total} when the call was counted before,
/// {1, before, after} when it is counted now.
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
if redis.call('HEXISTS', key, 'ready') == 0 then return {-1} end
local before = tonumber(redis.call('HGET', key, 'total')) or 0
if redis.call('HSETNX', key, ARGV[1], ARGV[2]) == 0 then return {0, before} end
local after = redis.call('HINCRBY', key, 'total', ARGV[2])
redis.call('EXPIREAT', key, ARGV[3])
return {1, before, after}
",
    )
});

/// One chunk of a rebuild. KEYS[1] the hash; ARGV: the rebuild's token, whether this is the
/// first chunk and the last ("1"/"0"), the expiry, then pairs of call field and seconds.
/// The first chunk leaves the token in the hash and later ones require it, so a hash that
/// vanished between chunks (taking the earlier chunks with it) is never marked ready: the
/// chunk returns -1 and the rebuild starts over. The last chunk marks the hash ready.
/// Returns the total.
static UNION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local token = 'r:' .. ARGV[1]
if ARGV[2] == '1' then
  redis.call('HSET', key, token, 1)
elseif redis.call('HEXISTS', key, token) == 0 then
  return -1
end
redis.call('HSETNX', key, 'total', 0)
for i = 5, #ARGV, 2 do
  if redis.call('HSETNX', key, ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', key, 'total', ARGV[i + 1])
  end
end
if ARGV[3] == '1' then
  redis.call('HDEL', key, token)
  redis.call('HSET', key, 'ready', 1)
end
local total = tonumber(redis.call('HGET', key, 'total'))
redis.call('EXPIREAT', key, ARGV[4])
return total
",
    )
});

/// The usage counter in Redis, over the ledger it is rebuilt from.
pub struct RedisCounter {
    conn: Redis,
    ledger: Arc<dyn UsageLedger>,
    /// One rebuild at a time per period hash in this process: after a flush, a burst of adds
    /// that all find the hash gone reads the ledger once, not once each (which would also
    /// drain the database pool).
    gates: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Whether an add marks the call's ledger row counted. A counter written to beside the
    /// Postgres one (while counters move) leaves that to Postgres, whose flip of the mark is
    /// what makes its own add happen once.
    marks_ledger: bool,
}

/// What the add script did.
enum Added {
    NotReady,
    Before(i64),
    Now { before: i64, after: i64 },
}

fn key(org: OrgId, period_start: DateTime<Utc>) -> String {
    format!("callplane:usage:{org}:{}", period_start.timestamp())
}

fn field(call_id: &str) -> String {
    format!("c:{call_id}")
}

/// When the period's hash expires: [`KEEP_FOR`] after the period starts, and not before a day
/// from now (so a rebuild of an old period is not deleted as it is written).
fn expire_at(period_start: DateTime<Utc>) -> i64 {
    (period_start + KEEP_FOR).max(Utc::now() + Duration::days(1)).timestamp()
}

impl RedisCounter {
    pub fn new(conn: Redis, ledger: Arc<dyn UsageLedger>) -> Self {
        Self { conn, ledger, gates: Arc::default(), marks_ledger: true }
    }

    /// The same counter (same Redis, same rebuild gates), leaving the ledger's `counted` mark
    /// to another counter.
    pub fn leaving_the_ledger_unmarked(&self) -> Self {
        Self { conn: self.conn.clone(), ledger: self.ledger.clone(), gates: self.gates.clone(), marks_ledger: false }
    }

    /// The period's hash as it is: its total and every call it holds with its seconds, or
    /// `None` when it is not ready (it is rebuilt from the ledger before its next use).
    pub async fn snapshot(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
    ) -> StoreResult<Option<(i64, HashMap<String, i64>)>> {
        let mut read = redis::cmd("HGETALL");
        read.arg(key(org, period_start));
        let read = &read;
        let fields: HashMap<String, String> =
            round_trip(&self.conn, |mut c| async move { read.query_async(&mut c).await }).await?;
        if !fields.contains_key("ready") {
            return Ok(None);
        }
        let total = fields.get("total").and_then(|t| t.parse().ok()).unwrap_or(0);
        let calls =
            fields.iter().filter_map(|(f, v)| Some((f.strip_prefix("c:")?.to_owned(), v.parse().ok()?))).collect();
        Ok(Some((total, calls)))
    }

    /// Deletes every period hash in Redis (`SCAN`, then `DEL` in batches); returns how many.
    /// Each is rebuilt from the ledger before its next use.
    pub async fn forget_all(&self) -> StoreResult<usize> {
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg("callplane:usage:*").arg("COUNT").arg(1000);
            let scan = &scan;
            let (next, keys): (u64, Vec<String>) =
                round_trip(&self.conn, |mut c| async move { scan.query_async(&mut c).await }).await?;
            if !keys.is_empty() {
                let mut del = redis::cmd("DEL");
                del.arg(&keys);
                let del = &del;
                round_trip(&self.conn, |mut c| async move { del.exec_async(&mut c).await }).await?;
                deleted += keys.len();
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The rebuild gate of a period hash; gates nobody holds are dropped on the way.
    fn gate(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        gates.entry(key.to_owned()).or_default().clone()
    }

    /// The total if the hash is ready.
    async fn ready_total(&self, key: &str) -> StoreResult<Option<i64>> {
        let mut read = redis::cmd("HMGET");
        read.arg(key).arg("ready").arg("total");
        let read = &read;
        let (ready, total): (Option<String>, Option<i64>) =
            round_trip(&self.conn, |mut c| async move { read.query_async(&mut c).await }).await?;
        Ok(total.filter(|_| ready.is_some()))
    }

    /// The total, rebuilt from the ledger first unless the hash is ready (another add's
    /// rebuild may have finished while this one waited for the gate).
    async fn ensure_ready(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        let key = key(org, period_start);
        let gate = self.gate(&key);
        let _one_at_a_time = gate.lock().await;
        match self.ready_total(&key).await? {
            Some(total) => Ok(total),
            None => self.rebuild_now(org, period_start).await,
        }
    }

    async fn rebuild_now(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        for _ in 0..ATTEMPTS {
            if let Some(total) = self.union_ledger(org, period_start).await? {
                return Ok(total);
            }
        }
        Err(StoreError::unavailable(BACKEND, CacheError::Vanished))
    }

    async fn add(&self, key: &str, call_id: &str, seconds: i64, expire_at: i64) -> StoreResult<Added> {
        let mut add = ADD.prepare_invoke();
        add.key(key).arg(field(call_id)).arg(seconds).arg(expire_at);
        let add = &add;
        let reply: Vec<i64> = round_trip(&self.conn, |mut c| async move { add.invoke_async(&mut c).await }).await?;
        match reply[..] {
            [-1] => Ok(Added::NotReady),
            [0, total] => Ok(Added::Before(total)),
            [1, before, after] => Ok(Added::Now { before, after }),
            _ => Err(StoreError::backend(BACKEND, CacheError::UnexpectedReply(reply))),
        }
    }

    /// Unions the ledger's calls into the hash, chunk by chunk, then marks it ready. `None`
    /// when the hash vanished between chunks.
    async fn union_ledger(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<Option<i64>> {
        self.union_ledger_into(&key(org, period_start), org, period_start).await
    }

    async fn union_ledger_into(&self, key: &str, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<Option<i64>> {
        let calls = self.ledger.calls_in_period(org, period_start).await?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expire_at = expire_at(period_start);
        // An empty period still takes one (empty) chunk, to set the total to 0 and `ready`.
        let chunks: Vec<&[(String, i64)]> =
            if calls.is_empty() { vec![&[]] } else { calls.chunks(REBUILD_CHUNK).collect() };
        let mut total = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let mut union = UNION.prepare_invoke();
            union.key(key).arg(&token).arg(flag(i == 0)).arg(flag(i == chunks.len() - 1)).arg(expire_at);
            for (call_id, seconds) in *chunk {
                union.arg(field(call_id)).arg(*seconds);
            }
            let union = &union;
            total = round_trip(&self.conn, |mut c| async move { union.invoke_async(&mut c).await }).await?;
            if total < 0 {
                return Ok(None);
            }
        }
        Ok(Some(total))
    }
}

fn flag(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

#[async_trait]
impl UsageCounter for RedisCounter {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    #[instrument(skip_all, fields(org_id = %org, call_id = %call_id))]
    async fn add_call(
        &self,
        org: OrgId,
        period_start: DateTime<Utc>,
        call_id: &str,
        seconds: i64,
    ) -> StoreResult<Counted> {
        let key = key(org, period_start);
        let expire_at = expire_at(period_start);
        let mut rebuilt = false;
        let mut counted = None;
        for _ in 0..ATTEMPTS {
            counted = match self.add(&key, call_id, seconds, expire_at).await? {
                Added::NotReady => {
                    self.ensure_ready(org, period_start).await?;
                    rebuilt = true;
                    continue;
                }
                // A rebuild on the way usually brought the call in from the ledger already.
                Added::Before(total) => Some(Counted { before: Some(total), after: total, new: false }),
                Added::Now { before, after } => Some(Counted { before: Some(before), after, new: true }),
            };
            break;
        }
        let Some(mut counted) = counted else {
            return Err(StoreError::unavailable(BACKEND, CacheError::Vanished));
        };
        if rebuilt {
            counted.before = None;
        }
        // The add is done either way; a row left unmarked is added again by the repair loop,
        // which changes nothing here.
        if self.marks_ledger
            && let Err(e) = self.ledger.mark_counted(org, &[call_id.to_owned()]).await
        {
            tracing::warn!(error = %callplane_core::error_chain(&e), "could not mark a counted call in the ledger");
        }
        Ok(counted)
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn used(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        match self.ready_total(&key(org, period_start)).await? {
            Some(total) => Ok(total),
            None => self.ensure_ready(org, period_start).await,
        }
    }

    /// Builds the period's hash afresh from the ledger under a key of its own and renames it
    /// over the live one (so a drifted total is replaced, not merged into), then unions the
    /// ledger into it once more: a call whose add went to the old hash between the first read
    /// and the rename committed its ledger row before the second read, which brings it in.
    #[instrument(skip_all, fields(org_id = %org))]
    async fn rebuild(&self, org: OrgId, period_start: DateTime<Utc>) -> StoreResult<i64> {
        let live = key(org, period_start);
        let gate = self.gate(&live);
        let _one_at_a_time = gate.lock().await;
        for _ in 0..ATTEMPTS {
            let fresh = format!("{live}:rebuild:{}", uuid::Uuid::new_v4().simple());
            if self.union_ledger_into(&fresh, org, period_start).await?.is_none() {
                continue;
            }
            let mut rename = redis::cmd("RENAME");
            rename.arg(&fresh).arg(&live);
            let rename = &rename;
            // A flush between the build and the rename leaves nothing to rename: build again.
            match round_trip(&self.conn, |mut c| async move { rename.query_async::<()>(&mut c).await }).await {
                Ok(()) => {}
                Err(StoreError::Backend { .. }) => continue,
                Err(e) => return Err(e),
            }
            if let Some(total) = self.union_ledger(org, period_start).await? {
                return Ok(total);
            }
        }
        Err(StoreError::unavailable(BACKEND, CacheError::Vanished))
    }
}
