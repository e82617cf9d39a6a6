//! `InlinePipeline`: process a VAPI event inside the request that delivered it (or the inbox
//! drainer that took it over), with the processor; failures become dead letters.

use crate::dead_letters::DeadLetters;
use crate::processor::{ProcessingStats, Processor};
use async_trait::async_trait;
use callplane_core::OrgId;
use callplane_core::seams::{EventPipeline, InboundEvent, PipelineError, Processed, StoreError};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use tracing::instrument;

#[derive(Clone)]
pub struct InlinePipeline {
    processor: Processor,
    dead_letters: DeadLetters,
    stats: Arc<ProcessingStats>,
}

impl InlinePipeline {
    pub fn new(processor: Processor, dead_letters: DeadLetters) -> Self {
        let stats = processor.stats();
        Self { processor, dead_letters, stats }
    }
}

#[async_trait]
impl EventPipeline for InlinePipeline {
    fn backend(&self) -> &'static str {
        "inline"
    }

    async fn keep_unprocessed(
        &self,
        org: Option<OrgId>,
        body: &Value,
        raw: Option<&[u8]>,
        code: &str,
        error: &str,
        received_at: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        self.dead_letters.keep_unprocessed(org, body, raw, code, error, received_at).await
    }

    #[instrument(skip_all, fields(org_id = %ev.org_id, kind = ev.message.kind.label(), call_id = ev.message.call_id.as_deref().unwrap_or("")))]
    async fn submit(&self, ev: InboundEvent) -> Result<Processed, PipelineError> {
        let result = match self.processor.process(&ev).await {
            Ok(p) => Ok(p),
            Err(failure) => Err(self.dead_letters.fail(&ev, failure).await),
        };
        self.stats.record(&result);
        result
    }

    fn render_metrics(&self, out: &mut String) {
        self.stats.render(out);
    }
}
