//! The OpenAPI document, generated from the handlers' annotations and served at
//! `/openapi.json`. `docs/openapi.json` is a committed copy; a test fails when it is stale.

use serde_json::{Value, json};
use utoipa::openapi::path::{HttpMethod, OperationBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ResponseBuilder};
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

/// The operational routes, outside the organizations' API. Described here rather than by
/// annotations on their handlers in `ops.rs`.
struct Operations;

/// One answer of an operational route: status, description, content type and an example.
type Answer = (&'static str, &'static str, &'static str, Value);

impl Modify for Operations {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let json = "application/json";
        let routes: [(&str, &str, &str, Vec<Answer>); 3] = [
            (
                "/healthz",
                "Liveness",
                "The process is up. Says nothing of the database: see /readyz.",
                vec![("200", "Up.", json, json!({ "status": "ok" }))],
            ),
            (
                "/readyz",
                "Readiness",
                "Ready to take traffic: the database answers with every migration applied, and the inbox \
                 keeps up. Answers within a second whatever the database does, and says why when not ready.",
                vec![
                    ("200", "Ready.", json, json!({ "status": "ready", "checks": { "database": { "ok": true } } })),
                    (
                        "503",
                        "Not ready; `reason` says why.",
                        json,
                        json!({ "status": "not_ready", "reason": "database unreachable: ...",
                                "checks": { "database": { "ok": false, "error": "database unreachable: ..." } } }),
                    ),
                ],
            ),
            (
                "/metrics",
                "Metrics",
                "Prometheus metrics: webhooks by type and outcome, the inbox, lost events, latencies, pools. \
                 Open unless `server.metrics_token` is set; then `Authorization: Bearer <metrics token>`.",
                vec![
                    (
                        "200",
                        "The Prometheus text format.",
                        "text/plain; version=0.0.4",
                        json!("# TYPE callplane_events_lost_total counter\ncallplane_events_lost_total 0\n"),
                    ),
                    (
                        "401",
                        "`server.metrics_token` is set and was not sent.",
                        json,
                        json!({ "code": "missing_credentials", "message": "..." }),
                    ),
                ],
            ),
        ];
        for (path, summary, description, answers) in routes {
            let mut operation = OperationBuilder::new()
                .tag("operations")
                .summary(Some(summary))
                .description(Some(description))
                .operation_id(Some(&path[1..]));
            for (status, description, content_type, example) in answers {
                let content = ContentBuilder::new().example(Some(example)).build();
                operation = operation
                    .response(status, ResponseBuilder::new().description(description).content(content_type, content));
            }
            openapi.paths.add_path_operation(path, vec![HttpMethod::Get], operation);
        }
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
        crate::search::search,
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
        crate::advice::advice,
    ),
    modifiers(&Security, &Operations),
)]
pub struct ApiDoc;

/// The document as pretty JSON, exactly as served and committed.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operational_routes_are_documented() {
        let doc: Value = serde_json::from_str(&openapi_json()).unwrap_or_default();
        let paths = &doc["paths"];
        assert_eq!(
            paths["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["example"]["status"],
            "ok"
        );
        let ready = &paths["/readyz"]["get"]["responses"];
        assert!(ready["200"].is_object() && ready["503"]["description"].as_str().is_some_and(|d| d.contains("reason")));
        assert!(paths["/metrics"]["get"]["responses"]["200"]["content"]["text/plain; version=0.0.4"].is_object());
        assert!(paths["/healthz"]["get"].get("security").is_none(), "the operational routes take no credentials");
    }
}
