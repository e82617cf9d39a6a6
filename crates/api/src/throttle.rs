//! Failed authentication, throttled per client address and per API-key prefix, so guessing
//! credentials costs the guesser time and costs us neither database queries nor log lines.
//!
//! The policy:
//! - A *failure* is a credential that was presented and not accepted: an unknown or revoked API
//!   key, a JWT that does not verify, a wrong admin or metrics token, a VAPI webhook whose secret
//!   or signature does not match. A request with no credential at all is not a failure (nothing
//!   was guessed), nor is a database error.
//! - After `auth.failure_limit` failures within `auth.failure_window_seconds` from one address
//!   (an IPv6 client counts by its /64, which one machine usually holds whole), or with one
//!   API-key prefix (the 11 characters `cp_XXXXXXXX` the admin API already shows; never more of
//!   the secret), further attempts are answered 429 `too_many_failed_attempts` with
//!   `Retry-After` until the window that began with the first failure ends. The answer comes
//!   before any database query or secret comparison.
//! - Successes neither count nor reset the count: a caller holding one valid key cannot launder
//!   guesses between successful requests.
//! - A valid credential from a throttled address: an API key this process has verified before
//!   keeps working (its SHA-256 is in [`crate::ApiKeyCache`]), because it is not a guess and
//!   answering it tells a guesser nothing; so a client sharing an address with an attacker
//!   (an office NAT) is not locked out once it has been served. Anything else from a throttled
//!   address (a key not seen before, a JWT, the admin or metrics token) waits out the window:
//!   checking it would tell a guesser whether the guess was right.
//! - VAPI webhooks are the exception: a valid secret or signature is always served, throttled
//!   address or not. VAPI sends every customer's webhooks from shared addresses and never
//!   retries, so throttling its address because someone else's assistant sends a wrong secret
//!   would lose our events. Checking a webhook signature costs no query; past the limit the
//!   wrong ones are answered 429 without a log line each.
//! - The address is the TCP peer, or the last `X-Forwarded-For` entry (the one the proxy in
//!   front appended) when `auth.trust_forwarded_for` is set. Behind a proxy it must be set, or
//!   every client shares the proxy's address and one attacker throttles them all; without a
//!   proxy it must not be, or a client could name any address it likes.
//! - Memory is bounded: at most `auth.failure_table_entries` addresses and prefixes are tracked;
//!   windows that ended are dropped as they age, and the oldest window makes room when full.
//! - Each refused credential is logged once by the ordinary 4xx line, which the limit bounds per
//!   address and prefix; attempts refused while throttled are not logged one by one, and an
//!   address or prefix becoming throttled is logged at most once a second (with how many were
//!   not). Counts are on `/metrics`: `callplane_auth_failures_total`,
//!   `callplane_auth_throttled_total`.

use crate::ApiError;
use crate::AppState;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How many characters of an API key name its bucket: the prefix the admin API shows.
const KEY_PREFIX_CHARS: usize = 11;

/// At most one "now throttled" log line this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ThrottleSettings {
    /// Failures allowed per address or key prefix within `window`.
    pub failure_limit: u32,
    pub window: Duration,
    /// Most addresses and prefixes tracked at once.
    pub max_entries: usize,
    /// Take the client's address from the last `X-Forwarded-For` entry.
    pub trust_forwarded_for: bool,
}

/// Where a request comes from. Unknown when the server was not started with the peer address
/// (`into_make_service_with_connect_info`); then only key prefixes are throttled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(Option<IpAddr>);

impl ClientAddr {
    /// For callers that do not have the request's parts.
    pub const UNKNOWN: ClientAddr = ClientAddr(None);

    pub fn of(parts: &Parts, throttle: &AuthThrottle) -> Self {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
        let forwarded = if throttle.settings.trust_forwarded_for { last_forwarded(&parts.headers) } else { None };
        ClientAddr(forwarded.or(peer).map(bucket_address))
    }
}

#[cfg(test)]
impl From<IpAddr> for ClientAddr {
    fn from(ip: IpAddr) -> Self {
        ClientAddr(Some(bucket_address(ip)))
    }
}

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Infallible> {
        Ok(ClientAddr::of(parts, &s.auth_throttle))
    }
}

/// The last address in the last `X-Forwarded-For` header: the one our own proxy appended.
fn last_forwarded(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get_all("x-forwarded-for").iter().next_back()?.to_str().ok()?;
    value.rsplit(',').next()?.trim().parse().ok()
}

/// IPv4 as is (IPv4-mapped IPv6 included); IPv6 by its /64.
fn bucket_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// The visible prefix of an API key, when it is longer than that (shorter strings are no key).
pub fn key_prefix(key: &str) -> Option<&str> {
    key.char_indices().nth(KEY_PREFIX_CHARS).map(|(end, _)| &key[..end])
}

