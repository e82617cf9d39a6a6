//! callplane-testkit: what every test suite shares. A fresh, migrated database per test
//! (cloned from a template built once per migration set), and one contract suite per seam
//! that every backend must pass, tenant isolation included, and Stripe- and VAPI-compatible
//! stub servers for the endpoints callplane calls. A dev-dependency only.

// The Stripe stub's objects are large `json!` literals.
#![recursion_limit = "256"]

pub mod contracts;
mod db;
pub mod fault_proxy;
pub mod redis;
pub mod replica;
pub mod s3;
pub mod stripe_stub;
pub mod temporal;
pub mod vapi_stub;

pub use db::{TestDb, admin_url};

/// Kills a server the tests started (if it is running) and waits for it to exit, so that its
/// port refuses connections when this returns.
pub(crate) fn kill(child: Option<std::process::Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}
