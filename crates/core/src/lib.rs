//! callplane-core: the domain of callplane with no I/O.
//!
//! It holds the VAPI server-message model (tolerant of real payloads), the billing rules
//! (plans, billable seconds, billing periods), webhook authentication, the answers given to
//! the phone agent, and the seam traits every backend implements. It must never depend on a
//! database driver, an HTTP framework or a runtime: backends depend on it, not the reverse.

pub mod agent;
pub mod auth;
pub mod billing;
pub mod domain;
pub mod error_code;
pub mod events;
pub mod jwt;
pub mod metering;
pub mod reads;
pub mod routes;
pub mod seams;
pub mod text;
pub mod vapi;

pub use domain::{CallRecord, OrgId, OrgStatus, Organization, RawJson};
pub use error_code::ErrorCode;

/// An error and its causes on one line (`outer: inner: root`), for logs and for what is kept
/// with a failed event.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
