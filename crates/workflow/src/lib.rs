//! callplane-workflow: the event pipeline behind the `EventPipeline` seam.
//!
//! Phase 1 processes each verified VAPI event inline, in the webhook request. Phase 2 adds
//! Temporal workflows behind the same seam. Whatever the backend, an event that fails is
//! kept in the dead-letter table and can be replayed. Depends on `core` and `storage`;
//! never on `api` or `server`.

mod inline;

pub use inline::{InlinePipeline, PipelineSettings, ReplayReport};