/// What failures are counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Bucket {
    Address(IpAddr),
    KeyPrefix(Box<str>),
}

fn buckets(client: &ClientAddr, prefix: Option<&str>) -> impl Iterator<Item = Bucket> {
    client.0.map(Bucket::Address).into_iter().chain(prefix.map(|p| Bucket::KeyPrefix(p.into())))
}

struct Window {
    started: Instant,
    failures: u32,
}

#[derive(Default)]
struct Table {
    windows: HashMap<Bucket, Window>,
    /// The tracked buckets, oldest window first: each is here exactly once, and windows start
    /// in the order they are pushed, so ended ones and eviction candidates are at the front.
    order: VecDeque<Bucket>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Table {
    fn drop_ended(&mut self, now: Instant, window: Duration) {
        while let Some(oldest) = self.order.front() {
            match self.windows.get(oldest) {
                Some(w) if now.saturating_duration_since(w.started) < window => break,
                _ => {
                    if let Some(b) = self.order.pop_front() {
                        self.windows.remove(&b);
                    }
                }
            }
        }
    }
}

/// Failed-authentication counts, shared by every surface that checks a credential.
pub struct AuthThrottle {
    settings: ThrottleSettings,
    table: Mutex<Table>,
    failures_total: AtomicU64,
    throttled_total: AtomicU64,
}

/// A 429: this address or key prefix failed too often. Not logged per request.
#[derive(Debug)]
pub struct Throttled {
    pub retry_after_seconds: u64,
}

impl Throttled {
    pub fn message(&self) -> String {
        format!(
            "too many failed authentication attempts from this address or with this key; retry in {} s",
            self.retry_after_seconds
        )
    }
}

impl IntoResponse for Throttled {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

impl AuthThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        AuthThrottle {
            settings,
            table: Mutex::default(),
            failures_total: AtomicU64::new(0),
            throttled_total: AtomicU64::new(0),
        }
    }

    /// Call before verifying a credential: refuses when the client's address, or the key's
    /// prefix, has failed too often in the current window.
    pub fn check(&self, client: &ClientAddr, key_prefix: Option<&str>) -> Result<(), Throttled> {
        self.check_at(client, key_prefix, Instant::now())
    }

    /// Call when a presented credential was not accepted.
    pub fn record_failure(&self, client: &ClientAddr, key_prefix: Option<&str>) {
        self.record_failure_at(client, key_prefix, Instant::now());
    }

    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    pub fn throttled_total(&self) -> u64 {
        self.throttled_total.load(Ordering::Relaxed)
    }

    fn check_at(&self, client: &ClientAddr, key_prefix: Option<&str>, now: Instant) -> Result<(), Throttled> {
        let ThrottleSettings { failure_limit, window, .. } = self.settings;
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.drop_ended(now, window);
        let wait = buckets(client, key_prefix)
            .filter_map(|b| table.windows.get(&b))
            .filter(|w| w.failures >= failure_limit)
            .map(|w| window.saturating_sub(now.saturating_duration_since(w.started)))
            .max();
        match wait {
            None => Ok(()),
            Some(wait) => {
                self.throttled_total.fetch_add(1, Ordering::Relaxed);
                Err(Throttled { retry_after_seconds: whole_seconds(wait) })
            }
        }
    }

