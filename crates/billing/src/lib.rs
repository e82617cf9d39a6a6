//! callplane-billing: Stripe. Plans map to Stripe prices; Checkout and the customer portal
//! let an organization subscribe and change plans; subscription webhooks (signature
//! verified, deduplicated by event id, never applied out of order) set the organization's
//! plan, status and billing period. `callplane billing setup` creates the catalog.
//!
//! Depends on `callplane-core` and async-stripe only; storage comes in through the
//! `BillingStore` seam. Never depends on `api`, `storage` or `server`.

mod catalog;
mod client;
mod events;
mod signature;
mod webhooks;

pub use catalog::{CatalogIds, PlanCatalog, setup_catalog};
pub use client::{BillingOff, StripeBilling, StripeSettings};
pub use signature::{SignatureError, sign_for_tests, verify_signature};
pub use webhooks::StripeWebhooks;
