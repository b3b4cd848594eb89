//! Conversation items: validated, kept as canonical JSON bytes, with the few fields
//! the server needs extracted once.
//!
//! Canonical form: compact JSON, object keys sorted (at every depth), strings
//! re-escaped minimally by serde_json (only `"`, `\` and control characters), numbers
//! as serde_json prints them (integers that fit 64 bits exactly; other numbers as
//! the shortest `f64` that round-trips). Keys are sorted by this module itself, so
//! the form does not depend on serde_json's `preserve_order` feature being off.
//!
//! An [`Items`] batch is an `Arc`'d slice of `Arc<Item>`: cloning a batch, or
//! concatenating two, shares the items instead of copying their bytes.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};

/// Deepest nesting accepted from Python objects (serde_json applies the same limit
/// when parsing text).
pub const MAX_DEPTH: usize = 128;

/// `type` values common enough to share one static string instead of allocating.
const KNOWN_TYPES: &[&str] = &[
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "item_reference",
    "web_search_call",
    "file_search_call",
    "computer_call",
    "computer_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "compaction",
];
const KNOWN_ROLES: &[&str] = &["user", "assistant", "system", "developer"];

fn interned(value: &str, known: &'static [&'static str]) -> Cow<'static, str> {
    match known.iter().find(|k| **k == value) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(value.to_owned()),
    }
}

/// One item: canonical JSON bytes plus fields extracted from it.
#[derive(Debug)]
pub struct Item {
    json: Box<[u8]>,
    kind: Cow<'static, str>,
    id: Option<Box<str>>,
    role: Option<Cow<'static, str>>,
    call_id: Option<Box<str>>,
    name: Option<Box<str>>,
    /// Tokens of this item; 0 until a tokenizer is attached.
    pub tokens: u32,
    /// Digest of the item, used to compare items cheaply. For now xxh3 of the
    /// canonical bytes; the diffing work may replace it with a semantic digest.
    pub digest: u64,
}

impl Item {
    /// Validate one JSON value as an item (`index` is its position, for messages).
    pub fn from_value(index: usize, value: &Value, max_item_bytes: usize) -> Result<Item> {
        let Value::Object(map) = value else {
            return Err(Error::ItemNotObject {
                index,
                found: json_kind(value),
            });
        };
        let mut json = Vec::with_capacity(64);
        write_canonical(value, &mut json);
        if json.len() > max_item_bytes {
            return Err(Error::ItemTooLarge {
                index,
                size: json.len(),
                limit: max_item_bytes,
            });
        }
        let text = |key: &str| map.get(key).and_then(Value::as_str);
        let role = text("role").map(|r| interned(r, KNOWN_ROLES));
        let kind = match text("type") {
            Some(t) => interned(t, KNOWN_TYPES),
            None if role.is_some() => Cow::Borrowed("message"),
            None => Cow::Borrowed(""),
        };
        let digest = xxhash_rust::xxh3::xxh3_64(&json);
        Ok(Item {
            json: json.into_boxed_slice(),
            kind,
            id: text("id").map(Into::into),
            role,
            call_id: text("call_id").map(Into::into),
            name: text("name").map(Into::into),
            tokens: 0,
            digest,
        })
    }

    /// The canonical JSON bytes.
    pub fn json(&self) -> &[u8] {
        &self.json
    }
    pub fn nbytes(&self) -> usize {
        self.json.len()
    }
    /// `type`; `"message"` when absent but `role` is present; empty when neither is.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    pub fn role(&self) -> Option<&str> {
        self.role.as_deref()
    }
    pub fn call_id(&self) -> Option<&str> {
        self.call_id.as_deref()
    }
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// Whether this is a `message` item with the given role.
    pub fn is_message_from(&self, role: &str) -> bool {
        self.kind == "message" && self.role.as_deref() == Some(role)
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Compact JSON with object keys sorted, whatever order the map keeps them in.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
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
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k.as_str());
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        leaf => write_leaf(leaf, out),
    }
}

fn write_leaf(leaf: &Value, out: &mut Vec<u8>) {
    // Writing a string, number, bool or null into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, leaf);
}

/// An immutable batch of items. Clones share the batch; `concat` shares the items.
#[derive(Clone, Debug)]
pub struct Items(Arc<Batch>);

