//! The JSON value a client message decodes to, with Python's data model.
//!
//! The validation in `request.rs` must reach exactly the verdicts of
//! `warmsocket/client_events.py`, which works on what `json.loads` returns. So this
//! tree keeps what Python keeps and `serde_json::Value` does not:
//!
//! * integers of any size (`BigInt` holds the decimal text of those outside 64 bits),
//!   and whether a number was written as an integer or as a float (`1` vs `1.0`);
//! * objects as Python dicts build them: a duplicate key keeps its first position
//!   and takes the last value;
//! * strings borrowed from the message when they hold no escapes.

use std::borrow::Cow;

/// A decoded JSON (or msgpack) value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX` that fits 64 bits.
    UInt(u64),
    /// An integer outside 64 bits, as its decimal text (Python keeps it exactly).
    BigInt(Cow<'a, str>),
    /// A finite float (non-finite numbers are rejected when decoding).
    Float(f64),
    Str(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object(Object<'a>),
}

/// A JSON object with Python dict semantics for duplicate keys.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a> {
    entries: Vec<(Cow<'a, str>, Value<'a>)>,
}

/// Objects up to this size look for duplicate keys pairwise; larger ones sort.
const PAIRWISE_DUPLICATES: usize = 12;

impl<'a> Object<'a> {
    /// An object from its entries in document order (duplicates resolved like a dict).
    pub fn from_entries(mut entries: Vec<(Cow<'a, str>, Value<'a>)>) -> Object<'a> {
        if has_duplicates(&entries) {
            entries = dedup(entries);
        }
        Object { entries }
    }

    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_ref() == key)
            .map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in dict order (first position of each key).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value<'a>)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v))
    }

    pub fn into_entries(self) -> Vec<(Cow<'a, str>, Value<'a>)> {
        self.entries
    }
}

fn has_duplicates(entries: &[(Cow<'_, str>, Value<'_>)]) -> bool {
    let n = entries.len();
    if n < 2 {
        return false;
    }
    if n <= PAIRWISE_DUPLICATES {
        return (1..n).any(|i| entries[..i].iter().any(|(k, _)| *k == entries[i].0));
    }
    let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_ref()).collect();
    keys.sort_unstable();
    keys.windows(2).any(|w| w[0] == w[1])
}

/// Keep each key at its first position with its last value (what `dict` does).
#[cold]
fn dedup<'a>(entries: Vec<(Cow<'a, str>, Value<'a>)>) -> Vec<(Cow<'a, str>, Value<'a>)> {
    let mut position: std::collections::HashMap<Cow<'a, str>, usize> =
        std::collections::HashMap::with_capacity(entries.len());
    let mut out: Vec<(Cow<'a, str>, Value<'a>)> = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        match position.get(&k) {
            Some(&i) => out[i].1 = v,
            None => {
                position.insert(k.clone(), out.len());
                out.push((k, v));
            }
        }
    }
    out
}

impl<'a> Value<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// A member of an object (`None` for other values).
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.as_object().and_then(|o| o.get(key))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Python's `isinstance(v, int) and not isinstance(v, bool)`.
    pub fn is_int(&self) -> bool {
        matches!(self, Value::Int(_) | Value::UInt(_) | Value::BigInt(_))
    }
}

/// Write `value` as compact JSON with object keys sorted at every depth: the same
/// bytes `crate::item::write_canonical` writes for the equivalent `serde_json::Value`
/// (same string escaping, same number formatting), plus integers outside 64 bits.
pub fn write_canonical(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
        Value::UInt(u) => out.extend_from_slice(itoa::Buffer::new().format(*u).as_bytes()),
        Value::BigInt(text) => out.extend_from_slice(text.as_bytes()),
        Value::Float(f) => write_f64(*f, out),
        Value::Str(s) => write_str(s, out),
        Value::Array(values) => {
            out.push(b'[');
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        Value::Object(object) => {
            let mut entries: Vec<&(Cow<'_, str>, Value<'_>)> = object.entries.iter().collect();
            if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
                entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            }
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
    }
}

/// A JSON string as serde_json writes it (only `"`, `\` and control characters escaped).
#[inline]
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    super::scan::write_escaped(s, out);
}

/// A finite float as serde_json writes it (the shortest text that round-trips).
pub fn write_f64(f: f64, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, &f);
}

