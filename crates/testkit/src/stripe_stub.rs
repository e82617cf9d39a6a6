//! A Stripe-compatible stub for exactly the endpoints callplane calls, answering with
//! Stripe's JSON objects for the API version async-stripe pins (2026-09-30), so the real
//! async-stripe client is exercised over HTTP. It keeps what it created (so `billing setup`
//! finds it again) and records every request for tests to assert.
//!
//! No local Stripe fake covers prices and meters (see shared/SERVICES.md), hence this.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::sync::{Arc, Mutex};

/// One request as the stub received it: method, path and the decoded form or query pairs.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub params: Vec<(String, String)>,
}

impl Recorded {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Objects {
    products: Vec<Value>,
    prices: Vec<Value>,
    meters: Vec<Value>,
    customers: Vec<Value>,
    sessions: Vec<Value>,
    requests: Vec<Recorded>,
    counter: u64,
}

#[derive(Clone, Default)]
pub struct StripeStub {
    state: Arc<Mutex<Objects>>,
}

const NOW: i64 = 1_795_000_000;

fn error(status: StatusCode, code: &str, message: &str, param: Option<&str>) -> Response {
    (
        status,
        axum::Json(json!({ "error": {
            "code": code, "doc_url": format!("https://stripe.com/docs/error-codes/{code}"),
            "message": message, "param": param, "type": "invalid_request_error"
        }})),
    )
        .into_response()
}

fn list(url: &str, data: Vec<Value>) -> Value {
    json!({ "object": "list", "data": data, "has_more": false, "url": url })
}

/// `metadata[key]=value` pairs as an object.
fn metadata(params: &[(String, String)], prefix: &str) -> Value {
    let mut m = Map::new();
    for (k, v) in params {
        if let Some(key) = k.strip_prefix(&format!("{prefix}[")).and_then(|r| r.strip_suffix(']')) {
            m.insert(key.to_owned(), Value::String(v.clone()));
        }
    }
    Value::Object(m)
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl StripeStub {
    /// Serves on a random loopback port; returns the stub and its base URL.
    pub async fn start() -> anyhow::Result<(Self, String)> {
        let stub = StripeStub::default();
        let app = Router::new()
            .route("/v1/products", post(create_product))
            .route("/v1/products/{id}", get(get_product))
            .route("/v1/prices", get(list_prices).post(create_price))
            .route("/v1/billing/meters", get(list_meters).post(create_meter))
            .route("/v1/customers", post(create_customer))
            .route("/v1/checkout/sessions", post(create_session))
            .route("/v1/billing_portal/sessions", post(create_portal))
            .fallback(|method: Method, uri: axum::http::Uri| async move {
                error(
                    StatusCode::NOT_FOUND,
                    "resource_missing",
                    &format!("Unrecognized request URL ({method}: {uri})"),
                    None,
                )
            })
            .layer(axum::middleware::from_fn_with_state(stub.clone(), record))
            .with_state(stub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((stub, url))
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().map(|s| s.requests.clone()).unwrap_or_default()
    }

    fn next_id(&self, prefix: &str) -> String {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.counter += 1;
        format!("{prefix}_stub{:06}", s.counter)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Objects) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }
}

/// Checks the secret key like Stripe does and records the request's parameters.
async fn record(State(stub): State<StripeStub>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let authorized =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("Bearer sk_"));
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"message": "Invalid API Key provided", "type": "invalid_request_error"}})),
        )
            .into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let mut params: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
    if let Some(q) = parts.uri.query() {
        params.extend(serde_urlencoded::from_str::<Vec<(String, String)>>(q).unwrap_or_default());
    }
    stub.with(|s| {
        s.requests.push(Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            params: params.clone(),
        })
    });
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

fn form(body: &Bytes) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

fn query(raw: Option<String>) -> Vec<(String, String)> {
    raw.and_then(|q| serde_urlencoded::from_str(&q).ok()).unwrap_or_default()
}

