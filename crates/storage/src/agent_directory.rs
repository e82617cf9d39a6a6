//! `PgAgentDirectory`: organizations, function data and the routing registries in memory,
//! for answers VAPI waits for.
//!
//! An entry is current until a change notification (`callplane_cache`, raised by triggers on
//! the tables) or a local write marks it stale; a notification also starts reading it again
//! at once. A stale entry asked for is read again within a budget (a quarter of the answer
//! deadline); when the database cannot answer in time, the stale entry is served, the read
//! finishes in the background, and the entry rests a second before the next try: a locked
//! table or a stopped server costs an answer at most the budget. Reads use their own small
//! pool whose connections carry `statement_timeout` and `lock_timeout`, so they never queue
//! behind event processing.
//!
//! Every organization is read into memory at start and after the listener reconnects, so an
//! organization not asked about since the start is answered all the same while the database
//! is away. Registry and call lookups are cached only when found: a mapping, once made, never
//! moves to another organization.

use crate::PgStore;
use async_trait::async_trait;
use callplane_core::seams::{AgentDirectory, FunctionData, OrgDirectory, StoreResult};
use callplane_core::{OrgId, Organization};
use serde_json::{Map, Value};
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const CACHE_CHANNEL: &str = "callplane_cache";

/// Entries older than this are read again even without a notification (a safety net for a
/// notification lost outside a reconnect).
const MAX_AGE: Duration = Duration::from_secs(60);
/// The most call ids remembered; past it the map starts over.
const MAX_CALLS: usize = 100_000;
/// The most organizations read at start (and after a reconnect); others are read when asked.
const MAX_WARM: i64 = 50_000;
/// After a failed read, an organization is answered from memory without trying again for
/// this long: a database that is down is not asked on every answer.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How many reads in a row a burst of changes to one organization may cost before the next
/// answer is left to read it.
const MAX_REFRESH_ROUNDS: usize = 10;

#[derive(Clone)]
struct Known {
    org: Option<Organization>,
    data: Arc<Map<String, Value>>,
    read_at: Instant,
    stale: bool,
    refreshing: bool,
    /// Set after a failed read: no new read before then.
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct Maps {
    orgs: HashMap<OrgId, Known>,
    /// Bumped at every change heard of an organization (whether or not it is in memory), so a
    /// read that overlapped a change is known to be stale when it lands.
    changes: HashMap<OrgId, u64>,
    /// Bumped when every organization is to be read again.
    all_changes: u64,
    registry: HashMap<String, OrgId>,
    calls: HashMap<String, OrgId>,
}

struct Inner {
    /// A store over the answer pool (statement and lock timeouts on every connection).
    answers: PgStore,
    /// The main store, for what answers never need (API keys).
    primary: PgStore,
    /// Where function data is read from when an organization is (re)read: Postgres over the
    /// answer pool, or a cache in front of it.
    data: Arc<dyn FunctionData>,
    maps: Mutex<Maps>,
    /// Told when an organization's API keys change (`None`: anything may have changed), for
    /// the verified-key cache kept outside the directory.
    on_keys_changed: Mutex<Vec<ChangeHook>>,
    /// How long a stale entry's read is awaited before the stale entry is served.
    refresh_budget: Duration,
}

type ChangeHook = Arc<dyn Fn(Option<OrgId>) + Send + Sync>;

#[derive(Clone)]
pub struct PgAgentDirectory {
    inner: Arc<Inner>,
}

impl PgAgentDirectory {
    /// `answers` should be a store over a small pool of its own (see [`PgStore::answer_pool`]);
    /// function data is read from `data` (Postgres over that pool, or a cache in front of it).
    pub fn new(answers: PgStore, primary: PgStore, data: Arc<dyn FunctionData>, refresh_budget: Duration) -> Self {
        let inner =
            Inner { answers, primary, data, maps: Mutex::default(), on_keys_changed: Mutex::default(), refresh_budget };
        Self { inner: Arc::new(inner) }
    }

    /// Calls `hook` with the organization whose API keys changed (a key revoked or deleted),
    /// and with `None` when changes may have been missed (the listener reconnected).
    pub fn on_keys_changed(&self, hook: impl Fn(Option<OrgId>) + Send + Sync + 'static) {
        if let Ok(mut hooks) = self.inner.on_keys_changed.lock() {
            hooks.push(Arc::new(hook));
        }
    }

    fn keys_changed(&self, org: Option<OrgId>) {
        let hooks = self.inner.on_keys_changed.lock().map(|h| h.clone()).unwrap_or_default();
        hooks.iter().for_each(|hook| hook(org));
    }

    /// Listens for change notifications for as long as the process runs.
    pub fn spawn_listener(&self) {
        let directory = self.clone();
        tokio::spawn(async move { directory.listen_forever().await });
    }

