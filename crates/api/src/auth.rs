//! Who is calling the dashboard API: an organization (API key or Supabase-style JWT), or an
//! operator (the admin token). Every dashboard query is scoped to the caller's organization.
//!
//! Failed attempts are throttled before any database query (see [`crate::throttle`] for the
//! policy). A valid API key costs no query per request: it is remembered by its SHA-256 for
//! `auth.api_key_cache_seconds` (60 by default). A revocation reaches every server process at
//! once through the database's change notification ([`ApiKeyCache::recheck`]); the
//! expiry bounds how long a revoked key could work if a notification were missed.

use crate::throttle::{AuthThrottle, ClientAddr, Throttled, key_prefix};
use crate::{ApiError, AppState};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use callplane_core::ErrorCode;
use callplane_core::OrgId;
use callplane_core::jwt::{self, JwtSettings};
use callplane_core::seams::OrgDirectory;
use chrono::Utc;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Most API keys remembered per process. Only keys that verified are remembered, so an
/// attacker cannot fill it; past this, the least recently verified key makes room.
const API_KEY_CACHE_ENTRIES: usize = 10_000;

pub struct DashboardAuth {
    /// Supabase-style JWTs are accepted when set.
    pub jwt: Option<JwtSettings>,
    /// The operators' token for `/admin`; the admin surface is off when unset.
    pub admin_token: Option<Vec<u8>>,
    pub api_keys: ApiKeyCache,
}

/// API keys that verified, by SHA-256, with their organization. Fresh entries answer without
/// a query; stale ones are checked again, and still mark the key as known (not a guess) to the
/// throttle. Keys the directory does not know are never remembered.
pub struct ApiKeyCache {
    fresh_for: Duration,
    keys: Mutex<HashMap<[u8; 32], Verified>>,
}

#[derive(Clone, Copy)]
struct Verified {
    org: OrgId,
    at: Instant,
    /// The organization's keys changed (one was revoked): check it again before trusting it.
    stale: bool,
}

enum CachedKey {
    Fresh(OrgId),
    /// Verified before, but longer ago than `fresh_for`: ask the directory again.
    Known,
    Unknown,
}

impl ApiKeyCache {
    pub fn new(fresh_for: Duration) -> Self {
        ApiKeyCache { fresh_for, keys: Mutex::default() }
    }

    fn lookup(&self, hash: &[u8; 32], now: Instant) -> CachedKey {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        match keys.get(hash) {
            Some(v) if !v.stale && now.saturating_duration_since(v.at) < self.fresh_for => CachedKey::Fresh(v.org),
            Some(_) => CachedKey::Known,
            None => CachedKey::Unknown,
        }
    }

    fn remember(&self, hash: [u8; 32], org: OrgId, now: Instant) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.len() >= API_KEY_CACHE_ENTRIES && !keys.contains_key(&hash) {
            let oldest = keys.iter().min_by_key(|(_, v)| v.at).map(|(h, _)| *h);
            if let Some(oldest) = oldest {
                keys.remove(&oldest);
            }
        }
        keys.insert(hash, Verified { org, at: now, stale: false });
    }

    fn forget(&self, hash: &[u8; 32]) {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).remove(hash);
    }

    /// Marks the verified keys of an organization whose keys changed (one revoked, say), or
    /// every key (`None`), to be checked again on their next use. They stay known (not
    /// guesses) to the throttle.
    pub fn recheck(&self, org: Option<OrgId>) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.values_mut().filter(|v| org.is_none_or(|o| v.org == o)).for_each(|v| v.stale = true);
    }
}

/// The organization a dashboard request acts for.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub org_id: OrgId,
    /// The log position the client's reads must see: `Callplane-Read-After`, as its last
    /// write's answer gave it.
    pub read_after: Option<callplane_core::reads::Lsn>,
}

/// An operator, authenticated with the admin token.
#[derive(Clone, Copy, Debug)]
pub struct Admin;

pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?.trim();
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

