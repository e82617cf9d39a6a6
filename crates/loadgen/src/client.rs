//! Talking to a running callplane over HTTP: the admin API (organizations, API keys), the
//! dashboard API (function data, usage), and VAPI's webhooks, signed the way VAPI signs them.
//!
//! Webhooks can be delivered once ([`Server::post_webhook`], what benchmarks measure) or, like a
//! load balancer with a healthy peer or like VAPI when told to retry, again after a refused or
//! reset connection and after a 503 (honouring its `Retry-After`), within a time budget
//! ([`Server::deliver`] with a [`RetryPolicy`]). Every attempt is classified ([`AnswerClass`]) so
//! the fault suite can count 2xx, 503s, other 5xx and connection errors.

use std::fmt;
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
    /// The `Retry-After` header, when the answer carried one (its value may not parse).
    pub retry_after: Option<String>,
}

impl Delivery {
    pub fn class(&self) -> AnswerClass {
        AnswerClass::of_status(self.status, self.retry_after.is_some())
    }

    /// How long `Retry-After` asks to wait, when it is a number of seconds.
    pub fn retry_after_delay(&self) -> Option<Duration> {
        self.retry_after.as_deref().and_then(parse_retry_after)
    }
}

/// How one attempt to deliver a webhook ended, in the classes the fault suite counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerClass {
    /// A 2xx answer.
    Success,
    /// 503 with `Retry-After`: the server refused early, as it should when overloaded.
    Shed,
    /// 503 without `Retry-After`.
    ShedWithoutRetryAfter,
    /// Any other 5xx.
    ServerError,
    /// 1xx, 3xx or 4xx.
    OtherStatus,
    /// Refused, reset or closed before an answer: nothing was listening, or it died mid-request.
    ConnectionError,
    /// No answer within the client's timeout.
    Timeout,
    /// The request could not be built or signed; never sent.
    Unsent,
}

impl AnswerClass {
    pub fn of_status(status: StatusCode, has_retry_after: bool) -> Self {
        if status.is_success() {
            Self::Success
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            if has_retry_after { Self::Shed } else { Self::ShedWithoutRetryAfter }
        } else if status.is_server_error() {
            Self::ServerError
        } else {
            Self::OtherStatus
        }
    }

    /// Whether the server answered at all (a timeout is not an answer).
    pub fn answered(self) -> bool {
        !matches!(self, Self::ConnectionError | Self::Timeout | Self::Unsent)
    }
}

/// A delivery attempt that got no HTTP answer.
#[derive(Debug)]
pub struct DeliveryError {
    /// [`AnswerClass::ConnectionError`], [`AnswerClass::Timeout`] or [`AnswerClass::Unsent`].
    pub class: AnswerClass,
    pub message: String,
    pub elapsed: Duration,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.class {
            AnswerClass::Timeout => "timed out",
            AnswerClass::Unsent => "could not be sent",
            _ => "connection failed",
        };
        write!(f, "{what} after {:.0} ms: {}", self.elapsed.as_secs_f64() * 1000.0, self.message)
    }
}

impl std::error::Error for DeliveryError {}

impl DeliveryError {
    fn from_reqwest(error: &reqwest::Error, elapsed: Duration) -> Self {
        let class = if error.is_timeout() {
            AnswerClass::Timeout
        } else if error.is_builder() {
            AnswerClass::Unsent
        } else {
            // Refused, reset, closed mid-request or mid-body: the connection failed.
            AnswerClass::ConnectionError
        };
        // reqwest's own message is terse ("error sending request"); the cause says why.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self { class, message, elapsed }
    }
}

/// One attempt, as reported to the caller of [`Server::deliver`].
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub class: AnswerClass,
    /// From sending the request to its answer (or to the failure).
    pub elapsed: Duration,
}

/// When to send a webhook again: after a connection error (backing off from 100 ms to 1 s) or a
/// 503 (after its `Retry-After`, at least 50 ms), as long as the whole delivery stays within
/// `budget` of its first attempt. Other answers, timeouts included, are final. A zero budget
/// (the default) never retries, which is what benchmarks want: raw behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    pub budget: Duration,
}

impl RetryPolicy {
    pub fn within(budget: Duration) -> Self {
        Self { budget }
    }

    /// How long to wait before the next attempt, after attempt number `attempt` (from 1) ended
    /// as `class`, `elapsed` after the first attempt began; `None` to give up.
    pub fn wait(
        &self,
        class: AnswerClass,
        retry_after: Option<Duration>,
        attempt: u32,
        elapsed: Duration,
    ) -> Option<Duration> {
        let wait = match class {
            AnswerClass::ConnectionError => backoff(attempt),
            AnswerClass::Shed | AnswerClass::ShedWithoutRetryAfter => {
                retry_after.map_or_else(|| backoff(attempt), |after| after.max(Duration::from_millis(50)))
            }
            _ => return None,
        };
        (elapsed + wait <= self.budget).then_some(wait)
    }
}

/// 100 ms, 200 ms, 400 ms, 800 ms, then 1 s.
fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(4);
    Duration::from_millis(100 << doublings).min(Duration::from_secs(1))
}

