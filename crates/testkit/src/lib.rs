//! callplane-testkit: what every test suite shares. A fresh, migrated database per test
//! (cloned from a template built once per migration set), and one contract suite per seam
//! that every backend must pass, tenant isolation included. A dev-dependency only.

pub mod contracts;
mod db;

pub use db::{TestDb, admin_url};
