//! `RedisFunctionData`: a read-through cache in Redis over the primary function-data store.
//!
//! An organization's whole map is one JSON value, `callplane:fd:{org}`, kept for a TTL. Writes
//! go to the primary first, then drop the cached map; they drop it again a second later, which
//! undoes a reader that read the primary before the write and filled the cache after the
//! first drop. Redis failing costs only speed: every read is served from the primary then.

use crate::{BACKEND, Redis, WarnEvery, round_trip};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{FunctionData, StoreError, StoreResult};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::instrument;

/// When the second drop of a written organization's map runs, and then how often it is tried
/// again while Redis cannot be reached.
const DROP_AGAIN_AFTER: Duration = Duration::from_secs(1);

pub struct RedisFunctionData {
    conn: Redis,
    primary: Arc<dyn FunctionData>,
    ttl: Duration,
    warn: Arc<WarnEvery>,
}

fn key(org: OrgId) -> String {
    format!("callplane:fd:{org}")
}

impl RedisFunctionData {
    pub fn new(conn: Redis, primary: Arc<dyn FunctionData>, ttl: Duration) -> Self {
        Self { conn, primary, ttl, warn: Arc::new(WarnEvery::new(Duration::from_secs(10))) }
    }

    fn warn(&self, what: &str, e: &StoreError) {
        warn(&self.warn, what, e);
    }

    /// Drops the cached map now, and again after [`DROP_AGAIN_AFTER`] in the background. The
    /// second drop is tried until it lands or the TTL has run out (by then any map cached
    /// before the write has expired anyway), so a write made while Redis was unreachable
    /// does not leave the old map served for a whole TTL once it is back.
    async fn invalidate(&self, org: OrgId) {
        if let Err(e) = del(&self.conn, org).await {
            self.warn("could not drop the cached function data", &e);
        }
        let (conn, ttl, warner) = (self.conn.clone(), self.ttl, self.warn.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(DROP_AGAIN_AFTER).await;
                match del(&conn, org).await {
                    Ok(()) => return,
                    Err(e) if started.elapsed() >= ttl => {
                        return warn(&warner, "gave up dropping the cached function data", &e);
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// The cached map; `None` on a miss (or a value this build cannot read, which the refill
    /// replaces).
    pub async fn cached(&self, org: OrgId) -> StoreResult<Option<Map<String, Value>>> {
        let mut get = redis::cmd("GET");
        get.arg(key(org));
        let get = &get;
        let json =
            round_trip(&self.conn, |mut c| async move { get.query_async::<Option<String>>(&mut c).await }).await?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }

    async fn fill(&self, org: OrgId, map: &Map<String, Value>) {
        if let Err(e) = self.set(org, map).await {
            self.warn("could not cache function data", &e);
        }
    }

    async fn set(&self, org: OrgId, map: &Map<String, Value>) -> StoreResult<()> {
        let json = serde_json::to_string(map).map_err(|e| StoreError::backend(BACKEND, e))?;
        let mut set = redis::cmd("SET");
        set.arg(key(org)).arg(json).arg("EX").arg(self.ttl.as_secs().max(1));
        let set = &set;
        round_trip(&self.conn, |mut c| async move { set.exec_async(&mut c).await }).await
    }

    /// Caches the organization's map as the primary has it now, replacing what was cached.
    /// A write racing this is dropped again by the write's second drop, a second later.
    pub async fn warm(&self, org: OrgId) -> StoreResult<usize> {
        let map = self.primary.preload(org).await?;
        self.set(org, &map).await?;
        Ok(map.len())
    }
}

fn warn(every: &WarnEvery, what: &str, e: &StoreError) {
    if every.ready() {
        tracing::warn!(error = %callplane_core::error_chain(e), "{what}");
    }
}

async fn del(conn: &Redis, org: OrgId) -> StoreResult<()> {
    let mut del = redis::cmd("DEL");
    del.arg(key(org));
    let del = &del;
    round_trip(conn, |mut c| async move { del.exec_async(&mut c).await }).await
}

#[async_trait]
impl FunctionData for RedisFunctionData {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn preload(&self, org: OrgId) -> StoreResult<Map<String, Value>> {
        match self.cached(org).await {
            Ok(Some(map)) => Ok(map),
            Ok(None) => {
                let map = self.primary.preload(org).await?;
                self.fill(org, &map).await;
                Ok(map)
            }
            Err(e) => {
                self.warn("could not read cached function data; reading the primary", &e);
                self.primary.preload(org).await
            }
        }
    }

    async fn get(&self, org: OrgId, key: &str) -> StoreResult<Option<Value>> {
        Ok(self.preload(org).await?.remove(key))
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn put(&self, org: OrgId, key: &str, value: &Value) -> StoreResult<()> {
        self.primary.put(org, key, value).await?;
        self.invalidate(org).await;
        Ok(())
    }

    #[instrument(skip_all, fields(org_id = %org))]
    async fn delete(&self, org: OrgId, key: &str) -> StoreResult<bool> {
        let existed = self.primary.delete(org, key).await?;
        self.invalidate(org).await;
        Ok(existed)
    }
}
