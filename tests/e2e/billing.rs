//! Billing with Stripe: the catalog, Checkout and portal links through the real async-stripe
//! client against the Stripe-compatible stub, and subscription webhooks signed the way Stripe
//! signs them (by our signer and by Stripe's own Node library).

use crate::helpers::{TestApp, lifecycle, sample};
use callplane_billing::sign_for_tests;
use callplane_core::OrgStatus;
use callplane_testkit::stripe_stub::StripeStub;
use chrono::{DateTime, Duration, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};

const WHSEC: &str = "whsec_new_secret";

async fn billing_app() -> (TestApp, StripeStub) {
    let (stub, url) = StripeStub::start().await.unwrap();
    let app = TestApp::spawn_with(&[
        ("stripe.secret_key", "sk_test_callplane"),
        ("stripe.api_base", url.as_str()),
        ("stripe.webhook_secrets", "whsec_old_secret,whsec_new_secret"),
        ("plans.pro.stripe_price_id", "price_pro"),
        ("plans.pro.stripe_overage_price_id", "price_pro_overage"),
        ("plans.business.stripe_price_id", "price_business"),
        ("plans.starter.stripe_price_id", "price_starter"),
    ])
    .await;
    (app, stub)
}

fn subscription_event(
    id: &str,
    kind: &str,
    created: i64,
    org: &str,
    status: &str,
    price: &str,
    period: (DateTime<Utc>, DateTime<Utc>),
) -> Value {
    json!({
        "id": id, "object": "event", "api_version": "2026-09-30.endive", "created": created, "livemode": false,
        "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null}, "type": kind,
        "data": {"object": {
            "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": status, "cancel_at_period_end": false,
            "metadata": {"callplane_organization_id": org},
            "items": {"object": "list", "data": [{
                "id": "si_1", "object": "subscription_item", "price": {"id": price, "object": "price"}, "quantity": 1,
                "current_period_start": period.0.timestamp(), "current_period_end": period.1.timestamp()
            }]}
        }}
    })
}

