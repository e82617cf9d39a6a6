//! `GET /v1/search`: the caller's transcripts matching a query, best first, with snippets.

use crate::auth::Caller;
use crate::dashboard::parse_time;
use crate::extract::ValidQuery;
use crate::{ApiError, AppState};
use axum::Json;
use axum::extract::State;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use callplane_core::ErrorCode;
use callplane_core::seams::{SearchCursor, SearchError, SearchRequest};
use chrono::{DateTime, Datelike, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// What to look for, in web-search syntax: words (all must match, in any form: "refunds"
    /// finds "refund"), `"an exact phrase"`, `or`, and `-word` to exclude. 1 to 200 characters.
    pub q: Option<String>,
    /// Calls created at or after (RFC 3339). Default: 30 days before `to`.
    pub from: Option<String>,
    /// Calls created before (RFC 3339). Default: now. The window is at most 366 days, so a
    /// search reads only the months it names.
    pub to: Option<String>,
    /// 1 to 50, default 20.
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHitView {
    pub call_id: String,
    pub created_at: DateTime<Utc>,
    /// How well the transcript matches (higher is better); results come best first.
    pub rank: f32,
    /// HTML: fragments of the transcript around the matches, its text escaped and each match in
    /// `<mark>`, fragments joined by " … ".
    pub snippet: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    pub query: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub data: Vec<SearchHitView>,
    /// Pass as `cursor` (with the same `q`, `from` and `to`) for the next page; absent on the
    /// last.
    pub next_cursor: Option<String>,
}

const MAX_QUERY_CHARS: usize = 200;
const MAX_WINDOW_DAYS: i64 = 366;
const DEFAULT_WINDOW_DAYS: i64 = 30;

fn bad(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::client(code, message)
}

/// Search the caller's call transcripts.
#[utoipa::path(get, path = "/v1/search", tag = "search", params(SearchQuery),
    responses((status = 200, body = SearchResults), (status = 400, body = crate::error::ErrorBody),
              (status = 409, description = "`search_off`: search is off on this server", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn search(
    State(s): State<AppState>,
    caller: Caller,
    ValidQuery(q): ValidQuery<SearchQuery>,
) -> Result<Json<SearchResults>, ApiError> {
    let started = Instant::now();
    let request = request(&q, caller.org_id, Utc::now())?;
    let org = caller.org_id;
    let searched = s
        .reads
        .run(org, caller.read_after, |r| {
            let request = &request;
            async move {
                match r.search.search(request).await {
                    // The database's failure is the replica's to hand to the primary.
                    Err(SearchError::Store(e)) => Err(e),
                    other => Ok(other),
                }
            }
        })
        .await;
    let hits = match searched? {
        Ok(hits) => hits,
        Err(SearchError::Off) => {
            s.metrics.search_refused();
            return Err(bad(
                ErrorCode::SearchOff,
                "transcript search is off on this server; an operator turns it on with backends.search = \"postgres\"",
            ));
        }
        Err(SearchError::Store(e)) => return Err(e.into()),
    };
    s.metrics.api_query("search", started.elapsed());
    let next_cursor = (hits.len() as i64 == request.limit)
        .then(|| hits.last())
        .flatten()
        .map(|h| encode_cursor(&SearchCursor { rank: h.rank, created_at: h.created_at, call_id: h.call_id.clone() }));
    Ok(Json(SearchResults {
        query: request.query,
        from: request.from,
        to: request.to,
        data: hits
            .into_iter()
            .map(|h| SearchHitView {
                call_id: h.call_id,
                created_at: h.created_at,
                rank: h.rank,
                snippet: snippet_html(&h.snippet),
            })
            .collect(),
        next_cursor,
    }))
}

/// The search a query asks for, checked before it meets the database.
fn request(q: &SearchQuery, org: callplane_core::OrgId, now: DateTime<Utc>) -> Result<SearchRequest, ApiError> {
    let query = q.q.as_deref().map(str::trim).unwrap_or_default();
    if query.is_empty() || query.chars().count() > MAX_QUERY_CHARS {
        return Err(bad(ErrorCode::InvalidQuery, format!("`q` must be 1 to {MAX_QUERY_CHARS} characters")));
    }
    let to = match &q.to {
        Some(raw) => parse_time("to", raw)?,
        None => now,
    };
    let from = match &q.from {
        Some(raw) => parse_time("from", raw)?,
        None => to - Duration::days(DEFAULT_WINDOW_DAYS),
    };
    if from >= to || to - from > Duration::days(MAX_WINDOW_DAYS) {
        return Err(bad(
            ErrorCode::InvalidFilter,
            format!("`from` must be before `to`, and the window at most {MAX_WINDOW_DAYS} days"),
        ));
    }
    let limit = q.limit.unwrap_or(20);
    if !(1..=50).contains(&limit) {
        return Err(bad(ErrorCode::InvalidQuery, "`limit` must be 1 to 50"));
    }
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    Ok(SearchRequest { org, query: query.to_owned(), from, to, limit, after })
}

/// An opaque page position: `{rank bits}|{created_at micros}|{call id}`, base64url. The rank's
/// exact bits, so the next page starts exactly after the last hit.
fn encode_cursor(c: &SearchCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}|{}", c.rank.to_bits(), c.created_at.timestamp_micros(), c.call_id))
}

fn decode_cursor(s: &str) -> Result<SearchCursor, ApiError> {
    let invalid = || bad(ErrorCode::InvalidCursor, "`cursor` is not a cursor this API returned");
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid())?).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '|');
    let (Some(bits), Some(micros), Some(call_id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let rank =
        bits.parse::<u32>().map(f32::from_bits).ok().filter(|r| r.is_finite() && *r >= 0.0).ok_or_else(invalid)?;
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(|t| (1970..=9999).contains(&t.year()))
        .ok_or_else(invalid)?;
    if call_id.contains('\0') {
        return Err(invalid());
    }
    Ok(SearchCursor { rank, created_at, call_id: call_id.to_owned() })
}

/// The snippet as HTML: the transcript's text escaped, the matches (between \u{1} and \u{2})
/// in `<mark>`.
fn snippet_html(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        match c {
            '\u{1}' => out.push_str("<mark>"),
            '\u{2}' => out.push_str("</mark>"),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snippets_escape_the_transcript_and_mark_the_matches() {
        assert_eq!(
            snippet_html("User: my <b>\u{1}refund\u{2}</b> & \"more\""),
            "User: my &lt;b&gt;<mark>refund</mark>&lt;/b&gt; &amp; &quot;more&quot;"
        );
    }

    #[test]
    fn cursors_round_trip_exactly_and_foreign_ones_are_refused() {
        let c = SearchCursor { rank: 0.0607927, created_at: Utc::now(), call_id: "call|with|bars".into() };
        let back = decode_cursor(&encode_cursor(&c)).unwrap();
        assert_eq!(back.rank.to_bits(), c.rank.to_bits());
        assert_eq!(back.call_id, c.call_id);
        assert_eq!(back.created_at.timestamp_micros(), c.created_at.timestamp_micros());
        for bad in [
            "",
            "bm9wZQ",
            &URL_SAFE_NO_PAD.encode(format!("{}|0|x", f32::NAN.to_bits())),
            &URL_SAFE_NO_PAD.encode("1|0|a\0b"),
        ] {
            assert_eq!(decode_cursor(bad).unwrap_err().code().as_str(), "invalid_cursor", "{bad}");
        }
    }

    #[test]
    fn queries_are_checked_before_the_database() {
        let org = callplane_core::OrgId::new();
        let now = Utc::now();
        let q = |q: Option<&str>, from: Option<&str>, to: Option<&str>, limit: Option<i64>| SearchQuery {
            q: q.map(str::to_owned),
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
            limit,
            cursor: None,
        };
        let code = |query: SearchQuery| request(&query, org, now).unwrap_err().code().as_str();
        assert_eq!(code(q(None, None, None, None)), "invalid_query");
        assert_eq!(code(q(Some("   "), None, None, None)), "invalid_query");
        assert_eq!(code(q(Some(&"x".repeat(201)), None, None, None)), "invalid_query");
        assert_eq!(code(q(Some("refund"), None, None, Some(0))), "invalid_query");
        assert_eq!(
            code(q(Some("refund"), Some("2020-01-01T00:00:00Z"), Some("2026-01-01T00:00:00Z"), None)),
            "invalid_filter"
        );
        assert_eq!(
            code(q(Some("refund"), Some("2026-01-02T00:00:00Z"), Some("2026-01-01T00:00:00Z"), None)),
            "invalid_filter"
        );
        let r = request(&q(Some(" refund "), None, None, None), org, now).unwrap();
        assert_eq!((r.query.as_str(), r.limit, r.to, r.to - r.from), ("refund", 20, now, Duration::days(30)));
    }
}
