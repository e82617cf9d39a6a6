//! `probe`: latency of one plain GET (for example `/healthz`) at a given concurrency and rate.
//!
//! It is the baseline of the agent-latency benchmark: the same server, the same number of
//! concurrent clients and the same request rate as the simulated calls produced, but a request
//! that does no work, so the difference is what answering VAPI costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::client::http_client;
use crate::random::item_rng;
use crate::stats::{LatencySummary, Recorder};

#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub url: String,
    pub bearer: Option<String>,
    pub concurrency: usize,
    /// Requests per second across all clients; 0 sends back to back.
    pub rate: f64,
    pub duration: Duration,
    pub quiet: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub concurrency: usize,
    pub latency: LatencySummary,
}

pub async fn run(config: ProbeConfig) -> Result<ProbeSummary> {
    let http = http_client()?;
    let recorder = Arc::new(Recorder::default());
    let (requests, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients = config.concurrency.max(1);
    // Each client paces itself so that together they send `rate` requests per second.
    let gap = (config.rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / config.rate));
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (http, recorder, requests, errors) = (http.clone(), recorder.clone(), requests.clone(), errors.clone());
        let (url, bearer) = (config.url.clone(), config.bearer.clone());
        tasks.spawn(async move {
            let mut rng = item_rng(0, 9, client as u64);
            // Spread the clients' first requests over one gap, so they do not arrive in step.
            if let Some(gap) = gap {
                tokio::time::sleep(gap.mul_f64(rng.random::<f64>())).await;
            }
            while Instant::now() < deadline {
                let mut request = http.get(&url);
                if let Some(token) = &bearer {
                    request = request.bearer_auth(token);
                }
                let sent = Instant::now();
                let ok = match request.send().await {
                    Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                requests.fetch_add(1, Ordering::Relaxed);
                if ok {
                    recorder.record(sent.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(gap) = gap {
                    tokio::time::sleep(gap.mul_f64(rng.random_range(0.5..1.5))).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let requests = requests.load(Ordering::Relaxed);
    let summary = ProbeSummary {
        requests,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        requests_per_second: requests as f64 / seconds.max(1e-9),
        concurrency: clients,
        latency: recorder.summary(),
    };
    if !config.quiet {
        eprintln!(
            "loadgen: GET {} x{} clients: {} requests ({:.0}/s), {} errors, {}",
            config.url,
            clients,
            summary.requests,
            summary.requests_per_second,
            summary.errors,
            summary.latency.line()
        );
    }
    Ok(summary)
}
