//! Properties of what faces the outside: the VAPI body parser and webhook authentication, on
//! arbitrary input. Neither may panic (a panic is an empty reply and a lost event); a parse is
//! a message or a typed `ParseError`; a signature verifies only for the exact body signed.
//!
//! Cases per property come from `PROPTEST_CASES` (proptest's default, 256, in `cargo xtask
//! test`; far more in `cargo xtask fuzz`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use callplane_core::auth::{AuthError, HmacAlgorithm, HmacSettings, WebhookAuth};
use callplane_core::vapi::{ParseError, ServerMessage, parse_body, parse_message};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use std::path::PathBuf;
use std::sync::LazyLock;

/// The shared VAPI samples in `tests/fixtures/vapi`, as sent.
static FIXTURES: LazyLock<Vec<Value>> = LazyLock::new(|| {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vapi");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "the samples are in {}", dir.display());
    names.iter().map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()).collect()
});

/// A parse is a message or a typed error with a message. (Its code is an `ErrorCode` by type.)
fn check_outcome(outcome: Result<ServerMessage, ParseError>) -> Result<(), TestCaseError> {
    match outcome {
        Ok(m) => prop_assert!(!m.message_type.trim().is_empty()),
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

/// Keys VAPI's messages use, so generated objects often hit a field the parser reads.
const KEYS: &[&str] = &[
    "message",
    "type",
    "call",
    "id",
    "createdAt",
    "updatedAt",
    "timestamp",
    "status",
    "endedReason",
    "customer",
    "number",
    "phoneNumber",
    "phoneNumberId",
    "assistantId",
    "assistantOverrides",
    "metadata",
    "variableValues",
    "startedAt",
    "endedAt",
    "durationSeconds",
    "durationMs",
    "cost",
    "summary",
    "transcript",
    "messages",
    "artifact",
    "recordingUrl",
    "analysis",
    "toolCallList",
    "toolWithToolCallList",
    "toolCall",
    "function",
    "name",
    "arguments",
    "parameters",
    "functionCall",
    "callplaneOrgId",
    "callplaneOrgSig",
    "role",
    "turn",
];

/// Leaves chosen to sit on the edges: huge, negative and fractional numbers, times at and past
/// what chrono and PostgreSQL hold, NUL, empty and long text.
fn edge_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::from(i64::MIN)),
        Just(Value::from(i64::MAX)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(f64::MAX)),
        Just(Value::from(-f64::MAX)),
        Just(Value::from(-0.0)),
        Just(Value::from(1e17)),
        Just(Value::from(8.64e15)),
        Just(Value::from("-262143-01-01T00:00:00Z")),
        Just(Value::from("+262142-12-31T23:59:59.999Z")),
        Just(Value::from("9999-12-31T23:59:59Z")),
        Just(Value::from("1969-12-31T23:59:59Z")),
        Just(Value::from("")),
        Just(Value::from("\u{0}")),
        Just(Value::from("a\u{0}b")),
        Just(Value::from("{\"n\": 1}")),
        Just(Value::from("x".repeat(5000))),
        "[0-9]{1,20}".prop_map(Value::from),
        "[+-]?[0-9]{4,7}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Finite only (JSON has no NaN or infinity), so no case is rejected.
        (prop::num::f64::POSITIVE
            | prop::num::f64::NEGATIVE
            | prop::num::f64::NORMAL
            | prop::num::f64::SUBNORMAL
            | prop::num::f64::ZERO)
            .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        any::<String>().prop_map(Value::from),
        prop::sample::select(KEYS).prop_map(Value::from),
        edge_leaf(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![3 => prop::sample::select(KEYS).prop_map(str::to_owned), 1 => any::<String>()]
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every JSON pointer inside `v`, `v` itself first.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    let escape = |k: &str| k.replace('~', "~0").replace('/', "~1");
    match v {
        Value::Array(items) => items.iter().enumerate().for_each(|(i, x)| pointers(x, format!("{at}/{i}"), out)),
        Value::Object(map) => map.iter().for_each(|(k, x)| pointers(x, format!("{at}/{}", escape(k)), out)),
        _ => {}
    }
}

/// One change to a sample: a node replaced, removed, or given a new member.
#[derive(Clone, Debug)]
enum Edit {
    Replace(prop::sample::Index, Value),
    Remove(prop::sample::Index),
    Insert(prop::sample::Index, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), json()).prop_map(|(i, v)| Edit::Replace(i, v)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Remove),
        2 => (any::<prop::sample::Index>(), key(), json()).prop_map(|(i, k, v)| Edit::Insert(i, k, v)),
    ]
}

