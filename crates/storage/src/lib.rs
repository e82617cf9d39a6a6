//! callplane-storage: everything callplane keeps in Postgres.
//!
//! Organizations and their registries, calls (partitioned by month on VAPI's `createdAt`),
//! transcripts, the usage ledger, the dead-letter table, partition maintenance, and the
//! phase-1 backends of the seams (`PgUsageCounter`, `PgTranscriptStore`, `PgFunctionData`,
//! `PgRealtimeBus`). Depends on `callplane-core` and sqlx only; never on `api` or `server`.

mod advisor;
mod agent_directory;
#[cfg(feature = "object-store")]
mod archive;
mod billing;
mod calls;
mod convert;
mod dead_letters;
mod function_data;
#[cfg(feature = "object-store")]
mod objects;
mod orgs;
mod partitions;
mod reads;
mod realtime;
mod replica;
mod routes;
mod search;
mod transcripts;
mod unfinished;
mod usage;

pub use advisor::Connections;
pub use agent_directory::{CACHE_CHANNEL, PgAgentDirectory};
#[cfg(feature = "object-store")]
pub use archive::{
    ArchiveProgress, ArchiveReport, ArchivedColumn, ArchivedTable, Archiver, Manifest, MonthArchived, RestoreReport,
};
pub use callplane_core::domain::CallChange;
pub use callplane_core::domain::{ApiKeyInfo, NewApiKey, NewOrganization};
pub use calls::{ApplyOptions, LedgerRow};
pub use convert::{CONVERTIBLE, ConvertProgress, ConvertReport, ConvertRequest, MonthCheck};
pub use dead_letters::{DeadLetter, DeadLetterFilter, NewDeadLetter};
pub use function_data::PgFunctionData;
#[cfg(feature = "object-store")]
pub use objects::{
    MoveProgress, MoveReport, MoveRequest, MoveTarget, ObjectStoreConfig, ObjectTranscriptStore, Objects,
};
/// The Parquet reader and writer the archive uses, for tools and tests that read archives.
#[cfg(feature = "object-store")]
pub use parquet;
pub use partitions::{ArchivedMonth, PartitionReport};
pub use realtime::{PgRealtimeBus, queue_realtime_events};
pub use replica::{PgReplica, ReplicaSettings};
pub use routes::{ServerBeat, StoredRoutes};
pub use search::{SEARCH_SQL, SearchIndexReport, SearchIndexStep};
pub use transcripts::PgTranscriptStore;
pub use unfinished::{UnfinishedCall, UnfinishedFilter};
pub use usage::PgUsageCounter;

use callplane_core::seams::StoreError;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

pub(crate) fn db(e: sqlx::Error) -> StoreError {
    if is_transient(&e) { StoreError::unavailable("postgres", e) } else { StoreError::backend("postgres", e) }
}

/// Errors that say the database is unreachable, overloaded or gave up waiting, not that the
/// statement is wrong: the same work may succeed later.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57: operator
            // intervention (shutdown, statement_timeout, cannot connect now); 40001/40P01:
            // serialization failure and deadlock; 55P03: lock_timeout.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || code == "40001"
                || code == "40P01"
                || code == "55P03"
        }),
        _ => false,
    }
}

/// The Postgres store. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// What needs a session of its own (LISTEN, session advisory locks, migrations): `pool`
    /// itself, unless `pool` goes through a transaction-mode pooler (PgBouncer), which hands
    /// each transaction to any server connection; then a small pool straight to the database.
    direct: PgPool,
    /// Months (as `year * 12 + month0`) whose partitions are known to exist.
    known_months: Arc<Mutex<HashSet<i32>>>,
}

fn connect_options(url: &str, application_name: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url).map_err(db)?.application_name(application_name))
}

/// A pool that connects on first use, so that a process starts while its database is away.
fn lazy_pool(options: PgConnectOptions, max_connections: u32, acquire_timeout: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options)
}

/// How many sessions of its own a process holds at most: two listeners, and a lock or a
/// migration run now and then.
const DIRECT_CONNECTIONS: u32 = 8;

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = connect_options(url, "callplane")?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(db)?;
        Ok(Self::from_pool(pool))
    }

    /// A store whose pool connects on first use, so that a server starts while this database
    /// is away (a read replica: its reads go to the primary until it answers).
    pub fn connect_lazy(url: &str, max_connections: u32, application_name: &str) -> Result<Self, StoreError> {
        Ok(Self::from_pool(lazy_pool(connect_options(url, application_name)?, max_connections, Duration::from_secs(2))))
    }

    /// The same store, keeping its sessions (LISTEN, session locks, migrations) on connections
    /// straight to the database at `direct_url`, past the pooler its queries go through. Connects
    /// on first use.
    pub fn with_direct_url(self, direct_url: &str) -> Result<Self, StoreError> {
        let options = connect_options(direct_url, "callplane-direct")?;
        Ok(Self { direct: lazy_pool(options, DIRECT_CONNECTIONS, Duration::from_secs(5)), ..self })
    }

    /// A store over a small pool for answers VAPI waits for: it connects lazily (so a server
    /// starts while the database is away), waits at most `deadline` for a connection, and
    /// every statement on it gives up after `deadline` (`statement_timeout`) or a lock wait
    /// after half of it (`lock_timeout`).
    pub fn answer_pool(url: &str, max_connections: u32, deadline: Duration) -> Result<Self, StoreError> {
        let ms = deadline.as_millis().max(1);
        let options = connect_options(url, "callplane-answers")?
            .options([("statement_timeout", ms.to_string()), ("lock_timeout", (ms / 2).max(1).to_string())]);
        Ok(Self::from_pool(lazy_pool(options, max_connections, deadline)))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { direct: pool.clone(), pool, known_months: Arc::new(Mutex::new(HashSet::new())) }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connections for what needs a session of its own (see the field).
    pub fn direct(&self) -> &PgPool {
        &self.direct
    }

    /// Applies the migrations, on a direct connection: sqlx holds a session lock while it runs.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.direct).await.map_err(|e| StoreError::backend("postgres", e))
    }

    /// Whether every migration this build knows has been applied.
    pub async fn migrations_current(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        Ok(MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()).all(|m| applied.contains(&m.version)))
    }
}
