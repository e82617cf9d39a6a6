//! Phase 3's archive of old months: `callplane partitions archive` and `restore` against a real
//! S3-compatible server (`s3s-fs`) and a directory, with webhooks arriving meanwhile; the
//! Parquet files read by a plain Parquet reader as an analyst's tool would; and `serve`'s
//! retention setting.

use crate::durability::eventually;
use crate::helpers::{TestApp, lifecycle};
use callplane_core::OrgId;
use callplane_core::billing::month_start;
use callplane_storage::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use callplane_testkit::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use chrono::{DateTime, Duration, Months, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Calls inserted straight into the old month, beside the ones its webhooks make.
const BULK_CALLS: i64 = 3_000;

/// A month far enough back that no event may arrive for it any more (`max_past_days` is 400
/// for the CLI), and the webhooks that fill it accepted by a server that allows older calls.
fn old_month() -> DateTime<Utc> {
    month_start(Utc::now() - Duration::days(500))
}

/// Every row of a table's month, as JSON, in key order.
async fn month_rows(app: &TestApp, table: &str, month: DateTime<Utc>) -> Vec<Value> {
    let next = month.checked_add_months(Months::new(1)).unwrap();
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(t) FROM {table} t WHERE created_at >= $1 AND created_at < $2 ORDER BY 1"
    ))
    .bind(month)
    .bind(next)
    .fetch_all(app.db.store.pool())
    .await
    .unwrap()
}

