//! Conversation items: validated, kept as canonical JSON bytes, with the few fields
//! the server needs extracted once.
//!
//! Canonical form: compact JSON, object keys sorted (at every depth), strings
//! re-escaped minimally by serde_json (only `"`, `\` and control characters), numbers
//! as serde_json prints them (integers that fit 64 bits exactly; other numbers as
//! the shortest `f64` that round-trips). Keys are sorted by this module itself, so
//! the form does not depend on serde_json's `preserve_order` feature being off.
//!
//! An [`Items`] handle is a range of an `Arc`'d batch of `Arc<Item>`: cloning a
//! handle, slicing it, or concatenating two shares the items instead of copying
//! their bytes. A batch built by a tokenising cache also holds each item's token
//! count and the token ids (see [`Items::tokenize`]).
//!
//! Each item also gets a *semantic digest* ([`semantic_digest`]): XXH3-128 of the
//! canonical JSON of the item with the differences that do not change its meaning
//! normalised away (ids, status, an easy message's missing `type`, a lone text
//! part vs plain string content, empty annotations/logprobs, null members). The
//! session cache matches re-sent histories by it; docs/architecture.md states the
//! rules.

use std::sync::Arc;

use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_128;

use crate::error::{Error, Result};
use crate::token::{TokenError, Tokenizer};

/// serde_json's default recursion limit: parsing text fails at the 128th nested
/// array or object (127 parse). `tests::serde_json_nesting_limit` pins it.
const SERDE_JSON_NESTING: usize = 128;

/// Deepest nesting accepted in an item: the item object is level 1, each array or
/// object adds one, so an item of `MAX_DEPTH` levels holds at most `MAX_DEPTH`
/// nested arrays and objects.
///
/// Every stored item's canonical JSON is parsed again by serde_json, whose limit is
/// `SERDE_JSON_NESTING`: alone (snapshot restore, `to_objects`), inside an array
/// (`Items.parse(items.json())`, how the shared store reloads items), and by peers
/// inside event and request bodies (`{"input": [item]}`, `{"response": {"output":
/// [item]}}`). So the limit stays `WRAPPING_MARGIN` levels below serde_json's:
/// anything accepted here survives every such re-parse. [`Item::from_value`]
/// enforces it for every way in (request parser, Python objects, `Items.parse`,
/// snapshots), so no stored item is deeper.
pub const MAX_DEPTH: usize = 100;

/// Levels of wrapping (arrays, objects) an accepted item can be re-parsed inside.
const WRAPPING_MARGIN: usize = 27;
const _: () = assert!(MAX_DEPTH + WRAPPING_MARGIN < SERDE_JSON_NESTING);

/// The detail of the error for an item deeper than [`MAX_DEPTH`] (no content).
pub fn too_deep() -> String {
    format!("nested deeper than {MAX_DEPTH} levels")
}

/// The detail of a serde_json error on items' text: [`too_deep`] when the text nests
/// deeper than serde_json reads (so every entry states the one depth rule), else
/// serde_json's own message (which never holds content).
pub fn json_error_detail(e: &serde_json::Error) -> String {
    match e.to_string() {
        m if m.starts_with("recursion limit exceeded") => too_deep(),
        m => m,
    }
}

/// Whether `value`, at level `depth`, nests deeper than [`MAX_DEPTH`] levels. The
/// recursion stops at `MAX_DEPTH + 1` levels, so it is bounded whatever the input.
fn too_deep_at<V: JsonValue>(value: &V, depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return true;
    }
    if let Some(values) = value.as_array() {
        return values.iter().any(|v| too_deep_at(v, depth + 1));
    }
    if let Some(object) = value.as_object() {
        return object.entries().any(|(_, v)| too_deep_at(v, depth + 1));
    }
    false
}

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

/// `type` and `role` codes: an index into `KNOWN_TYPES` / `KNOWN_ROLES`, or one of
/// these.
const CODE_OWNED: u8 = u8::MAX; // not a known value: kept in `Item::text`
const CODE_NONE: u8 = u8::MAX - 1; // absent (`type`: the empty string)
/// The code of `"message"`.
const MESSAGE: u8 = 0;
const _: () =
    assert!(KNOWN_TYPES.len() < CODE_NONE as usize && KNOWN_ROLES.len() < CODE_NONE as usize);

/// The code of a known value, if it is one.
fn known_code(value: &str, known: &[&str]) -> Option<u8> {
    known
        .iter()
        .position(|k| *k == value)
        .and_then(|i| u8::try_from(i).ok())
}

/// Fields of [`Item::text`], in order.
const ID: usize = 0;
const CALL_ID: usize = 1;
const NAME: usize = 2;
const KIND: usize = 3;
const ROLE: usize = 4;
const FIELDS: usize = 5;