#[derive(Debug)]
struct Batch {
    items: Box<[Arc<Item>]>,
    nbytes: u64,
    tokens: u64,
}

impl Default for Items {
    fn default() -> Self {
        Items::from_vec(Vec::new())
    }
}

impl Items {
    pub fn from_vec(items: Vec<Arc<Item>>) -> Items {
        let nbytes = items.iter().map(|i| i.nbytes() as u64).sum();
        let tokens = items.iter().map(|i| u64::from(i.tokens)).sum();
        Items(Arc::new(Batch {
            items: items.into_boxed_slice(),
            nbytes,
            tokens,
        }))
    }

    /// Validate a JSON array of objects (UTF-8 bytes).
    pub fn parse(data: &[u8], max_item_bytes: usize) -> Result<Items> {
        let value: Value = serde_json::from_slice(data).map_err(|e| Error::ItemNotJson {
            index: None,
            detail: e.to_string(),
        })?;
        match value {
            Value::Array(values) => Items::from_values(&values, max_item_bytes),
            other => Err(Error::ItemNotJson {
                index: None,
                detail: format!("expected an array, found a {}", json_kind(&other)),
            }),
        }
    }

    /// Validate already-decoded values (one per item).
    pub fn from_values(values: &[Value], max_item_bytes: usize) -> Result<Items> {
        let items = values
            .iter()
            .enumerate()
            .map(|(i, v)| Item::from_value(i, v, max_item_bytes).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Items::from_vec(items))
    }

    pub fn len(&self) -> usize {
        self.0.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.items.is_empty()
    }
    /// Total canonical bytes of the items (without brackets and commas).
    pub fn nbytes(&self) -> u64 {
        self.0.nbytes
    }
    pub fn tokens(&self) -> u64 {
        self.0.tokens
    }
    pub fn as_slice(&self) -> &[Arc<Item>] {
        &self.0.items
    }
    pub fn get(&self, index: usize) -> Option<&Arc<Item>> {
        self.0.items.get(index)
    }
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<Item>> {
        self.0.items.iter()
    }

    /// This batch followed by `other`; the items are shared, not copied.
    pub fn concat(&self, other: &Items) -> Items {
        if other.is_empty() {
            return self.clone();
        }
        if self.is_empty() {
            return other.clone();
        }
        let mut items = Vec::with_capacity(self.len() + other.len());
        items.extend(self.iter().cloned());
        items.extend(other.iter().cloned());
        Items::from_vec(items)
    }

    /// Whether two handles share one batch.
    pub fn ptr_eq(&self, other: &Items) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Reject a batch built with a larger item limit than the caller's.
    pub fn check_item_limit(&self, max_item_bytes: usize) -> Result<()> {
        match self.iter().position(|i| i.nbytes() > max_item_bytes) {
            None => Ok(()),
            Some(index) => Err(Error::ItemTooLarge {
                index,
                size: self.0.items[index].nbytes(),
                limit: max_item_bytes,
            }),
        }
    }

    /// The batch as one JSON array.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(array_len(self.len() as u64, self.nbytes()) as usize);
        write_array(self.iter().map(|i| i.json()), |chunk| {
            out.extend_from_slice(chunk)
        });
        out
    }
}

/// Bytes of a JSON array holding `count` items of `item_bytes` total.
pub fn array_len(count: u64, item_bytes: u64) -> u64 {
    2 + item_bytes + count.saturating_sub(1)
}