/// Items are built from this tree directly (`crate::item::Item::from_value`).
///
/// The caller has rejected what the item conversion of Python objects rejects
/// (integers outside 64 bits); a `BigInt` that slipped through is written as its text.
impl<'a> crate::item::JsonValue for Value<'a> {
    type Object = Object<'a>;
    fn as_str(&self) -> Option<&str> {
        Value::as_str(self)
    }
    fn as_array(&self) -> Option<&[Value<'a>]> {
        match self {
            Value::Array(values) => Some(values),
            _ => None,
        }
    }
    fn as_object(&self) -> Option<&Object<'a>> {
        Value::as_object(self)
    }
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }
    fn kind_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::UInt(_) | Value::BigInt(_) | Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
    fn write_canonical(&self, out: &mut Vec<u8>) {
        write_canonical(self, out);
    }
}

impl<'a> crate::item::JsonObject<Value<'a>> for Object<'a> {
    fn get(&self, key: &str) -> Option<&Value<'a>> {
        Object::get(self, key)
    }
    fn entries<'s>(&'s self) -> impl Iterator<Item = (&'s str, &'s Value<'a>)>
    where
        Value<'a>: 's,
    {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value<'_> {
        Value::Str(Cow::Borrowed(text))
    }

    #[test]
    fn duplicate_keys_keep_first_position_and_last_value() {
        let object = Object::from_entries(vec![
            (Cow::Borrowed("a"), s("1")),
            (Cow::Borrowed("b"), s("2")),
            (Cow::Borrowed("a"), s("3")),
        ]);
        let keys: Vec<&str> = object.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(object.get("a"), Some(&s("3")));
    }

    #[test]
    fn duplicate_keys_in_large_objects() {
        let mut entries: Vec<(Cow<'_, str>, Value<'_>)> = (0..100)
            .map(|i| (Cow::Owned(format!("k{i}")), Value::Int(i)))
            .collect();
        entries.push((Cow::Borrowed("k7"), Value::Int(-1)));
        let object = Object::from_entries(entries);
        assert_eq!(object.len(), 100);
        assert_eq!(object.get("k7"), Some(&Value::Int(-1)));
        assert_eq!(object.iter().nth(7).map(|(k, _)| k), Some("k7"));
    }

    #[test]
    fn canonical_matches_the_item_canonical_form() {
        let text = r#"{"b":[1,2.5,-0.0,1e100,"x\n\u0001é"],"a":{"z":null,"y":true},"c":18446744073709551615}"#;
        let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut expected = Vec::new();
        crate::item::write_canonical(&parsed, &mut expected);
        let value = crate::framing::json::parse(text).unwrap();
        let mut ours = Vec::new();
        write_canonical(&value, &mut ours);
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn items_from_this_tree_match_items_from_serde_values() {
        use crate::item::Item;
        for text in crate::item::tests::DIGEST_CORPUS {
            let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
            let expected = Item::from_value(3, &parsed, 1 << 20).unwrap();
            let value = crate::framing::json::parse(text).unwrap();
            let ours = Item::from_value(3, &value, 1 << 20).unwrap();
            assert_eq!(ours.json(), expected.json(), "{text}");
            assert_eq!(ours.digest(), expected.digest(), "{text}");
            assert_eq!(
                (ours.kind(), ours.id(), ours.role()),
                (expected.kind(), expected.id(), expected.role()),
                "{text}"
            );
            assert_eq!(
                (ours.call_id(), ours.name()),
                (expected.call_id(), expected.name()),
                "{text}"
            );
        }
        for (text, found) in [("[1]", "array"), ("1.5", "number"), ("\"x\"", "string")] {
            let value = crate::framing::json::parse(text).unwrap();
            let err = Item::from_value(2, &value, 1 << 20).unwrap_err();
            assert_eq!(err, crate::error::Error::ItemNotObject { index: 2, found });
        }
        let value = crate::framing::json::parse(r#"{"a":"1234567890"}"#).unwrap();
        assert!(matches!(
            Item::from_value(0, &value, 15),
            Err(crate::error::Error::ItemTooLarge { size: 18, .. })
        ));
    }

    #[test]
    fn big_integers_are_kept_exactly() {
        let value = crate::framing::json::parse("[123456789012345678901234567890,-0]").unwrap();
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        assert_eq!(out, b"[123456789012345678901234567890,0]");
    }
}