    async fn listen_forever(self) {
        loop {
            match PgListener::connect_with(self.inner.primary.direct()).await {
                Ok(mut listener) => match listener.listen(CACHE_CHANNEL).await {
                    Ok(()) => {
                        // Changes made while nobody listened are unknown: read everything
                        // again, now that changes from here on are heard.
                        self.warm().await;
                        if let Err(e) = self.receive(&mut listener).await {
                            warn!(error = %e, "cache listener lost its connection; reconnecting");
                        }
                    }
                    Err(e) => warn!(error = %e, "LISTEN callplane_cache failed; retrying"),
                },
                Err(e) => warn!(error = %e, "cache listener cannot connect; retrying"),
            }
            self.mark_all_stale();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn receive(&self, listener: &mut PgListener) -> Result<(), sqlx::Error> {
        loop {
            match listener.try_recv().await? {
                Some(n) => self.on_notification(n.payload()),
                None => {
                    info!("cache listener reconnecting; cached organizations will be read again");
                    self.mark_all_stale();
                }
            }
        }
    }

    /// Reads every organization (up to a bound) and its function data into memory, so
    /// answers for organizations not yet asked about survive the database going away.
    async fn warm(&self) {
        let before = self.inner.maps.lock().map(|m| (m.changes.clone(), m.all_changes)).unwrap_or_default();
        match self.inner.primary.organizations_with_data(MAX_WARM).await {
            Ok(all) => {
                let now = Instant::now();
                if let Ok(mut maps) = self.inner.maps.lock() {
                    for (org, data) in all {
                        // Changed while this was read: keep it, but stale.
                        let changed =
                            maps.all_changes != before.1 || maps.changes.get(&org.id) != before.0.get(&org.id);
                        let known = Known {
                            org: Some(org.clone()),
                            data: Arc::new(data),
                            read_at: now,
                            stale: changed,
                            refreshing: false,
                            retry_at: None,
                        };
                        maps.orgs.insert(org.id, known);
                    }
                    maps.registry.clear();
                }
            }
            Err(e) => {
                warn!(error = %e, "reading the organizations into memory failed; they are read when asked");
                self.mark_all_stale();
            }
        }
    }

    fn on_notification(&self, payload: &str) {
        match payload.split_once(':') {
            Some(("org", id)) => {
                if let Ok(id) = id.parse::<uuid::Uuid>() {
                    self.refresh_in_background(OrgId(id));
                }
            }
            Some(("keys", id)) => {
                if let Ok(id) = id.parse::<uuid::Uuid>() {
                    self.keys_changed(Some(OrgId(id)));
                }
            }
            Some(("registry", _)) => {
                if let Ok(mut maps) = self.inner.maps.lock() {
                    maps.registry.clear();
                }
            }
            _ => warn!(payload, "ignoring an unknown cache notification"),
        }
    }

    /// An organization changed (or was created) elsewhere: read it again now, so the next
    /// answer finds it current, and an organization created after the start is in memory
    /// before its first call. Until the read lands, the entry is stale.
    fn refresh_in_background(&self, org: OrgId) {
        let start = match self.inner.maps.lock() {
            Ok(mut maps) => {
                *maps.changes.entry(org).or_default() += 1;
                match maps.orgs.get_mut(&org) {
                    // A read under way lands stale (the change above); the next answer reads.
                    Some(entry) if entry.refreshing => false,
                    Some(entry) => {
                        entry.stale = true;
                        entry.refreshing = true;
                        entry.retry_at = None;
                        true
                    }
                    None => true,
                }
            }
            Err(_) => false,
        };
        if start {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                // Changes heard while a read was under way land it stale (an organization
                // created, then its function data put key by key): read again until memory
                // holds what was last written, rather than leave it for the next answer to
                // read, which may come while the database is away and get the partial copy.
                for _ in 0..MAX_REFRESH_ROUNDS {
                    if let Err(e) = Self::load(&inner, org).await {
                        warn!(org_id = %org, error = %e, "reading a changed organization failed; read when asked");
                        if let Ok(mut maps) = inner.maps.lock()
                            && let Some(entry) = maps.orgs.get_mut(&org)
                        {
                            entry.refreshing = false;
                        }
                        return;
                    }
                    let again = match inner.maps.lock() {
                        Ok(mut maps) => match maps.orgs.get_mut(&org) {
                            Some(entry) if entry.stale => {
                                entry.refreshing = true;
                                true
                            }
                            _ => false,
                        },
                        Err(_) => false,
                    };
                    if !again {
                        return;
                    }
                }
            });
        }
    }

    fn mark_all_stale(&self) {
        self.keys_changed(None);
        if let Ok(mut maps) = self.inner.maps.lock() {
            maps.all_changes += 1;
            maps.orgs.values_mut().for_each(|k| {
                k.stale = true;
                k.refreshing = false;
                k.retry_at = None;
            });
            maps.registry.clear();
        }
    }