fn apply(doc: &mut Value, edit: &Edit) {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    match edit {
        Edit::Replace(i, v) => *doc.pointer_mut(i.get::<String>(&all)).unwrap() = v.clone(),
        Edit::Remove(i) => {
            let target = i.get::<String>(&all);
            let Some((parent, last)) = target.rsplit_once('/') else { return };
            let last = last.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent).unwrap() {
                Value::Object(map) => {
                    map.remove(&last);
                }
                Value::Array(items) => {
                    items.remove(last.parse::<usize>().unwrap());
                }
                _ => unreachable!("a pointer's parent is a container"),
            }
        }
        Edit::Insert(i, k, v) => match doc.pointer_mut(i.get::<String>(&all)).unwrap() {
            Value::Object(map) => {
                map.insert(k.clone(), v.clone());
            }
            Value::Array(items) => items.push(v.clone()),
            other => *other = Value::Object(Map::from_iter([(k.clone(), v.clone())])),
        },
    }
}

/// A sample with a few edits anywhere in it.
fn edited_sample() -> impl Strategy<Value = Value> {
    (prop::sample::select(FIXTURES.clone()), prop::collection::vec(edit(), 1..5)).prop_map(|(mut doc, edits)| {
        for e in &edits {
            apply(&mut doc, e);
        }
        doc
    })
}

/// A sample's bytes with a few bytes overwritten, or cut short.
fn damaged_sample_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(FIXTURES.clone()),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(doc, flips, cut)| {
            let mut bytes = serde_json::to_vec(&doc).unwrap();
            for (at, b) in flips {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

fn chrono_seconds() -> std::ops::RangeInclusive<i64> {
    DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp()
}

fn hmac_settings(algorithm: HmacAlgorithm, secret: Vec<u8>, prefix: &str, format: &str) -> HmacSettings {
    HmacSettings {
        secrets: vec![secret],
        algorithm,
        signature_header: "x-signature".into(),
        timestamp_header: "x-timestamp".into(),
        signature_prefix: prefix.into(),
        payload_format: format.into(),
        max_skew_seconds: 300,
    }
}

fn algorithm() -> impl Strategy<Value = HmacAlgorithm> {
    prop_oneof![Just(HmacAlgorithm::Sha256), Just(HmacAlgorithm::Sha512)]
}

/// Verifies with the headers `headers` (names matched case-insensitively).
fn verify(auth: &WebhookAuth, headers: &[(String, String)], body: &[u8], at: DateTime<Utc>) -> Result<(), AuthError> {
    auth.verify(|name| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()), body, at)
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(&["Authorization", "x-vapi-secret", "X-Signature", "x-timestamp", "x-other"][..])
            .prop_map(str::to_owned),
        any::<String>(),
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "(Bearer |bearer )?[ -~]{0,80}",
        "(sha256=)?[0-9a-fA-F]{0,130}",
        "[A-Za-z0-9+/=_-]{0,100}",
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{10,13}",
    ]
}

