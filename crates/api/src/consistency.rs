//! Read-your-writes across servers: a write's answer carries `Callplane-Read-After`, the
//! primary's log position after the write, when a read replica serves reads; a client that
//! sends it back makes its reads, on whichever server answers, wait for the replica to replay
//! that far or go to the primary. (This process remembers each organization's writes by
//! itself; the header carries them to the others.)

use crate::{ApiError, AppState};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use callplane_core::reads::Lsn;
use callplane_core::{ErrorCode, OrgId};

/// The header, on a write's answer and on the reads that follow it.
const READ_AFTER: &str = "callplane-read-after";

/// The position a request's reads must see, when it sends one.
pub(crate) fn read_after(headers: &HeaderMap) -> Result<Option<Lsn>, ApiError> {
    let Some(value) = headers.get(READ_AFTER) else { return Ok(None) };
    let invalid = |why: String| ApiError::client(ErrorCode::InvalidReadAfter, why);
    let text = value.to_str().map_err(|_| invalid("`Callplane-Read-After` is not text".into()))?;
    text.parse().map(Some).map_err(|why: String| invalid(format!("`Callplane-Read-After`: {why}")))
}

/// The headers a write's answer carries: `Callplane-Read-After`, when a replica serves reads.
pub(crate) async fn written(s: &AppState, org: OrgId) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(lsn) = s.reads.wrote(org).await
        && let Ok(value) = HeaderValue::from_str(&lsn.to_string())
    {
        headers.insert(HeaderName::from_static(READ_AFTER), value);
    }
    headers
}
