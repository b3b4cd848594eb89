//! Rendering a Responses API item (or the instructions) as framed text segments.
//!
//! This is the accounting template that token counts and block hashes are
//! computed from. **Changing it changes every stored block hash**: keep it
//! stable, and bump [`TEMPLATE_VERSION`] (and `docs/tokens.md`) when it must change.
//!
//! An item renders as one *message*: a role and a list of text segments. The
//! tokenizer turns it into
//!
//! ```text
//! START  enc(role)  SEP  enc(segment 1) enc(segment 2) ...  END
//! ```
//!
//! where `START`, `SEP`, `END` are the encoding's framing token ids (see
//! `Framing`) and every segment is encoded on its own. So an item costs
//! `3 + tokens(role) + Σ tokens(segment)`, OpenAI's "3 tokens per message plus
//! the role" count for chat.
//!
//! | item | role | segments |
//! |------|------|----------|
//! | `message` (`type` is `"message"`, or `type` is absent and `role` is present); `role` a string, `content` a string or an array | `role` | `content`: a string is one segment; an array gives one segment per part (below) |
//! | `function_call` with string `name`, `arguments`, `call_id` | `assistant` | `"{name} {call_id}\n"`, `arguments` |
//! | `function_call_output` with string `call_id`, `output` a string or an array | `tool` | `"{call_id}\n"`, then `output` like message content |
//! | `reasoning`; `summary` and `content` each absent, null, a string or an array | `reasoning` | the parts of `summary`, the parts of `content`, then `"<encrypted_content {h}>"` if `encrypted_content` is a string |
//! | `compaction` made by warmsocket: `encrypted_content` is `wsc1.` and the base64url of a JSON object with a string `summary` and, if present, arrays of objects `before` and `after` | `user` | the segments of each `before` item, `summary`, the segments of each `after` item (each item rendered by this table from its canonical JSON, its role not counted): what the model reads in its place |
//! | anything else, or a known type with fields of the wrong shape | `type` when it is a string, else `item` | the item's JSON text exactly as given |
//!
//! A *part* (an element of a content array) renders as:
//! - its `text` when that is a string (`input_text`, `output_text`, `summary_text`, `reasoning_text`, ...);
//! - else its `refusal` when that is a string;
//! - else, for an element that is a JSON string, the string itself;
//! - else `"<{type} {h}>"` (`type` the part's string `type`, or `part`): images,
//!   files and audio are not tokenised from their base64 payload; the marker
//!   keeps distinct payloads distinct in the block hashes.
//!
//! `{h}` is the XXH3-64 (seed 0) of the value's JSON text exactly as it appears
//! in the item, as 16 lowercase hex digits. Fields not named above (`id`,
//! `status`, annotations, ...) are not rendered. `null` counts as absent.
//!
//! The instructions render as role `system` with the instructions as the one segment.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use crate::framing::json;
use crate::framing::value::{write_canonical, Value as FrameValue};
use serde_json::value::RawValue;
use xxhash_rust::xxh3::xxh3_64;

/// Version of the template below. Bump it on any change that alters tokens, so
/// stored counts and block hashes (snapshots) can be recognised as stale.
pub const TEMPLATE_VERSION: u32 = 2;

/// An item rendered as one framed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered<'a> {
    pub role: Cow<'a, str>,
    pub segments: Vec<Cow<'a, str>>,
}

/// Item JSON that cannot be rendered: not UTF-8, not JSON, or not an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    pub reason: String,
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The role of the instructions message.
pub const INSTRUCTIONS_ROLE: &str = "system";

/// The instructions as one framed message.
pub fn render_instructions(text: &str) -> Rendered<'_> {
    Rendered {
        role: Cow::Borrowed(INSTRUCTIONS_ROLE),
        segments: vec![Cow::Borrowed(text)],
    }
}

/// The role of the tools message.
pub const TOOLS_ROLE: &str = "system";