async fn create_product(State(stub): State<StripeStub>, body: Bytes) -> Response {
    let p = form(&body);
    let Some(name) = param(&p, "name") else {
        return error(StatusCode::BAD_REQUEST, "parameter_missing", "Missing required param: name.", Some("name"));
    };
    let id = param(&p, "id").map(str::to_owned).unwrap_or_else(|| stub.next_id("prod"));
    if stub.with(|s| s.products.iter().any(|x| x["id"] == id.as_str())) {
        return error(StatusCode::BAD_REQUEST, "resource_already_exists", "Product already exists.", Some("id"));
    }
    let product = json!({
        "id": id, "object": "product", "active": true, "created": NOW, "default_price": null,
        "description": null, "images": [], "livemode": false, "marketing_features": [],
        "metadata": metadata(&p, "metadata"), "name": name, "package_dimensions": null, "shippable": null,
        "statement_descriptor": null, "tax_code": null, "type": "service", "unit_label": null,
        "updated": NOW, "url": null
    });
    stub.with(|s| s.products.push(product.clone()));
    axum::Json(product).into_response()
}

async fn get_product(State(stub): State<StripeStub>, Path(id): Path<String>) -> Response {
    match stub.with(|s| s.products.iter().find(|p| p["id"] == id.as_str()).cloned()) {
        Some(p) => axum::Json(p).into_response(),
        None => error(StatusCode::NOT_FOUND, "resource_missing", &format!("No such product: '{id}'"), Some("id")),
    }
}

async fn list_prices(State(stub): State<StripeStub>, RawQuery(q): RawQuery) -> Response {
    let p = query(q);
    let keys: Vec<&str> = p.iter().filter(|(k, _)| k.starts_with("lookup_keys[")).map(|(_, v)| v.as_str()).collect();
    let data = stub.with(|s| {
        s.prices.iter().filter(|x| keys.is_empty() || keys.iter().any(|k| x["lookup_key"] == *k)).cloned().collect()
    });
    axum::Json(list("/v1/prices", data)).into_response()
}

async fn create_price(State(stub): State<StripeStub>, body: Bytes) -> Response {
    let p = form(&body);
    let (Some(currency), Some(product)) = (param(&p, "currency"), param(&p, "product")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "parameter_missing",
            "Missing required param: currency or product.",
            None,
        );
    };
    if !stub.with(|s| s.products.iter().any(|x| x["id"] == product)) {
        return error(
            StatusCode::BAD_REQUEST,
            "resource_missing",
            &format!("No such product: '{product}'"),
            Some("product"),
        );
    }
    let amount: Option<i64> = param(&p, "unit_amount").and_then(|a| a.parse().ok());
    let recurring = param(&p, "recurring[interval]").map(|interval| {
        json!({ "interval": interval, "interval_count": 1, "meter": param(&p, "recurring[meter]"),
                "trial_period_days": null, "usage_type": param(&p, "recurring[usage_type]").unwrap_or("licensed") })
    });
    let price = json!({
        "id": stub.next_id("price"), "object": "price", "active": true, "billing_scheme": "per_unit",
        "created": NOW, "currency": currency, "custom_unit_amount": null, "livemode": false,
        "lookup_key": param(&p, "lookup_key"), "metadata": metadata(&p, "metadata"), "nickname": null,
        "product": product, "recurring": recurring, "tax_behavior": "unspecified", "tiers_mode": null,
        "transform_quantity": null, "type": if recurring.is_some() { "recurring" } else { "one_time" },
        "unit_amount": amount, "unit_amount_decimal": amount.map(|a| a.to_string())
    });
    stub.with(|s| s.prices.push(price.clone()));
    axum::Json(price).into_response()
}

async fn list_meters(State(stub): State<StripeStub>) -> Response {
    axum::Json(list("/v1/billing/meters", stub.with(|s| s.meters.clone()))).into_response()
}

