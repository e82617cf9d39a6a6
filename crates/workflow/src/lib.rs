//! callplane-workflow: the event pipeline behind the `EventPipeline` seam.
//!
//! Phase 1 keeps every accepted VAPI event in a local, fsync'd inbox (`LocalIntake`), then
//! processes it inline in the webhook request or, when that cannot finish, from the inbox.
//! Phase 2 adds Temporal workflows behind the same seams. Whatever the backend, an event that
//! cannot be processed is kept in the dead-letter table and can be replayed. Depends on `core` and `storage`;
//! never on `api` or `server`.

pub mod counting;
mod dead_letters;
mod inbox;
mod inline;
mod intake;
mod processor;
pub mod reconcile;

pub use dead_letters::{DeadLetters, ReplayReport};
pub use inbox::{Inbox, InboxError, InboxLimits, StoredEvent};
pub use inline::InlinePipeline;
pub use intake::{DrainReport, IntakeSettings, LocalIntake};
pub use processor::{Failure, PipelineSettings, ProcessingStats, Processor, render_counters};
