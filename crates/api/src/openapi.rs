//! The OpenAPI document, generated from the handlers' annotations and served at
//! `/openapi.json`. `docs/openapi.json` is a committed copy; a test fails when it is stale.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An organization's API key (`cp_...`) or a Supabase-style JWT (HS256)."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The operators' admin token."))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "callplane", description = "The dashboard and admin API of callplane. VAPI's webhooks go to POST /vapi/{org_id}; see the README."),
    paths(
        crate::dashboard::list_calls,
        crate::dashboard::live_calls,
        crate::dashboard::export_csv,
        crate::dashboard::get_call,
        crate::dashboard::usage,
        crate::dashboard::usage_daily,
        crate::dashboard::list_function_data,
        crate::dashboard::get_function_data,
        crate::dashboard::put_function_data,
        crate::dashboard::delete_function_data,
        crate::realtime::realtime,
        crate::billing::checkout,
        crate::billing::portal,
        crate::admin::create_org,
        crate::admin::list_orgs,
        crate::admin::get_org,
        crate::admin::update_org,
        crate::admin::create_key,
        crate::admin::revoke_key,
    ),
    modifiers(&Security),
)]
pub struct ApiDoc;

/// The document as pretty JSON, exactly as served and committed.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