    /// Reads an organization and its function data from the database and remembers them.
    async fn load(inner: &Inner, org: OrgId) -> StoreResult<Known> {
        let version = |maps: &Maps| (maps.changes.get(&org).copied().unwrap_or(0), maps.all_changes);
        let before = inner.maps.lock().map(|maps| version(&maps)).ok();
        let (row, data) = tokio::try_join!(inner.answers.get(org), inner.data.preload(org))?;
        let known = Known {
            org: row,
            data: Arc::new(data),
            read_at: Instant::now(),
            stale: false,
            refreshing: false,
            retry_at: None,
        };
        if let Ok(mut maps) = inner.maps.lock() {
            // A change heard while reading may not be in what was read: keep it, but stale.
            let mut stored = known.clone();
            stored.stale = before != Some(version(&maps));
            maps.orgs.insert(org, stored);
        }
        Ok(known)
    }

    /// The organization's entry: from memory when current; read again when stale, serving the
    /// stale entry if the read does not finish within the budget.
    async fn known(&self, org: OrgId) -> StoreResult<Known> {
        let cached = self.inner.maps.lock().ok().and_then(|maps| {
            let entry = maps.orgs.get(&org)?;
            let current = !entry.stale && entry.read_at.elapsed() < MAX_AGE;
            let resting = entry.retry_at.is_some_and(|at| Instant::now() < at);
            Some((entry.clone(), current || resting))
        });
        match cached {
            None => Self::load(&self.inner, org).await,
            Some((known, true)) => Ok(known),
            Some((stale, false)) => {
                let inner = self.inner.clone();
                let refresh = tokio::spawn(async move { Self::load(&inner, org).await });
                let outcome = tokio::time::timeout(self.inner.refresh_budget, refresh).await;
                if let Ok(Ok(Ok(fresh))) = outcome {
                    return Ok(fresh);
                }
                match outcome {
                    Ok(Ok(Err(e))) => {
                        warn!(org_id = %org, error = %e, "reading an organization failed; answering from memory")
                    }
                    _ => warn!(org_id = %org, "reading an organization is slow; answering from memory"),
                }
                // The database is in trouble: the next answers use what is known at once
                // (the read, if still running, lands when it can).
                if let Ok(mut maps) = self.inner.maps.lock()
                    && let Some(entry) = maps.orgs.get_mut(&org)
                {
                    entry.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
                Ok(stale)
            }
        }
    }

    fn remembered(&self, key: &str) -> Option<OrgId> {
        self.inner.maps.lock().ok().and_then(|m| m.registry.get(key).copied())
    }

    fn remember(&self, key: String, org: Option<OrgId>) -> Option<OrgId> {
        if let (Some(org), Ok(mut maps)) = (org, self.inner.maps.lock()) {
            maps.registry.insert(key, org);
        }
        org
    }
}

#[async_trait]
impl OrgDirectory for PgAgentDirectory {
    async fn get(&self, org: OrgId) -> StoreResult<Option<Organization>> {
        Ok(self.known(org).await?.org)
    }

    async fn by_phone_number(&self, id: &str) -> StoreResult<Option<OrgId>> {
        let key = format!("phone:{id}");
        match self.remembered(&key) {
            Some(org) => Ok(Some(org)),
            None => Ok(self.remember(key, self.inner.answers.by_phone_number(id).await?)),
        }
    }

    async fn by_assistant(&self, id: &str) -> StoreResult<Option<OrgId>> {
        let key = format!("assistant:{id}");
        match self.remembered(&key) {
            Some(org) => Ok(Some(org)),
            None => Ok(self.remember(key, self.inner.answers.by_assistant(id).await?)),
        }
    }

    async fn by_call(&self, id: &str) -> StoreResult<Option<OrgId>> {
        if let Some(org) = self.inner.maps.lock().ok().and_then(|m| m.calls.get(id).copied()) {
            return Ok(Some(org));
        }
        let org = self.inner.answers.by_call(id).await?;
        if let (Some(org), Ok(mut maps)) = (org, self.inner.maps.lock()) {
            if maps.calls.len() >= MAX_CALLS {
                maps.calls.clear();
            }
            maps.calls.insert(id.to_owned(), org);
        }
        Ok(org)
    }

    async fn by_api_key(&self, secret: &str) -> StoreResult<Option<OrgId>> {
        self.inner.primary.by_api_key(secret).await
    }
}

#[async_trait]
impl AgentDirectory for PgAgentDirectory {
    async fn function_data(&self, org: OrgId) -> StoreResult<Arc<Map<String, Value>>> {
        Ok(self.known(org).await?.data)
    }

    fn invalidate(&self, org: OrgId) {
        if let Ok(mut maps) = self.inner.maps.lock() {
            *maps.changes.entry(org).or_default() += 1;
            if let Some(entry) = maps.orgs.get_mut(&org) {
                entry.stale = true;
                entry.refreshing = false;
                entry.retry_at = None;
            }
        }
    }

    fn invalidate_all(&self) {
        self.mark_all_stale();
    }
}
