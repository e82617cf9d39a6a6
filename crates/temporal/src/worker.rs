//! The worker: polls the task queue for call workflows and their activities.
//!
//! The SDK's worker future is not `Send`, so it runs on a thread of its own with a
//! single-threaded runtime; the activities' work is spawned on the process's runtime.

use crate::TemporalSettings;
use crate::activities::CallActivities;
use crate::pipeline::{TemporalPipeline, connect};
use crate::workflow::CallWorkflow;
use callplane_core::error_chain;
use callplane_workflow::{DeadLetters, Processor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::thread::JoinHandle;
use std::time::Duration;
use temporalio_sdk::runtime::worker_tuner::{FixedSizeSlotSupplier, TunerHolder};
use temporalio_sdk::runtime::{PollerBehavior, RuntimeOptions};
use temporalio_sdk::{Runtime, Worker, WorkerOptions, WorkerOptionsBuilder, WorkflowRegistrationError};
use tracing::{info, warn};

type Shutdown = Box<dyn Fn() + Send>;

/// A running worker; [`stop`](WorkerHandle::stop) lets its activities finish and joins it.
pub struct WorkerHandle {
    stopping: Arc<AtomicBool>,
    shutdown: Arc<Mutex<Option<Shutdown>>>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops polling, waits for the tasks in hand to finish, and joins the worker's thread.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn signal_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(shutdown) = self.shutdown.lock().ok().and_then(|mut s| s.take()) {
            shutdown();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// How long to wait before connecting again after Temporal did not answer.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What a worker runs: its workflows and activities, registered on the options' builder.
pub(crate) type Register =
    Box<dyn Fn(WorkerOptionsBuilder) -> Result<WorkerOptionsBuilder, WorkflowRegistrationError> + Send>;

/// Starts a worker on the pipeline's task queue, running the processor's steps. It connects
/// (and reconnects) on its own: Temporal may be down when it starts.
pub fn spawn_worker(
    pipeline: &TemporalPipeline,
    processor: Processor,
    dead_letters: DeadLetters,
) -> std::io::Result<WorkerHandle> {
    let activities = CallActivities {
        processing: processor.stats(),
        processor,
        dead_letters,
        waiters: pipeline.waiters(),
        stats: pipeline.stats(),
        runtime: tokio::runtime::Handle::current(),
    };
    let register: Register =
        Box::new(move |o| Ok(o.register_workflow::<CallWorkflow>()?.register_activities(activities.clone())));
    spawn(pipeline.settings().clone(), register)
}

/// Starts a worker on `settings.task_queue` that runs what `register` registers, with
/// callplane's tuning: `max_concurrent_activities` slots, and pollers shared evenly between
/// the shared and the sticky queue.
pub(crate) fn spawn(settings: TemporalSettings, register: Register) -> std::io::Result<WorkerHandle> {
    let stopping = Arc::new(AtomicBool::new(false));
    let shutdown: Arc<Mutex<Option<Shutdown>>> = Arc::default();
    let (stop_flag, shutdown_slot) = (stopping.clone(), shutdown.clone());
    let thread = std::thread::Builder::new().name("temporal-worker".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => return warn!(error = %e, "the Temporal worker's runtime could not start"),
        };
        runtime.block_on(async move {
            let core = match Runtime::from_current_tokio(RuntimeOptions::builder().build().unwrap_or_default()) {
                Ok(core) => core,
                Err(e) => return warn!(error = %e, "the Temporal worker could not start"),
            };
            while !stop_flag.load(Ordering::SeqCst) {
                let client = match connect(&settings).await {
                    Ok(client) => client,
                    Err(e) => {
                        warn!(error = %error_chain(&e), address = %settings.address,
                              "the Temporal worker cannot connect; retrying");
                        tokio::time::sleep(RECONNECT_AFTER).await;
                        continue;
                    }
                };
                let slots = settings.max_concurrent_activities.max(1);
                let tuner = TunerHolder::builder()
                    .workflow_task_slot_supplier(FixedSizeSlotSupplier::new(slots))
                    .activity_task_slot_supplier(FixedSizeSlotSupplier::new(slots))
                    .local_activity_task_slot_supplier(FixedSizeSlotSupplier::new(slots))
                    .nexus_task_slot_supplier(FixedSizeSlotSupplier::new(1))
                    .build();
                // Most calls' first workflow task is on the shared queue (a new run), not the
                // worker's sticky one: poll both evenly, where the SDK's default ratio gives the
                // shared queue one poller in five.
                let pollers = (slots / 2).clamp(2, 10);
                let options = register(WorkerOptions::new(settings.task_queue.clone())).map(|o| {
                    o.tuner(tuner)
                        .workflow_task_poller_behavior(PollerBehavior::SimpleMaximum(pollers))
                        .nonsticky_to_sticky_poll_ratio(0.5)
                        .build()
                });
                let mut worker = match options
                    .map_err(|e| e.to_string())
                    .and_then(|options| Worker::new(&core, client, options).map_err(|e| e.to_string()))
                {
                    Ok(worker) => worker,
                    Err(e) => {
                        warn!(error = %e, "the Temporal worker could not be made; retrying");
                        tokio::time::sleep(RECONNECT_AFTER).await;
                        continue;
                    }
                };
                if let Ok(mut slot) = shutdown_slot.lock() {
                    *slot = Some(Box::new(worker.shutdown_handle()));
                }
                // Stopped between connecting and here: nobody called the handle yet.
                if stop_flag.load(Ordering::SeqCst)
                    && let Some(shutdown) = shutdown_slot.lock().ok().and_then(|mut s| s.take())
                {
                    shutdown();
                }
                info!(task_queue = %settings.task_queue, "Temporal worker polling");
                match worker.run().await {
                    Ok(()) => info!("Temporal worker stopped"),
                    Err(e) => {
                        warn!(error = %e, "the Temporal worker stopped with an error; restarting it");
                        tokio::time::sleep(RECONNECT_AFTER).await;
                    }
                }
            }
        });
    })?;
    Ok(WorkerHandle { stopping, shutdown, thread: Some(thread) })
}
