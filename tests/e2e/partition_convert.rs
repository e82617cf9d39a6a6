//! `callplane partitions convert --table calls`: an unpartitioned calls table holding 300,000
//! calls over 24 months becomes the monthly layout while VAPI's events keep arriving; and a
//! legacy table of another shape is copied in through a mapping file and kept in sync.

use crate::helpers::{TestApp, books_balance, traffic_during};
use callplane_core::OrgId;
use serde_json::Value;
use sqlx::Executor;

/// Replaces the partitioned calls table with an unpartitioned one of the same columns and
/// indexes (what a database whose calls were never partitioned has), holding `rows` calls of
/// `orgs` spread over the last 24 months, none of them in the call-key registry.
async fn unpartitioned_calls(app: &TestApp, orgs: &[OrgId], rows: i64) {
    let pool = app.db.store.pool();
    pool.execute(
        "CREATE TABLE calls_legacy (LIKE calls INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
         INSERT INTO calls_legacy SELECT * FROM calls;
         DROP TABLE calls CASCADE;
         ALTER TABLE calls_legacy RENAME TO calls;
         ALTER TABLE calls ADD CONSTRAINT calls_pkey PRIMARY KEY (id, created_at);
         CREATE INDEX calls_org_created ON calls (organization_id, created_at DESC, id DESC);
         CREATE INDEX calls_org_live ON calls (organization_id, created_at) WHERE status_rank < 5;
         CREATE INDEX calls_review ON calls (created_at, id) WHERE review_reason IS NOT NULL;",
    )
    .await
    .unwrap();
    let orgs: Vec<uuid::Uuid> = orgs.iter().map(|o| o.0).collect();
    sqlx::query(
        "INSERT INTO calls (id, organization_id, created_at, status, status_rank, ended_reason, started_at, ended_at, \
                            duration_seconds, billable_seconds, summary, reported_at) \
         SELECT 'legacy-' || g, ($1::uuid[])[1 + g % array_length($1::uuid[], 1)], \
                now() - interval '730 days' * (g::float8 / $2) - interval '1 hour', 'ended', 5, 'customer-ended-call', \
                now() - interval '730 days' * (g::float8 / $2) - interval '1 hour', \
                now() - interval '730 days' * (g::float8 / $2) - interval '50 minutes', \
                600, 600, CASE WHEN g % 7 = 0 THEN 'a legacy call ' || g END, now() \
         FROM generate_series(1, $2) g",
    )
    .bind(&orgs)
    .bind(rows)
    .execute(pool)
    .await
    .unwrap();
    pool.execute("ANALYZE calls").await.unwrap();
}