thread_local! {
    /// `Item::from_value`'s working buffer (canonical then normalised form).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Above this capacity the working buffer is dropped after use.
const SCRATCH_KEEP: usize = 1 << 20;

/// One item: canonical JSON bytes plus fields extracted from it.
///
/// Laid out for size, since a cache holds one per cached item: the extracted
/// strings share one allocation (`text`), and `type` and `role` are codes of the
/// common values (the struct is 72 bytes; it was 128 with a `Box<str>` or `Cow`
/// per field).
#[derive(Debug)]
pub struct Item {
    json: Box<[u8]>,
    /// The present fields among `id`, `call_id`, `name`, and `type` and `role`
    /// when not known values, back to back (an absent field is empty here).
    text: Box<str>,
    /// Where each field ends in `text` (it starts where the previous one ends).
    ends: [u32; FIELDS],
    /// Bit `1 << field` set when the field is present.
    present: u8,
    /// `type` / `role`: index into `KNOWN_TYPES` / `KNOWN_ROLES`, `CODE_OWNED` or
    /// `CODE_NONE`.
    kind: u8,
    role: u8,
    /// The semantic digest ([`semantic_digest`]), as two words so the struct keeps
    /// 8-byte alignment (a `u128` field would pad it to 16).
    digest: [u64; 2],
}

impl Item {
    /// Validate one JSON value as an item (`index` is its position, for messages):
    /// an object, nested at most [`MAX_DEPTH`] levels, canonically at most
    /// `max_item_bytes`.
    ///
    /// One pass writes the canonical bytes and records where the top-level members
    /// (and the parts of the content) landed; the normalised form the semantic
    /// digest hashes is then assembled from those bytes, so no string is escaped
    /// twice.
    pub fn from_value<V: JsonValue>(
        index: usize,
        value: &V,
        max_item_bytes: usize,
    ) -> Result<Item> {
        let Some(map) = value.as_object() else {
            return Err(Error::ItemNotObject {
                index,
                found: value.kind_name(),
            });
        };
        if too_deep_at(value, 1) {
            return Err(Error::ItemNotJson {
                index: Some(index),
                detail: too_deep(),
            });
        }
        // Both forms are written into a buffer kept by the thread, so growing it
        // costs nothing after the first items; the item then takes one allocation
        // of the canonical form's exact size.
        let (canonical, digest) = SCRATCH.with_borrow_mut(|buffer| {
            buffer.clear();
            let layout = Layout::<V>::write(map, buffer);
            let canonical_len = buffer.len();
            if canonical_len > max_item_bytes {
                return Err(Error::ItemTooLarge {
                    index,
                    size: canonical_len,
                    limit: max_item_bytes,
                });
            }
            layout.write_semantic(buffer);
            let digest = xxh3_128(&buffer[canonical_len..]);
            let canonical: Box<[u8]> = buffer[..canonical_len].into();
            if buffer.capacity() > SCRATCH_KEEP {
                *buffer = Vec::new(); // one huge item does not pin its size for good
            }
            Ok((canonical, digest))
        })?;
        let field = |key: &str| map.get(key).and_then(V::as_str);
        let mut fields: [Option<&str>; FIELDS] = [None; FIELDS];
        fields[ID] = field("id");
        fields[CALL_ID] = field("call_id");
        fields[NAME] = field("name");
        let role_text = field("role");
        let role = match role_text {
            None => CODE_NONE,
            Some(r) => known_code(r, KNOWN_ROLES).unwrap_or_else(|| {
                fields[ROLE] = Some(r);
                CODE_OWNED
            }),
        };
        let kind = match field("type") {
            Some(t) => known_code(t, KNOWN_TYPES).unwrap_or_else(|| {
                fields[KIND] = Some(t);
                CODE_OWNED
            }),
            None if role_text.is_some() => MESSAGE,
            None => CODE_NONE,
        };
        let mut text = String::with_capacity(fields.iter().flatten().map(|f| f.len()).sum());
        let mut ends = [0u32; FIELDS];
        let mut present = 0u8;
        for (i, f) in fields.iter().enumerate() {
            if let Some(f) = f {
                text.push_str(f);
                present |= 1 << i;
            }
            // The strings are parts of the item, so this fits unless the item
            // itself is over 4 GiB.
            ends[i] = u32::try_from(text.len()).map_err(|_| Error::ItemTooLarge {
                index,
                size: canonical.len(),
                limit: u32::MAX as usize,
            })?;
        }
        Ok(Item {
            json: canonical,
            text: text.into_boxed_str(),
            ends,
            present,
            kind,
            role,
            digest: split(digest),
        })
    }

    /// Field `i` of `text`, when present.
    fn field(&self, i: usize) -> Option<&str> {
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize)
    }

    /// The semantic digest ([`semantic_digest`]).
    pub fn digest(&self) -> u128 {
        (u128::from(self.digest[0]) << 64) | u128::from(self.digest[1])
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
        match self.kind {
            CODE_OWNED => self.field(KIND).unwrap_or(""),
            code => KNOWN_TYPES.get(usize::from(code)).copied().unwrap_or(""),
        }
    }
    pub fn id(&self) -> Option<&str> {
        self.field(ID)
    }
    pub fn role(&self) -> Option<&str> {
        match self.role {
            CODE_OWNED => self.field(ROLE),
            code => KNOWN_ROLES.get(usize::from(code)).copied(),
        }
    }
    pub fn call_id(&self) -> Option<&str> {
        self.field(CALL_ID)
    }
    pub fn name(&self) -> Option<&str> {
        self.field(NAME)
    }
    /// Whether this is a `message` item with the given role.
    pub fn is_message_from(&self, role: &str) -> bool {
        self.kind() == "message" && self.role() == Some(role)
    }
}

fn split(digest: u128) -> [u64; 2] {
    [(digest >> 64) as u64, digest as u64]
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

/// What building an item needs of a decoded JSON value. `serde_json::Value` and the
/// request parser's value (`crate::framing::value::Value`) implement it, so items
/// are built from either without converting one into the other.
pub trait JsonValue: Sized {
    type Object: JsonObject<Self>;
    fn as_str(&self) -> Option<&str>;
    fn as_array(&self) -> Option<&[Self]>;
    fn as_object(&self) -> Option<&Self::Object>;
    fn is_null(&self) -> bool;
    /// The JSON kind, for error messages (`"string"`, `"number"`, ...).
    fn kind_name(&self) -> &'static str;
    /// Append the canonical JSON (see the module documentation).
    fn write_canonical(&self, out: &mut Vec<u8>);
}

/// An object of a [`JsonValue`]: keys are unique.
pub trait JsonObject<V> {
    fn get(&self, key: &str) -> Option<&V>;
    fn entries<'s>(&'s self) -> impl Iterator<Item = (&'s str, &'s V)>
    where
        V: 's;
}

impl JsonValue for Value {
    type Object = Map<String, Value>;
    fn as_str(&self) -> Option<&str> {
        Value::as_str(self)
    }
    fn as_array(&self) -> Option<&[Value]> {
        Value::as_array(self).map(Vec::as_slice)
    }
    fn as_object(&self) -> Option<&Map<String, Value>> {
        Value::as_object(self)
    }
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }
    fn kind_name(&self) -> &'static str {
        json_kind(self)
    }
    fn write_canonical(&self, out: &mut Vec<u8>) {
        write_canonical(self, out);
    }
}

impl JsonObject<Value> for Map<String, Value> {
    fn get(&self, key: &str) -> Option<&Value> {
        Map::get(self, key)
    }
    fn entries<'s>(&'s self) -> impl Iterator<Item = (&'s str, &'s Value)>
    where
        Value: 's,
    {
        self.iter().map(|(k, v)| (k.as_str(), v))
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
                write_str(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        leaf => write_leaf(leaf, out),
    }
}

fn write_leaf(leaf: &Value, out: &mut Vec<u8>) {
    match leaf {
        Value::String(text) => write_str(text, out),
        // Writing a number, bool or null into a Vec cannot fail.
        _ => {
            let _ = serde_json::to_writer(&mut *out, leaf);
        }
    }
}

fn write_str(text: &str, out: &mut Vec<u8>) {
    crate::framing::scan::write_escaped(text, out);
}

/// An object's entries sorted by key (keys are unique, so the order is total).
fn sorted_entries<V: JsonValue>(map: &V::Object) -> Vec<(&str, &V)> {
    let mut entries: Vec<(&str, &V)> = map.entries().collect();
    if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    entries
}

