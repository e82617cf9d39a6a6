//! Every error code callplane answers with, or keeps with an event it could not process: one
//! list, each code a stable string a client can branch on.
//!
//! Domain errors name their code here (`ParseError::code`, `AuthError::code`, ...); the HTTP
//! surface maps each code to one status and documents the list in the OpenAPI document; metric
//! labels are derived from the enum, never from string matching.

use std::fmt;

macro_rules! error_codes {
    ($($(#[$group:meta])* $variant:ident = $text:literal, $doc:literal;)*) => {
        /// A stable error code. See the module doc.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorCode {
            $($(#[$group])* #[doc = $doc] $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order of this file.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as sent: `snake_case`, stable.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }

            /// What the code means, in one line (for the OpenAPI document and the README).
            pub const fn describe(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $doc,)*
                }
            }
        }
    };
}

error_codes! {
    // A VAPI webhook's body.
    MalformedJson = "malformed_json", "The body is not valid JSON.";
    MissingMessage = "missing_message", "The body has no `message` object.";
    MissingType = "missing_type", "`message.type` is missing or not a string.";
    InvalidMessage = "invalid_message", "`message` does not match VAPI's schema; the body is kept as a dead letter.";
    InvalidTimestamp = "invalid_timestamp", "A time is not one, or is outside the years 1970 to 9999; the body is kept as a dead letter.";
    InvalidDuration = "invalid_duration", "A duration is negative or longer than 7 days; the body is kept as a dead letter.";
    IdTooLong = "id_too_long", "An id is longer than 256 characters; the body is kept as a dead letter.";
    PayloadTooLarge = "payload_too_large", "The body is larger than the server accepts.";
    // A VAPI webhook's authentication.
    MissingCredentials = "missing_credentials", "No credentials were sent.";
    InvalidCredentials = "invalid_credentials", "The webhook secret or signature does not match.";
    InvalidSignatureTimestamp = "invalid_signature_timestamp", "The signature's timestamp is not a number.";
    ExpiredSignature = "expired_signature", "The signature's timestamp is outside the allowed window.";
    // A VAPI event's processing.
    UnknownOrganization = "unknown_organization", "No organization matched the URL, the call, the phone number, the assistant or signed metadata; the event is kept.";
    FutureTimestamp = "future_timestamp", "The call was created too far in the future; the event is kept as a dead letter.";
    StaleTimestamp = "stale_timestamp", "The call was created too long ago (`partitions.max_past_days`); the event is kept as a dead letter.";
    InvalidEvent = "invalid_event", "The event conflicts with what is recorded (a call id of another organization); the event is kept as a dead letter.";
    ProcessingFailed = "processing_failed", "Processing failed repeatedly; the event is kept as a dead letter for replay.";
    ParserPanic = "parser_panic", "Reading the body hit a bug in callplane; the body is kept as a dead letter.";
    // Dashboard and operator credentials.
    InvalidApiKey = "invalid_api_key", "The API key is unknown or revoked.";
    JwtNotConfigured = "jwt_not_configured", "This server does not accept JWTs; use an API key.";
    MalformedToken = "malformed_token", "The token is not a JWT, or a time claim is not a number in range.";
    UnsupportedTokenAlgorithm = "unsupported_token_algorithm", "The token's algorithm is not HS256.";
    InvalidTokenSignature = "invalid_token_signature", "The token's signature does not match.";
    TokenExpired = "token_expired", "The token has expired.";
    TokenNotYetValid = "token_not_yet_valid", "The token is not valid yet (`nbf`).";
    TokenMissingExpiry = "token_missing_expiry", "The token has no `exp` claim.";
    TokenLifetimeTooLong = "token_lifetime_too_long", "The token lives longer than `auth.jwt_max_lifetime_seconds`.";
    TokenIssuedInFuture = "token_issued_in_future", "The token's `iat` is in the future.";
    TokenWrongAudience = "token_wrong_audience", "The token's audience is not the configured one.";
    TokenMissingOrganization = "token_missing_organization", "The token names no organization in the configured claim.";
    InvalidMetricsToken = "invalid_metrics_token", "Not the metrics token.";
    Forbidden = "forbidden", "Not the admin token.";
    TooManyFailedAttempts = "too_many_failed_attempts", "Too many failed authentication attempts from this address or with this key; wait `Retry-After` seconds.";
    // Dashboard and admin requests.
    InvalidQuery = "invalid_query", "A query parameter is unknown, malformed or out of range.";
    InvalidFilter = "invalid_filter", "A filter is not one the endpoint accepts.";
    InvalidCursor = "invalid_cursor", "The cursor is not one this API gave.";
    InvalidReadAfter = "invalid_read_after", "`Callplane-Read-After` is not a log position this API gave.";
    InvalidPath = "invalid_path", "A path segment is not valid text.";
    InvalidBody = "invalid_body", "The request body is not the JSON the endpoint expects.";
    InvalidKey = "invalid_key", "The function-data key is not a valid name.";
    ReservedKey = "reserved_key", "The function-data key is reserved by callplane.";
    FunctionDataTooLarge = "function_data_too_large", "The function-data value is too large.";
    WebsocketRequired = "websocket_required", "The endpoint needs a WebSocket upgrade.";
    TooManyConnections = "too_many_connections", "Too many WebSockets are open for this organization or key; close one or wait `Retry-After` seconds.";
    NotFound = "not_found", "No such route, or the admin API is not enabled.";
    CallNotFound = "call_not_found", "No such call in this organization.";
    CallArchived = "call_archived", "The call's month is archived to object storage (`callplane partitions restore YYYY-MM` brings it back).";
    KeyNotFound = "key_not_found", "No such function-data key.";
    OrganizationNotFound = "organization_not_found", "No such organization.";
    ApiKeyNotFound = "api_key_not_found", "No such API key in this organization.";
    UnknownPlan = "unknown_plan", "The plan is not one the server offers.";
    InvalidStatus = "invalid_status", "The organization status is not one of active, past_due, canceled, suspended.";
    SearchOff = "search_off", "Transcript search is off on this server (`backends.search`).";
    InvalidTimeZone = "invalid_time_zone", "The billing time zone is not an IANA time zone name such as Europe/Paris.";
    // Billing.
    BillingNotConfigured = "billing_not_configured", "Billing is not configured on this server.";
    BillingProviderError = "billing_provider_error", "The billing provider refused or failed the request; try again later.";
    WebhookNotConfigured = "webhook_not_configured", "Stripe webhooks are not configured on this server (`stripe.webhook_secret`).";
    MalformedEvent = "malformed_event", "The Stripe event is not one callplane can store (missing or oversized ids, a NUL, a time out of range).";
    MissingSignature = "missing_signature", "The Stripe-Signature header is missing.";
    MalformedSignature = "malformed_signature", "The Stripe-Signature header cannot be read.";
    StaleSignature = "stale_signature", "The Stripe signature's timestamp is outside the tolerance.";
    InvalidSignature = "invalid_signature", "The Stripe signature does not match.";
    // The server's side.
    InternalError = "internal_error", "Something failed on the server's side; it is logged.";
    Overloaded = "overloaded", "A backend is away or full; retry after `Retry-After` seconds.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_described() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(text.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{text}");
            assert!(code.describe().ends_with('.'), "{text}: {}", code.describe());
        }
    }
}
