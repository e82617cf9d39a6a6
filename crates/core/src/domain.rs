//! Organizations and the identifiers shared by every crate.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// An organization (a business on a minute plan). Every tenant-scoped call takes one first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrgId(pub Uuid);

impl OrgId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for OrgId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrgId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim()).map(OrgId)
    }
}

/// Where an organization's subscription stands. Only `active` and `past_due` (within the
/// grace period) may take new calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgStatus {
    Active,
    PastDue,
    Canceled,
    Suspended,
}

impl OrgStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgStatus::Active => "active",
            OrgStatus::PastDue => "past_due",
            OrgStatus::Canceled => "canceled",
            OrgStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => OrgStatus::Active,
            "past_due" => OrgStatus::PastDue,
            "canceled" => OrgStatus::Canceled,
            "suspended" => OrgStatus::Suspended,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Organization {
    pub id: OrgId,
    pub name: String,
    pub plan: String,
    pub status: OrgStatus,
    /// Set when the status became `past_due`; the grace period runs from here.
    pub status_changed_at: DateTime<Utc>,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// Periods are whole months counted from here (the first period's start).
    pub billing_anchor: DateTime<Utc>,
    /// The phase-1 usage counter for the current period, in billed seconds.
    pub seconds_used: i64,
    /// The VAPI assistant answered to `assistant-request` for this organization.
    pub default_assistant_id: Option<String>,
    /// The IANA time zone its usage is counted by day in (`UTC` unless set).
    pub billing_timezone: String,
    pub created_at: DateTime<Utc>,
}

impl Organization {
    /// The organization as of `now`: once its billing period has ended without a renewal
    /// being recorded, the next period has started and nothing is used in it yet.
    pub fn as_of(mut self, now: DateTime<Utc>) -> Self {
        if now >= self.period_end {
            let (start, end) = crate::billing::period_containing(self.billing_anchor, now);
            self.period_start = start;
            self.period_end = end;
            self.seconds_used = 0;
        }
        self
    }
}

/// JSON kept as the text it was read as: a stored `jsonb` value goes out in a response as it
/// came from the database, without a tree built of it and written out again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(pub Box<serde_json::value::RawValue>);

impl RawJson {
    /// The value as a tree, for the few readers that look inside it.
    pub fn to_value(&self) -> serde_json::Value {
        // Text that parsed once as JSON parses again.
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }
}

/// Equal when they are the same JSON value (key order and spacing aside).
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get() || self.to_value() == other.to_value()
    }
}

/// A stored call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    pub id: String,
    pub organization_id: OrgId,
    pub created_at: DateTime<Utc>,
    pub call_type: Option<String>,
    pub status: String,
    pub ended_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_seconds: Option<f64>,
    pub cost: Option<f64>,
    pub costs: Option<RawJson>,
    pub summary: Option<String>,
    pub analysis: Option<RawJson>,
    pub recording_url: Option<String>,
    pub assistant_id: Option<String>,
    pub phone_number_id: Option<String>,
    pub customer_number: Option<String>,
    pub billable_seconds: Option<i64>,
    pub reported_at: Option<DateTime<Utc>>,
    pub last_event_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
pub struct NewOrganization {
    pub name: String,
    pub plan: String,
    pub default_assistant_id: Option<String>,
    /// The first billing period starts here (usually now) and lasts a month.
    pub period_start: DateTime<Utc>,
}

/// An API key as listed: never the key itself.
#[derive(Clone, Debug, Serialize)]
pub struct ApiKeyInfo {
    pub id: uuid::Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A freshly created API key. `secret` is shown once and never stored.
#[derive(Clone, Debug)]
pub struct NewApiKey {
    pub id: uuid::Uuid,
    pub prefix: String,
    pub secret: String,
}

/// What applying one event did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallChange {
    pub call_id: String,
    /// Where the call lives (its partition key), from `call_keys`.
    pub created_at: DateTime<Utc>,
    pub inserted: bool,
    /// The new status, when this event moved it forward.
    pub status_changed: Option<String>,
    /// Set the first time the call's ledger row is written.
    pub billed: Option<Billed>,
    /// The event stored or replaced the call's transcript (in the call's transaction):
    /// whether it is final.
    pub transcript: Option<bool>,
    /// The call ended connected but no source gave its duration: it is not billed yet, and is
    /// marked for review until VAPI's record (reconciliation) gives the duration.
    pub duration_unknown: bool,
}

/// A call's ledger row, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billed {
    pub seconds: i64,
    /// The billing period it counts in.
    pub period_start: DateTime<Utc>,
    /// The organization's plan when it was written (for the usage alerts).
    pub plan: String,
}

/// Why a call waits for review (`calls.review_reason`).
pub const REVIEW_DURATION_UNKNOWN: &str = "duration-unknown";

/// An organization reached 80, 90 or 100% of its included minutes in a period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageAlert {
    pub threshold: i32,
    pub period_start: DateTime<Utc>,
    pub seconds_used: i64,
    pub included_seconds: i64,
    pub at: DateTime<Utc>,
}