// ---------------------------------------------------------------- semantic digest

/// Top-level members that never change what an item means to a model: the item's
/// id and its status (clients drop or add both when they replay output items).
const IGNORED_MEMBERS: [&str; 2] = ["id", "status"];
/// Content-part types whose lone text is the same content as a plain string.
const TEXT_PARTS: [&str; 2] = ["input_text", "output_text"];
/// Members of a text part that carry nothing when empty (`[]`).
const EMPTY_PART_MEMBERS: [&str; 2] = ["annotations", "logprobs"];

/// The semantic digest of one item (a JSON object), `None` for anything else.
///
/// XXH3-128 (seed 0) of the canonical JSON of the item normalised as follows:
///
/// 1. the top-level members `id` and `status` and every top-level member whose
///    value is `null` are dropped;
/// 2. an item without `type` (after 1) but with `role` gets `"type":"message"`;
/// 3. in the `content` of a `message` and the `output` of a
///    `function_call_output`, when that value is an array: an element that is a
///    text part (an object whose `type` is `input_text` or `output_text`, whose
///    `text` is a string, and whose other members are `null`, or `annotations` /
///    `logprobs` equal to `[]`) becomes the string `text`; other object elements
///    lose their `null` members; and an array of exactly one string becomes
///    that string.
///
/// Everything else is kept exactly, so key order and whitespace never matter
/// (canonical JSON) and any change of content changes the digest.
pub fn semantic_digest<V: JsonValue>(value: &V, buf: &mut Vec<u8>) -> Option<u128> {
    let map = value.as_object()?;
    buf.clear();
    let layout = Layout::<V>::write(map, buf);
    let start = buf.len();
    layout.write_semantic(buf);
    Some(xxh3_128(&buf[start..]))
}

/// Where a piece of an item's canonical JSON lies in the output buffer.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    end: usize,
}

/// One member of an object, with where its key (quoted and escaped) and its value
/// were written.
struct Member<'v, V> {
    key: &'v str,
    value: &'v V,
    key_at: Span,
    value_at: Span,
}

/// One element of a content array: where it was written and, for an object, its
/// members (a range of [`Layout::part_members`]).
struct Part<'v, V> {
    value: &'v V,
    at: Span,
    members: std::ops::Range<usize>,
}

/// An item's canonical JSON as written by [`Layout::write`], with what the
/// normalised form (see [`semantic_digest`]) needs to be assembled from its bytes.
struct Layout<'v, V> {
    /// Top-level members in key order.
    members: Vec<Member<'v, V>>,
    /// Whether the normalised form adds `"type":"message"`.
    add_type: bool,
    /// The member whose array value is normalised as content, if any.
    content_key: Option<&'static str>,
    /// The elements of that array, when it is one.
    parts: Vec<Part<'v, V>>,
    part_members: Vec<Member<'v, V>>,
}

const TYPE_MESSAGE: &[u8] = br#""type":"message""#;

impl<'v, V: JsonValue> Layout<'v, V> {
    /// Append the canonical JSON of the object `map`, recording its layout.
    fn write(map: &'v V::Object, out: &mut Vec<u8>) -> Layout<'v, V> {
        let present = |key: &str| map.get(key).is_some_and(|v| !v.is_null());
        let typed = present("type");
        let kind = match map.get("type") {
            Some(v) if !v.is_null() => v.as_str(),
            _ if map.get("role").and_then(V::as_str).is_some() => Some("message"),
            _ => None,
        };
        let content_key = match kind {
            Some("message") => Some("content"),
            Some("function_call_output") => Some("output"),
            _ => None,
        };
        let mut layout = Layout {
            members: Vec::new(),
            add_type: !typed && kind == Some("message"),
            content_key,
            parts: Vec::new(),
            part_members: Vec::new(),
        };
        let entries = sorted_entries::<V>(map);
        layout.members.reserve_exact(entries.len());
        out.push(b'{');
        for (i, (key, value)) in entries.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let key_at = write_key(key, out);
            let start = out.len();
            match value.as_array() {
                Some(parts) if content_key == Some(key) => layout.write_parts(parts, out),
                _ => value.write_canonical(out),
            }
            layout.members.push(Member {
                key,
                value,
                key_at,
                value_at: Span {
                    start,
                    end: out.len(),
                },
            });
        }
        out.push(b'}');
        layout
    }

    /// The content array, each element and each member of an object element
    /// recorded.
    fn write_parts(&mut self, parts: &'v [V], out: &mut Vec<u8>) {
        self.parts.reserve_exact(parts.len());
        out.push(b'[');
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let start = out.len();
            let first = self.part_members.len();
            match part.as_object() {
                Some(map) => {
                    out.push(b'{');
                    for (j, (key, value)) in sorted_entries::<V>(map).into_iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        let key_at = write_key(key, out);
                        let value_start = out.len();
                        value.write_canonical(out);
                        self.part_members.push(Member {
                            key,
                            value,
                            key_at,
                            value_at: Span {
                                start: value_start,
                                end: out.len(),
                            },
                        });
                    }
                    out.push(b'}');
                }
                None => part.write_canonical(out),
            }
            self.parts.push(Part {
                value: part,
                at: Span {
                    start,
                    end: out.len(),
                },
                members: first..self.part_members.len(),
            });
        }
        out.push(b']');
    }

    /// Append the normalised form (see [`semantic_digest`]), copying every key and
    /// value from the canonical bytes this layout was written to (`out[..]`).
    fn write_semantic(&self, out: &mut Vec<u8>) {
        let mut first = true;
        let mut add_type = self.add_type;
        out.push(b'{');
        for member in &self.members {
            if member.value.is_null() || IGNORED_MEMBERS.contains(&member.key) {
                continue;
            }
            if add_type && member.key > "type" {
                separate(&mut first, out);
                out.extend_from_slice(TYPE_MESSAGE);
                add_type = false;
            }
            separate(&mut first, out);
            copy(member.key_at, out);
            out.push(b':');
            if self.content_key == Some(member.key) && member.value.as_array().is_some() {
                self.write_content(out);
            } else {
                copy(member.value_at, out);
            }
        }
        if add_type {
            separate(&mut first, out);
            out.extend_from_slice(TYPE_MESSAGE);
        }
        out.push(b'}');
    }

    fn write_content(&self, out: &mut Vec<u8>) {
        if let [only] = self.parts.as_slice() {
            if let Some(text) = self.plain_text(only) {
                copy(text, out);
                return;
            }
        }
        out.push(b'[');
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match self.plain_text(part) {
                Some(text) => copy(text, out),
                None if part.value.as_object().is_some() => {
                    let mut first = true;
                    out.push(b'{');
                    for m in &self.part_members[part.members.clone()] {
                        if m.value.is_null() {
                            continue;
                        }
                        separate(&mut first, out);
                        copy(m.key_at, out);
                        out.push(b':');
                        copy(m.value_at, out);
                    }
                    out.push(b'}');
                }
                None => copy(part.at, out),
            }
        }
        out.push(b']');
    }

    /// Where the text of a part that means exactly its text (see
    /// [`semantic_digest`]) was written: the part itself for a string, the `text`
    /// member's value for a text part.
    fn plain_text(&self, part: &Part<'v, V>) -> Option<Span> {
        if part.value.as_str().is_some() {
            return Some(part.at);
        }
        part.value.as_object()?;
        let members = &self.part_members[part.members.clone()];
        let is_text = members
            .iter()
            .find(|m| m.key == "type")
            .and_then(|m| m.value.as_str())
            .is_some_and(|t| TEXT_PARTS.contains(&t));
        let text = members
            .iter()
            .find(|m| m.key == "text" && m.value.as_str().is_some())?;
        let rest_empty = members.iter().all(|m| match m.key {
            "type" | "text" => true,
            k if EMPTY_PART_MEMBERS.contains(&k) => {
                m.value.is_null() || m.value.as_array().is_some_and(<[V]>::is_empty)
            }
            _ => m.value.is_null(),
        });
        (is_text && rest_empty).then_some(text.value_at)
    }
}

