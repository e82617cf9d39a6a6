//! The counter repair loop: ledger rows whose counter add did not happen (the counter was
//! unavailable, or the process stopped between the ledger's commit and the add) are added
//! now. Adds are idempotent on the call, so every process may run it.

use callplane_core::error_chain;
use callplane_core::events;
use callplane_core::metering::Metering;
use callplane_core::seams::RealtimeBus;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// A row younger than this is left to the add that follows its commit.
pub const REPAIR_GRACE: Duration = Duration::from_secs(3);
/// The most rows one pass adds.
const REPAIR_BATCH: i64 = 500;

/// Adds uncounted ledger rows until none is left (or the counter fails); publishes the usage
/// alerts they reach. Returns how many calls were counted.
pub async fn repair_counts(metering: &Metering, bus: &dyn RealtimeBus, grace: Duration) -> usize {
    let mut total = 0;
    loop {
        match metering.repair(grace, REPAIR_BATCH).await {
            Ok((counted, alerts)) => {
                let alerts: Vec<_> =
                    alerts.iter().map(|(org, call_id, alert)| events::usage_alert(*org, call_id, alert)).collect();
                if let Err(e) = bus.publish(&alerts).await {
                    warn!(error = %e, "realtime publish of usage alerts failed");
                }
                total += counted;
                if counted < REPAIR_BATCH as usize {
                    break;
                }
            }
            Err(e) => {
                debug!(error = %error_chain(&e), "uncounted calls wait: the counter or the ledger is unavailable");
                break;
            }
        }
    }
    if total > 0 {
        info!(calls = total, counter = metering.backend(), "uncounted calls added to the usage counter");
    }
    total
}

pub fn spawn_counter_repair(
    metering: Arc<Metering>,
    bus: Arc<dyn RealtimeBus>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            repair_counts(&metering, bus.as_ref(), REPAIR_GRACE).await;
        }
    })
}
