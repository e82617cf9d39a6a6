//! The read routing seam: the dashboard's reads (lists, call detail, usage, search, export,
//! function data) go to a read replica when it has what the reader must see, and to the primary
//! otherwise. Writes, the ledger, billing and everything that decides admission never come
//! here: they use the primary.
//!
//! What a reader must see is a position in the primary's write-ahead log ([`Lsn`]): the newest
//! write this process knows the organization made (its own dashboard writes, and the call
//! changes announced on the real-time stream), and the position a client brings back from its
//! last write (`Callplane-Read-After`). A replica that has not replayed that far within a short
//! wait, that lags too far, that is down, or that fails the read, sends the read to the primary,
//! and the router counts why. No reader sees an error the primary would not have given.

use crate::OrgId;
use crate::seams::{CallReads, FunctionData, StoreError, StoreResult, TranscriptSearch, TranscriptStore};
use async_trait::async_trait;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A position in the primary's write-ahead log (PostgreSQL's `pg_lsn`), written as PostgreSQL
/// writes it: two hexadecimal halves, `16/B374D848`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a log position: expected two hexadecimal halves such as 16/B374D848");
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u64::from_str_radix(h, 16).map_err(|_| bad())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Everything the dashboard reads, over one database.
#[derive(Clone)]
pub struct Readers {
    pub calls: Arc<dyn CallReads>,
    pub transcripts: Arc<dyn TranscriptStore>,
    pub search: Arc<dyn TranscriptSearch>,
    pub function_data: Arc<dyn FunctionData>,
}

/// Why a read went to the primary although a replica is configured. (Declared in the order of
/// [`Fallback::ALL`], so `why as usize` indexes it.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The replica did not answer its last check.
    Down,
    /// The replica is further behind than `database.replica_max_lag_ms`.
    Lagging,
    /// The replica had not replayed what this reader must see within `database.replica_wait_ms`.
    Behind,
    /// The read failed on the replica and was answered by the primary.
    Failed,
}

impl Fallback {
    pub const ALL: [Fallback; 4] = [Fallback::Down, Fallback::Lagging, Fallback::Behind, Fallback::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Down => "down",
            Fallback::Lagging => "lagging",
            Fallback::Behind => "behind",
            Fallback::Failed => "failed",
        }
    }
}

/// How the replica is doing, for `/readyz` and `/metrics`.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaStatus {
    /// `streaming` (reads go to it), `lagging` or `down` (reads go to the primary).
    pub state: &'static str,
    /// How long ago the primary wrote the oldest change the replica has not replayed (0 when
    /// it has replayed everything the last check saw).
    pub lag_seconds: f64,
    /// Bytes of the primary's log the replica had not replayed at the last check.
    pub lag_bytes: u64,
    /// The replica's replay position at the last check.
    pub replayed: Lsn,
    /// Reads the replica answered since this process started.
    pub reads_on_replica: u64,
    /// Reads sent to the primary instead, by reason (`down`, `lagging`, `behind`, `failed`).
    pub fallbacks: Vec<(&'static str, u64)>,
    /// Why the last check failed, when the replica is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the replica backend tells the router. Postgres implements it (`PgReplica`).
#[async_trait]
pub trait ReplicaRouting: Send + Sync {
    /// Whether a read of `org` may go to the replica: waits (up to `database.replica_wait_ms`)
    /// until the replica has replayed the organization's newest write known here and `after`.
    async fn ready(&self, org: OrgId, after: Option<Lsn>) -> Result<(), Fallback>;
    /// Counts where a read was answered: `None` by the replica, `Some(why)` by the primary.
    fn served(&self, fallback: Option<Fallback>);
    /// Called after a write for `org` committed on the primary: the primary's log position now,
    /// which reads of `org` wait for from here on. `None` when the primary could not say.
    async fn wrote(&self, org: OrgId) -> Option<Lsn>;
    fn status(&self) -> ReplicaStatus;
}

/// The dashboard's reads, routed: the primary's readers, and a replica's with its router.
#[derive(Clone)]
pub struct Reads {
    primary: Readers,
    replica: Option<(Readers, Arc<dyn ReplicaRouting>)>,
}

impl Reads {
    /// Every read on the primary (no replica configured).
    pub fn primary(primary: Readers) -> Self {
        Self { primary, replica: None }
    }

    pub fn with_replica(primary: Readers, replica: Readers, routing: Arc<dyn ReplicaRouting>) -> Self {
        Self { primary, replica: Some((replica, routing)) }
    }

    /// Runs `read` on the replica when it has what `org`'s reader must see, else (or when it
    /// fails there) on the primary.
    ///
    /// `read` gets the readers by value (cheap clones), so that the future it returns borrows
    /// nothing of them and a handler's future stays `Send`.
    pub async fn run<T, F, Fut>(&self, org: OrgId, after: Option<Lsn>, read: F) -> StoreResult<T>
    where
        F: Fn(Readers) -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        if let Some((replica, routing)) = self.ready_replica(org, after).await {
            match read(replica.clone()).await {
                Ok(value) => {
                    routing.served(None);
                    return Ok(value);
                }
                // The caller's own mistake is the same on the primary.
                Err(e @ StoreError::Refused { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "a read failed on the replica; answered by the primary");
                    routing.served(Some(Fallback::Failed));
                }
            }
        }
        read(self.primary.clone()).await
    }

    /// The readers a long read (an export's pages) keeps using from its start: the replica's
    /// when it is ready for `org`, else the primary's.
    pub async fn choose(&self, org: OrgId, after: Option<Lsn>) -> &Readers {
        match self.ready_replica(org, after).await {
            Some((replica, routing)) => {
                routing.served(None);
                replica
            }
            None => &self.primary,
        }
    }

    /// The replica and its router when it may take a read of `org` now; `None` (and, with a
    /// replica, the fallback counted) when the primary must.
    async fn ready_replica(&self, org: OrgId, after: Option<Lsn>) -> Option<&(Readers, Arc<dyn ReplicaRouting>)> {
        let replica = self.replica.as_ref()?;
        match replica.1.ready(org, after).await {
            Ok(()) => Some(replica),
            Err(why) => {
                replica.1.served(Some(why));
                None
            }
        }
    }

    /// After a write for `org`: the log position its client's next reads must see, when a
    /// replica is configured (for `Callplane-Read-After`).
    pub async fn wrote(&self, org: OrgId) -> Option<Lsn> {
        match &self.replica {
            Some((_, routing)) => routing.wrote(org).await,
            None => None,
        }
    }

    /// The replica's status, when one is configured.
    pub fn replica_status(&self) -> Option<ReplicaStatus> {
        self.replica.as_ref().map(|(_, routing)| routing.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_positions_read_and_write_as_postgres_does() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn((0x16 << 32) | 0xB374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        // Ordered as the log is, across the halves.
        assert!("1/0".parse::<Lsn>().unwrap() > "0/FFFFFFFF".parse::<Lsn>().unwrap());
        for bad in ["", "16", "/1", "1/", "1/2/3", "g/1", "123456789/0", "-1/0", "1/ 2", "0x1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} must be refused");
        }
    }
}
