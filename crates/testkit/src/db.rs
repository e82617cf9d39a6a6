//! A fresh database per test, cloned from a migrated template.

use anyhow::{Context, bail};
use callplane_storage::{MIGRATOR, PgStore};
use chrono::Utc;
use sqlx::{Connection, Executor, PgConnection};

/// The cluster tests run against, started by `cargo xtask test`.
pub fn admin_url() -> anyhow::Result<String> {
    match std::env::var("CALLPLANE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => bail!(
            "CALLPLANE_TEST_DATABASE_URL is not set: run the suites with `cargo xtask test`, \
             which starts a throwaway Postgres cluster and sets it"
        ),
    }
}

pub(crate) fn with_database(url: &str, db: &str) -> String {
    // postgres://user@host:port/dbname?params -> replace dbname.
    let (base, query) = url.split_once('?').map(|(b, q)| (b, format!("?{q}"))).unwrap_or((url, String::new()));
    let cut = base.rfind('/').map(|i| &base[..i]).unwrap_or(base);
    format!("{cut}/{db}{query}")
}

/// The template's name changes with the migrations, so a new migration gets a new template.
fn template_name() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for m in MIGRATOR.iter() {
        for b in m.checksum.iter().chain(m.version.to_le_bytes().iter()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
    }
    format!("callplane_template_{h:016x}")
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    pub store: PgStore,
}

impl TestDb {
    /// A new database with every migration applied and partitions from this month on.
    pub async fn fresh() -> anyhow::Result<Self> {
        let admin = admin_url()?;
        let mut conn = PgConnection::connect(&admin).await.context("connecting to the test cluster")?;
        let template = template_name();
        // One builder at a time across all test processes.
        conn.execute("SELECT pg_advisory_lock(727274)").await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            let building = format!("{template}_building");
            conn.execute(format!("DROP DATABASE IF EXISTS {building}").as_str()).await?;
            conn.execute(format!("CREATE DATABASE {building}").as_str()).await?;
            {
                let store = PgStore::connect(&with_database(&admin, &building), 2).await?;
                store.migrate().await?;
                store.ensure_partitions(Utc::now(), 3).await?;
                store.build_search_index(|_| {}).await?;
                store.pool().close().await;
            }
            conn.execute(format!("ALTER DATABASE {building} RENAME TO {template}").as_str()).await?;
        }
        conn.execute("SELECT pg_advisory_unlock(727274)").await?;
        let name = format!("cp_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name} TEMPLATE {template}").as_str()).await?;
        conn.close().await?;
        let url = with_database(&admin, &name);
        let store = PgStore::connect(&url, 10).await?;
        Ok(Self { name, url, store })
    }
}
