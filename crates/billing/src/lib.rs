//! callplane-billing: Stripe (plans and prices, subscription webhooks, meter sync). Nothing is
//! here yet: the billing issue builds it behind a `BillingProvider` seam. Plans and the
//! billable-seconds rule already live in `callplane-core::billing`. Never depends on `api`.