/// A request's tools (a JSON array, as in its canonical settings) as one framed
/// message: each tool's JSON text, exactly as given, is a segment. None for an
/// empty array. Never panics; fails only when the bytes are not UTF-8 JSON of an
/// array.
pub fn render_tools(json: &[u8]) -> Result<Option<Rendered<'_>>, ItemError> {
    let text = std::str::from_utf8(json).map_err(|e| ItemError {
        reason: format!(
            "tools JSON is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })?;
    let tools: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| ItemError {
        reason: format!("tools are not a JSON array: {e}"),
    })?;
    if tools.is_empty() {
        return Ok(None);
    }
    Ok(Some(Rendered {
        role: Cow::Borrowed(TOOLS_ROLE),
        segments: tools.into_iter().map(|t| Cow::Borrowed(t.get())).collect(),
    }))
}

/// Render one item given as JSON bytes. Never panics; fails only when the
/// bytes are not UTF-8 JSON of an object.
pub fn render_item(json: &[u8]) -> Result<Rendered<'_>, ItemError> {
    let text = std::str::from_utf8(json).map_err(|e| ItemError {
        reason: format!(
            "item JSON is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })?;
    // Checked first: serde would also read a JSON array into the fields struct.
    if !text.trim_start().starts_with('{') {
        return Err(ItemError {
            reason: "item is not a JSON object".to_owned(),
        });
    }
    let fields: ItemFields<'_> = serde_json::from_str(text).map_err(|e| ItemError {
        reason: format!("item is not a JSON object: {e}"),
    })?;
    Ok(render_known(&fields).unwrap_or_else(|| Rendered {
        role: fields
            .kind
            .and_then(string)
            .unwrap_or(Cow::Borrowed("item")),
        segments: vec![Cow::Borrowed(text)],
    }))
}

/// The fields the template reads; everything else is ignored.
#[derive(Deserialize)]
struct ItemFields<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow, default)]
    call_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output: Option<&'a RawValue>,
    #[serde(borrow, default)]
    summary: Option<&'a RawValue>,
    #[serde(borrow, default)]
    encrypted_content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PartFields<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    refusal: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(transparent)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

/// `None` for null: the template treats null like an absent field.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

/// The value as a string, borrowed when it has no escapes.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    serde_json::from_str::<Str<'_>>(raw.get()).ok().map(|s| s.0)
}

fn marker(kind: &str, raw: &RawValue) -> Cow<'static, str> {
    Cow::Owned(format!("<{kind} {:016x}>", xxh3_64(raw.get().as_bytes())))
}

fn render_known<'a>(f: &ItemFields<'a>) -> Option<Rendered<'a>> {
    let kind = match present(f.kind) {
        Some(raw) => Some(string(raw)?),
        None => None,
    };
    let mut segments = Vec::new();
    let role = match kind.as_deref() {
        Some("message") => message(f, &mut segments)?,
        None if present(f.role).is_some() => message(f, &mut segments)?,
        Some("function_call") => {
            let name = string(present(f.name)?)?;
            let call_id = string(present(f.call_id)?)?;
            let arguments = string(present(f.arguments)?)?;
            segments.push(Cow::Owned(format!("{name} {call_id}\n")));
            segments.push(arguments);
            Cow::Borrowed("assistant")
        }
        Some("function_call_output") => {
            let call_id = string(present(f.call_id)?)?;
            segments.push(Cow::Owned(format!("{call_id}\n")));
            parts(present(f.output)?, &mut segments)?;
            Cow::Borrowed("tool")
        }
        Some("compaction") => {
            let content = string(present(f.encrypted_content)?)?;
            let compacted = Compacted::decode(&content)?;
            return Some(compacted.render());
        }
        Some("reasoning") => {
            if let Some(summary) = present(f.summary) {
                parts(summary, &mut segments)?;
            }
            if let Some(content) = present(f.content) {
                parts(content, &mut segments)?;
            }
            if let Some(encrypted) = present(f.encrypted_content) {
                string(encrypted)?;
                segments.push(marker("encrypted_content", encrypted));
            }
            Cow::Borrowed("reasoning")
        }
        _ => return None,
    };
    Some(Rendered { role, segments })
}

