//! `StripeBilling`: Checkout and customer-portal links through the real async-stripe client.

use async_trait::async_trait;
use callplane_core::Organization;
use callplane_core::seams::{BillingError, BillingLink, BillingProvider, BillingStore};
use std::collections::HashMap;
use std::sync::Arc;
use stripe::Client;
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_core::customer::CreateCustomer;

use crate::events::ORG_METADATA_KEY;

#[derive(Clone, Debug)]
pub struct StripeSettings {
    pub secret_key: String,
    /// `https://api.stripe.com/` in production; the stub's address in tests.
    pub api_base: String,
    pub checkout_success_url: String,
    pub checkout_cancel_url: String,
    pub portal_return_url: String,
    /// Plan name -> the plan's monthly price id.
    pub plan_prices: HashMap<String, String>,
    /// Plan name -> its metered overage price id, for plans that bill overage.
    pub overage_prices: HashMap<String, String>,
}

/// Billing when no Stripe key is configured: every link is refused with a clear reason.
pub struct BillingOff;

#[async_trait]
impl BillingProvider for BillingOff {
    fn backend(&self) -> &'static str {
        "off"
    }

    async fn checkout(&self, _: &Organization, _: &str) -> Result<BillingLink, BillingError> {
        Err(BillingError::NotConfigured("stripe.secret_key is not set".into()))
    }

    async fn portal(&self, _: &Organization) -> Result<BillingLink, BillingError> {
        Err(BillingError::NotConfigured("stripe.secret_key is not set".into()))
    }
}

pub struct StripeBilling {
    client: Client,
    store: Arc<dyn BillingStore>,
    settings: StripeSettings,
}

pub(crate) fn client(secret_key: &str, api_base: &str) -> Result<Client, BillingError> {
    stripe::ClientBuilder::new(secret_key)
        .url(api_base)
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| BillingError::NotConfigured(e.to_string()))
}

fn provider(e: stripe::StripeError) -> BillingError {
    BillingError::provider(e)
}

impl StripeBilling {
    pub fn new(store: Arc<dyn BillingStore>, settings: StripeSettings) -> Result<Self, BillingError> {
        Ok(Self { client: client(&settings.secret_key, &settings.api_base)?, store, settings })
    }

    /// The organization's Stripe customer, created (and remembered) on first use.
    async fn customer(&self, org: &Organization) -> Result<String, BillingError> {
        if let Some(c) = self.store.customer_of(org.id).await? {
            return Ok(c);
        }
        let customer = CreateCustomer::new()
            .name(org.name.clone())
            .metadata([(ORG_METADATA_KEY.to_owned(), org.id.to_string())])
            .send(&self.client)
            .await
            .map_err(provider)?;
        let id = customer.id.as_str().to_owned();
        self.store.set_customer(org.id, &id).await?;
        Ok(id)
    }
}

#[async_trait]
impl BillingProvider for StripeBilling {
    fn backend(&self) -> &'static str {
        "stripe"
    }

    async fn checkout(&self, org: &Organization, plan: &str) -> Result<BillingLink, BillingError> {
        let price = self.settings.plan_prices.get(plan).ok_or_else(|| {
            BillingError::NotConfigured(format!(
                "plans.{plan}.stripe_price_id is not set; run `callplane billing setup`"
            ))
        })?;
        let customer = self.customer(org).await?;
        let mut base = CreateCheckoutSessionLineItems::new();
        base.price = Some(price.clone());
        base.quantity = Some(1);
        let mut items = vec![base];
        if let Some(overage) = self.settings.overage_prices.get(plan) {
            // Metered prices take no quantity: usage is reported to the meter.
            let mut metered = CreateCheckoutSessionLineItems::new();
            metered.price = Some(overage.clone());
            items.push(metered);
        }
        let mut subscription = CreateCheckoutSessionSubscriptionData::new();
        subscription.metadata = Some([(ORG_METADATA_KEY.to_owned(), org.id.to_string())].into_iter().collect());
        let session = CreateCheckoutSession::new()
            .mode(stripe_shared::CheckoutSessionMode::Subscription)
            .customer(customer.clone())
            .client_reference_id(org.id.to_string())
            .line_items(items)
            .subscription_data(subscription)
            .success_url(self.settings.checkout_success_url.clone())
            .cancel_url(self.settings.checkout_cancel_url.clone())
            .send(&self.client)
            .await
            .map_err(provider)?;
        let url = session.url.ok_or_else(|| BillingError::Provider {
            message: "Stripe returned a session without a url".into(),
            source: None,
        })?;
        Ok(BillingLink { url, customer_id: customer })
    }

    async fn portal(&self, org: &Organization) -> Result<BillingLink, BillingError> {
        let Some(customer) = self.store.customer_of(org.id).await? else {
            return Err(BillingError::NotConfigured(
                "this organization has no subscription yet; use checkout first".into(),
            ));
        };
        let session = CreateBillingPortalSession::new()
            .customer(customer.clone())
            .return_url(self.settings.portal_return_url.clone())
            .send(&self.client)
            .await
            .map_err(provider)?;
        Ok(BillingLink { url: session.url, customer_id: customer })
    }
}