async fn create_meter(State(stub): State<StripeStub>, body: Bytes) -> Response {
    let p = form(&body);
    let (Some(name), Some(event)) = (param(&p, "display_name"), param(&p, "event_name")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "parameter_missing",
            "Missing required param: display_name or event_name.",
            None,
        );
    };
    let meter = json!({
        "id": stub.next_id("mtr"), "object": "billing.meter", "created": NOW,
        "customer_mapping": { "event_payload_key": "stripe_customer_id", "type": "by_id" },
        "default_aggregation": { "formula": param(&p, "default_aggregation[formula]").unwrap_or("sum") },
        "display_name": name, "event_name": event, "event_time_window": null, "livemode": false,
        "status": "active", "status_transitions": { "deactivated_at": null }, "updated": NOW,
        "value_settings": { "event_payload_key": "value" }
    });
    stub.with(|s| s.meters.push(meter.clone()));
    axum::Json(meter).into_response()
}

async fn create_customer(State(stub): State<StripeStub>, body: Bytes) -> Response {
    let p = form(&body);
    let customer = json!({
        "id": stub.next_id("cus"), "object": "customer", "address": null, "balance": 0, "created": NOW,
        "currency": null, "default_source": null, "delinquent": false, "description": null, "discount": null,
        "email": param(&p, "email"), "invoice_prefix": "CPSTUB", "livemode": false,
        "metadata": metadata(&p, "metadata"), "name": param(&p, "name"), "next_invoice_sequence": 1,
        "phone": null, "preferred_locales": [], "shipping": null, "tax_exempt": "none", "test_clock": null
    });
    stub.with(|s| s.customers.push(customer.clone()));
    axum::Json(customer).into_response()
}

async fn create_session(State(stub): State<StripeStub>, _headers: HeaderMap, body: Bytes) -> Response {
    let p = form(&body);
    if param(&p, "line_items[0][price]").is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "parameter_missing",
            "Missing required param: line_items.",
            Some("line_items"),
        );
    }
    let id = stub.next_id("cs_test");
    let session = json!({
        "id": id, "object": "checkout.session", "after_expiration": null, "allow_promotion_codes": null,
        "amount_subtotal": null, "amount_total": null,
        "automatic_tax": { "enabled": false, "liability": null, "provider": null, "status": null },
        "billing_address_collection": null, "cancel_url": param(&p, "cancel_url"),
        "client_reference_id": param(&p, "client_reference_id"), "client_secret": null, "consent": null,
        "consent_collection": null, "created": NOW, "currency": "usd", "custom_fields": [],
        "custom_text": { "after_submit": null, "shipping_address": null, "submit": null, "terms_of_service_acceptance": null },
        "customer": param(&p, "customer"), "customer_creation": null, "customer_details": null, "customer_email": null,
        "expires_at": NOW + 86_400, "invoice": null, "invoice_creation": null, "livemode": false, "locale": null,
        "metadata": metadata(&p, "metadata"), "mode": param(&p, "mode").unwrap_or("payment"), "payment_intent": null,
        "payment_link": null, "payment_method_collection": "always", "payment_method_types": ["card"],
        "payment_status": "unpaid", "phone_number_collection": { "enabled": false }, "recovered_from": null,
        "setup_intent": null, "shipping_address_collection": null, "shipping_cost": null, "shipping_options": [],
        "status": "open", "submit_type": null, "subscription": null, "success_url": param(&p, "success_url"),
        "total_details": null, "ui_mode": "hosted", "url": format!("https://checkout.stripe.com/c/pay/{id}")
    });
    stub.with(|s| s.sessions.push(session.clone()));
    axum::Json(session).into_response()
}

async fn create_portal(State(stub): State<StripeStub>, body: Bytes) -> Response {
    let p = form(&body);
    let Some(customer) = param(&p, "customer") else {
        return error(
            StatusCode::BAD_REQUEST,
            "parameter_missing",
            "Missing required param: customer.",
            Some("customer"),
        );
    };
    let id = stub.next_id("bps");
    axum::Json(json!({
        "id": id, "object": "billing_portal.session", "configuration": "bpc_stub_default", "created": NOW,
        "customer": customer, "flow": null, "livemode": false, "locale": null, "on_behalf_of": null,
        "return_url": param(&p, "return_url"), "url": format!("https://billing.stripe.com/p/session/{id}")
    }))
    .into_response()
}