/// Append a quoted key, returning where it was written.
fn write_key(key: &str, out: &mut Vec<u8>) -> Span {
    let start = out.len();
    write_str(key, out);
    let end = out.len();
    out.push(b':');
    Span { start, end }
}

fn separate(first: &mut bool, out: &mut Vec<u8>) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

/// Append bytes already written to `out`.
fn copy(span: Span, out: &mut Vec<u8>) {
    out.extend_from_within(span.start..span.end);
}

/// An immutable range of a batch of items. Clones and slices share the batch;
/// `concat` shares the items.
#[derive(Clone, Debug)]
pub struct Items {
    batch: Arc<Batch>,
    start: u32,
    end: u32,
}

#[derive(Debug)]
struct Batch {
    items: Box<[Arc<Item>]>,
    nbytes: u64,
    tokens: Option<BatchTokens>,
}

/// What a tokenising cache computed for a batch.
#[derive(Debug)]
struct BatchTokens {
    /// Which tokenizer (see [`Tokenizer::fingerprint`]).
    fingerprint: u64,
    /// Tokens of each item.
    counts: Box<[u32]>,
    total: u64,
    /// All the items' token ids, in order, when kept.
    ids: Option<Box<[u32]>>,
}

impl Default for Items {
    fn default() -> Self {
        Items::from_vec(Vec::new())
    }
}

impl Items {
    /// No items, shared by all callers: allocates nothing after the first call.
    pub fn empty() -> Items {
        static EMPTY: std::sync::OnceLock<Items> = std::sync::OnceLock::new();
        EMPTY.get_or_init(Items::default).clone()
    }

    pub fn from_vec(items: Vec<Arc<Item>>) -> Items {
        let nbytes = items.iter().map(|i| i.nbytes() as u64).sum();
        Items::with_batch(Batch {
            items: items.into_boxed_slice(),
            nbytes,
            tokens: None,
        })
    }

    fn with_batch(batch: Batch) -> Items {
        let end = batch.items.len() as u32;
        Items {
            batch: Arc::new(batch),
            start: 0,
            end,
        }
    }

    /// Validate a JSON array of objects (UTF-8 bytes).
    pub fn parse(data: &[u8], max_item_bytes: usize) -> Result<Items> {
        let values = parse_values(data)?;
        Items::from_values(&values, max_item_bytes)
    }

    /// Validate already-decoded values (one per item).
    pub fn from_values(values: &[Value], max_item_bytes: usize) -> Result<Items> {
        Items::from_values_at(values, 0, max_item_bytes)
    }

    /// [`Items::from_values`] for values that start at position `offset` of what
    /// the client sent (errors name that position).
    pub fn from_values_at(values: &[Value], offset: usize, max_item_bytes: usize) -> Result<Items> {
        let items = values
            .iter()
            .enumerate()
            .map(|(i, v)| Item::from_value(offset + i, v, max_item_bytes).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Items::from_vec(items))
    }

