//! The VAPI parser on the real-world variations SPEC.md §13-14 lists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use callplane_core::vapi::{MessageKind, ParseError, parse_body};
use chrono::{TimeZone, Utc};
use serde_json::json;

fn parse(v: serde_json::Value) -> Result<callplane_core::vapi::ServerMessage, ParseError> {
    parse_body(v.to_string().as_bytes())
}

#[test]
fn timestamps_parse_from_epoch_millis_fractional_millis_and_iso_strings() {
    let expected = Utc.with_ymd_and_hms(2024, 7, 26, 22, 20, 57).unwrap() + chrono::Duration::milliseconds(931);
    for ts in
        [json!(1722032457931_i64), json!(1722032457931.4), json!("2024-07-26T22:20:57.931Z"), json!("1722032457931")]
    {
        let m = parse(json!({"message": {"type": "hang", "timestamp": ts}})).unwrap();
        assert_eq!(m.timestamp, Some(expected), "{ts}");
    }
    let err = parse(json!({"message": {"type": "hang", "timestamp": "soon"}})).unwrap_err();
    assert_eq!(err.code().as_str(), "invalid_timestamp");
}

#[test]
fn tool_arguments_are_read_as_objects_or_json_strings_in_every_shape() {
    let m = parse(json!({"message": {"type": "tool-calls", "toolCallList": [
        {"id": "a", "function": {"name": "lookup", "arguments": {"n": 1}}},
        {"id": "b", "function": {"name": "lookup", "arguments": "{\"n\": 2}"}},
        {"id": "c", "name": "flat", "parameters": {"n": 3}},
        {"id": "d", "function": {"name": "bad", "arguments": "not json"}}
    ]}}))
    .unwrap();
    let args: Vec<_> =
        m.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.get("n").cloned())).collect();
    assert_eq!(
        args,
        vec![
            ("a", "lookup", Some(json!(1))),
            ("b", "lookup", Some(json!(2))),
            ("c", "flat", Some(json!(3))),
            ("d", "bad", None)
        ]
    );

    // Only `toolWithToolCallList` present.
    let m = parse(json!({"message": {"type": "tool-calls", "toolWithToolCallList": [
        {"function": {"name": "slot"}, "toolCall": {"id": "x", "parameters": {"kind": "repair"}}}
    ]}}))
    .unwrap();
    assert_eq!(m.tool_calls[0].name, "slot");
    assert_eq!(m.tool_calls[0].arguments["kind"], "repair");
}

#[test]
fn nulls_extra_keys_and_the_final_transcript_literal_are_accepted() {
    let m = parse(json!({"message": {
        "type": "transcript[transcriptType=\"final\"]", "role": "user", "transcript": "hi",
        "call": {"id": "c1", "assistantId": null, "squadId": null, "createdAt": "2026-03-10T17:02:11.482Z", "brandNew": {"x": 1}},
        "phoneNumber": {"id": null, "assistantId": null}, "somethingNew": [1, 2]
    }}))
    .unwrap();
    assert_eq!(m.kind, MessageKind::Transcript);
    assert_eq!(m.call_id.as_deref(), Some("c1"));
    assert_eq!(m.assistant_id, None);
}

#[test]
fn unknown_types_parse_as_unknown_and_envelope_errors_have_codes() {
    assert_eq!(parse(json!({"message": {"type": "call.artifact.upload"}})).unwrap().kind, MessageKind::Unknown);
    assert_eq!(parse_body(b"{").unwrap_err().code().as_str(), "malformed_json");
    assert_eq!(parse(json!({"type": "hang"})).unwrap_err().code().as_str(), "missing_message");
    assert_eq!(parse(json!({"message": {"type": 5}})).unwrap_err().code().as_str(), "missing_type");
    assert_eq!(parse(json!({"message": {"type": ""}})).unwrap_err().code().as_str(), "missing_type");
}

#[test]
fn end_of_call_reports_prefer_the_message_over_the_stale_call_and_fall_back_to_legacy_fields() {
    let m = parse(json!({"message": {
        "type": "end-of-call-report", "endedReason": "customer-ended-call",
        "startedAt": "2026-03-10T17:02:13.000Z", "endedAt": "2026-03-10T17:03:13.500Z",
        "summary": "legacy summary", "transcript": "legacy transcript",
        "artifact": {"messages": []}, "messages": [{"role": "bot", "message": "hello"}],
        "call": {"id": "c1", "status": "ringing"}
    }}))
    .unwrap();
    let r = m.report.unwrap();
    assert_eq!(m.status.as_deref(), Some("ended"));
    assert_eq!(r.duration_seconds, Some(60.5));
    assert_eq!(r.summary.as_deref(), Some("legacy summary"));
    assert_eq!(r.transcript.as_deref(), Some("legacy transcript"));
    assert_eq!(r.messages.unwrap().len(), 1, "an empty artifact list does not hide the legacy messages");
}
