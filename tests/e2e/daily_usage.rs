//! Daily usage: kept with the ledger in the same transaction, the days counted in the
//! organization's billing time zone, rebuildable from the ledger while reports arrive.

use crate::cli::Cli;
use crate::helpers::{ADMIN_TOKEN, TestApp, lifecycle};
use callplane_core::OrgId;
use chrono::{DateTime, Duration, FixedOffset, NaiveDate, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Per day: calls, seconds of duration, billable seconds.
pub type Days = BTreeMap<NaiveDate, (i64, f64, i64)>;

/// What the ledger holds, bucketed by the day each call started in `offset`: computed here,
/// apart from the database's own time-zone arithmetic.
async fn ledger_days(app: &TestApp, org: OrgId, offset: FixedOffset) -> Days {
    let mut days = Days::new();
    for row in app.db.store.ledger(org).await.unwrap() {
        let day = row.call_started_at.with_timezone(&offset).date_naive();
        let entry = days.entry(day).or_default();
        entry.0 += 1;
        entry.1 += row.duration_seconds;
        entry.2 += row.billable_seconds;
    }
    days
}

/// What `GET /v1/usage/daily` says for `[from, to]`.
async fn api_days(app: &TestApp, key: &str, from: NaiveDate, to: NaiveDate) -> (Value, Days) {
    let (status, body) = app.get(&format!("/v1/usage/daily?from={from}&to={to}"), key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let days = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let day: NaiveDate = d["day"].as_str().unwrap().parse().unwrap();
            (
                day,
                (d["calls"].as_i64().unwrap(), d["seconds"].as_f64().unwrap(), d["billable_seconds"].as_i64().unwrap()),
            )
        })
        .collect();
    (body, days)
}

fn assert_same_days(what: &str, got: &Days, want: &Days) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: the days differ");
    for (day, (calls, seconds, billable)) in want {
        let (c, s, b) = got[day];
        assert_eq!((c, b), (*calls, *billable), "{what}: {day}");
        assert!((s - seconds).abs() < 1e-6, "{what}: {day}: {s} seconds, want {seconds}");
    }
}

async fn set_time_zone(app: &TestApp, org: OrgId, zone: &str) -> (StatusCode, Value) {
    let r = app
        .http
        .patch(format!("{}/admin/v1/organizations/{org}", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "billing_timezone": zone }))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// Calls of `org` starting at `starts` (each created 2 s before it starts), all at once, each
/// one's messages in order; every report is sent twice.
async fn calls(app: &TestApp, org: OrgId, starts: &[(String, DateTime<Utc>, f64)]) {
    let sends = starts.iter().map(|(id, start, seconds)| async move {
        let events = lifecycle(id, *start - Duration::seconds(2), *seconds);
        for e in events.iter().chain(events.last()) {
            let (status, body) = app.post_vapi(org, e).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    });
    futures::future::join_all(sends).await;
}

/// Starts spread over midnight in UTC and in India (UTC+5:30, no daylight saving), two days ago.
fn starts_around_midnights(prefix: &str, n: usize) -> Vec<(String, DateTime<Utc>, f64)> {
    let midnight = (Utc::now() - Duration::days(2)).date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let india_midnight = midnight + Duration::hours(18) + Duration::minutes(30);
    (0..n)
        .map(|i| {
            let around = if i % 2 == 0 { midnight } else { india_midnight };
            let start = around + Duration::minutes(i as i64 * 7 - 60);
            (format!("{prefix}-{i}"), start, 20.0 + (i * 13 % 300) as f64 + 0.25)
        })
        .collect()
}

/// Checks that each organization's daily usage, as the API shows it, equals its ledger summed
/// by the day each call started in its time zone.
///
/// Waits first for every call to be billed: on the Temporal pipeline, an event Temporal did not
/// take at once stays in the inbox and is billed on the inbox's retry, seconds later.
async fn check_days(app: &TestApp, orgs: &[(OrgId, FixedOffset, &str, usize)]) {
    for &(org, offset, zone, sent) in orgs {
        crate::durability::eventually_within("every call is billed", 90, async || {
            ledger_days(app, org, offset).await.values().map(|d| d.0).sum::<i64>() >= sent as i64
        })
        .await;
        let want = daily_usage_matches_the_ledger(app, org, offset, zone).await;
        assert_eq!(want.values().map(|d| d.0).sum::<i64>(), sent as i64, "every call billed once");
        assert!(want.len() >= 2, "the calls fall on both sides of a midnight: {want:?}");
    }
}

/// Asserts that `GET /v1/usage/daily` equals the organization's ledger summed by the day each
/// call started in `offset` (its time zone, `zone`); returns those days.
pub async fn daily_usage_matches_the_ledger(app: &TestApp, org: OrgId, offset: FixedOffset, zone: &str) -> Days {
    let want = ledger_days(app, org, offset).await;
    let key = app.api_key(org).await;
    let (from, to) = match (want.keys().next(), want.keys().last()) {
        (Some(from), Some(to)) => (*from, *to),
        _ => return want,
    };
    let (body, got) = api_days(app, &key, from, to).await;
    assert_eq!(body["time_zone"], zone);
    assert_same_days(zone, &got, &want);
    want
}

/// Concurrent reports (each sent twice) for two organizations, one counting days in India's
/// time zone: the daily usage equals the ledger summed by day, as the API shows it. Then more
/// reports while the daily usage is rebuilt from the ledger over and over: still equal.
#[tokio::test]
async fn daily_usage_equals_the_ledger_by_day_under_concurrent_reports_and_rebuilds() {
    let app = TestApp::spawn().await;
    let (utc_org, india_org) = (app.org("pro").await, app.org("business").await);
    let (status, body) = set_time_zone(&app, india_org.id, "Asia/Kolkata").await;
    assert_eq!((status, body["billing_timezone"].as_str()), (StatusCode::OK, Some("Asia/Kolkata")), "{body}");
    let utc = FixedOffset::east_opt(0).unwrap();
    let india = FixedOffset::east_opt(5 * 3600 + 30 * 60).unwrap();

    let (a, b) = (starts_around_midnights("utc", 16), starts_around_midnights("india", 16));
    futures::future::join(calls(&app, utc_org.id, &a), calls(&app, india_org.id, &b)).await;
    check_days(&app, &[(utc_org.id, utc, "UTC", 16), (india_org.id, india, "Asia/Kolkata", 16)]).await;
    // The same calls counted in UTC fall on other days.
    assert_ne!(ledger_days(&app, india_org.id, utc).await, ledger_days(&app, india_org.id, india).await);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rebuilds = {
        let (store, stop, orgs) = (app.db.store.clone(), stop.clone(), [utc_org.id, india_org.id]);
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for org in orgs {
                    store.rebuild_daily_usage(org).await.unwrap();
                }
                n += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            n
        })
    };
    let (c, d) = (starts_around_midnights("utc-more", 16), starts_around_midnights("india-more", 16));
    futures::future::join(calls(&app, utc_org.id, &c), calls(&app, india_org.id, &d)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(rebuilds.await.unwrap() > 0, "the rebuilds ran alongside the reports");
    check_days(&app, &[(utc_org.id, utc, "UTC", 32), (india_org.id, india, "Asia/Kolkata", 32)]).await;
}

