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
pub mod events;
pub mod jwt;
pub mod seams;
pub mod vapi;

pub use domain::{CallRecord, OrgId, OrgStatus, Organization};