/// `callplane --json <args>`, expected to fail; its error output.
async fn refused(app: &TestApp, args: &[&str]) -> String {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = app.callplane(&all).await;
    assert!(!out.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fills an old month (webhooks of two organizations, transcripts, and bulk calls with every
/// kind of column, NULLs among them), archives it with traffic arriving, checks what left and
/// what stayed, reads the Parquet files, restores the month, and finds every row as it was.
/// `file_of` maps an object key to the file the store keeps it in.
async fn archive_round_trip(app: &TestApp, file_of: impl Fn(&str) -> PathBuf) {
    let (a, b) = (app.org("pro").await, app.org("pro").await);
    let month = old_month();
    let label = month.format("%Y-%m").to_string();
    let next = month.checked_add_months(Months::new(1)).unwrap();
    let webhook_calls = [(a.id, "old-a-1"), (a.id, "old-a-2"), (b.id, "old-b-1")];
    for (i, (org, call)) in webhook_calls.iter().enumerate() {
        for event in lifecycle(call, month + Duration::days(3 + i as i64), 95.0) {
            assert_eq!(app.post_vapi_in_turn(*org, &event).await.0, StatusCode::OK);
        }
    }
    // A call of the next month, which stays.
    for event in lifecycle("kept-call", next + Duration::days(1), 40.0) {
        assert_eq!(app.post_vapi_in_turn(a.id, &event).await.0, StatusCode::OK);
    }
    sqlx::query(
        "INSERT INTO calls (id, organization_id, created_at, call_type, status, status_rank, ended_reason, \
                            started_at, ended_at, duration_seconds, cost, costs, summary, analysis, customer_number, \
                            billable_seconds, reported_at) \
         SELECT 'bulk-' || i, $1, $2 + i * interval '7 minutes', 'inboundPhoneCall', 'ended', 5, \
                CASE WHEN i % 4 = 0 THEN NULL ELSE 'customer-ended-call' END, \
                $2 + i * interval '7 minutes', $2 + i * interval '7 minutes' + interval '95 s', \
                95.5 + i / 1000.0, CASE WHEN i % 5 = 0 THEN NULL ELSE 0.1 * i END, \
                jsonb_build_array(jsonb_build_object('type', 'model', 'cost', i)), \
                'Summary ' || i || E' with a tab\\t, a \"quote\" and ünïcode', \
                CASE WHEN i % 3 = 0 THEN NULL ELSE jsonb_build_object('successEvaluation', i % 2 = 0) END, \
                '+1555' || lpad(i::text, 7, '0'), 96, $2 + i * interval '7 minutes' + interval '96 s' \
         FROM generate_series(1, $3) i",
    )
    .bind(a.id.0)
    .bind(month)
    .bind(BULK_CALLS)
    .execute(app.db.store.pool())
    .await
    .unwrap();
    let billed = async |org: OrgId| {
        app.count(&format!("SELECT count(*) FROM usage_ledger WHERE organization_id = '{}'", org.0)).await
    };
    eventually("every webhook call is billed", async || billed(a.id).await == 3 && billed(b.id).await == 1).await;
    let calls_before = month_rows(app, "calls", month).await;
    let transcripts_before = month_rows(app, "call_transcripts", month).await;
    assert_eq!(calls_before.len() as i64, BULK_CALLS + 3);
    assert_eq!(transcripts_before.len(), 3, "each webhook call has its transcript");
    let ledger_before = app.count("SELECT count(*) FROM usage_ledger").await;
    let key = app.api_key(a.id).await;
    assert_eq!(app.get("/v1/calls/old-a-1", &key).await.0, StatusCode::OK);

    // A month that can still receive events is refused, and nothing moves.
    let this_month = month_start(Utc::now()).format("%Y-%m").to_string();
    let error = refused(app, &["partitions", "archive", "--before", &this_month]).await;
    assert!(error.contains("max_past_days"), "{error}");
    assert_eq!(month_rows(app, "calls", month).await.len(), calls_before.len());

    // Archived, with a call's webhooks arriving meanwhile.
    let before = next.format("%Y-%m").to_string();
    let traffic = async {
        for event in lifecycle("live-call", Utc::now() - Duration::minutes(2), 30.0) {
            assert_eq!(app.post_vapi_in_turn(b.id, &event).await.0, StatusCode::OK);
        }
    };
    let args = ["partitions", "archive", "--before", &before];
    let (out, ()) = tokio::join!(app.callplane_json(&args), traffic);
    let archived = out["archived"].as_array().unwrap();
    let this = archived.iter().find(|m| m["month"] == label.as_str()).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(this["calls"], BULK_CALLS + 3, "{out}");
    assert_eq!(this["transcripts"], 3, "{out}");
    assert!(this["bytes"].as_u64().unwrap() > 0, "{out}");

    // The month left the database; the ledger, the next month and the live call did not.
    for table in ["calls", "call_transcripts"] {
        let gone: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NULL")
            .bind(format!("{table}_{}", month.format("%Y_%m")))
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
        assert!(gone, "{table}'s partition of {label} is still in the database");
    }
    assert_eq!(month_rows(app, "calls", month).await, Vec::<Value>::new());
    eventually("the live call is billed, and nothing else", async || {
        app.count("SELECT count(*) FROM usage_ledger").await == ledger_before + 1
    })
    .await;
    let (status, body) = app.get("/v1/calls/old-a-1", &key).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["code"], "call_archived", "{body}");
    assert!(body["message"].as_str().unwrap().contains(&format!("partitions restore {label}")), "{body}");
    // Another organization asking for it learns nothing.
    let other = app.api_key(b.id).await;
    assert_eq!(app.get("/v1/calls/old-a-1", &other).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/v1/calls/kept-call", &key).await.0, StatusCode::OK);
    let listed = app.callplane_json(&["partitions", "archived"]).await;
    assert_eq!(listed[0]["state"], "archived", "{listed}");
    assert_eq!(listed[0]["calls"], BULK_CALLS + 3, "{listed}");
    // Nothing makes the month again while it is archived.
    let remade = sqlx::query("SELECT callplane_ensure_month($1)").bind(month).execute(app.db.store.pool()).await;
    let remade = remade.expect_err("an archived month's partition was made again").to_string();
    assert!(remade.contains("is archived"), "{remade}");
    // Archiving again finds nothing left to do.
    let again = app.callplane_json(&["partitions", "archive", "--before", &before]).await;
    assert_eq!(again["archived"], serde_json::json!([]), "{again}");
    assert_eq!(again["already_archived"], serde_json::json!([label]), "{again}");

    // What an analyst reads: the manifest, and Parquet files any reader opens.
    let manifest_key = listed[0]["manifest_key"].as_str().unwrap();
    assert!(manifest_key.ends_with(&format!("archive/month={label}/manifest.json")), "{manifest_key}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(file_of(manifest_key)).unwrap()).unwrap();
    assert!(manifest["schema_version"].as_i64().unwrap() >= 20261206000001, "{manifest}");
    for table in manifest["tables"].as_array().unwrap() {
        let file = std::fs::File::open(file_of(table["object"].as_str().unwrap())).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let columns: Vec<String> = reader.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert!(columns.contains(&"organization_id".to_owned()) && columns.contains(&"created_at".to_owned()));
        let rows: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows as i64, table["rows"].as_i64().unwrap(), "{table}");
    }

    // Restored: every row as it was, the month attached and readable through the API.
    let error = refused(app, &["partitions", "restore", &next.format("%Y-%m").to_string()]).await;
    assert!(error.contains("is not archived"), "{error}");
    let back = app.callplane_json(&["partitions", "restore", &label]).await;
    assert_eq!(back["calls"], BULK_CALLS + 3, "{back}");
    assert_eq!(month_rows(app, "calls", month).await, calls_before, "a call came back different");
    assert_eq!(
        month_rows(app, "call_transcripts", month).await,
        transcripts_before,
        "a transcript came back different"
    );
    let (status, detail) = app.get("/v1/calls/old-a-1", &key).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["transcript_final"], true, "{detail}");
    assert_eq!(app.callplane_json(&["partitions", "archived"]).await, serde_json::json!([]));
    let attached: i64 = app
        .count(&format!(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid IN (to_regclass('calls_{0}'), to_regclass('call_transcripts_{0}'))",
            month.format("%Y_%m")
        ))
        .await;
    assert_eq!(attached, 2, "both partitions are attached again");
    // And the month takes events again (for a server that allows calls that old).
    sqlx::query("SELECT callplane_ensure_month($1)").bind(month).execute(app.db.store.pool()).await.unwrap();
}

/// The settings of a server whose transcripts and archive are in the S3 server, and that
/// accepts webhooks of calls made long ago (to fill an old month).
fn old_calls_on<'a>(url: &'a str, endpoint: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("partitions.max_past_days", "3650"),
        ("object_store.url", url),
        ("object_store.endpoint", endpoint),
        ("object_store.access_key_id", ACCESS_KEY),
        ("object_store.secret_access_key", SECRET_KEY),
        ("object_store.timeout_seconds", "5"),
    ]
}

