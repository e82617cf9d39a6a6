//! Text from outside made fit for PostgreSQL.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold the NUL character (U+0000), which JSON can
//! carry as `\u0000`. Left in, one such character makes every write of the event fail, the
//! dead letter with it. So NUL is replaced by U+FFFD (the replacement character, what Unicode
//! prescribes for a character that cannot be represented) before text meets the database;
//! the exact bytes received are kept separately where replay needs them.

use serde_json::{Map, Value};
use std::borrow::Cow;

/// The longest id (call, phone number, assistant, tool call) accepted from outside, in
/// characters. VAPI's ids are UUIDs; anything near this is not an id.
pub const MAX_ID_CHARS: usize = 256;

/// What NUL becomes.
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

/// `s` with every NUL replaced; borrowed when there is none (the common case).
pub fn storable(s: &str) -> Cow<'_, str> {
    if s.contains('\0') { Cow::Owned(s.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(s) }
}

/// Whether any string or key in `v` holds a NUL.
pub fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Replaces NUL in every string and key of `v`, in place. Returns whether anything changed.
pub fn make_storable(v: &mut Value) -> bool {
    if !has_nul(v) {
        return false;
    }
    match v {
        Value::String(s) => *s = s.replace('\0', "\u{FFFD}"),
        Value::Array(items) => {
            for item in items {
                make_storable(item);
            }
        }
        Value::Object(map) => {
            let old = std::mem::take(map);
            let mut clean = Map::with_capacity(old.len());
            for (key, mut value) in old {
                make_storable(&mut value);
                clean.insert(storable(&key).into_owned(), value);
            }
            *map = clean;
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    true
}

/// `v` ready for a `jsonb` column: borrowed unless it held a NUL.
pub fn storable_json(v: &Value) -> Cow<'_, Value> {
    if has_nul(v) {
        let mut owned = v.clone();
        make_storable(&mut owned);
        Cow::Owned(owned)
    } else {
        Cow::Borrowed(v)
    }
}

/// At most `max` characters of `s` (never splitting a character).
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_is_replaced_in_strings_and_keys_at_any_depth_and_nothing_else_changes() {
        let mut v = json!({"a\u{0}b": ["x\u{0}", {"k": "\u{0}\u{0}"}], "n": 1.5, "ok": "fine"});
        assert!(make_storable(&mut v));
        assert_eq!(v, json!({"a\u{FFFD}b": ["x\u{FFFD}", {"k": "\u{FFFD}\u{FFFD}"}], "n": 1.5, "ok": "fine"}));
        assert!(!has_nul(&v));
        let mut clean = json!({"a": ["b"]});
        assert!(!make_storable(&mut clean));
        assert!(matches!(storable("plain"), Cow::Borrowed(_)));
        assert_eq!(storable("a\0"), "a\u{FFFD}");
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("ab", 5), "ab");
    }
}