async fn deliver(app: &TestApp, body: &str, signature: &str) -> (StatusCode, Value) {
    let r = app
        .http
        .post(format!("{}/stripe/webhook", app.base))
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn send_event(app: &TestApp, event: &Value) -> (StatusCode, Value) {
    let body = event.to_string();
    deliver(app, &body, &sign_for_tests(WHSEC.as_bytes(), body.as_bytes(), Utc::now())).await
}

/// Plan, status, current period and its usage (from the configured counter).
async fn org_state(app: &TestApp, org: callplane_core::OrgId) -> (String, String, DateTime<Utc>, i64) {
    let (plan, status, period_start): (String, String, DateTime<Utc>) =
        sqlx::query_as("SELECT plan, status, period_start FROM organizations WHERE id = $1")
            .bind(org.0)
            .fetch_one(app.db.store.pool())
            .await
            .unwrap();
    (plan, status, period_start, app.seconds_used(org).await)
}

#[tokio::test]
async fn subscription_webhooks_set_plan_status_and_period_and_are_applied_once_and_in_order() {
    let (app, _stub) = billing_app().await;
    let org = app.org("starter").await;
    let id = org.id.to_string();
    let p1 = (Utc::now() - Duration::days(3), Utc::now() + Duration::days(27));
    let t0 = Utc::now().timestamp() - 60;

    let created = subscription_event("evt_1", "customer.subscription.created", t0, &id, "active", "price_business", p1);
    assert_eq!(send_event(&app, &created).await, (StatusCode::OK, json!({"received": true, "outcome": "applied"})));
    let (plan, status, period_start, _) = org_state(&app, org.id).await;
    assert_eq!((plan.as_str(), status.as_str()), ("business", "active"));
    assert_eq!(period_start.timestamp(), p1.0.timestamp());
    let customer: Option<String> = sqlx::query_scalar("SELECT stripe_customer_id FROM organizations WHERE id = $1")
        .bind(org.id.0)
        .fetch_one(app.db.store.pool())
        .await
        .unwrap();
    assert_eq!(customer.as_deref(), Some("cus_1"));

    // Redelivered: acknowledged, not applied again.
    assert_eq!(send_event(&app, &created).await.1["outcome"], "duplicate");
    assert_eq!(app.count("SELECT count(*) FROM stripe_events").await, 1);

    // A newer update, then an older one arriving late: the org is not rolled back.
    let newer =
        subscription_event("evt_3", "customer.subscription.updated", t0 + 20, &id, "past_due", "price_business", p1);
    let older = subscription_event("evt_2", "customer.subscription.updated", t0 + 10, &id, "active", "price_pro", p1);
    assert_eq!(send_event(&app, &newer).await.1["outcome"], "applied");
    assert_eq!(send_event(&app, &older).await.1["outcome"], "stale");
    let (plan, status, _, _) = org_state(&app, org.id).await;
    assert_eq!((plan.as_str(), status.as_str()), ("business", "past_due"));

    // past_due keeps calls going within the grace period.
    let (_, answer) = app.post_vapi(org.id, &sample("01-assistant-request.json")).await;
    assert!(answer["assistantId"].is_string(), "{answer}");

    // invoice.paid brings it back; unknown types are acknowledged and ignored.
    let paid = json!({"id": "evt_4", "object": "event", "created": t0 + 30, "type": "invoice.paid",
        "data": {"object": {"id": "in_1", "object": "invoice", "customer": "cus_1", "status": "paid",
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1", "metadata": {"callplane_organization_id": id}}}}}});
    assert_eq!(send_event(&app, &paid).await.1["outcome"], "applied");
    assert_eq!(org_state(&app, org.id).await.1, "active");
    let unknown = json!({"id": "evt_5", "object": "event", "created": t0 + 31, "type": "charge.refunded", "data": {"object": {"id": "ch_1"}}});
    assert_eq!(send_event(&app, &unknown).await, (StatusCode::OK, json!({"received": true, "outcome": "ignored"})));

    // Deleted: canceled, and new calls are refused at assistant-request.
    let deleted =
        subscription_event("evt_6", "customer.subscription.deleted", t0 + 40, &id, "canceled", "price_business", p1);
    assert_eq!(send_event(&app, &deleted).await.1["outcome"], "applied");
    assert_eq!(org_state(&app, org.id).await.1, "canceled");
    let (_, answer) = app.post_vapi(org.id, &sample("01-assistant-request.json")).await;
    assert!(answer["error"].as_str().unwrap().contains("not in service"), "{answer}");
}

#[tokio::test]
async fn a_past_due_org_beyond_its_grace_period_is_refused() {
    let (app, _stub) = billing_app().await;
    let org = app.org("pro").await;
    let failed = json!({"id": "evt_f", "object": "event", "created": Utc::now().timestamp(), "type": "invoice.payment_failed",
        "data": {"object": {"id": "in_2", "object": "invoice", "customer": "cus_9",
            "parent": {"subscription_details": {"subscription": "sub_9", "metadata": {"callplane_organization_id": org.id.to_string()}}}}}});
    assert_eq!(send_event(&app, &failed).await.1["outcome"], "applied");
    assert_eq!(org_state(&app, org.id).await.1, OrgStatus::PastDue.as_str());
    // Grace (168 h by default) ran out.
    sqlx::query("UPDATE organizations SET status_changed_at = now() - interval '8 days' WHERE id = $1")
        .bind(org.id.0)
        .execute(app.db.store.pool())
        .await
        .unwrap();
    // A change made in the database directly reaches the server's memory by notification,
    // within moments.
    let mut answer = Value::Null;
    for _ in 0..40 {
        answer = app.post_vapi(org.id, &sample("01-assistant-request.json")).await.1;
        if answer["error"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(answer["error"].as_str().is_some(), "{answer}");
}

#[tokio::test]
async fn a_new_period_starts_the_counter_from_zero_and_the_old_total_stays_in_the_ledger() {
    let (app, _stub) = billing_app().await;
    let start = Utc::now() - Duration::days(10);
    let org = app.org_from("pro", start).await;
    let report = lifecycle("old-period", Utc::now() - Duration::days(2), 600.0).pop().unwrap();
    app.post_vapi(org.id, &report).await;
    assert_eq!(org_state(&app, org.id).await.3, 600);

    let next = (Utc::now() - Duration::hours(1), Utc::now() + Duration::days(30));
    let renewed = subscription_event(
        "evt_r",
        "customer.subscription.updated",
        Utc::now().timestamp(),
        &org.id.to_string(),
        "active",
        "price_pro",
        next,
    );
    assert_eq!(send_event(&app, &renewed).await.1["outcome"], "applied");
    let (_, _, period_start, used) = org_state(&app, org.id).await;
    assert_eq!((period_start.timestamp(), used), (next.0.timestamp(), 0));
    let ledger = app.db.store.ledger(org.id).await.unwrap();
    assert_eq!((ledger.len(), ledger[0].billable_seconds, ledger[0].period_start), (1, 600, org.period_start));

    // Calls in the new period count from zero.
    let report = lifecycle("new-period", Utc::now() - Duration::minutes(10), 60.0).pop().unwrap();
    app.post_vapi(org.id, &report).await;
    assert_eq!(org_state(&app, org.id).await.3, 60);
}

#[tokio::test]
async fn bad_signatures_are_refused_and_nothing_is_recorded() {
    let (app, _stub) = billing_app().await;
    let org = app.org("pro").await;
    let event = subscription_event(
        "evt_bad",
        "customer.subscription.updated",
        Utc::now().timestamp(),
        &org.id.to_string(),
        "canceled",
        "price_pro",
        (Utc::now(), Utc::now() + Duration::days(30)),
    );
    let body = event.to_string();
    let good = sign_for_tests(WHSEC.as_bytes(), body.as_bytes(), Utc::now());
    let tampered = body.replace("canceled", "active");
    for (body, sig, code) in [
        (tampered.as_str(), good.clone(), "invalid_signature"),
        (body.as_str(), sign_for_tests(b"whsec_guess", body.as_bytes(), Utc::now()), "invalid_signature"),
        (
            body.as_str(),
            sign_for_tests(WHSEC.as_bytes(), body.as_bytes(), Utc::now() - Duration::minutes(10)),
            "stale_signature",
        ),
        (body.as_str(), "garbage".to_owned(), "malformed_signature"),
    ] {
        let (status, answer) = deliver(&app, body, &sig).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{answer}");
    }
    let r = app.http.post(format!("{}/stripe/webhook", app.base)).body(body.clone()).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "missing_signature");
    assert_eq!(app.count("SELECT count(*) FROM stripe_events").await, 0);
    assert_eq!(org_state(&app, org.id).await.1, "active");
    // The previous secret still verifies during a rotation.
    let old = sign_for_tests(b"whsec_old_secret", body.as_bytes(), Utc::now());
    assert_eq!(deliver(&app, &body, &old).await.1["outcome"], "applied");
}

/// Stripe's own Node library signs, callplane verifies.
#[tokio::test]
async fn signatures_made_by_stripes_own_library_verify() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/stripe-node");
    if !std::path::Path::new(dir).join("node_modules/stripe").exists() {
        let out =
            Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--prefix", dir]).output().expect("npm runs");
        assert!(out.status.success(), "npm ci in tests/stripe-node failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (app, _stub) = billing_app().await;
    let org = app.org("starter").await;
    let event = subscription_event(
        "evt_node",
        "customer.subscription.updated",
        Utc::now().timestamp(),
        &org.id.to_string(),
        "active",
        "price_pro",
        (Utc::now(), Utc::now() + Duration::days(30)),
    );
    let body = event.to_string();
    let sign = |secret: &str| {
        let mut child = Command::new("node")
            .arg(format!("{dir}/sign.js"))
            .arg(secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs");
        child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let header = sign(WHSEC);
    assert!(header.starts_with("t=") && header.contains(",v1="), "{header}");
    assert_eq!(deliver(&app, &body, &sign("whsec_not_ours")).await.1["code"], "invalid_signature");
    assert_eq!(deliver(&app, &body, &header).await.1["outcome"], "applied");
    assert_eq!(org_state(&app, org.id).await.0, "pro");
}

#[tokio::test]
async fn checkout_and_portal_links_come_from_stripe_through_the_real_client() {
    let (app, stub) = billing_app().await;
    let org = app.org("starter").await;
    let key = app.api_key(org.id).await;
    let post =
        |path: &str, body: Value| app.http.post(format!("{}{path}", app.base)).bearer_auth(&key).json(&body).send();

    let r = post("/v1/billing/portal", json!({})).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "no customer yet");
    let r = post("/v1/billing/checkout", json!({"plan": "platinum"})).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unknown_plan");

    let link: Value = post("/v1/billing/checkout", json!({"plan": "pro"})).await.unwrap().json().await.unwrap();
    assert!(link["url"].as_str().unwrap().starts_with("https://checkout.stripe.com/c/pay/cs_test_"), "{link}");
    let again: Value = post("/v1/billing/checkout", json!({"plan": "business"})).await.unwrap().json().await.unwrap();
    assert!(again["url"].is_string());
    let portal: Value = post("/v1/billing/portal", json!({})).await.unwrap().json().await.unwrap();
    assert!(portal["url"].as_str().unwrap().starts_with("https://billing.stripe.com/p/session/"), "{portal}");

    let requests = stub.requests();
    let customers: Vec<_> = requests.iter().filter(|r| r.path == "/v1/customers").collect();
    assert_eq!(customers.len(), 1, "the Stripe customer is created once and reused");
    assert_eq!(customers[0].param("metadata[callplane_organization_id]"), Some(org.id.to_string().as_str()));
    let sessions: Vec<_> = requests.iter().filter(|r| r.path == "/v1/checkout/sessions").collect();
    assert_eq!(sessions[0].param("mode"), Some("subscription"));
    assert_eq!(sessions[0].param("line_items[0][price]"), Some("price_pro"));
    assert_eq!(sessions[0].param("line_items[1][price]"), Some("price_pro_overage"), "pro bills overage on the meter");
    assert_eq!(
        sessions[0].param("subscription_data[metadata][callplane_organization_id]"),
        Some(org.id.to_string().as_str())
    );
    assert_eq!(sessions[1].param("line_items[0][price]"), Some("price_business"));
    let portal_req = requests.iter().find(|r| r.path == "/v1/billing_portal/sessions").unwrap();
    assert_eq!(portal_req.param("customer"), customers.first().and(Some("cus_stub000001")));

    // Without Stripe configured the links are refused with a reason.
    let plain = TestApp::spawn().await;
    let org2 = plain.org("pro").await;
    let key2 = plain.api_key(org2.id).await;
    let r = plain
        .http
        .post(format!("{}/v1/billing/checkout", plain.base))
        .bearer_auth(&key2)
        .json(&json!({"plan": "pro"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status(), r.json::<Value>().await.unwrap()["code"].as_str().map(str::to_owned)),
        (StatusCode::CONFLICT, Some("billing_not_configured".to_owned()))
    );
}

// The CLI runs as another process and blocks this thread; the stub needs a second worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_setup_creates_the_catalog_once_and_finds_it_again() {
    let (stub, url) = StripeStub::start().await.unwrap();
    let cli = crate::cli::Cli::new().await;
    let run = || {
        let out = cli
            .command(&["billing", "setup", "--json"])
            .env("CALLPLANE__STRIPE__SECRET_KEY", "sk_test_setup")
            .env("CALLPLANE__STRIPE__API_BASE", &url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first["created"].as_array().unwrap().len(), 1 + 3 + 3 + 2, "{first}");
    assert!(first["plans"]["starter"]["overage_price_id"].is_null(), "starter is a hard-limit plan");
    assert!(first["plans"]["pro"]["overage_price_id"].is_string());
    let second = run();
    assert_eq!(second["created"], json!([]));
    assert_eq!(second["plans"], first["plans"]);
    assert_eq!(second["meter_id"], first["meter_id"]);

    let prices: Vec<_> = stub.requests().into_iter().filter(|r| r.method == "POST" && r.path == "/v1/prices").collect();
    let pro_overage = prices.iter().find(|r| r.param("lookup_key") == Some("callplane_pro_overage")).unwrap();
    assert_eq!(pro_overage.param("recurring[usage_type]"), Some("metered"));
    assert_eq!(pro_overage.param("recurring[meter]"), first["meter_id"].as_str());
    assert_eq!(pro_overage.param("unit_amount"), Some("15"));
    let pro = prices.iter().find(|r| r.param("lookup_key") == Some("callplane_pro_monthly")).unwrap();
    assert_eq!((pro.param("unit_amount"), pro.param("currency")), (Some("7900"), Some("usd")));
}

#[tokio::test]
async fn crossing_80_90_and_100_percent_alerts_once_each_on_the_stream_and_in_the_api() {
    let (app, _stub) = billing_app().await;
    let org = app.org("starter").await; // 100 minutes
    let key = app.api_key(org.id).await;
    let created = Utc::now() - Duration::hours(3);
    for (call, minutes) in [("a", 79.0), ("b", 1.0), ("c", 5.0), ("d", 5.0), ("e", 10.0), ("f", 3.0)] {
        let report = lifecycle(call, created, minutes * 60.0).pop().unwrap();
        assert_eq!(app.post_vapi(org.id, &report).await.0, StatusCode::OK);
    }
    let (_, usage) = app.get("/v1/usage", &key).await;
    let thresholds: Vec<i64> =
        usage["alerts"].as_array().unwrap().iter().map(|a| a["threshold"].as_i64().unwrap()).collect();
    assert_eq!(thresholds, vec![80, 90, 100]);
    assert_eq!(usage["alerts"][0]["seconds_used"], 80 * 60, "80% was reached by the second call");
    let alerts: Vec<(i32, String)> = sqlx::query_as(
        "SELECT (data->>'threshold')::int, call_id FROM realtime_events WHERE kind = 'usage.alert' AND organization_id = $1 ORDER BY seq",
    )
    .bind(org.id.0)
    .fetch_all(app.db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        alerts,
        vec![(80, "b".to_owned()), (90, "d".to_owned()), (100, "e".to_owned())],
        "79+1 = 80%, +5 = 85%, +5 = 90%, +10 = 100%, +3 stays"
    );
}