proptest! {
    #[test]
    fn prop_vapi_parser_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_outcome(parse_body(&body))?;
    }

    #[test]
    fn prop_vapi_parser_never_panics_on_damaged_samples(body in damaged_sample_bytes()) {
        check_outcome(parse_body(&body))?;
    }

    #[test]
    fn prop_vapi_parser_never_panics_on_arbitrary_json(doc in json()) {
        check_outcome(parse_body(doc.to_string().as_bytes()))?;
        check_outcome(parse_message(doc))?;
    }

    #[test]
    fn prop_vapi_parser_never_panics_on_edited_samples(doc in edited_sample()) {
        check_outcome(parse_body(doc.to_string().as_bytes()))?;
        if let Some(message) = doc.get("message") {
            check_outcome(parse_message(message.clone()))?;
        }
    }

    #[test]
    fn prop_webhook_auth_never_panics_on_arbitrary_headers_and_bodies(
        headers in prop::collection::vec((header_name(), header_value()), 0..5),
        body in prop::collection::vec(any::<u8>(), 0..256),
        shared in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 0..3),
        alg in algorithm(),
        secret in prop::collection::vec(any::<u8>(), 0..70),
        prefix in prop_oneof![Just(String::new()), Just("sha256=".to_owned()), any::<String>()],
        format in prop_oneof![Just("{timestamp}.{body}".to_owned()), Just("{body}".to_owned()), any::<String>(), "[{}a-z.]{0,30}"],
        with_hmac in any::<bool>(),
        allow_unauthenticated in any::<bool>(),
        at in chrono_seconds(),
    ) {
        let hmac = with_hmac.then(|| hmac_settings(alg, secret, &prefix, &format));
        let auth = WebhookAuth { shared_secrets: shared.clone(), hmac, allow_unauthenticated };
        let now = DateTime::from_timestamp(at, 0).unwrap();
        let outcome = verify(&auth, &headers, &body, now);
        // Without HMAC, only a configured shared secret (or the development switch) lets a
        // request in.
        if outcome.is_ok() && !with_hmac && !allow_unauthenticated {
            let presented = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim());
            let bearer = presented("authorization").and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
            let tokens: Vec<&str> = [bearer, presented("x-vapi-secret")].into_iter().flatten().map(str::trim).collect();
            prop_assert!(tokens.iter().any(|t| shared.iter().any(|s| s == t.as_bytes())), "{:?}", headers);
        }
    }

    #[test]
    fn prop_hmac_verifies_exactly_the_signed_body(
        alg in algorithm(),
        secret in prop::collection::vec(any::<u8>(), 1..70),
        body in prop::collection::vec(any::<u8>(), 1..512),
        skew in -300i64..=300,
        millis in any::<bool>(),
        prefix in prop_oneof![Just(String::new()), Just("sha256=".to_owned()), Just("v1,".to_owned())],
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let h = hmac_settings(alg, secret, &prefix, "{timestamp}.{body}");
        let auth = WebhookAuth { hmac: Some(h.clone()), ..WebhookAuth::default() };
        let signed_at = now() + chrono::Duration::seconds(skew);
        let ts = if millis { signed_at.timestamp_millis() } else { signed_at.timestamp() }.to_string();
        let headers = vec![("x-signature".to_owned(), h.sign_hex(&ts, &body)), ("x-timestamp".to_owned(), ts.clone())];
        prop_assert_eq!(verify(&auth, &headers, &body, now()), Ok(()));

        let mut changed = body.clone();
        changed[at.index(body.len())] ^= flip;
        prop_assert_eq!(verify(&auth, &headers, &changed, now()), Err(AuthError::Invalid));

        // The timestamp is signed too: the same signature under another one never verifies.
        let mut other = headers.clone();
        other[1].1 = format!("0{ts}");
        prop_assert!(verify(&auth, &other, &body, now()).is_err());
    }

    #[test]
    fn prop_shared_secrets_admit_exactly_the_configured_ones(
        secret in "[!-~]{1,40}",
        token in "[!-~]{0,40}",
        header in prop_oneof![Just("authorization"), Just("x-vapi-secret")],
    ) {
        let auth = WebhookAuth { shared_secrets: vec![secret.clone().into_bytes()], ..WebhookAuth::default() };
        let value = |t: &str| if header == "authorization" { format!("Bearer {t}") } else { t.to_owned() };
        prop_assert_eq!(verify(&auth, &[(header.to_owned(), value(&secret))], b"{}", now()), Ok(()));
        let outcome = verify(&auth, &[(header.to_owned(), value(&token))], b"{}", now());
        prop_assert_eq!(outcome.is_ok(), token == secret);
    }
}