fn unauthorized(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::client(code, message)
}

/// Resolves an API key (`cp_...`) or a JWT to its organization.
pub(crate) async fn authenticate_client(
    s: &AppState,
    client: &ClientAddr,
    token: Option<&str>,
) -> Result<OrgId, ApiError> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(unauthorized(ErrorCode::MissingCredentials, "send `Authorization: Bearer <API key or JWT>`"));
    };
    let org = if jwt::looks_like_jwt(token) {
        s.auth_throttle.check(client, None)?;
        let verified = match &s.dashboard_auth.jwt {
            None => Err(unauthorized(ErrorCode::JwtNotConfigured, "this server does not accept JWTs; use an API key")),
            Some(settings) => {
                jwt::verify(token, settings, Utc::now()).map_err(|e| unauthorized(e.code(), e.to_string()))
            }
        };
        verified.inspect_err(|_| s.auth_throttle.record_failure(client, None))?
    } else {
        s.dashboard_auth.api_key_org(&s.auth_throttle, s.orgs.as_ref(), client, token).await?
    };
    tracing::Span::current().record("org_id", tracing::field::display(org));
    Ok(org)
}

impl DashboardAuth {
    /// The organization an API key belongs to: remembered while fresh, else from the
    /// directory. Keys not verified before are throttled first.
    async fn api_key_org(
        &self,
        throttle: &AuthThrottle,
        orgs: &dyn OrgDirectory,
        client: &ClientAddr,
        key: &str,
    ) -> Result<OrgId, ApiError> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let prefix = key_prefix(key);
        match self.api_keys.lookup(&hash, Instant::now()) {
            CachedKey::Fresh(org) => return Ok(org),
            CachedKey::Known => {}
            CachedKey::Unknown => throttle.check(client, prefix)?,
        }
        match orgs.by_api_key(key).await.map_err(ApiError::from)? {
            Some(org) => {
                self.api_keys.remember(hash, org, Instant::now());
                Ok(org)
            }
            None => {
                self.api_keys.forget(&hash);
                throttle.record_failure(client, prefix);
                Err(unauthorized(ErrorCode::InvalidApiKey, "the API key is unknown or revoked"))
            }
        }
    }
}