async fn relkind(app: &TestApp, table: &str) -> Option<String> {
    sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = $1")
        .bind(table)
        .fetch_optional(app.db.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_unpartitioned_calls_table_is_converted_with_events_arriving() {
    let app = TestApp::spawn().await;
    let orgs: Vec<OrgId> = vec![app.org("pro").await.id, app.org("business").await.id, app.org("starter").await.id];
    unpartitioned_calls(&app, &orgs, 300_000).await;
    assert_eq!(relkind(&app, "calls").await.as_deref(), Some("r"));

    let (expected, report, rounds) =
        traffic_during(&app, &orgs, 3, app.callplane_json(&["partitions", "convert", "--table", "calls"])).await;
    assert!(rounds >= 2, "events arrived all through the conversion ({rounds} rounds)");
    assert_eq!(report["state"], "swapped", "{report}");
    assert!(report["copied_rows"].as_i64().unwrap() >= 300_000 - 1000, "{report}");
    let swap_ms = report["swap_lock_ms"].as_f64().unwrap();
    assert!(swap_ms < 500.0, "the swap held its lock {swap_ms} ms");
    let months = report["months"].as_array().unwrap();
    assert!(months.len() >= 24, "{} months checked", months.len());
    assert!(months.iter().all(|m| m["checksum"].as_str().is_some_and(|c| c.len() == 32)), "{report}");
    eprintln!(
        "converted: {} rows, {} months, swap lock {swap_ms:.1} ms, {} ms in all, {rounds} rounds of traffic meanwhile",
        report["copied_rows"],
        months.len(),
        report["took_ms"]
    );

    // The layout is the partitioned one, every row is there once, each month in its partition.
    assert_eq!(relkind(&app, "calls").await.as_deref(), Some("p"));
    let old = app.count("SELECT count(*) FROM calls_unpartitioned").await;
    let missing = app
        .count(
            "SELECT count(*) FROM calls_unpartitioned o WHERE NOT EXISTS \
             (SELECT 1 FROM calls c WHERE c.id = o.id AND c.created_at = o.created_at)",
        )
        .await;
    assert_eq!(missing, 0, "every call of the old table ({old}) is in the new one");
    // Calls kept arriving after the swap, into the new table only.
    let total = app.count("SELECT count(*) FROM calls").await;
    assert!(total > old, "the calls after the swap went to the partitioned table: {total} vs {old}");
    let in_months: i64 = months.iter().map(|m| m["rows"].as_i64().unwrap()).sum();
    assert!(in_months >= 300_000 && in_months <= old, "the months checked ({in_months}) hold the calls then");
    assert_eq!(app.count("SELECT count(*) FROM ONLY calls").await, 0, "no row outside a partition");
    let partitions = app.count("SELECT count(*) FROM pg_inherits WHERE inhparent = 'calls'::regclass").await;
    assert!(partitions >= 27, "{partitions} monthly partitions");
    // The registry was filled on the way: each legacy call is found by its id.
    assert_eq!(app.count("SELECT count(*) FROM call_keys WHERE vapi_call_id LIKE 'legacy-%'").await, 300_000);
    let legacy = app.recorded_call(orgs[1], "legacy-4").await;
    assert_eq!(legacy.status, "ended");
    // The indexes came along, under their names.
    for index in ["calls_pkey", "calls_org_created", "calls_org_live", "calls_review"] {
        assert_eq!(relkind(&app, index).await.as_deref(), Some("I"), "{index} is a partitioned index");
    }
    books_balance(&app, &expected).await;

    // Partition maintenance works on the new layout; running the conversion again changes nothing.
    app.app.store.ensure_partitions(chrono::Utc::now(), 4).await.unwrap();
    let again = app.callplane_json(&["partitions", "convert", "--table", "calls"]).await;
    assert_eq!(again["state"], "already", "{again}");
    let dropped = app.callplane_json(&["partitions", "convert", "--table", "calls", "--drop-old"]).await;
    assert_eq!(dropped["dropped_old"], true, "{dropped}");
    assert_eq!(relkind(&app, "calls_unpartitioned").await, None);
    assert_eq!(app.count("SELECT count(*) FROM calls").await, total);
}

/// A legacy table of another shape is copied into the partitioned calls through a mapping
/// file, and what the legacy application writes meanwhile follows; a required column left
/// unmapped is refused, naming it.
#[tokio::test]
async fn a_legacy_table_of_another_shape_is_copied_in_through_a_mapping_file() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await.id;
    // The service's own call this month, beside the legacy calls of the same month.
    for e in crate::helpers::lifecycle("served-now", chrono::Utc::now() - chrono::Duration::minutes(5), 30.0) {
        assert_eq!(app.post_vapi(org, &e).await.0, reqwest::StatusCode::OK);
    }
    let pool = app.db.store.pool();
    pool.execute(
        "CREATE TABLE legacy_calls (call_uuid text NOT NULL, org uuid NOT NULL, started timestamptz NOT NULL, \
                                    call_state text NOT NULL, state_rank smallint NOT NULL, secs double precision, \
                                    PRIMARY KEY (call_uuid, started))",
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO legacy_calls SELECT 'old-' || g, $1, now() - interval '1 day' * (g % 300), 'ended', 5, 60 + g % 50 \
         FROM generate_series(1, 5000) g",
    )
    .bind(org.0)
    .execute(pool)
    .await
    .unwrap();
    let dir = crate::helpers::ScratchDir::new("callplane-mapping");
    let file = std::path::Path::new(&*dir).join("mapping.txt");
    std::fs::write(
        &file,
        "# calls column = legacy column\nid = call_uuid\norganization_id = org\ncreated_at = started\n\
         status = call_state\nstatus_rank = state_rank\nduration_seconds = secs\n",
    )
    .unwrap();

    // Without `status`, which calls requires: refused, naming it.
    let out = app
        .callplane(&[
            "partitions",
            "convert",
            "--table",
            "calls",
            "--from",
            "legacy_calls",
            "--map",
            "id=call_uuid",
            "--map",
            "organization_id=org",
            "--map",
            "created_at=started",
        ])
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("calls.status") && stderr.contains("--map status="), "{stderr}");

    let file_arg = file.to_str().unwrap();
    let report: Value = app
        .callplane_json(&["partitions", "convert", "--table", "calls", "--from", "legacy_calls", "--mapping", file_arg])
        .await;
    assert_eq!(report["state"], "synced", "{report}");
    assert_eq!(report["copied_rows"], 5000, "{report}");
    assert_eq!(report["mapping"]["status"], "call_state", "{report}");
    assert_eq!(app.count("SELECT count(*) FROM calls WHERE id LIKE 'old-%'").await, 5000);
    assert_eq!(app.count("SELECT count(*) FROM call_keys WHERE vapi_call_id LIKE 'old-%'").await, 5000);
    assert_eq!(report["months"].as_array().unwrap().iter().filter(|m| m["recopied"] == true).count(), 0, "{report}");
    assert_eq!(app.recorded_call(org, "served-now").await.status, "ended", "the service's own call is untouched");

    // The legacy application goes on writing: the trigger carries it over.
    pool.execute("INSERT INTO legacy_calls VALUES ('old-new', (SELECT org FROM legacy_calls LIMIT 1), now(), 'in-progress', 3, NULL)")
        .await
        .unwrap();
    pool.execute("UPDATE legacy_calls SET call_state = 'ended', state_rank = 5, secs = 42 WHERE call_uuid = 'old-new'")
        .await
        .unwrap();
    pool.execute("DELETE FROM legacy_calls WHERE call_uuid = 'old-1'").await.unwrap();
    let new = app.recorded_call(org, "old-new").await;
    assert_eq!((new.status.as_str(), new.duration_seconds), ("ended", Some(42.0)));
    assert_eq!(app.count("SELECT count(*) FROM calls WHERE id = 'old-1'").await, 0, "a delete follows too");

    let dropped = app
        .callplane_json(&["partitions", "convert", "--table", "calls", "--from", "legacy_calls", "--drop-old"])
        .await;
    assert_eq!(dropped["dropped_old"], true, "{dropped}");
    pool.execute(
        "INSERT INTO legacy_calls VALUES ('old-after', (SELECT org FROM legacy_calls LIMIT 1), now(), 'ended', 5, 1)",
    )
    .await
    .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM calls WHERE id = 'old-after'").await, 0, "no longer synced");
}

