//! `callplane billing setup`: the products, prices and overage meter in Stripe, created once
//! and found again on every later run (products by our own ids, prices by lookup key, the
//! meter by event name), so it can run as often as you like.

use crate::client::client;
use callplane_core::seams::BillingError;
use serde::Serialize;
use std::collections::BTreeMap;
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula,
    ListBillingMeter,
};
use stripe_product::price::{
    CreatePrice, CreatePriceRecurring, CreatePriceRecurringInterval, CreatePriceRecurringUsageType, ListPrice,
};
use stripe_product::product::{CreateProduct, RetrieveProduct};

/// A plan as Stripe needs it.
#[derive(Clone, Debug)]
pub struct PlanCatalog {
    pub name: String,
    pub price_cents: i64,
    pub overage_cents_per_minute: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PlanIds {
    pub product_id: String,
    pub price_id: String,
    pub overage_price_id: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CatalogIds {
    pub meter_id: String,
    pub meter_event_name: String,
    pub plans: BTreeMap<String, PlanIds>,
    /// What this run created (the rest already existed).
    pub created: Vec<String>,
}

fn provider(e: stripe::StripeError) -> BillingError {
    BillingError::provider(e)
}

fn is_missing(e: &stripe::StripeError) -> bool {
    matches!(e, stripe::StripeError::Stripe(_, 404))
}

async fn price_by_lookup_key(client: &stripe::Client, key: &str) -> Result<Option<String>, BillingError> {
    let found = ListPrice::new().lookup_keys(vec![key.to_owned()]).send(client).await.map_err(provider)?;
    Ok(found.data.first().map(|p| p.id.as_str().to_owned()))
}

pub async fn setup_catalog(
    secret_key: &str,
    api_base: &str,
    currency: &str,
    meter_event_name: &str,
    plans: &[PlanCatalog],
    mut progress: impl FnMut(&str),
) -> Result<CatalogIds, BillingError> {
    let client = client(secret_key, api_base)?;
    let currency: stripe_types::Currency = currency
        .parse()
        .map_err(|_| BillingError::NotConfigured(format!("stripe.currency {currency:?} is not a currency")))?;
    let mut ids = CatalogIds { meter_event_name: meter_event_name.to_owned(), ..Default::default() };

    let meters = ListBillingMeter::new().send(&client).await.map_err(provider)?;
    ids.meter_id = match meters.data.iter().find(|m| m.event_name == meter_event_name) {
        Some(m) => m.id.as_str().to_owned(),
        None => {
            let m = CreateBillingMeter::new(
                CreateBillingMeterDefaultAggregation { formula: CreateBillingMeterDefaultAggregationFormula::Sum },
                "callplane overage minutes",
                meter_event_name,
            )
            .send(&client)
            .await
            .map_err(provider)?;
            ids.created.push(format!("meter {}", m.id.as_str()));
            m.id.as_str().to_owned()
        }
    };
    progress(&format!("meter {} ({meter_event_name})", ids.meter_id));

    for plan in plans {
        let product_id = format!("callplane_{}", plan.name);
        match RetrieveProduct::new(product_id.clone()).send(&client).await {
            Ok(_) => {}
            Err(e) if is_missing(&e) => {
                CreateProduct::new(format!("callplane {}", plan.name))
                    .id(product_id.clone())
                    .send(&client)
                    .await
                    .map_err(provider)?;
                ids.created.push(format!("product {product_id}"));
            }
            Err(e) => return Err(provider(e)),
        }
        let monthly_key = format!("callplane_{}_monthly", plan.name);
        let price_id = match price_by_lookup_key(&client, &monthly_key).await? {
            Some(id) => id,
            None => {
                let p = CreatePrice::new(currency.clone())
                    .product(product_id.clone())
                    .unit_amount(plan.price_cents)
                    .recurring(CreatePriceRecurring::new(CreatePriceRecurringInterval::Month))
                    .lookup_key(monthly_key.clone())
                    .send(&client)
                    .await
                    .map_err(provider)?;
                ids.created.push(format!("price {}", p.id.as_str()));
                p.id.as_str().to_owned()
            }
        };
        let overage_price_id = if plan.overage_cents_per_minute > 0 {
            let key = format!("callplane_{}_overage", plan.name);
            Some(match price_by_lookup_key(&client, &key).await? {
                Some(id) => id,
                None => {
                    let mut recurring = CreatePriceRecurring::new(CreatePriceRecurringInterval::Month);
                    recurring.usage_type = Some(CreatePriceRecurringUsageType::Metered);
                    recurring.meter = Some(ids.meter_id.clone());
                    let p = CreatePrice::new(currency.clone())
                        .product(product_id.clone())
                        .unit_amount(plan.overage_cents_per_minute)
                        .recurring(recurring)
                        .lookup_key(key)
                        .send(&client)
                        .await
                        .map_err(provider)?;
                    ids.created.push(format!("price {}", p.id.as_str()));
                    p.id.as_str().to_owned()
                }
            })
        } else {
            None
        };
        progress(&format!("plan {}: product {product_id}, price {price_id}", plan.name));
        ids.plans.insert(plan.name.clone(), PlanIds { product_id, price_id, overage_price_id });
    }
    Ok(ids)
}
