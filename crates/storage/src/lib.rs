//! callplane-storage: everything callplane keeps in Postgres.
//!
//! Organizations and their registries, calls (partitioned by month on VAPI's `createdAt`),
//! transcripts, the usage ledger, the dead-letter table, partition maintenance, and the
//! phase-1 backends of the seams (`PgUsageCounter`, `PgTranscriptStore`, `PgFunctionData`,
//! `PgRealtimeBus`). Depends on `callplane-core` and sqlx only; never on `api` or `server`.

mod billing;
mod calls;
mod dead_letters;
mod function_data;
mod orgs;
mod partitions;
mod reads;
mod realtime;
mod transcripts;
mod usage;

pub use callplane_core::domain::CallChange;
pub use callplane_core::domain::{ApiKeyInfo, NewApiKey, NewOrganization};
pub use calls::{ApplyOptions, LedgerRow};
pub use dead_letters::{DeadLetter, DeadLetterFilter, NewDeadLetter};
pub use function_data::PgFunctionData;
pub use partitions::PartitionReport;
pub use realtime::PgRealtimeBus;
pub use transcripts::PgTranscriptStore;
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
    StoreError::backend("postgres", e)
}

/// The Postgres store. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Months (as `year * 12 + month0`) whose partitions are known to exist.
    known_months: Arc<Mutex<HashSet<i32>>>,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(db)?.application_name("callplane");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(db)?;
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool, known_months: Arc::new(Mutex::new(HashSet::new())) }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::backend("postgres", e))
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