    fn is_whole(&self) -> bool {
        self.start == 0 && self.end as usize == self.batch.items.len()
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    /// Total canonical bytes of the items (without brackets and commas).
    pub fn nbytes(&self) -> u64 {
        if self.is_whole() {
            return self.batch.nbytes;
        }
        self.iter().map(|i| i.nbytes() as u64).sum()
    }
    /// Tokens of the items: 0 unless the batch was tokenised.
    pub fn tokens(&self) -> u64 {
        match &self.batch.tokens {
            None => 0,
            Some(t) if self.is_whole() => t.total,
            Some(t) => t.counts[self.range()].iter().map(|&c| u64::from(c)).sum(),
        }
    }
    /// The tokens of each item, when the batch was tokenised.
    pub fn token_counts(&self) -> Option<&[u32]> {
        let range = self.range();
        self.batch.tokens.as_ref().map(|t| &t.counts[range])
    }
    /// The items' token ids in order, when the batch was tokenised and kept them.
    pub fn token_ids(&self) -> Option<&[u32]> {
        let t = self.batch.tokens.as_ref()?;
        let ids = t.ids.as_deref()?;
        let skip: usize = t.counts[..self.start as usize]
            .iter()
            .map(|&c| c as usize)
            .sum();
        let take: usize = t.counts[self.range()].iter().map(|&c| c as usize).sum();
        Some(&ids[skip..skip + take])
    }
    /// These items in a batch of their own when they are a slice of a larger one
    /// (with their counts and ids): what is stored holds only what it meters, not
    /// the rest of a batch a client sent (a whole re-sent history). The items are
    /// shared, never copied.
    pub fn own_batch(&self) -> Items {
        if self.is_whole() {
            return self.clone();
        }
        let tokens = self.batch.tokens.as_ref().map(|t| BatchTokens {
            fingerprint: t.fingerprint,
            counts: self.token_counts().unwrap_or_default().into(),
            total: self.tokens(),
            ids: self.token_ids().map(Into::into),
        });
        Items::with_batch(Batch {
            items: self.as_slice().into(),
            nbytes: self.nbytes(),
            tokens,
        })
    }
    /// The fingerprint of the tokenizer that counted this batch, if any.
    pub fn tokenized_by(&self) -> Option<u64> {
        self.batch.tokens.as_ref().map(|t| t.fingerprint)
    }
    fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
    pub fn as_slice(&self) -> &[Arc<Item>] {
        &self.batch.items[self.range()]
    }
    pub fn get(&self, index: usize) -> Option<&Arc<Item>> {
        self.as_slice().get(index)
    }
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<Item>> {
        self.as_slice().iter()
    }

    /// The first `id` (in order) that an earlier item has too, or that `taken` holds:
    /// lists are paged by item id, so OpenAI refuses an id given twice. Empty ids are
    /// not ids.
    pub fn first_duplicate_id(&self, mut taken: impl FnMut(&str) -> bool) -> Option<&str> {
        let mut seen = rustc_hash::FxHashSet::default();
        self.iter()
            .filter_map(|item| item.id())
            .filter(|id| !id.is_empty())
            .find(|id| !seen.insert(*id) || taken(id))
    }

    /// The items in `range` (relative to this handle), sharing the batch.
    ///
    /// # Panics
    /// When `range` is out of bounds (a caller bug, never input-dependent).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Items {
        assert!(range.start <= range.end && range.end <= self.len());
        Items {
            batch: self.batch.clone(),
            start: self.start + range.start as u32,
            end: self.start + range.end as u32,
        }
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

    /// Whether two handles share one batch and range.
    pub fn ptr_eq(&self, other: &Items) -> bool {
        Arc::ptr_eq(&self.batch, &other.batch) && self.range() == other.range()
    }

    /// The same items counted with `tokenizer` (items shared, not copied): token
    /// counts per item, and the token ids themselves (needed once, to block-hash
    /// the items when they enter a chain; see [`Items::without_token_ids`]).
    /// Returns `self` when this tokenizer already counted the batch.
    pub fn tokenize(&self, tokenizer: &Tokenizer) -> Result<Items, TokenError> {
        let fingerprint = tokenizer.fingerprint();
        if self.tokenized_by() == Some(fingerprint) && self.token_ids().is_some() {
            return Ok(self.clone());
        }
        let mut ids = Vec::new();
        let mut counts = Vec::with_capacity(self.len());
        for item in self.iter() {
            let before = ids.len();
            tokenizer.encode_item_into(item.json(), &mut ids)?;
            counts.push(u32::try_from(ids.len() - before).unwrap_or(u32::MAX));
        }
        let total = ids.len() as u64;
        Ok(Items::with_batch(Batch {
            items: self.as_slice().into(),
            nbytes: self.nbytes(),
            tokens: Some(BatchTokens {
                fingerprint,
                counts: counts.into_boxed_slice(),
                total,
                ids: Some(ids.into_boxed_slice()),
            }),
        }))
    }

    /// The same items and counts without the token ids (items and counts shared).
    /// A cache that does not keep token ids stores its chains' batches this way.
    pub fn without_token_ids(&self) -> Items {
        let Some(t) = &self.batch.tokens else {
            return self.clone();
        };
        if t.ids.is_none() {
            return self.clone();
        }
        let counts: Box<[u32]> = t.counts[self.range()].into();
        Items::with_batch(Batch {
            items: self.as_slice().into(),
            nbytes: self.nbytes(),
            tokens: Some(BatchTokens {
                fingerprint: t.fingerprint,
                total: counts.iter().map(|&c| u64::from(c)).sum(),
                counts,
                ids: None,
            }),
        })
    }

    /// `first` then `second` as the two ranges of one batch, without token ids: how
    /// a node stores its input and output. One batch costs one `Arc<Batch>`, one
    /// slice of item handles and one of counts instead of two of each (about 150
    /// bytes a node). Token counts are kept when both were counted by the same
    /// tokenizer (or one side is empty); otherwise neither keeps counts. Handles
    /// that already are adjacent ranges of one batch without ids are returned as
    /// they are. The items themselves are shared, never copied.
    pub fn pair_without_token_ids(first: &Items, second: &Items) -> (Items, Items) {
        let ids = |i: &Items| i.batch.tokens.as_ref().is_some_and(|t| t.ids.is_some());
        if Arc::ptr_eq(&first.batch, &second.batch) && first.end == second.start && !ids(first) {
            return (first.clone(), second.clone());
        }
        let fingerprint = match (first.tokenized_by(), second.tokenized_by()) {
            (a, b) if a == b => a,
            (a, None) if second.is_empty() => a,
            (None, b) if first.is_empty() => b,
            _ => None,
        };
        let n = first.len() + second.len();
        let mut items = Vec::with_capacity(n);
        items.extend(first.iter().cloned());
        items.extend(second.iter().cloned());
        let tokens = fingerprint.map(|fingerprint| {
            let mut counts = Vec::with_capacity(n);
            counts.extend_from_slice(first.token_counts().unwrap_or_default());
            counts.extend_from_slice(second.token_counts().unwrap_or_default());
            BatchTokens {
                fingerprint,
                total: first.tokens() + second.tokens(),
                counts: counts.into_boxed_slice(),
                ids: None,
            }
        });
        let batch = Arc::new(Batch {
            items: items.into_boxed_slice(),
            nbytes: first.nbytes() + second.nbytes(),
            tokens,
        });
        let split = first.len() as u32;
        (
            Items {
                batch: batch.clone(),
                start: 0,
                end: split,
            },
            Items {
                batch,
                start: split,
                end: n as u32,
            },
        )
    }

    /// Reject a batch built with a larger item limit than the caller's.
    pub fn check_item_limit(&self, max_item_bytes: usize) -> Result<()> {
        match self.iter().position(|i| i.nbytes() > max_item_bytes) {
            None => Ok(()),
            Some(index) => Err(Error::ItemTooLarge {
                index,
                size: self.as_slice()[index].nbytes(),
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

/// Parse a JSON array (UTF-8 bytes) into its elements, without validating them.
pub fn parse_values(data: &[u8]) -> Result<Vec<Value>> {
    let value: Value = serde_json::from_slice(data).map_err(|e| Error::ItemNotJson {
        index: None,
        detail: json_error_detail(&e),
    })?;
    match value {
        Value::Array(values) => Ok(values),
        other => Err(Error::ItemNotJson {
            index: None,
            detail: format!("expected an array, found a {}", json_kind(&other)),
        }),
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
pub(crate) mod tests {
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
        assert_eq!(items.tokens(), 0);
        assert_eq!(items.token_counts(), None);
    }

    #[test]
    fn uncommon_fields_share_one_string() {
        let items = parse(
            r#"[{"type":"x_call","role":"tool","id":"é1","call_id":"","name":"n\"q"},
                {"type":"message","role":"assistant","id":"msg_1"},
                {"role":"critic","name":"ñ"}]"#,
        )
        .unwrap();
        let a = items.get(0).unwrap();
        assert_eq!((a.kind(), a.role()), ("x_call", Some("tool")));
        assert_eq!(
            (a.id(), a.call_id(), a.name()),
            (Some("é1"), Some(""), Some("n\"q"))
        );
        assert!(!a.is_message_from("tool"));
        let b = items.get(1).unwrap();
        assert_eq!(
            (b.kind(), b.role(), b.id()),
            ("message", Some("assistant"), Some("msg_1"))
        );
        assert_eq!((b.call_id(), b.name()), (None, None));
        assert!(b.is_message_from("assistant"));
        let c = items.get(2).unwrap();
        assert_eq!(
            (c.kind(), c.role(), c.name()),
            ("message", Some("critic"), Some("ñ"))
        );
        assert!(c.is_message_from("critic"));
        assert_eq!(KNOWN_TYPES[usize::from(MESSAGE)], "message");
        assert!(
            std::mem::size_of::<Item>() <= 72,
            "{}",
            std::mem::size_of::<Item>()
        );
    }

    fn digest(json: &str) -> u128 {
        let value: Value = serde_json::from_str(json).unwrap();
        let d = semantic_digest(&value, &mut Vec::new()).unwrap();
        // The item's own digest is the same function.
        let item = Item::from_value(0, &value, 1 << 20).unwrap();
        assert_eq!(item.digest(), d);
        d
    }

    #[test]
    fn semantic_digest_ignores_form_and_replay_noise() {
        let same = [
            // Key order, whitespace, an easy message vs a typed one, a lone text
            // part vs a string, ids, status, empty annotations/logprobs, nulls.
            r#"{"type":"message","role":"assistant","content":"hi"}"#,
            r#"{ "content" : "hi", "role": "assistant" }"#,
            r#"{"role":"assistant","content":[{"type":"output_text","text":"hi"}]}"#,
            r#"{"id":"msg_1","type":"message","status":"completed","role":"assistant",
                "content":[{"type":"output_text","text":"hi","annotations":[],"logprobs":[]}]}"#,
            r#"{"role":"assistant","content":[{"type":"input_text","text":"hi"}],"name":null}"#,
            r#"{"role":"assistant","type":null,"content":["hi"]}"#,
        ];
        let d0 = digest(same[0]);
        for json in same {
            assert_eq!(digest(json), d0, "{json}");
        }
        let outputs = [
            r#"{"type":"function_call_output","call_id":"c","output":"x"}"#,
            r#"{"type":"function_call_output","call_id":"c","id":"fco_1","status":"completed",
                "output":[{"type":"input_text","text":"x"}]}"#,
        ];
        assert_eq!(digest(outputs[0]), digest(outputs[1]));
        let calls = [
            r#"{"type":"function_call","call_id":"c","name":"f","arguments":"{}"}"#,
            r#"{"arguments":"{}","call_id":"c","name":"f","type":"function_call",
                "id":"fc_1","status":"completed"}"#,
        ];
        assert_eq!(digest(calls[0]), digest(calls[1]));
        // Part objects lose their null members only.
        assert_eq!(
            digest(
                r#"{"role":"user","content":[{"type":"input_image","image_url":"u","file_id":null}]}"#
            ),
            digest(r#"{"role":"user","content":[{"type":"input_image","image_url":"u"}]}"#),
        );
    }

    #[test]
    fn semantic_digest_sees_every_change_of_content() {
        let base = r#"{"type":"message","role":"assistant","content":"hi"}"#;
        let different = [
            r#"{"type":"message","role":"assistant","content":"hi "}"#,
            r#"{"type":"message","role":"user","content":"hi"}"#,
            r#"{"type":"message","role":"assistant","content":["hi","hi"]}"#,
            r#"{"type":"message","role":"assistant","content":[{"type":"refusal","refusal":"hi"}]}"#,
            r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"hi",
                "annotations":[{"type":"url_citation"}]}]}"#,
            r#"{"type":"message","role":"assistant","content":[{"type":"output_text","text":"hi",
                "extra":1}]}"#,
            r#"{"type":"message","role":"assistant","content":"hi","phase":"final"}"#,
            r#"{"type":"other","role":"assistant","content":"hi"}"#,
            r#"{"type":"message","role":"assistant","content":[]}"#,
        ];
        let d0 = digest(base);
        for json in different {
            assert_ne!(digest(json), d0, "{json}");
        }
        // Arguments are content: re-serialised arguments do not match.
        assert_ne!(
            digest(r#"{"type":"function_call","call_id":"c","name":"f","arguments":"{\"a\":1}"}"#),
            digest(r#"{"type":"function_call","call_id":"c","name":"f","arguments":"{\"a\": 1}"}"#),
        );
        // `id` and `status` are ignored only at the top level.
        assert_ne!(
            digest(
                r#"{"role":"user","content":[{"type":"input_image","image_url":"u","id":"a"}]}"#
            ),
            digest(
                r#"{"role":"user","content":[{"type":"input_image","image_url":"u","id":"b"}]}"#
            ),
        );
        assert_eq!(
            semantic_digest(&serde_json::json!([1]), &mut Vec::new()),
            None
        );
    }

    /// The normalised form written straight from the value, as it was before the
    /// form was assembled from the canonical bytes: the two must agree.
    mod reference {
        use super::super::*;

        pub fn semantic(map: &Map<String, Value>) -> u128 {
            let mut out = Vec::new();
            write_semantic(map, &mut out);
            xxh3_128(&out)
        }

        fn write_semantic(map: &Map<String, Value>, out: &mut Vec<u8>) {
            let present = |key: &str| map.get(key).is_some_and(|v| !v.is_null());
            let typed = present("type");
            let kind = match map.get("type") {
                Some(Value::String(t)) => Some(t.as_str()),
                Some(v) if !v.is_null() => None,
                _ if map.get("role").is_some_and(Value::is_string) => Some("message"),
                _ => None,
            };
            let content_key = match kind {
                Some("message") => Some("content"),
                Some("function_call_output") => Some("output"),
                _ => None,
            };
            let mut entries: Vec<(&str, Option<&Value>)> = map
                .iter()
                .filter(|(k, v)| !v.is_null() && !IGNORED_MEMBERS.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), Some(v)))
                .collect();
            if !typed && kind == Some("message") {
                entries.push(("type", None));
            }
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                match value {
                    None => write_str("message", out),
                    Some(Value::Array(parts)) if content_key == Some(key) => {
                        write_content(parts, out)
                    }
                    Some(v) => write_canonical(v, out),
                }
            }
            out.push(b'}');
        }

        fn plain_text(part: &Value) -> Option<&str> {
            match part {
                Value::String(text) => Some(text),
                Value::Object(map) => {
                    let is_text = map
                        .get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| TEXT_PARTS.contains(&t));
                    let text = map.get("text").and_then(Value::as_str)?;
                    let rest_empty = map.iter().all(|(k, v)| match k.as_str() {
                        "type" | "text" => true,
                        k if EMPTY_PART_MEMBERS.contains(&k) => {
                            v.is_null() || v.as_array().is_some_and(Vec::is_empty)
                        }
                        _ => v.is_null(),
                    });
                    (is_text && rest_empty).then_some(text)
                }
                _ => None,
            }
        }

        fn write_content(parts: &[Value], out: &mut Vec<u8>) {
            if let [only] = parts {
                if let Some(text) = plain_text(only) {
                    write_str(text, out);
                    return;
                }
            }
            out.push(b'[');
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match (plain_text(part), part) {
                    (Some(text), _) => write_str(text, out),
                    (None, Value::Object(map)) => {
                        let mut members: Vec<(&String, &Value)> =
                            map.iter().filter(|(_, v)| !v.is_null()).collect();
                        members.sort_unstable_by(|a, b| a.0.cmp(b.0));
                        out.push(b'{');
                        for (j, (k, v)) in members.into_iter().enumerate() {
                            if j > 0 {
                                out.push(b',');
                            }
                            write_str(k, out);
                            out.push(b':');
                            write_canonical(v, out);
                        }
                        out.push(b'}');
                    }
                    (None, other) => write_canonical(other, out),
                }
            }
            out.push(b']');
        }
    }

    /// Items that exercise every rule of the normalised form and its edges.
    pub(crate) const DIGEST_CORPUS: &[&str] = &[
        r#"{"type":"message","role":"assistant","content":"hi"}"#,
        r#"{"role":"assistant","content":[{"type":"output_text","text":"h\"i\n\u0001é"}]}"#,
        r#"{"id":"m","status":"s","role":"user","content":[{"type":"input_text","text":"a",
            "annotations":[],"logprobs":null},{"type":"input_text","text":"b","annotations":[1]},
            "c",3,null,[1,{"b":null}],{"type":"input_image","image_url":"u","file_id":null,
            "detail":"auto"},{"text":"no type"},{"type":"input_text","text":7}]}"#,
        r#"{"role":"user","content":[{"type":"input_text","text":"x","extra":null}]}"#,
        r#"{"role":"user","content":[]}"#,
        r#"{"role":"user","content":null,"type":null,"a":null,"z":1}"#,
        r#"{"role":"user","s":1,"tz":2,"ty":3,"u":4,"content":{"text":"x"}}"#,
        r#"{"role":"user","type":5,"content":[{"type":"input_text","text":"x"}]}"#,
        r#"{"role":7,"content":[{"type":"input_text","text":"x"}]}"#,
        r#"{"type":"function_call_output","call_id":"c","output":[{"type":"input_text",
            "text":"2 KB"}],"content":[{"type":"input_text","text":"y"}]}"#,
        r#"{"type":"function_call_output","call_id":"c","output":["a","b"]}"#,
        r#"{"type":"function_call_output","call_id":"c","output":"plain \\ text"}"#,
        r#"{"type":"function_call","call_id":"c","name":"f","arguments":"{\"a\": 1}",
            "content":["x"],"output":["y"]}"#,
        r#"{"type":"reasoning","id":"rs","summary":[{"type":"summary_text","text":"t"}],
            "encrypted_content":null}"#,
        r#"{"k\"ey":1,"kéy":{"b":[1.5,-0.0,1e300,18446744073709551615,-9]},"K":true,"":false}"#,
        r#"{}"#,
        r#"{"id":"only","status":"s"}"#,
        r#"{"role":"user"}"#,
        r#"{"role":"user","content":[{"type":"output_text","text":"x","annotations":[],
            "logprobs":[],"zz":null}],"phase":"final","id":null}"#,
    ];

    #[test]
    fn semantic_digest_matches_the_direct_normalised_form() {
        for json in DIGEST_CORPUS {
            let value: Value = serde_json::from_str(json).unwrap();
            let map = value.as_object().unwrap();
            let item = Item::from_value(0, &value, 1 << 20).unwrap();
            assert_eq!(item.digest(), reference::semantic(map), "{json}");
            let mut canonical = Vec::new();
            write_canonical(&value, &mut canonical);
            assert_eq!(item.json(), canonical.as_slice(), "{json}");
        }
    }

    #[test]
    fn slices_share_the_batch() {
        let a = parse(r#"[{"a":1},{"b":22},{"c":333}]"#).unwrap();
        let s = a.slice(1..3);
        assert_eq!(s.len(), 2);
        assert!(Arc::ptr_eq(s.get(0).unwrap(), a.get(1).unwrap()));
        assert_eq!(s.nbytes(), a.nbytes() - 7);
        assert_eq!(s.to_json(), br#"[{"b":22},{"c":333}]"#);
        assert!(s.slice(0..0).is_empty());
        assert!(s.ptr_eq(&a.slice(1..3)));
        assert!(!s.ptr_eq(&a));
    }

    #[test]
    fn tokenize_counts_and_keeps_ids_until_dropped() {
        let tok = Tokenizer::builtin("o200k_base").unwrap();
        let a = parse(
            r#"[{"role":"user","content":"hello world"},{"role":"assistant","content":"hi"}]"#,
        )
        .unwrap();
        let t = a.tokenize(&tok).unwrap();
        assert!(Arc::ptr_eq(t.get(0).unwrap(), a.get(0).unwrap()));
        assert_eq!(t.token_counts(), Some(&[6u32, 5][..]));
        assert_eq!(t.tokens(), 11);
        let ids = t.token_ids().unwrap();
        assert_eq!(ids.len(), 11);
        assert_eq!(
            &ids[..6],
            tok.encode_item(a.get(0).unwrap().json()).unwrap()
        );
        assert_eq!(t.tokenized_by(), Some(tok.fingerprint()));
        // Slices see their own counts and ids.
        let second = t.slice(1..2);
        assert_eq!(second.tokens(), 5);
        assert_eq!(second.token_ids().unwrap(), &ids[6..]);
        // Tokenising again with the same tokenizer is free.
        assert!(t.tokenize(&tok).unwrap().ptr_eq(&t));
        let bare = t.without_token_ids();
        assert_eq!((bare.tokens(), bare.token_ids()), (11, None));
        assert_eq!(bare.slice(1..2).tokens(), 5);
        let other = Tokenizer::builtin("cl100k_base").unwrap();
        assert_ne!(other.fingerprint(), tok.fingerprint());
        assert_eq!(
            bare.tokenize(&other).unwrap().tokenized_by(),
            Some(other.fingerprint())
        );
    }

    #[test]
    fn a_pair_shares_one_batch_and_keeps_counts() {
        let tok = Tokenizer::builtin("o200k_base").unwrap();
        let a = parse(r#"[{"role":"user","content":"hello world"},{"a":1}]"#).unwrap();
        let b = parse(r#"[{"role":"assistant","content":"hi"}]"#).unwrap();
        let (ta, tb) = (a.tokenize(&tok).unwrap(), b.tokenize(&tok).unwrap());
        let (x, y) = Items::pair_without_token_ids(&ta, &tb);
        assert!(Arc::ptr_eq(&x.batch, &y.batch));
        assert!(Arc::ptr_eq(x.get(0).unwrap(), a.get(0).unwrap()));
        assert!(Arc::ptr_eq(y.get(0).unwrap(), b.get(0).unwrap()));
        assert_eq!((x.len(), y.len()), (2, 1));
        assert_eq!((x.nbytes(), y.nbytes()), (a.nbytes(), b.nbytes()));
        assert_eq!(x.to_json(), a.to_json());
        assert_eq!(y.to_json(), b.to_json());
        assert_eq!(x.token_counts(), ta.token_counts());
        assert_eq!(y.token_counts(), tb.token_counts());
        assert_eq!((x.tokens(), y.tokens()), (ta.tokens(), tb.tokens()));
        assert_eq!((x.token_ids(), y.token_ids()), (None, None));
        assert_eq!(x.tokenized_by(), Some(tok.fingerprint()));
        // Already one batch: returned as it is.
        let (x2, y2) = Items::pair_without_token_ids(&x, &y);
        assert!(x2.ptr_eq(&x) && y2.ptr_eq(&y));
        // An empty side takes the other's tokenizer; a mismatch keeps no counts.
        let (e, z) = Items::pair_without_token_ids(&Items::default(), &tb);
        assert_eq!((e.len(), z.tokens()), (0, tb.tokens()));
        assert_eq!(z.tokenized_by(), Some(tok.fingerprint()));
        let (p, q) = Items::pair_without_token_ids(&a, &tb);
        assert_eq!((p.tokenized_by(), q.tokens()), (None, 0));
        assert_eq!(q.to_json(), b.to_json());
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

    /// A reasoning item `levels` levels deep, innermost an empty array.
    pub(crate) fn nested_item(levels: usize) -> String {
        let n = levels - 1;
        format!(
            r#"{{"type":"reasoning","x":{}{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
    }

    #[test]
    fn serde_json_nesting_limit() {
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(serde_json::from_str::<Value>(&nest(SERDE_JSON_NESTING - 1)).is_ok());
        let err = serde_json::from_str::<Value>(&nest(SERDE_JSON_NESTING)).unwrap_err();
        // `json_error_detail` recognises it by this message.
        assert!(
            err.to_string().starts_with("recursion limit exceeded"),
            "{err}"
        );
        assert_eq!(json_error_detail(&err), too_deep());
    }

    #[test]
    fn items_at_the_depth_limit_survive_every_re_parse() {
        for levels in [MAX_DEPTH - 1, MAX_DEPTH] {
            let items = parse(&format!("[{}]", nested_item(levels))).unwrap();
            let json = std::str::from_utf8(items.get(0).unwrap().json()).unwrap();
            // Alone (snapshots, `to_objects`), in an array (`Items.parse(items.json())`),
            // and inside as many more levels as the margin promises.
            serde_json::from_str::<Value>(json).unwrap();
            assert_eq!(
                Items::parse(&items.to_json(), 1 << 20).unwrap().to_json(),
                items.to_json()
            );
            let wrapped = format!(
                "{}{json}{}",
                "[".repeat(WRAPPING_MARGIN),
                "]".repeat(WRAPPING_MARGIN)
            );
            serde_json::from_str::<Value>(&wrapped).unwrap();
        }
    }

    #[test]
    fn items_deeper_than_the_limit_are_refused() {
        let n = MAX_DEPTH - 1;
        let objects = format!(
            "{}{{}}{}",
            r#"{"a":"#.repeat(MAX_DEPTH),
            "}".repeat(MAX_DEPTH)
        );
        let scalar = format!(
            r#"{{"type":"reasoning","x":{}1{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        );
        for deep in [nested_item(MAX_DEPTH + 1), objects, scalar] {
            // serde_json reads it: the item check refuses it, naming the item.
            serde_json::from_str::<Value>(&format!("[{deep}]")).unwrap();
            let err = parse(&format!("[{{}},{deep}]")).unwrap_err();
            assert_eq!(
                err,
                Error::ItemNotJson {
                    index: Some(1),
                    detail: too_deep()
                }
            );
            assert_eq!(
                err.to_string(),
                "Item 1 is not valid JSON: nested deeper than 100 levels."
            );
        }
        // Deeper than serde_json reads: refused while parsing, without recursing on,
        // for the same reason.
        let err = parse(&format!("[{}]", nested_item(100_000))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Items are not a JSON array of objects: nested deeper than 100 levels."
        );
        // Other syntax errors keep serde_json's message.
        let err = parse("[{]").unwrap_err();
        assert!(err.to_string().contains("key must be a string"), "{err}");
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

    #[test]
    fn the_first_duplicate_id_is_found_in_order() {
        let items = parse(
            r#"[{"id":"a","role":"user","content":"x"},{"role":"user","content":"y"},
                {"id":"","role":"user","content":"z"},{"id":"","role":"user","content":"z"},
                {"id":"b","role":"user","content":"x"},{"id":"a","role":"user","content":"x"},
                {"id":"b","role":"user","content":"x"}]"#,
        )
        .unwrap();
        assert_eq!(items.first_duplicate_id(|_| false), Some("a"));
        assert_eq!(items.first_duplicate_id(|id| id == "b"), Some("b"));
        assert_eq!(items.slice(0..5).first_duplicate_id(|_| false), None);
    }
}