/// Emit `[a,b,...]` as chunks: the brackets, the commas and each item's bytes.
pub fn write_array<'a>(items: impl Iterator<Item = &'a [u8]>, mut sink: impl FnMut(&[u8])) {
    sink(b"[");
    for (i, json) in items.enumerate() {
        if i > 0 {
            sink(b",");
        }
        sink(json);
    }
    sink(b"]");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Items> {
        Items::parse(s.as_bytes(), 1 << 20)
    }

    #[test]
    fn canonical_form_sorts_keys_and_is_compact() {
        let items = parse(r#"[ {"b": 1, "a": {"z": [1, 2.5, "x"], "y": null}} ]"#).unwrap();
        assert_eq!(
            items.get(0).unwrap().json(),
            br#"{"a":{"y":null,"z":[1,2.5,"x"]},"b":1}"#
        );
        assert_eq!(items.nbytes(), 38);
        assert_eq!(
            items.to_json(),
            br#"[{"a":{"y":null,"z":[1,2.5,"x"]},"b":1}]"#
        );
    }

    #[test]
    fn strings_are_re_escaped_minimally() {
        let items = parse(r#"[{"t": "\u00e9\u0041\n\"\u001f\/"}]"#).unwrap();
        assert_eq!(
            items.get(0).unwrap().json(),
            "{\"t\":\"éA\\n\\\"\\u001f/\"}".as_bytes()
        );
    }

    #[test]
    fn meta_is_extracted() {
        let items = parse(
            r#"[{"role":"user","content":"hi"},
                {"type":"function_call","call_id":"c1","name":"f","id":"fc_1","arguments":"{}"},
                {"type":"custom_thing","role":42},
                {"content":"no type, no role"}]"#,
        )
        .unwrap();
        let m = items.get(0).unwrap();
        assert_eq!(
            (m.kind(), m.role(), m.id()),
            ("message", Some("user"), None)
        );
        assert!(m.is_message_from("user"));
        let f = items.get(1).unwrap();
        assert_eq!(f.kind(), "function_call");
        assert_eq!(
            (f.call_id(), f.name(), f.id()),
            (Some("c1"), Some("f"), Some("fc_1"))
        );
        assert!(!f.is_message_from("user"));
        let c = items.get(2).unwrap();
        assert_eq!((c.kind(), c.role()), ("custom_thing", None));
        assert_eq!(items.get(3).unwrap().kind(), "");
        assert_eq!(m.digest, xxhash_rust::xxh3::xxh3_64(m.json()));
        assert_eq!(m.tokens, 0);
    }

    #[test]
    fn not_json_or_not_array() {
        for bad in ["", "[", "{\"a\":1}", "1", "[{\"a\":1},]", "nul"] {
            let err = parse(bad).unwrap_err();
            assert!(
                matches!(err, Error::ItemNotJson { index: None, .. }),
                "{bad:?}: {err:?}"
            );
        }
        let err = Items::parse(b"[\xff]", 100).unwrap_err();
        assert!(matches!(err, Error::ItemNotJson { .. }));
    }

    #[test]
    fn element_not_object_names_index_and_kind() {
        let err = parse(r#"[{"a":1}, "secret text"]"#).unwrap_err();
        assert_eq!(
            err,
            Error::ItemNotObject {
                index: 1,
                found: "string"
            }
        );
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn too_large_uses_the_canonical_size() {
        // 15 bytes canonical, 26 as sent.
        let sent = r#"[ {  "a" :  "1234567"  } ]"#;
        assert!(Items::parse(sent.as_bytes(), 15).is_ok());
        let err = Items::parse(br#"[{"a":"1"},{"a":"1234567890"}]"#, 15).unwrap_err();
        assert_eq!(
            err,
            Error::ItemTooLarge {
                index: 1,
                size: 18,
                limit: 15
            }
        );
    }

    #[test]
    fn concat_shares_items() {
        let a = parse(r#"[{"a":1}]"#).unwrap();
        let b = parse(r#"[{"b":2},{"c":3}]"#).unwrap();
        let c = a.concat(&b);
        assert_eq!(c.len(), 3);
        assert!(Arc::ptr_eq(c.get(0).unwrap(), a.get(0).unwrap()));
        assert!(Arc::ptr_eq(c.get(2).unwrap(), b.get(1).unwrap()));
        assert_eq!(c.nbytes(), a.nbytes() + b.nbytes());
        assert!(a.concat(&Items::default()).ptr_eq(&a));
        assert_eq!(c.to_json(), br#"[{"a":1},{"b":2},{"c":3}]"#);
        assert_eq!(Items::default().to_json(), b"[]");
    }

    #[test]
    fn item_limit_check() {
        let a = parse(r#"[{"a":1},{"a":"long value"}]"#).unwrap();
        assert!(a.check_item_limit(100).is_ok());
        assert!(matches!(
            a.check_item_limit(10),
            Err(Error::ItemTooLarge { index: 1, .. })
        ));
    }

    #[test]
    fn array_len_matches_to_json() {
        for s in ["[]", r#"[{"a":1}]"#, r#"[{"a":1},{"b":[]},{}]"#] {
            let items = parse(s).unwrap();
            assert_eq!(
                array_len(items.len() as u64, items.nbytes()),
                items.to_json().len() as u64
            );
        }
    }
}
