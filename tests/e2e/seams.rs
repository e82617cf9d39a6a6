//! The phase-1 backends pass their seams' contract suites.

use crate::helpers::TestApp;
use callplane_storage::{PgFunctionData, PgRealtimeBus, PgTranscriptStore, PgUsageCounter};
use callplane_testkit::contracts;
use chrono::Utc;

#[tokio::test]
async fn pg_function_data_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::function_data(&PgFunctionData(app.db.store.clone()), a.id, b.id).await;
}

#[tokio::test]
async fn pg_transcript_store_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::transcript_store(&PgTranscriptStore(app.db.store.clone()), a.id, b.id, "contract-call", Utc::now())
        .await;
}

#[tokio::test]
async fn pg_usage_counter_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::usage_counter(&PgUsageCounter(app.db.store.clone()), a.id, b.id, a.period_start, b.period_start).await;
}

#[tokio::test]
async fn pg_realtime_bus_passes_the_contract() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    contracts::realtime_bus(&PgRealtimeBus::start(app.db.store.clone(), 64).await.unwrap(), a.id, b.id).await;
}