/// A conversion killed in the middle of its copy resumes from its checkpoint; a month whose
/// copy went wrong meanwhile (rows lost from the copy) is found by its checksum and copied again.
#[tokio::test]
async fn an_interrupted_conversion_resumes_from_its_checkpoint_and_repairs_a_month() {
    let app = TestApp::spawn().await;
    let orgs: Vec<OrgId> = vec![app.org("pro").await.id];
    unpartitioned_calls(&app, &orgs, 100_000).await;
    let mut child = app
        .callplane_command(&["partitions", "convert", "--table", "calls", "--batch-rows", "500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::durability::eventually("the copy is under way", async || {
        sqlx::query_scalar::<_, i64>("SELECT next_page FROM partition_conversions WHERE table_name = 'calls'")
            .fetch_optional(app.db.store.pool())
            .await
            .unwrap()
            .is_some_and(|page| page > 20)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(relkind(&app, "calls").await.as_deref(), Some("r"), "killed before the swap");
    // Two rows lost from the copy, in pages already done and in one month: only the month
    // check can find them.
    let lost: Vec<String> = sqlx::query_scalar(
        "WITH m AS (SELECT date_trunc('month', created_at) AS m FROM calls_converting GROUP BY 1 ORDER BY count(*) DESC LIMIT 1), \
              gone AS (DELETE FROM calls_converting WHERE (id, created_at) IN \
                       (SELECT id, created_at FROM calls_converting, m WHERE date_trunc('month', created_at) = m.m LIMIT 2) \
                       RETURNING id) \
         SELECT id FROM gone",
    )
    .fetch_all(app.db.store.pool())
    .await
    .unwrap();
    assert_eq!(lost.len(), 2);

    let report = app.callplane_json(&["partitions", "convert", "--table", "calls"]).await;
    assert_eq!(report["state"], "swapped", "{report}");
    assert!(report["resumed_from_page"].as_i64().unwrap() > 20, "resumed, not started over: {report}");
    let recopied: Vec<&Value> = report["months"].as_array().unwrap().iter().filter(|m| m["recopied"] == true).collect();
    assert_eq!(recopied.len(), 1, "the month that lost rows was copied again: {report}");
    assert_eq!(app.count("SELECT count(*) FROM calls").await, 100_000);
    let back: i64 = sqlx::query_scalar("SELECT count(*) FROM calls WHERE id = ANY($1)")
        .bind(&lost)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(back, 2, "the lost rows are back");
}
