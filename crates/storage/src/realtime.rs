//! `PgRealtimeBus`: an organization's events over Postgres LISTEN/NOTIFY, the phase-1
//! backend. One listener connection per process fans events out in memory, so every
//! `callplane serve` on the database delivers every event.

use crate::{PgStore, db};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{RealtimeBus, RealtimeEvent, StoreResult};
use futures::stream::{self, BoxStream, StreamExt};
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::warn;

pub const CHANNEL: &str = "callplane_events";

#[derive(Clone)]
pub struct PgRealtimeBus {
    store: PgStore,
    fanout: broadcast::Sender<RealtimeEvent>,
}

impl PgRealtimeBus {
    /// Starts the process's listener task.
    pub fn start(store: PgStore) -> Self {
        let (fanout, _) = broadcast::channel(4096);
        let bus = Self { store, fanout };
        let task = bus.clone();
        tokio::spawn(async move { task.listen_forever().await });
        bus
    }

    async fn listen_forever(self) {
        loop {
            if let Err(e) = self.listen().await {
                warn!(error = %e, "realtime listener lost its connection; reconnecting");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn listen(&self) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(self.store.pool()).await?;
        listener.listen(CHANNEL).await?;
        loop {
            let n = listener.recv().await?;
            match serde_json::from_str::<RealtimeEvent>(n.payload()) {
                // No receivers is fine: nobody is watching that process.
                Ok(event) => drop(self.fanout.send(event)),
                Err(e) => warn!(error = %e, "ignoring a malformed realtime notification"),
            }
        }
    }
}

#[async_trait]
impl RealtimeBus for PgRealtimeBus {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn publish(&self, event: &RealtimeEvent) -> StoreResult<()> {
        let payload =
            serde_json::to_string(event).map_err(|e| callplane_core::seams::StoreError::backend("postgres", e))?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(self.store.pool())
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn subscribe(&self, org: OrgId) -> StoreResult<BoxStream<'static, RealtimeEvent>> {
        let rx = self.fanout.subscribe();
        Ok(stream::unfold(rx, move |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.org_id == org => return Some((e, rx)),
                    Ok(_) => continue,
                    // A lagging subscriber skips what it missed; resumable streams come with
                    // the dashboard's sequence numbers.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }
}