/// The start of the `encrypted_content` of a compaction item made by warmsocket
/// (`warmsocket.compaction_items`).
const COMPACTION_PREFIX: &str = "wsc1.";

/// What a compaction item made by warmsocket stands for.
struct Compacted {
    summary: String,
    before: Vec<Vec<u8>>,
    after: Vec<Vec<u8>>,
}

impl Compacted {
    /// `None` unless `content` is warmsocket's: the prefix, base64url, a JSON object
    /// with a string `summary` and arrays of objects (or nothing) as `before`/`after`.
    fn decode(content: &str) -> Option<Compacted> {
        use base64::Engine as _;
        let encoded = content.strip_prefix(COMPACTION_PREFIX)?;
        let payload = base64::engine::general_purpose::URL_SAFE
            .decode(encoded)
            .ok()?;
        // Read as the cache reads items (integers of any size kept as written), so
        // each nested item's canonical JSON is the one the cache gave it.
        let payload = json::decode(&payload).ok()?;
        let payload = payload.as_object()?;
        let summary = payload.get("summary")?.as_str()?.to_owned();
        let items = |name: &str| -> Option<Vec<Vec<u8>>> {
            match payload.get(name) {
                None => Some(Vec::new()),
                Some(FrameValue::Array(values)) => values
                    .iter()
                    .map(|value| {
                        value.as_object().map(|_| {
                            let mut json = Vec::new();
                            write_canonical(value, &mut json);
                            json
                        })
                    })
                    .collect(),
                Some(_) => None,
            }
        };
        Some(Compacted {
            summary,
            before: items("before")?,
            after: items("after")?,
        })
    }

    fn render(self) -> Rendered<'static> {
        let mut segments: Vec<Cow<'static, str>> = Vec::new();
        let nested = |items: &[Vec<u8>], segments: &mut Vec<Cow<'static, str>>| {
            for json in items {
                if let Ok(rendered) = render_item(json) {
                    segments.extend(
                        rendered
                            .segments
                            .into_iter()
                            .map(|s| Cow::Owned(s.into_owned())),
                    );
                }
            }
        };
        nested(&self.before, &mut segments);
        segments.push(Cow::Owned(self.summary));
        nested(&self.after, &mut segments);
        Rendered {
            role: Cow::Borrowed("user"),
            segments,
        }
    }
}

fn message<'a>(f: &ItemFields<'a>, segments: &mut Vec<Cow<'a, str>>) -> Option<Cow<'a, str>> {
    let role = string(present(f.role)?)?;
    parts(present(f.content)?, segments)?;
    Some(role)
}

/// Content: a string (one segment) or an array of parts. `None` for any other shape.
fn parts<'a>(raw: &'a RawValue, segments: &mut Vec<Cow<'a, str>>) -> Option<()> {
    if let Some(s) = string(raw) {
        segments.push(s);
        return Some(());
    }
    let elements: Vec<&'a RawValue> = serde_json::from_str(raw.get()).ok()?;
    for element in elements {
        segments.push(part(element));
    }
    Some(())
}

