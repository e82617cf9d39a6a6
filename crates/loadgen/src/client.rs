//! Talking to a running callplane over HTTP: the admin API (organizations, API keys), the
//! dashboard API (function data, usage), and VAPI's webhooks, signed the way VAPI signs them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

/// How webhooks prove they come from VAPI.
#[derive(Clone, Debug)]
pub enum WebhookAuth {
    /// VAPI's HMAC credential with its defaults: `x-signature` is the hex HMAC-SHA256 of
    /// `{timestamp}.{body}`, `x-timestamp` the unix time in seconds.
    Hmac(String),
    /// A Bearer credential: `Authorization: Bearer <secret>`.
    Bearer(String),
}

/// The hex HMAC-SHA256 of `{timestamp}.{body}` under `secret`.
pub fn hmac_signature(secret: &str, timestamp: i64, body: &[u8]) -> Result<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).context("invalid HMAC key")?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

impl WebhookAuth {
    /// The headers that authenticate `body` sent at unix time `now`.
    pub fn headers(&self, body: &[u8], now: i64) -> Result<Vec<(&'static str, String)>> {
        Ok(match self {
            Self::Hmac(secret) => {
                vec![("x-timestamp", now.to_string()), ("x-signature", hmac_signature(secret, now, body)?)]
            }
            Self::Bearer(secret) => vec![("authorization", format!("Bearer {secret}"))],
        })
    }
}

/// An organization as the admin API returns it.
#[derive(Clone, Debug, Deserialize)]
pub struct CreatedOrg {
    pub id: String,
    pub vapi_server_url: String,
}

/// A webhook's answer and how long it took.
pub struct Delivery {
    pub status: StatusCode,
    /// Kept as bytes; parsed only when a check needs it.
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

/// A running callplane.
#[derive(Clone)]
pub struct Server {
    pub base: String,
    http: reqwest::Client,
    admin_token: Option<String>,
    auth: WebhookAuth,
}

impl Server {
    pub fn new(base: &str, admin_token: Option<String>, auth: WebhookAuth) -> Result<Self> {
        let http = http_client()?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http, admin_token, auth })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn admin(&self) -> Result<&str> {
        self.admin_token.as_deref().context("the admin token is needed (--admin-token or CALLPLANE_ADMIN_TOKEN)")
    }

    /// `POST /admin/v1/organizations`.
    pub async fn create_org(&self, name: &str, plan: &str, assistant_id: &str) -> Result<CreatedOrg> {
        let response = self
            .http
            .post(format!("{}/admin/v1/organizations", self.base))
            .bearer_auth(self.admin()?)
            .json(&json!({ "name": name, "plan": plan, "assistant_id": assistant_id }))
            .send()
            .await
            .context("POST /admin/v1/organizations")?;
        expect_success(response, "POST /admin/v1/organizations").await?.json().await.context("organization JSON")
    }

    /// `POST /admin/v1/organizations/{id}/api-keys`; returns the key (shown once).
    pub async fn create_api_key(&self, org_id: &str) -> Result<String> {
        let response = self
            .http
            .post(format!("{}/admin/v1/organizations/{org_id}/api-keys", self.base))
            .bearer_auth(self.admin()?)
            .json(&json!({ "name": "loadgen" }))
            .send()
            .await
            .context("POST /admin/v1/organizations/{id}/api-keys")?;
        let value: Value = expect_success(response, "POST api-keys").await?.json().await?;
        match value.get("key").and_then(Value::as_str) {
            Some(key) => Ok(key.to_owned()),
            None => bail!("the API key answer has no `key`: {value}"),
        }
    }

    /// `PUT /v1/function-data/{key}` with the organization's API key.
    pub async fn put_function_data(&self, api_key: &str, key: &str, value: &Value) -> Result<()> {
        let response = self
            .http
            .put(format!("{}/v1/function-data/{key}", self.base))
            .bearer_auth(api_key)
            .json(value)
            .send()
            .await
            .context("PUT /v1/function-data")?;
        expect_success(response, "PUT /v1/function-data").await?;
        Ok(())
    }

    /// `GET /v1/usage` with the organization's API key.
    pub async fn usage(&self, api_key: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/v1/usage", self.base))
            .bearer_auth(api_key)
            .send()
            .await
            .context("GET /v1/usage")?;
        Ok(expect_success(response, "GET /v1/usage").await?.json().await?)
    }

    /// POSTs a webhook body to `url`, signed, and times the round trip.
    pub async fn post_webhook(&self, url: &str, body: Vec<u8>) -> Result<Delivery> {
        let now = chrono::Utc::now().timestamp();
        let mut request = self.http.post(url).header("content-type", "application/json");
        for (name, value) in self.auth.headers(&body, now)? {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let response = request.body(body).send().await?;
        let status = response.status();
        let body = response.bytes().await?.to_vec();
        Ok(Delivery { status, body, elapsed: started.elapsed() })
    }
}

/// An HTTP client for many concurrent requests to one loopback server.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .context("could not build the HTTP client")
}

/// Fails with the status and body when a response is not a success.
async fn expect_success(response: reqwest::Response, what: &str) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    bail!("{what} answered {status}: {body}")
}

/// Waits until `GET url` answers 200, for at most `timeout`.
pub async fn wait_ready(url: &str, timeout: Duration) -> Result<()> {
    let http = http_client()?;
    let deadline = Instant::now() + timeout;
    loop {
        match http.get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) if Instant::now() >= deadline => bail!("{url} still answers {}", response.status()),
            Err(error) if Instant::now() >= deadline => bail!("{url} is not reachable: {error}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_signs_timestamp_dot_body_in_hex() {
        // Reference value computed with Python's hmac module.
        let body = br#"{"message":{"type":"status-update"}}"#;
        let signature = hmac_signature("bench-hmac-secret", 1_767_225_600, body).unwrap();
        assert_eq!(signature, "cd05a4828c40ac178ecd68ddc3d77b21a6e54cd143cfe14586e7d8e49ce2c3bb");
        let headers = WebhookAuth::Hmac("bench-hmac-secret".into()).headers(body, 1_767_225_600).unwrap();
        assert_eq!(headers, vec![("x-timestamp", "1767225600".to_string()), ("x-signature", signature)]);
        let bearer = WebhookAuth::Bearer("s3cret".into()).headers(body, 0).unwrap();
        assert_eq!(bearer, vec![("authorization", "Bearer s3cret".to_string())]);
    }
}
