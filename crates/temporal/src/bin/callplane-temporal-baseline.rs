//! `callplane-temporal-baseline`: Temporal's own limit for benchmark 7 (see
//! `callplane_temporal::baseline`). Prints one JSON object of figures on stdout.

use anyhow::{Context, Result};
use callplane_temporal::TemporalSettings;
use callplane_temporal::baseline::{BaselineConfig, run_baseline};
use clap::Parser;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "No-op call workflows through a Temporal server, at benchmark 7's concurrency")]
struct Args {
    /// The frontend's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:7233")]
    address: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Hand-overs in flight at once.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of hand-overs.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seconds the worker may take to finish them afterwards.
    #[arg(long, default_value_t = 600)]
    settle_seconds: u64,
    /// Slots of the worker (callplane's `temporal.max_concurrent_activities`).
    #[arg(long, default_value_t = 16)]
    max_concurrent_activities: usize,
    /// A webhook body whose `message` each workflow carries (a VAPI end-of-call report).
    #[arg(long)]
    payload: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let body: Value = serde_json::from_slice(
        &std::fs::read(&args.payload).with_context(|| format!("could not read {}", args.payload.display()))?,
    )
    .with_context(|| format!("{} is not JSON", args.payload.display()))?;
    let message = body.get("message").cloned().context("the payload has no `message`")?;
    let settings = TemporalSettings {
        address: args.address,
        namespace: args.namespace,
        task_queue: format!("callplane-baseline-{}", uuid::Uuid::new_v4().simple()),
        answer_wait: Duration::ZERO,
        max_concurrent_activities: args.max_concurrent_activities,
    };
    let config = BaselineConfig {
        clients: args.clients,
        duration: Duration::from_secs(args.seconds),
        settle_timeout: Duration::from_secs(args.settle_seconds),
        message,
    };
    let figures = run_baseline(settings, config).await?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}