#[tokio::test]
async fn a_month_is_archived_to_s3_and_restored_row_for_row() {
    let s3 = S3Server::start();
    let (url, endpoint) = (s3.url("archive-test"), s3.endpoint());
    let app = TestApp::spawn_with(&old_calls_on(&url, &endpoint)).await;
    let bucket = s3.bucket_dir();
    archive_round_trip(&app, |key| bucket.join(key)).await;
    assert!(s3.objects("archive-test/archive").len() >= 3, "{:?}", s3.objects("archive-test"));
}

#[tokio::test]
async fn a_month_is_archived_to_a_directory_and_restored_row_for_row() {
    let app = TestApp::spawn_with(&[("partitions.max_past_days", "3650")]).await;
    let dir = PathBuf::from(&app.app.settings.object_store.url);
    archive_round_trip(&app, |key| dir.join(key)).await;
}

/// `partitions.archive_after_months` on a server: the months it names are archived by the
/// maintenance `serve` runs, never one that can still receive events, and `phase plan 3` then
/// says the step is done.
#[tokio::test]
async fn serve_archives_the_months_its_retention_names() {
    let app = TestApp::spawn_with(&[("partitions.archive_after_months", "13")]).await;
    let org = app.org("pro").await;
    let old = old_month();
    // The last month older than max_past_days (400) is archived; the one after it is kept.
    let recent = month_start(Utc::now() - Duration::days(400));
    for month in [old, recent] {
        sqlx::query("SELECT callplane_ensure_month($1)").bind(month).execute(app.db.store.pool()).await.unwrap();
        sqlx::query(
            "INSERT INTO calls (id, organization_id, created_at, status, status_rank) \
             SELECT 'retained-' || $3 || '-' || i, $1, $2 + i * interval '1 hour', 'ended', 5 FROM generate_series(1, 50) i",
        )
        .bind(org.id.0)
        .bind(month)
        .bind(month.format("%Y%m").to_string())
        .execute(app.db.store.pool())
        .await
        .unwrap();
    }
    let step = async || {
        let plan = app.callplane_json(&["phase", "plan", "3"]).await;
        let steps = plan["steps"].as_array().unwrap().clone();
        steps.into_iter().find(|s| s["step"] == "old call partitions archived to object storage").unwrap()
    };
    assert_eq!(step().await["status"], "ready");
    let report = callplane_server::archive_due(&app.app.settings, app.db.store.clone()).await.unwrap().unwrap();
    let months: Vec<&str> = report.archived.iter().map(|m| m.month.as_str()).collect();
    assert!(months.contains(&old.format("%Y-%m").to_string().as_str()), "{months:?}");
    assert!(
        !months.contains(&recent.format("%Y-%m").to_string().as_str()),
        "a month that can still get events: {months:?}"
    );
    assert_eq!(app.count("SELECT count(*) FROM calls WHERE id LIKE 'retained-%'").await, 50);
    let done = step().await;
    assert_eq!(done["status"], "done", "{done}");
    assert!(Path::new(&app.app.settings.object_store.url).join("archive").is_dir());
}
