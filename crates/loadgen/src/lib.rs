//! callplane-loadgen: measures callplane the way production will load it.
//!
//! - [`simulate`] plays realistic VAPI call lifecycles (assistant request, status updates,
//!   transcripts, conversation updates, tool calls, end-of-call report) against a running
//!   callplane over HTTP, signed like VAPI's HMAC credential, with duplicated and reordered
//!   deliveries, and then checks the books: every call recorded once, every second billed once.
//! - [`burst`] opens thousands of webhooks at the same instant, in the middle of real call
//!   lifecycles, for the fault suite (`cargo xtask chaos`); [`client`] can retry deliveries
//!   like a load balancer with a healthy peer, and counts answers by class.
//! - [`load`] fills a database with millions of synthetic calls and transcripts over many months
//!   and thousands of organizations, at COPY speed, for the dashboard benchmarks.
//! - [`probe`], [`realtime`] and [`dashboard`] drive the other benchmarks of `cargo xtask bench`
//!   (latency of plain requests, WebSocket delivery, dashboard reads) together with the raw
//!   baselines they are compared with.
//!
//! The pure parts (traffic plans, message generation, percentiles, the books check) are unit
//! tested here; the rest is exercised end to end by `cargo xtask bench --quick`.

pub mod books;
pub mod burst;
pub mod client;
pub mod dashboard;
pub mod load;
pub mod messages;
pub mod plan;
pub mod probe;
pub mod random;
pub mod realtime;
pub mod simulate;
pub mod stats;