/// A new time zone recounts the organization's days; a name PostgreSQL does not know is
/// refused with its code, and nothing changes.
#[tokio::test]
async fn changing_the_billing_time_zone_recounts_the_days_and_unknown_zones_are_refused() {
    let app = TestApp::spawn().await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    let starts = starts_around_midnights("tz", 6);
    calls(&app, org.id, &starts).await;
    let utc = ledger_days(&app, org.id, FixedOffset::east_opt(0).unwrap()).await;
    let (from, to) = (*utc.keys().next().unwrap() - Duration::days(1), *utc.keys().last().unwrap() + Duration::days(1));
    let (body, got) = api_days(&app, &key, from, to).await;
    assert_eq!(body["time_zone"], "UTC");
    assert_same_days("UTC", &got, &utc);

    for bad in ["Mars/Olympus_Mons", "", "UTC; DROP TABLE calls"] {
        let (status, body) = set_time_zone(&app, org.id, bad).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_time_zone")), "{bad}");
    }
    assert_eq!(api_days(&app, &key, from, to).await.0["time_zone"], "UTC");

    assert_eq!(set_time_zone(&app, org.id, "Asia/Kolkata").await.0, StatusCode::OK);
    let india = ledger_days(&app, org.id, FixedOffset::east_opt(5 * 3600 + 30 * 60).unwrap()).await;
    assert_ne!(india, utc);
    let (body, got) = api_days(&app, &key, from, to).await;
    assert_eq!(body["time_zone"], "Asia/Kolkata");
    assert_same_days("Asia/Kolkata", &got, &india);
}

/// `callplane usage rebuild-daily` puts back what the ledger says, whatever happened to the
/// roll-up.
#[tokio::test]
async fn rebuild_daily_restores_the_roll_up_from_the_ledger() {
    let app = TestApp::spawn().await;
    let cli = Cli { db_url: app.db.url.clone(), addr: crate::cli::free_addr() };
    let store = app.db.store.clone();
    let org = app.org("pro").await;
    calls(&app, org.id, &starts_around_midnights("rebuild", 8)).await;
    let want = ledger_days(&app, org.id, FixedOffset::east_opt(0).unwrap()).await;
    let key = app.api_key(org.id).await;
    let (from, to) = (*want.keys().next().unwrap(), *want.keys().last().unwrap());

    sqlx::query("DELETE FROM daily_usage WHERE day = $1").bind(from).execute(store.pool()).await.unwrap();
    sqlx::query("UPDATE daily_usage SET calls = calls + 5, billable_seconds = billable_seconds + 100")
        .execute(store.pool())
        .await
        .unwrap();
    let (_, broken) = api_days(&app, &key, from, to).await;
    assert_ne!(broken, want, "the API reads the roll-up, not the ledger");

    let report = cli.json(&["usage", "rebuild-daily", "--json"]);
    assert_eq!(report["organizations"], 1, "{report}");
    assert!(report["rows"].as_i64().unwrap() >= want.len() as i64, "{report}");
    assert_same_days("rebuilt", &api_days(&app, &key, from, to).await.1, &want);

    let out = cli.command(&["usage", "rebuild-daily", "--org", &org.id.to_string()]).output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 organizations"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
