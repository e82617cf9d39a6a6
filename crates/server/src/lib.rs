//! callplane-server: the `callplane` binary's library half. Configuration, telemetry, and
//! the composition root that turns configuration into backends behind the seams. This is
//! the only crate that depends on every other one, and the only place where a phase feature
//! chooses a backend.

pub mod advisor;
pub mod app;
pub mod phase;
pub mod routes;
pub mod settings;
pub mod telemetry;

pub use app::App;
#[cfg(feature = "object-store")]
pub use app::{archive_due, archiver};
pub use settings::Settings;
