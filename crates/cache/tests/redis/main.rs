//! The Redis backends against a real `redis-server` and a real Postgres ledger.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a failed call is a failed test.

mod counter;
mod function_data;

use callplane_core::OrgId;
use callplane_core::domain::{NewOrganization, Organization};
use callplane_testkit::TestDb;
use callplane_testkit::redis::RedisServer;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;

/// A Redis server, a fresh database and a connection to the server.
struct Env {
    redis: RedisServer,
    db: TestDb,
    /// Raw commands, for the tests' own checks and faults.
    conn: ConnectionManager,
    /// What the backends are given.
    client: callplane_cache::Redis,
}

impl Env {
    async fn new() -> Self {
        let redis = RedisServer::start();
        let db = TestDb::fresh().await.unwrap();
        let conn = callplane_cache::connect(&redis.url()).await.unwrap();
        let client = callplane_cache::Redis::new(&redis.url()).unwrap();
        Self { redis, db, conn, client }
    }

    /// A new organization on the "starter" plan whose period starts at `period_start`.
    async fn organization(&self, period_start: DateTime<Utc>) -> Organization {
        self.db
            .store
            .create_organization(&NewOrganization {
                name: format!("Org {}", uuid::Uuid::new_v4().simple()),
                plan: "starter".into(),
                default_assistant_id: None,
                period_start,
            })
            .await
            .unwrap()
    }

    async fn org(&self, period_start: DateTime<Utc>) -> OrgId {
        self.organization(period_start).await.id
    }
}

/// The start of a billing period, in whole seconds (as the ledger stores it).
fn period() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp() - 86_400, 0).unwrap()
}