/// `Retry-After` as a number of seconds (`120`, or `1.5` from lenient servers); HTTP dates are
/// not used by callplane and read as absent.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
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
        Self::with_timeout(base, admin_token, auth, DEFAULT_TIMEOUT)
    }

    /// A server whose requests give up after `timeout` (counted as [`AnswerClass::Timeout`]).
    pub fn with_timeout(base: &str, admin_token: Option<String>, auth: WebhookAuth, timeout: Duration) -> Result<Self> {
        let http = http_client_with_timeout(timeout)?;
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

    /// POSTs a webhook body to `url`, signed, once, and times the round trip.
    pub async fn post_webhook(&self, url: &str, body: Vec<u8>) -> Result<Delivery, DeliveryError> {
        let now = chrono::Utc::now().timestamp();
        let mut request = self.http.post(url).header("content-type", "application/json");
        let headers = self.auth.headers(&body, now).map_err(|error| DeliveryError {
            class: AnswerClass::Unsent,
            message: format!("{error:#}"),
            elapsed: Duration::ZERO,
        })?;
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let response =
            request.body(body).send().await.map_err(|e| DeliveryError::from_reqwest(&e, started.elapsed()))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = response.bytes().await.map_err(|e| DeliveryError::from_reqwest(&e, started.elapsed()))?.to_vec();
        Ok(Delivery { status, body, elapsed: started.elapsed(), retry_after })
    }

    /// Delivers a webhook, sending it again (signed anew) as `policy` allows; `observe` hears of
    /// every attempt. Returns the last attempt's answer or failure.
    pub async fn deliver(
        &self,
        url: &str,
        body: &[u8],
        policy: RetryPolicy,
        mut observe: impl FnMut(&Attempt),
    ) -> Result<Delivery, DeliveryError> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let result = self.post_webhook(url, body.to_vec()).await;
            let (class, retry_after, elapsed) = match &result {
                Ok(delivery) => (delivery.class(), delivery.retry_after_delay(), delivery.elapsed),
                Err(error) => (error.class, None, error.elapsed),
            };
            observe(&Attempt { class, elapsed });
            match policy.wait(class, retry_after, attempt, started.elapsed()) {
                Some(wait) => {
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                None => return result,
            }
        }
    }
}

/// How long a request may take unless the command says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// An HTTP client for many concurrent requests to one loopback server.
pub fn http_client() -> Result<reqwest::Client> {
    http_client_with_timeout(DEFAULT_TIMEOUT)
}

/// The same, with another request timeout.
pub fn http_client_with_timeout(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .timeout(timeout)
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

    #[test]
    fn answers_are_classified() {
        let class = |code: u16, retry_after| AnswerClass::of_status(StatusCode::from_u16(code).unwrap(), retry_after);
        assert_eq!(class(200, false), AnswerClass::Success);
        assert_eq!(class(202, true), AnswerClass::Success);
        assert_eq!(class(503, true), AnswerClass::Shed);
        assert_eq!(class(503, false), AnswerClass::ShedWithoutRetryAfter);
        assert_eq!(class(500, true), AnswerClass::ServerError);
        assert_eq!(class(504, false), AnswerClass::ServerError);
        assert_eq!(class(422, false), AnswerClass::OtherStatus);
        assert!(AnswerClass::Shed.answered() && !AnswerClass::ConnectionError.answered());
        assert!(!AnswerClass::Timeout.answered());
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("99999"), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn retries_follow_the_policy() {
        let ms = Duration::from_millis;
        let none = RetryPolicy::default();
        assert_eq!(none.wait(AnswerClass::ConnectionError, None, 1, Duration::ZERO), None);
        let policy = RetryPolicy::within(Duration::from_secs(10));
        // Connection errors back off 100 ms, 200 ms, ... up to 1 s.
        assert_eq!(policy.wait(AnswerClass::ConnectionError, None, 1, Duration::ZERO), Some(ms(100)));
        assert_eq!(policy.wait(AnswerClass::ConnectionError, None, 3, Duration::ZERO), Some(ms(400)));
        assert_eq!(policy.wait(AnswerClass::ConnectionError, None, 9, Duration::ZERO), Some(ms(1000)));
        // A 503 waits what Retry-After says, at least 50 ms; without it, the backoff.
        assert_eq!(policy.wait(AnswerClass::Shed, Some(ms(2000)), 1, Duration::ZERO), Some(ms(2000)));
        assert_eq!(policy.wait(AnswerClass::Shed, Some(Duration::ZERO), 1, Duration::ZERO), Some(ms(50)));
        assert_eq!(policy.wait(AnswerClass::ShedWithoutRetryAfter, None, 2, Duration::ZERO), Some(ms(200)));
        // Nothing else is retried: a 500 or a timeout may have been processed and is a finding.
        for class in [AnswerClass::Success, AnswerClass::ServerError, AnswerClass::OtherStatus, AnswerClass::Timeout] {
            assert_eq!(policy.wait(class, None, 1, Duration::ZERO), None, "{class:?}");
        }
        // The budget covers the whole delivery, waits included.
        assert_eq!(policy.wait(AnswerClass::ConnectionError, None, 1, ms(9_950)), None);
        assert_eq!(policy.wait(AnswerClass::Shed, Some(Duration::from_secs(5)), 1, ms(6_000)), None);
        assert_eq!(policy.wait(AnswerClass::Shed, Some(Duration::from_secs(4)), 1, ms(6_000)), Some(ms(4_000)));
    }
}