    fn record_failure_at(&self, client: &ClientAddr, key_prefix: Option<&str>, now: Instant) {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        let ThrottleSettings { failure_limit, window, max_entries, .. } = self.settings;
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.drop_ended(now, window);
        for bucket in buckets(client, key_prefix) {
            if !table.windows.contains_key(&bucket) {
                while table.windows.len() >= max_entries.max(1) {
                    let Some(oldest) = table.order.pop_front() else { break };
                    table.windows.remove(&oldest);
                }
                table.order.push_back(bucket.clone());
            }
            let w = table.windows.entry(bucket.clone()).or_insert(Window { started: now, failures: 0 });
            w.failures = w.failures.saturating_add(1);
            if w.failures == failure_limit {
                let retry_after = whole_seconds(window.saturating_sub(now.saturating_duration_since(w.started)));
                log_throttled(&mut table, &bucket, retry_after, now);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(table.windows.len(), table.order.len());
        table.windows.len()
    }
}

/// Rounded up, and at least 1: a client that waits as told is not refused again.
fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// One line when an address or prefix becomes throttled, at most once a second.
fn log_throttled(table: &mut Table, bucket: &Bucket, retry_after_seconds: u64, now: Instant) {
    if table.last_logged.is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY) {
        table.unlogged += 1;
        return;
    }
    let also = std::mem::take(&mut table.unlogged);
    table.last_logged = Some(now);
    match bucket {
        Bucket::Address(ip) => tracing::warn!(
            client = %ip, retry_after_seconds, others_since_last_line = also,
            "authentication throttled: too many failures from this address"
        ),
        Bucket::KeyPrefix(prefix) => tracing::warn!(
            key_prefix = %prefix, retry_after_seconds, others_since_last_line = also,
            "authentication throttled: too many failures with this API key prefix"
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn throttle(limit: u32, max_entries: usize) -> AuthThrottle {
        AuthThrottle::new(ThrottleSettings {
            failure_limit: limit,
            window: Duration::from_secs(60),
            max_entries,
            trust_forwarded_for: false,
        })
    }

    fn addr(s: &str) -> ClientAddr {
        ClientAddr::from(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn an_address_is_throttled_at_the_limit_until_its_window_ends() {
        let t = throttle(3, 100);
        let (a, start) = (addr("203.0.113.7"), Instant::now());
        for i in 0..3 {
            assert!(t.check_at(&a, None, start).is_ok(), "attempt {i}");
            t.record_failure_at(&a, None, start + Duration::from_secs(i));
        }
        let refused = t.check_at(&a, None, start + Duration::from_secs(10)).unwrap_err();
        assert_eq!(refused.retry_after_seconds, 50, "the window began with the first failure");
        assert!(t.check_at(&addr("203.0.113.8"), None, start).is_ok(), "other addresses are not affected");
        assert!(t.check_at(&a, None, start + Duration::from_secs(59)).is_err());
        assert!(t.check_at(&a, None, start + Duration::from_secs(60)).is_ok(), "the window has ended");
        assert_eq!(t.tracked(), 0, "ended windows are dropped");
        assert_eq!((t.failures_total(), t.throttled_total()), (3, 2));
    }

    #[test]
    fn failures_under_the_limit_are_forgotten_when_the_window_ends() {
        let t = throttle(3, 100);
        let (a, start) = (addr("198.51.100.1"), Instant::now());
        t.record_failure_at(&a, None, start);
        t.record_failure_at(&a, None, start);
        t.record_failure_at(&a, None, start + Duration::from_secs(61));
        t.record_failure_at(&a, None, start + Duration::from_secs(62));
        assert!(t.check_at(&a, None, start + Duration::from_secs(62)).is_ok());
    }

    #[test]
    fn a_key_prefix_is_throttled_whatever_the_address() {
        let t = throttle(3, 100);
        let now = Instant::now();
        for i in 0..3 {
            t.record_failure_at(&addr(&format!("192.0.2.{i}")), key_prefix("cp_AAAAAAAAguess-{i}"), now);
        }
        let fresh = addr("192.0.2.200");
        assert!(t.check_at(&fresh, key_prefix("cp_AAAAAAAAanother"), now).is_err());
        assert!(t.check_at(&fresh, key_prefix("cp_BBBBBBBBanother"), now).is_ok());
        assert!(t.check_at(&fresh, None, now).is_ok());
    }

    #[test]
    fn the_table_never_holds_more_than_its_cap_and_evicts_the_oldest() {
        let t = throttle(1, 3);
        let now = Instant::now();
        let first = addr("10.0.0.1");
        t.record_failure_at(&first, None, now);
        assert!(t.check_at(&first, None, now).is_err());
        for i in 2..1000 {
            t.record_failure_at(&addr(&format!("10.0.{}.{}", i / 256, i % 256)), None, now);
            assert!(t.tracked() <= 3);
        }
        assert_eq!(t.tracked(), 3);
        assert!(t.check_at(&first, None, now).is_ok(), "the oldest was evicted");
        assert!(t.check_at(&addr("10.0.3.231"), None, now).is_err(), "the newest is kept");
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(addr("2001:db8:1:2:aaaa::1"), addr("2001:db8:1:2:bbbb::9"));
        assert_ne!(addr("2001:db8:1:2::1"), addr("2001:db8:1:3::1"));
        assert_eq!(addr("::ffff:192.0.2.1"), addr("192.0.2.1"));
    }

    #[test]
    fn the_forwarded_address_is_the_last_one_appended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        assert_eq!(last_forwarded(&h), Some("203.0.113.9".parse().unwrap()));
        h.append("x-forwarded-for", "198.51.100.4".parse().unwrap());
        assert_eq!(last_forwarded(&h), Some("198.51.100.4".parse().unwrap()));
        h.insert("x-forwarded-for", "not an address".parse().unwrap());
        assert_eq!(last_forwarded(&h), None);
    }

    #[test]
    fn a_key_prefix_is_the_visible_part_only() {
        assert_eq!(key_prefix("cp_0123456789abcdefghij"), Some("cp_01234567"));
        assert_eq!(key_prefix("cp_01234567"), None, "a string no longer than a prefix is not a key");
        assert_eq!(key_prefix("ééééééééééééé"), Some("ééééééééééé"));
    }

    #[test]
    fn the_429_carries_retry_after_and_the_stable_code() {
        let r = Throttled { retry_after_seconds: 42 }.into_response();
        assert_eq!(r.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "42");
    }
}