/// Compares an operator's token (admin, metrics) in constant time, leaking neither content nor
/// length. Throttled like every credential; a mismatch counts as a failure.
pub(crate) fn operator_token_matches(
    throttle: &AuthThrottle,
    client: &ClientAddr,
    given: &str,
    expected: &[u8],
) -> Result<bool, Throttled> {
    throttle.check(client, None)?;
    let matches = bool::from(Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected)));
    if !matches {
        throttle.record_failure(client, None);
    }
    Ok(matches)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let client = ClientAddr::of(parts, &s.auth_throttle);
        let org_id = authenticate_client(s, &client, bearer(&parts.headers)).await?;
        Ok(Caller { org_id, read_after: crate::consistency::read_after(&parts.headers)? })
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &s.dashboard_auth.admin_token else {
            return Err(ApiError::client(ErrorCode::NotFound, "the admin API is not enabled"));
        };
        let given = bearer(&parts.headers)
            .ok_or_else(|| unauthorized(ErrorCode::MissingCredentials, "send `Authorization: Bearer <admin token>`"))?;
        let client = ClientAddr::of(parts, &s.auth_throttle);
        if operator_token_matches(&s.auth_throttle, &client, given, expected)? {
            Ok(Admin)
        } else {
            Err(ApiError::client(ErrorCode::Forbidden, "not the admin token"))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::throttle::ThrottleSettings;
    use async_trait::async_trait;
    use callplane_core::Organization;
    use callplane_core::seams::StoreResult;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A directory holding one key, counting the lookups that reach it.
    struct CountingDirectory {
        key: &'static str,
        org: OrgId,
        revoked: AtomicBool,
        lookups: AtomicUsize,
    }

    #[async_trait]
    impl OrgDirectory for CountingDirectory {
        async fn get(&self, _: OrgId) -> StoreResult<Option<Organization>> {
            Ok(None)
        }
        async fn by_phone_number(&self, _: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
        async fn by_assistant(&self, _: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
        async fn by_call(&self, _: &str) -> StoreResult<Option<OrgId>> {
            Ok(None)
        }
        async fn by_api_key(&self, secret: &str) -> StoreResult<Option<OrgId>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok((secret == self.key && !self.revoked.load(Ordering::SeqCst)).then_some(self.org))
        }
    }

    const KEY: &str = "cp_0123456789abcdefghijklmnopqrstuvwxyzABCD";

    fn setup(fresh_for: Duration) -> (DashboardAuth, AuthThrottle, CountingDirectory) {
        let auth = DashboardAuth { jwt: None, admin_token: None, api_keys: ApiKeyCache::new(fresh_for) };
        let throttle = AuthThrottle::new(ThrottleSettings {
            failure_limit: 3,
            window: Duration::from_secs(60),
            max_entries: 100,
            trust_forwarded_for: false,
        });
        let directory = CountingDirectory {
            key: KEY,
            org: OrgId::new(),
            revoked: AtomicBool::new(false),
            lookups: AtomicUsize::new(0),
        };
        (auth, throttle, directory)
    }

    fn client() -> ClientAddr {
        ClientAddr::from(std::net::IpAddr::from([192, 0, 2, 1]))
    }

    fn status(r: ApiError) -> axum::http::StatusCode {
        r.status()
    }

    #[tokio::test]
    async fn repeated_requests_with_a_valid_key_query_the_directory_once_per_freshness_period() {
        let (auth, throttle, dir) = setup(Duration::from_secs(60));
        for _ in 0..100 {
            assert_eq!(auth.api_key_org(&throttle, &dir, &client(), KEY).await.unwrap(), dir.org);
        }
        assert_eq!(dir.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_revoked_key_is_refused_once_its_entry_is_stale() {
        let (auth, throttle, dir) = setup(Duration::from_millis(50));
        auth.api_key_org(&throttle, &dir, &client(), KEY).await.unwrap();
        dir.revoked.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let refused = auth.api_key_org(&throttle, &dir, &client(), KEY).await.unwrap_err();
        assert_eq!(status(refused), axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(dir.lookups.load(Ordering::SeqCst), 2);
        assert!(matches!(auth.api_keys.lookup(&Sha256::digest(KEY).into(), Instant::now()), CachedKey::Unknown));
    }

    #[tokio::test]
    async fn unknown_keys_are_not_remembered_and_are_throttled_before_the_directory() {
        let (auth, throttle, dir) = setup(Duration::from_secs(60));
        for i in 0..3 {
            let wrong = format!("cp_wrong{i}-0123456789abcdefghijklmnopqrstuv");
            let refused = auth.api_key_org(&throttle, &dir, &client(), &wrong).await.unwrap_err();
            assert_eq!(status(refused), axum::http::StatusCode::UNAUTHORIZED);
        }
        let refused = auth.api_key_org(&throttle, &dir, &client(), "cp_wrong9-0123456789abcdef").await.unwrap_err();
        assert_eq!(status(refused), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(dir.lookups.load(Ordering::SeqCst), 3, "the throttled attempt never reached the directory");
    }

    #[tokio::test]
    async fn a_key_verified_before_still_works_from_a_throttled_address() {
        let (auth, throttle, dir) = setup(Duration::ZERO);
        auth.api_key_org(&throttle, &dir, &client(), KEY).await.unwrap();
        for _ in 0..3 {
            throttle.record_failure(&client(), None);
        }
        assert!(throttle.check(&client(), None).is_err());
        assert_eq!(auth.api_key_org(&throttle, &dir, &client(), KEY).await.unwrap(), dir.org);
        assert_eq!(dir.lookups.load(Ordering::SeqCst), 2, "stale, so checked again: revocation still applies");
    }
}
