//! End-to-end suites: the real server over HTTP on a loopback port, a fresh Postgres
//! database per test (started by `cargo xtask test`), and the real `callplane` binary where a
//! user would run it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod advisor;
#[cfg(feature = "object-store")]
mod archive;
mod auth_limits;
mod bad_input;
mod billing;
mod cli;
mod daily_usage;
mod dashboard;
mod durability;
mod hostile_api;
mod hostile_webhooks;
mod isolation;
mod lifecycle;
#[cfg(feature = "object-store")]
mod objects;
mod partition_convert;
mod partitions;
#[cfg(feature = "redis")]
mod phase_moves;
mod realtime;
mod realtime_limits;
mod reconcile;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "read-replica")]
mod replica;
mod samples;
mod seams;
mod search;
#[cfg(feature = "temporal")]
mod temporal;