fn part(raw: &RawValue) -> Cow<'_, str> {
    if let Some(s) = string(raw) {
        return s;
    }
    let fields = match raw.get().starts_with('{') {
        true => serde_json::from_str::<PartFields<'_>>(raw.get()).ok(),
        false => None,
    };
    let Some(fields) = fields else {
        return marker("part", raw);
    };
    if let Some(text) = present(fields.text).and_then(string) {
        return text;
    }
    if let Some(refusal) = present(fields.refusal).and_then(string) {
        return refusal;
    }
    let kind = present(fields.kind).and_then(string);
    marker(kind.as_deref().unwrap_or("part"), raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(json: &str) -> (String, Vec<String>) {
        let out = render_item(json.as_bytes()).unwrap();
        (
            out.role.into_owned(),
            out.segments.into_iter().map(Cow::into_owned).collect(),
        )
    }

    fn seg(role: &str, segments: &[&str]) -> (String, Vec<String>) {
        (
            role.to_owned(),
            segments.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    fn compaction(payload: &str) -> String {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::URL_SAFE.encode(payload);
        format!(r#"{{"encrypted_content":"wsc1.{encoded}","id":"cmp_1","type":"compaction"}}"#)
    }

    #[test]
    fn warmsocket_compaction_items_render_what_they_stand_for() {
        assert_eq!(
            r(&compaction(r#"{"summary":"all done"}"#)),
            seg("user", &["all done"])
        );
        // Nested items in any key order, rendered from their canonical JSON.
        let payload = r#"{"summary":"S","before":[{"role":"user","content":"task"}],"after":[{"type":"function_call","name":"f","call_id":"c","arguments":"{}"},{"type":"web_search_call","id":"ws","status":"completed"}]}"#;
        assert_eq!(
            r(&compaction(payload)),
            seg(
                "user",
                &[
                    "task",
                    "S",
                    "f c\n",
                    "{}",
                    r#"{"id":"ws","status":"completed","type":"web_search_call"}"#
                ]
            )
        );
        // Numbers as the cache writes them: an integer outside 64 bits as written, not
        // as the nearest float.
        let payload = r#"{"summary":"S","after":[{"type":-9223372036854775809,"n":1.5e300}]}"#;
        assert_eq!(
            r(&compaction(payload)),
            seg(
                "user",
                &["S", r#"{"n":1.5e+300,"type":-9223372036854775809}"#]
            )
        );
        // Anything else is a compaction item as any unknown item: its JSON text.
        for other in [
            r#"{"encrypted_content":"gAAAA","type":"compaction"}"#.to_owned(),
            r#"{"encrypted_content":"wsc1.!!","type":"compaction"}"#.to_owned(),
            compaction(r#"{"summary":5}"#),
            compaction(r#"{"summary":"s","before":{}}"#),
            compaction(r#"{"summary":"s","after":[1]}"#),
            compaction("[]"),
        ] {
            assert_eq!(r(&other), seg("compaction", &[&other]), "{other}");
        }
    }

    #[test]
    fn message_with_string_content() {
        assert_eq!(
            r(r#"{"content":"hi there","role":"user","type":"message"}"#),
            seg("user", &["hi there"])
        );
        // `type` may be absent when `role` is present.
        assert_eq!(
            r(r#"{"content":"hi","role":"developer"}"#),
            seg("developer", &["hi"])
        );
    }

    #[test]
    fn message_with_parts() {
        let json = r#"{"content":[{"text":"a","type":"input_text"},{"annotations":[],"text":"b\n","type":"output_text"},{"refusal":"no","type":"refusal"},"plain"],"id":"msg_1","role":"assistant","status":"completed","type":"message"}"#;
        assert_eq!(r(json), seg("assistant", &["a", "b\n", "no", "plain"]));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        assert_eq!(
            r(r#"{"content":"tab\there \"q\" \u00e9","role":"user"}"#),
            seg("user", &["tab\there \"q\" é"])
        );
    }

    #[test]
    fn opaque_parts_become_hashed_markers() {
        let image =
            r#"{"detail":"auto","image_url":"data:image/png;base64,AAAA","type":"input_image"}"#;
        let json = format!(r#"{{"content":[{image},7,["t"],{{"x":1}}],"role":"user"}}"#);
        let h = |s: &str| format!("{:016x}", xxh3_64(s.as_bytes()));
        assert_eq!(
            r(&json),
            (
                "user".to_owned(),
                vec![
                    format!("<input_image {}>", h(image)),
                    format!("<part {}>", h("7")),
                    format!("<part {}>", h(r#"["t"]"#)),
                    format!("<part {}>", h(r#"{"x":1}"#)),
                ]
            )
        );
    }

    #[test]
    fn function_call_and_output() {
        assert_eq!(
            r(
                r#"{"arguments":"{\"city\":\"Paris\"}","call_id":"call_1","name":"weather","type":"function_call"}"#
            ),
            seg("assistant", &["weather call_1\n", r#"{"city":"Paris"}"#])
        );
        assert_eq!(
            r(r#"{"call_id":"call_1","output":"sunny","type":"function_call_output"}"#),
            seg("tool", &["call_1\n", "sunny"])
        );
        assert_eq!(
            r(
                r#"{"call_id":"c","output":[{"text":"x","type":"input_text"}],"type":"function_call_output"}"#
            ),
            seg("tool", &["c\n", "x"])
        );
    }

    #[test]
    fn reasoning() {
        let enc = r#""gAAAA""#;
        let json = format!(
            r#"{{"encrypted_content":{enc},"id":"rs_1","summary":[{{"text":"thought 1","type":"summary_text"}},{{"text":"thought 2","type":"summary_text"}}],"type":"reasoning"}}"#
        );
        assert_eq!(
            r(&json),
            (
                "reasoning".to_owned(),
                vec![
                    "thought 1".to_owned(),
                    "thought 2".to_owned(),
                    format!("<encrypted_content {:016x}>", xxh3_64(enc.as_bytes()))
                ]
            )
        );
        assert_eq!(
            r(
                r#"{"content":[{"text":"raw","type":"reasoning_text"}],"summary":[],"type":"reasoning"}"#
            ),
            seg("reasoning", &["raw"])
        );
        assert_eq!(
            r(r#"{"summary":null,"type":"reasoning"}"#),
            seg("reasoning", &[])
        );
    }

    #[test]
    fn unknown_and_malformed_items_render_as_their_json() {
        for json in [
            r#"{"id":"ws_1","status":"completed","type":"web_search_call"}"#,
            r#"{"content":5,"role":"user"}"#,
            r#"{"content":"x","role":7,"type":"message"}"#,
            r#"{"call_id":"c","name":"f","type":"function_call"}"#,
            r#"{"summary":{"a":1},"type":"reasoning"}"#,
            r#"{"encrypted_content":1,"type":"reasoning"}"#,
        ] {
            let out = r(json);
            assert_eq!(out.1, vec![json.to_owned()], "{json}");
        }
        assert_eq!(
            r(r#"{"id":"ws_1","type":"web_search_call"}"#).0,
            "web_search_call"
        );
        assert_eq!(r(r#"{"content":5,"role":"user"}"#).0, "item");
        assert_eq!(r(r#"{"type":3}"#).0, "item");
        assert_eq!(r(r#"{}"#), seg("item", &["{}"]));
        assert_eq!(r(r#"{"role":null}"#).0, "item");
    }

    #[test]
    fn instructions() {
        let out = render_instructions("Be brief.");
        assert_eq!(out.role, "system");
        assert_eq!(out.segments, vec!["Be brief."]);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"   ",
            b"[]",
            b"\"x\"",
            b"null",
            b"{",
            b"{\"role\":\"user\",\"content\":\"\xff\"}",
            b"\xff\xfe",
            b"{\"a\":1}trailing",
            b"{\"role\":\"a\",\"role\":\"b\"}",
        ];
        for bytes in cases {
            let err = render_item(bytes).unwrap_err();
            assert!(!err.reason.is_empty());
        }
        assert!(render_item(b"\xff").unwrap_err().reason.contains("UTF-8"));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz over mutations of valid items.
        let seeds: &[&[u8]] = &[
            br#"{"content":[{"text":"a","type":"input_text"},{"type":"input_image","image_url":"x"}],"role":"user"}"#,
            br#"{"arguments":"{}","call_id":"c","name":"f","type":"function_call"}"#,
            br#"{"summary":[{"text":"t","type":"summary_text"}],"type":"reasoning","encrypted_content":"e"}"#,
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for seed in seeds {
            for _ in 0..2000 {
                let mut bytes = seed.to_vec();
                for _ in 0..3 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let at = (state as usize) % bytes.len();
                    bytes[at] = (state >> 32) as u8;
                }
                let _ = render_item(&bytes);
            }
        }
    }
}
