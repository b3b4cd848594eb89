//! A Responses API answer streamed by an upstream, as model events.
//!
//! The `responses` (SSE) and `responses-ws` upstream backends re-emit an upstream's
//! answer under warmsocket's own response and item ids, so only what the model
//! produced is taken: text deltas, function calls (`output_item.added` gives
//! `call_id` and name, then argument deltas) and the usage of the terminal event.
//! Text or arguments that arrive only in a `.done` event (servers that do not
//! stream deltas) are emitted then. Lifecycle events that carry the whole Response
//! (`response.created`, `response.in_progress`) are recognised by their SSE event
//! name and never parsed. A reasoning item's start, its summary and text deltas
//! are read as they come, and the whole item at its `output_item.done` (with its
//! `encrypted_content`). A custom tool call streams like a function call. A hosted
//! tool call (web search, code interpreter, ...: any other item type) starts with
//! its `output_item.added`, its own events (those naming its `item_id`) are passed
//! on whole for the encoder to renumber, and its `output_item.done` finishes it.
//!
//! `response.failed` and `error` events end the decoding with [`Stop`]; the caller
//! maps the error object to its own error type.
//!
//! One call per chunk of bytes: the SSE lines are split, each event's JSON parsed
//! and read here, with no per-event crossing into Python.

use std::collections::{HashMap, HashSet};

use super::json;
use super::value::{write_canonical, Value};

/// What the model produced, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Text(String),
    /// The model's refusal (a message's `refusal` content part).
    Refusal(String),
    /// A function call starts, or (`custom`) a custom tool call, whose input then
    /// comes as `Arguments`.
    Call {
        call_id: String,
        name: String,
        custom: bool,
    },
    Arguments(String),
    /// A reasoning item starts (its `output_item.added`): the upstream's item id.
    ReasoningStart(String),
    /// Reasoning text: a delta of summary part `index` (`summary`) or of
    /// `reasoning_text` content part `index`.
    ReasoningDelta {
        summary: bool,
        index: usize,
        delta: String,
    },
    /// A finished item of another type than message and function call (reasoning,
    /// custom and hosted tool calls), as JSON: the item of its `output_item.done`.
    Item(Vec<u8>),
    /// A message item starts (its `output_item.added`): text after it is another
    /// message than the text before it.
    MessageStart,
    /// An annotation of the message's text (`response.output_text.annotation.added`:
    /// a web search's `url_citation`, ...), as JSON.
    Annotation(Vec<u8>),
    /// A hosted tool call starts: the item of its `output_item.added`, as JSON.
    ItemStart(Vec<u8>),
    /// An event of a hosted tool call under way (one naming its `item_id`, such as
    /// `response.web_search_call.searching`), whole, as JSON.
    ItemEvent(Vec<u8>),
    Usage {
        input: Option<i64>,
        cached: Option<i64>,
        output: Option<i64>,
        /// `output_tokens_details.reasoning_tokens`.
        reasoning: Option<i64>,
    },
    /// The log probabilities of the text delta that follows (its `logprobs`, a
    /// non-empty JSON array: the client asked for them).
    TextLogprobs(Vec<u8>),
    /// `response.incomplete`: the answer stopped short, for this reason (its
    /// `incomplete_details.reason`; [`DEFAULT_INCOMPLETE_REASON`] when it gave none).
    Incomplete(String),
    /// The terminal event's Response has fields of [`RELAYED_FIELDS`]: a JSON object
    /// of those present with the shape they should have (others are left out).
    ResponseFields(Vec<u8>),
}

/// The shape a relayed field must have to be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Str,
    Object,
    Array,
}

/// Fields of an upstream's Response that tell what the upstream did, rather than
/// echo the request: the tier that served it (`auto` in, `default` out), moderation
/// results, hosted tools' billable usage, prompt cache diagnostics and the cache
/// options applied, reasoning items withheld, the image policy applied. They are
/// relayed into warmsocket's Response; everything else in it is warmsocket's own.
pub const RELAYED_FIELDS: [&str; 7] = [
    "service_tier",
    "moderation",
    "tool_usage",
    "prompt_cache_diagnostics",
    "prompt_cache_options",
    "input_transformations",
    "image",
];

const RELAYED_SHAPES: [Shape; 7] = [
    Shape::Str,
    Shape::Object,
    Shape::Object,
    Shape::Object,
    Shape::Object,
    Shape::Array,
    Shape::Object,
];

/// The relayed fields of a Response, in [`RELAYED_FIELDS`] order: `value(i)` gives
/// field `i`'s value if the Response has it. A JSON object of those of their
/// field's shape; None when there are none.
fn relayed_fields<'v>(mut value: impl FnMut(usize) -> Option<Value<'v>>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (i, (name, shape)) in RELAYED_FIELDS.iter().zip(RELAYED_SHAPES).enumerate() {
        let Some(value) = value(i) else { continue };
        let fits = match shape {
            Shape::Str => matches!(value, Value::Str(_)),
            Shape::Object => matches!(value, Value::Object(_)),
            Shape::Array => matches!(value, Value::Array(_)),
        };
        if !fits {
            continue;
        }
        out.push(if out.is_empty() { b'{' } else { b',' });
        super::value::write_str(name, &mut out);
        out.push(b':');
        write_canonical(&value, &mut out);
    }
    if out.is_empty() {
        return None;
    }
    out.push(b'}');
    Some(out)
}

/// The reason of a `response.incomplete` that gives none: the output token limit,
/// the reason of all but content filtering.
pub const DEFAULT_INCOMPLETE_REASON: &str = "max_output_tokens";

/// Why a stream ends without a model event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// `response.failed`: the Response's `error` object as JSON, if it had one.
    Failed(Option<Vec<u8>>),
    /// An `error` event: its error object as JSON (the nested `error` of the
    /// WebSocket shape, or the flat SSE event itself) and the `status` it gave.
    Error { error: Vec<u8>, status: Option<i64> },
    /// Not JSON, or not an object; or an SSE event over `MAX_EVENT_BYTES`.
    Protocol,
}

/// Largest upstream event accepted (an SSE event's lines, a WebSocket message): a
/// terminal event repeats the whole Response, so this is generous; it bounds what a
/// broken upstream can make the server buffer.
pub const MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// Hosted tool calls one response may have under way at once (a bound on what a
/// broken upstream can make the decoder remember; real ones run one at a time).
const MAX_HOSTED_ITEMS: usize = 1024;

/// SSE event names whose data carries nothing a model event needs.
const SKIPPED: [&[u8]; 5] = [
    b"response.created",
    b"response.in_progress",
    b"response.queued",
    b"response.content_part.added",
    b"response.content_part.done",
];

/// SSE event names of the events that end a response normally.
const TERMINAL: [&[u8]; 2] = [b"response.completed", b"response.incomplete"];

/// A terminal event, as far as it is read (see `ResponsesDecoder::terminal`):
/// unknown fields are skipped, and any other shape is an error.
#[derive(serde::Deserialize)]
struct TerminalEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    response: Option<TerminalResponse<'a>>,
}

#[derive(serde::Deserialize)]
struct TerminalResponse<'a> {
    #[serde(default, borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    usage: Option<TerminalUsage>,
    #[serde(default, borrow)]
    incomplete_details: Option<TerminalIncomplete<'a>>,
    // RELAYED_FIELDS, taken as they are and read by `relayed_fields`.
    #[serde(default, borrow)]
    service_tier: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    moderation: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    tool_usage: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    prompt_cache_diagnostics: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    prompt_cache_options: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    input_transformations: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    image: Option<&'a serde_json::value::RawValue>,
}

impl<'a> TerminalResponse<'a> {
    /// The relayed fields (`relayed_fields`).
    fn relayed(&self) -> Option<Vec<u8>> {
        let raw = [
            self.service_tier,
            self.moderation,
            self.tool_usage,
            self.prompt_cache_diagnostics,
            self.prompt_cache_options,
            self.input_transformations,
            self.image,
        ];
        relayed_fields(|i| raw[i].and_then(|raw| json::parse(raw.get()).ok()))
    }
}

#[derive(serde::Deserialize)]
struct TerminalIncomplete<'a> {
    #[serde(default, borrow)]
    reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct TerminalUsage {
    #[serde(default)]
    input_tokens: Option<i64>,
    #[serde(default)]
    output_tokens: Option<i64>,
    #[serde(default)]
    input_tokens_details: Option<TerminalTokenDetails>,
    #[serde(default)]
    output_tokens_details: Option<TerminalOutputDetails>,
}

#[derive(serde::Deserialize)]
struct TerminalOutputDetails {
    #[serde(default)]
    reasoning_tokens: Option<i64>,
}

#[derive(serde::Deserialize)]
struct TerminalTokenDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

/// One upstream response's events -> model events.
#[derive(Debug, Default)]
pub struct ResponsesDecoder {
    sse: SseLines,
    /// A terminal event (`response.completed` / `response.incomplete`) arrived.
    pub done: bool,
    /// Any event arrived.
    pub started: bool,
    /// The upstream's id of the response (from its terminal event).
    pub response_id: Option<String>,
    /// Characters of text or arguments already emitted, by upstream item id.
    emitted: HashMap<String, usize>,
    function_items: HashSet<String>,
    /// Hosted tool calls started and not done, by upstream item id.
    hosted_items: HashSet<String>,
}

impl ResponsesDecoder {
    /// The events completed by `chunk` of an SSE body.
    pub fn feed_sse(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), Stop> {
        let mut pending = Vec::new();
        self.sse.feed(chunk, &mut pending);
        if self.sse.buffered() > MAX_EVENT_BYTES {
            return Err(Stop::Protocol);
        }
        self.decode_sse(pending, out)
    }

    /// Bytes of an SSE event held until its end comes (what a next chunk may complete
    /// and decode).
    pub fn sse_buffered(&self) -> usize {
        self.sse.buffered()
    }

    /// The events left when an SSE body ends without a final blank line.
    pub fn finish_sse(&mut self, out: &mut Vec<Event>) -> Result<(), Stop> {
        let mut pending = Vec::new();
        self.sse.finish(&mut pending);
        self.decode_sse(pending, out)
    }

    fn decode_sse(
        &mut self,
        events: Vec<(Vec<u8>, Vec<u8>)>,
        out: &mut Vec<Event>,
    ) -> Result<(), Stop> {
        for (name, data) in events {
            if SKIPPED.contains(&name.as_slice()) {
                self.started = true;
                continue;
            }
            if data == b"[DONE]" {
                continue;
            }
            if TERMINAL.contains(&name.as_slice()) && self.terminal(&data, out) {
                continue;
            }
            self.message(&data, std::str::from_utf8(&name).ok(), out)?;
        }
        Ok(())
    }

    /// A terminal event read for the fields it gives (its type, the Response's id,
    /// usage, incomplete details and [`RELAYED_FIELDS`]), skipping the rest of the
    /// Response (instructions, tools, output) without building it. False, with nothing done, when the event
    /// is not in the shape this expects (another type, a field of another type, a
    /// duplicate key): `message` then reads it in full.
    fn terminal(&mut self, data: &[u8], out: &mut Vec<Event>) -> bool {
        let Ok(event) = serde_json::from_slice::<TerminalEvent<'_>>(data) else {
            return false;
        };
        if !TERMINAL.contains(&event.kind.as_bytes()) {
            return false;
        }
        self.started = true;
        self.done = true;
        let incomplete = event.kind == "response.incomplete";
        let Some(response) = event.response else {
            if incomplete {
                out.push(Event::Incomplete(DEFAULT_INCOMPLETE_REASON.to_owned()));
            }
            return true;
        };
        if let Some(fields) = response.relayed() {
            out.push(Event::ResponseFields(fields));
        }
        if let Some(id) = response.id {
            self.response_id = Some(id.into_owned());
        }
        if let Some(usage) = response.usage {
            out.push(Event::Usage {
                input: usage.input_tokens,
                cached: usage.input_tokens_details.and_then(|d| d.cached_tokens),
                output: usage.output_tokens,
                reasoning: usage.output_tokens_details.and_then(|d| d.reasoning_tokens),
            });
        }
        if incomplete {
            let reason = response.incomplete_details.and_then(|d| d.reason);
            let reason = reason.map_or(DEFAULT_INCOMPLETE_REASON.to_owned(), |r| r.into_owned());
            out.push(Event::Incomplete(reason));
        }
        true
    }

    /// One WebSocket message. Its `type` is read first, without parsing the rest:
    /// lifecycle events that carry the whole Response are skipped and terminal
    /// events read for their few fields, as on the SSE path.
    pub fn ws_message(&mut self, data: &[u8], out: &mut Vec<Event>) -> Result<(), Stop> {
        if let Some(kind) = super::peek::top_level_string(data, "type") {
            if SKIPPED.contains(&kind.as_bytes()) {
                self.started = true;
                return Ok(());
            }
            if TERMINAL.contains(&kind.as_bytes()) && self.terminal(data, out) {
                return Ok(());
            }
        }
        self.message(data, None, out)
    }

    /// One event as JSON (a WebSocket message, or an SSE event's data); `name`
    /// is the SSE event name, used when the JSON has no `type`.
    pub fn message(
        &mut self,
        data: &[u8],
        name: Option<&str>,
        out: &mut Vec<Event>,
    ) -> Result<(), Stop> {
        let value = json::decode(data).map_err(|_| Stop::Protocol)?;
        if !matches!(value, Value::Object(_)) {
            return Err(Stop::Protocol);
        }
        let kind = match value.get("type").and_then(Value::as_str) {
            Some(kind) => kind,
            None => name.unwrap_or(""),
        };
        self.event(kind, &value, out)
    }

    fn event(&mut self, kind: &str, data: &Value<'_>, out: &mut Vec<Event>) -> Result<(), Stop> {
        match kind {
            // Not counted as a start: a backend may still replay after an early error.
            "response.failed" => {
                let error = data
                    .get("response")
                    .and_then(|r| r.get("error"))
                    .filter(|e| !e.is_null())
                    .map(to_json);
                return Err(Stop::Failed(error));
            }
            "error" => {
                let nested = data.get("error").filter(|e| e.as_object().is_some());
                return Err(Stop::Error {
                    error: to_json(nested.unwrap_or(data)),
                    status: data.get("status").and_then(int),
                });
            }
            _ => {}
        }
        self.started = true;
        match kind {
            "response.output_text.delta" => {
                if let Some(delta) = nonempty_str(data.get("delta")) {
                    self.count(data, delta);
                    if let Some(logprobs) = data
                        .get("logprobs")
                        .filter(|l| matches!(l, Value::Array(a) if !a.is_empty()))
                    {
                        out.push(Event::TextLogprobs(to_json(logprobs)));
                    }
                    out.push(Event::Text(delta.to_owned()));
                }
            }
            "response.refusal.delta" => {
                if let Some(delta) = nonempty_str(data.get("delta")) {
                    let item_id = text_of(data.get("item_id"));
                    // The message streams: its whole item at the end brings nothing new.
                    self.emitted.entry(item_id.clone()).or_insert(0);
                    *self.emitted.entry(refusal_key(&item_id)).or_default() +=
                        delta.chars().count();
                    out.push(Event::Refusal(delta.to_owned()));
                }
            }
            "response.refusal.done" => {
                let key = refusal_key(&text_of(data.get("item_id")));
                if let Some(rest) = self.rest(&key, data.get("refusal")) {
                    out.push(Event::Refusal(rest));
                }
            }
            "response.function_call_arguments.delta" | "response.custom_tool_call_input.delta" => {
                if let Some(delta) = nonempty_str(data.get("delta")) {
                    self.count(data, delta);
                    out.push(Event::Arguments(delta.to_owned()));
                }
            }
            "response.output_item.added" => {
                let Some(item) = data.get("item").filter(|i| i.as_object().is_some()) else {
                    return Ok(());
                };
                let (custom, field) = match item.get("type").and_then(Value::as_str) {
                    Some("function_call") => (false, "arguments"),
                    Some("custom_tool_call") => (true, "input"),
                    Some("reasoning") => {
                        out.push(Event::ReasoningStart(text_of(item.get("id"))));
                        return Ok(());
                    }
                    Some("message") => {
                        out.push(Event::MessageStart);
                        return Ok(());
                    }
                    None => return Ok(()),
                    Some(_) => {
                        // A hosted tool call: shown now, if it has an id its events
                        // can name (else it comes whole at its done).
                        if let Some(id) = nonempty_str(item.get("id")) {
                            if self.hosted_items.len() < MAX_HOSTED_ITEMS {
                                self.hosted_items.insert(id.to_owned());
                                out.push(Event::ItemStart(to_json(item)));
                            }
                        }
                        return Ok(());
                    }
                };
                let item_id = text_of(item.get("id"));
                out.push(Event::Call {
                    call_id: text_of(item.get("call_id")),
                    name: text_of(item.get("name")),
                    custom,
                });
                if let Some(arguments) = nonempty_str(item.get(field)) {
                    self.emitted
                        .insert(item_id.clone(), arguments.chars().count());
                    out.push(Event::Arguments(arguments.to_owned()));
                }
                self.function_items.insert(item_id);
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                let summary = kind == "response.reasoning_summary_text.delta";
                let key = if summary {
                    "summary_index"
                } else {
                    "content_index"
                };
                let index = data.get(key).and_then(int).unwrap_or(0);
                if let Some(delta) = nonempty_str(data.get("delta")) {
                    out.push(Event::ReasoningDelta {
                        summary,
                        index: usize::try_from(index).unwrap_or(0),
                        delta: delta.to_owned(),
                    });
                }
            }
            "response.output_text.annotation.added" => {
                if let Some(annotation) = data.get("annotation").filter(|a| a.as_object().is_some())
                {
                    // The message streams: its whole item at the end brings nothing new.
                    self.emitted
                        .entry(text_of(data.get("item_id")))
                        .or_insert(0);
                    out.push(Event::Annotation(to_json(annotation)));
                }
            }
            "response.output_text.done" => {
                let item_id = text_of(data.get("item_id"));
                if let Some(rest) = self.rest(&item_id, data.get("text")) {
                    out.push(Event::Text(rest));
                }
            }
            "response.function_call_arguments.done" | "response.custom_tool_call_input.done" => {
                let item_id = text_of(data.get("item_id"));
                let field = if kind == "response.custom_tool_call_input.done" {
                    "input"
                } else {
                    "arguments"
                };
                if let Some(rest) = self.rest(&item_id, data.get(field)) {
                    out.push(Event::Arguments(rest));
                }
            }
            "response.output_item.done" => {
                let Some(item) = data.get("item").filter(|i| i.as_object().is_some()) else {
                    return Ok(());
                };
                let item_id = text_of(item.get("id"));
                match item.get("type").and_then(Value::as_str) {
                    Some("function_call") if self.function_items.contains(&item_id) => {
                        if let Some(rest) = self.rest(&item_id, item.get("arguments")) {
                            out.push(Event::Arguments(rest));
                        }
                    }
                    Some("custom_tool_call") if self.function_items.contains(&item_id) => {
                        if let Some(rest) = self.rest(&item_id, item.get("input")) {
                            out.push(Event::Arguments(rest));
                        }
                    }
                    Some("message") if !self.emitted.contains_key(&item_id) => {
                        // Not streamed: its text and its annotations, whole (or its
                        // refusal).
                        let text = message_text(item);
                        if let Some(rest) = self.rest_of(&item_id, &text) {
                            out.push(Event::Text(rest));
                        }
                        let refusal = message_refusal(item);
                        if let Some(rest) = self.rest_of(&refusal_key(&item_id), &refusal) {
                            out.push(Event::Refusal(rest));
                        }
                        for annotation in message_annotations(item) {
                            out.push(Event::Annotation(to_json(annotation)));
                        }
                    }
                    Some("message" | "function_call") | None => {}
                    Some(_) => {
                        self.hosted_items.remove(&item_id);
                        out.push(Event::Item(to_json(item)));
                    }
                }
            }
            "response.completed" | "response.incomplete" => {
                self.done = true;
                let response = data.get("response").filter(|r| r.as_object().is_some());
                let usage = response
                    .and_then(|r| r.get("usage"))
                    .filter(|u| u.as_object().is_some());
                if let Some(response) = response {
                    let fields = relayed_fields(|i| response.get(RELAYED_FIELDS[i]).cloned());
                    if let Some(fields) = fields {
                        out.push(Event::ResponseFields(fields));
                    }
                }
                if let Some(id) = response.and_then(|r| r.get("id")).and_then(Value::as_str) {
                    self.response_id = Some(id.to_owned());
                }
                if let Some(usage) = usage {
                    out.push(usage_event(usage));
                }
                if kind == "response.incomplete" {
                    let reason = response
                        .and_then(|r| r.get("incomplete_details"))
                        .and_then(|d| d.get("reason"))
                        .and_then(Value::as_str)
                        .unwrap_or(DEFAULT_INCOMPLETE_REASON);
                    out.push(Event::Incomplete(reason.to_owned()));
                }
            }
            _ => {
                let hosted = data
                    .get("item_id")
                    .and_then(Value::as_str)
                    .is_some_and(|id| self.hosted_items.contains(id));
                if hosted {
                    out.push(Event::ItemEvent(to_json(data)));
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, data: &Value<'_>, delta: &str) {
        let item_id = text_of(data.get("item_id"));
        *self.emitted.entry(item_id).or_default() += delta.chars().count();
    }

    /// The part of an item's full text or arguments not emitted yet.
    fn rest(&mut self, item_id: &str, full: Option<&Value<'_>>) -> Option<String> {
        let full = full.and_then(Value::as_str)?;
        self.rest_of(item_id, full)
    }

    fn rest_of(&mut self, item_id: &str, full: &str) -> Option<String> {
        let sent = self.emitted.get(item_id).copied().unwrap_or(0);
        let total = full.chars().count();
        if total <= sent {
            return None;
        }
        self.emitted.insert(item_id.to_owned(), total);
        Some(full.chars().skip(sent).collect())
    }
}

/// Where the characters of an item's refusal already emitted are counted (its text's
/// are under its id).
fn refusal_key(item_id: &str) -> String {
    format!("{item_id}\u{0}refusal")
}

/// The `refusal` parts of a message item, joined.
fn message_refusal(item: &Value<'_>) -> String {
    let Some(Value::Array(parts)) = item.get("content") else {
        return String::new();
    };
    parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("refusal"))
        .filter_map(|p| p.get("refusal").and_then(Value::as_str))
        .collect()
}

/// The `output_text` parts of a message item, joined.
fn message_text(item: &Value<'_>) -> String {
    let Some(Value::Array(parts)) = item.get("content") else {
        return String::new();
    };
    parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("output_text"))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect()
}

fn message_annotations<'v>(item: &'v Value<'_>) -> Vec<&'v Value<'v>> {
    let Some(Value::Array(parts)) = item.get("content") else {
        return Vec::new();
    };
    parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("output_text"))
        .filter_map(|p| match p.get("annotations") {
            Some(Value::Array(annotations)) => Some(annotations),
            _ => None,
        })
        .flatten()
        .filter(|a| a.as_object().is_some())
        .collect()
}

fn nonempty_str<'v>(value: Option<&'v Value<'_>>) -> Option<&'v str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// A field as text, as Python's `str(value)` would read a string id (other
/// values, which conformant upstreams never send, read as their JSON).
fn text_of(value: Option<&Value<'_>>) -> String {
    match value {
        None => String::new(),
        Some(Value::Str(s)) => s.to_string(),
        Some(other) => String::from_utf8_lossy(&to_json(other)).into_owned(),
    }
}

/// An integer (not a bool, not a float) that fits `i64`.
/// The usage of a terminal event's Response (an object).
fn usage_event(usage: &Value<'_>) -> Event {
    let cached = usage
        .get("input_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(int);
    let reasoning = usage
        .get("output_tokens_details")
        .and_then(|d| d.get("reasoning_tokens"))
        .and_then(int);
    Event::Usage {
        input: usage.get("input_tokens").and_then(int),
        cached,
        output: usage.get("output_tokens").and_then(int),
        reasoning,
    }
}

fn int(value: &Value<'_>) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::UInt(u) => i64::try_from(*u).ok(),
        _ => None,
    }
}

fn to_json(value: &Value<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

/// The lines of a `text/event-stream` body grouped into `(event name, data)`
/// pairs: `data:` lines joined with newlines, comments and other fields ignored,
/// LF, CRLF or lone CR line ends, and one UTF-8 byte order mark skipped at the start
/// of the body (the same rules as `warmsocket/sse.py`, from WHATWG HTML,
/// "Interpreting an event stream").
///
/// The data of an event named in [`SKIPPED`] is not kept (the pair comes out with
/// empty data): those events repeat the whole Response. That takes the `event:`
/// line before the `data:` lines, as every Responses server writes it; were a
/// second `event:` line to rename such an event after its data, the data kept
/// would be incomplete and the event would fail to decode (a protocol error).
#[derive(Debug, Default)]
struct SseLines {
    partial: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    data_lines: usize,
    skip: bool,
    /// Whether the body's first bytes were looked at for a byte order mark.
    started: bool,
    /// Whether the last chunk ended with a CR: a LF starting the next one is the
    /// second half of a CRLF, not a line end of its own.
    after_cr: bool,
}

const BOM: &[u8] = b"\xef\xbb\xbf";

impl SseLines {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        if !self.started {
            if chunk.is_empty() {
                return;
            }
            let mut head = std::mem::take(&mut self.partial);
            head.extend_from_slice(chunk);
            if head.len() < BOM.len() && BOM.starts_with(&head) {
                self.partial = head; // (at most two bytes)
                return;
            }
            self.started = true;
            let body = head.strip_prefix(BOM).unwrap_or(&head);
            self.feed(body, out);
            return;
        }
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            rest = rest.strip_prefix(b"\n").unwrap_or(rest);
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', rest) {
            let line_part = &rest[..end];
            let cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if cr {
                if rest.is_empty() {
                    self.after_cr = true;
                } else {
                    rest = rest.strip_prefix(b"\n").unwrap_or(rest);
                }
            }
            if self.partial.is_empty() {
                self.line(line_part, out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(line_part);
                self.line(&line, out);
            }
        }
        self.partial.extend_from_slice(rest);
    }

    /// Bytes held for the event being read (its data so far and a partial line).
    fn buffered(&self) -> usize {
        self.partial.len() + self.data.len()
    }

    fn finish(&mut self, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        self.started = true; // (a partial byte order mark is a line of its own)
        if !self.partial.is_empty() || self.data_lines > 0 {
            self.feed(b"\n\n", out);
        }
        self.partial.clear();
        self.after_cr = false;
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        if line.is_empty() {
            if self.data_lines > 0 {
                out.push((
                    std::mem::take(&mut self.event),
                    std::mem::take(&mut self.data),
                ));
            }
            self.event.clear();
            self.data_lines = 0;
            self.skip = false;
        } else if let Some(value) = line.strip_prefix(b"data:") {
            if !self.skip {
                if self.data_lines > 0 {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(field_value(value));
            }
            self.data_lines += 1;
        } else if let Some(value) = line.strip_prefix(b"event:") {
            self.event = field_value(value).to_vec();
            self.skip = self.data_lines == 0 && SKIPPED.contains(&self.event.as_slice());
        }
    }
}

fn field_value(value: &[u8]) -> &[u8] {
    value.strip_prefix(b" ").unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(kind: &str, data: &str) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    fn decode(body: &str, step: usize) -> (ResponsesDecoder, Result<Vec<Event>, Stop>) {
        let mut decoder = ResponsesDecoder::default();
        let mut out = Vec::new();
        for chunk in body.as_bytes().chunks(step) {
            if let Err(stop) = decoder.feed_sse(chunk, &mut out) {
                return (decoder, Err(stop));
            }
        }
        let result = decoder.finish_sse(&mut out).map(|()| out);
        (decoder, result)
    }

    fn stream() -> String {
        let response = r#"{"id":"resp_up","object":"response","instructions":"big","tools":[]}"#;
        [
            sse(
                "response.created",
                &format!(r#"{{"type":"response.created","response":{response}}}"#),
            ),
            sse(
                "response.output_item.added",
                r#"{"type":"response.output_item.added","item":{"id":"msg_1","type":"message","content":[]}}"#,
            ),
            sse(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","item_id":"msg_1","delta":"Hél"}"#,
            ),
            sse(
                "response.output_text.done",
                r#"{"type":"response.output_text.done","item_id":"msg_1","text":"Héllo"}"#,
            ),
            sse(
                "response.output_item.added",
                r#"{"type":"response.output_item.added","item":{"id":"fc_1","type":"function_call","call_id":"call_9","name":"f","arguments":""}}"#,
            ),
            sse(
                "response.function_call_arguments.delta",
                r#"{"type":"response.function_call_arguments.delta","item_id":"fc_1","delta":"{\"a\":"}"#,
            ),
            sse(
                "response.output_item.done",
                r#"{"type":"response.output_item.done","item":{"id":"fc_1","type":"function_call","arguments":"{\"a\":1}"}}"#,
            ),
            "data: [DONE]\n\n".to_owned(),
            // CRLF line ends and a comment.
            ": keep-alive\r\n\r\n".to_owned(),
            format!(
                "event: response.completed\r\ndata: {}\r\n\r\n",
                r#"{"type":"response.completed","response":{"id":"resp_up","usage":{"input_tokens":300,"input_tokens_details":{"cached_tokens":256},"output_tokens":12}}}"#
            ),
        ]
        .concat()
    }

    #[test]
    fn a_delta_s_log_probabilities_come_before_it() {
        // (keys sorted: the decoder passes the array on as canonical JSON)
        let with = r#"[{"logprob":-0.1,"token":"Hi","top_logprobs":[]}]"#;
        let body = format!(
            "data: {{\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"delta\":\"Hi\",\"logprobs\":{with}}}\n\n\
             data: {{\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"delta\":\"!\",\"logprobs\":[]}}\n\n\
             data: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\"}}}}\n\n"
        );
        let (_, events) = decode(&body, 7);
        assert_eq!(
            events,
            Ok(vec![
                Event::TextLogprobs(with.as_bytes().to_vec()),
                Event::Text("Hi".into()),
                Event::Text("!".into()),
            ])
        );
    }

    #[test]
    fn an_endless_event_is_a_protocol_error_and_the_bound_is_per_event() {
        let mut decoder = ResponsesDecoder::default();
        let mut out = Vec::new();
        let block = vec![b'a'; 1 << 20];
        // Two lifecycle events of half the bound each, in 1 MiB reads: fine.
        for _ in 0..2 {
            decoder
                .feed_sse(b"event: response.created\ndata: ", &mut out)
                .unwrap();
            for _ in 0..MAX_EVENT_BYTES / block.len() / 2 {
                decoder.feed_sse(&block, &mut out).unwrap();
            }
            decoder.feed_sse(b"\n\n", &mut out).unwrap();
        }
        // A line that never ends: an error once the bound is passed.
        decoder.feed_sse(b"data: ", &mut out).unwrap();
        let mut result = Ok(());
        for _ in 0..=MAX_EVENT_BYTES / block.len() {
            result = decoder.feed_sse(&block, &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Stop::Protocol));
        assert!(out.is_empty());
    }

    #[test]
    fn sse_lines_read_every_line_end_and_skip_a_leading_byte_order_mark() {
        // LF, CRLF and lone CR, mixed, and the body's one optional BOM (WHATWG HTML,
        // "Interpreting an event stream"); at every split of the body.
        let body: &[u8] =
            b"\xef\xbb\xbfevent: a\rdata: {}\r\rdata:two\r\ndata: lines\n\r\ndata: tail\r";
        let expected: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"a".to_vec(), b"{}".to_vec()),
            (Vec::new(), b"two\nlines".to_vec()),
            (Vec::new(), b"tail".to_vec()),
        ];
        for step in 1..=body.len() {
            let mut lines = SseLines::default();
            let mut out = Vec::new();
            for chunk in body.chunks(step) {
                lines.feed(chunk, &mut out);
            }
            lines.finish(&mut out);
            assert_eq!(out, expected, "step {step}");
        }
        // Only the body's first bytes may be a BOM; a body of part of one has no event.
        let mut lines = SseLines::default();
        let mut out = Vec::new();
        lines.feed(b"data: x\n\n\xef\xbb\xbfdata: y\n\n", &mut out);
        assert_eq!(out, vec![(Vec::new(), b"x".to_vec())]);
        let mut lines = SseLines::default();
        lines.feed(b"\xef\xbb", &mut out);
        lines.finish(&mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_stream_gives_the_model_events_in_any_chunking() {
        let expected = vec![
            Event::MessageStart,
            Event::Text("Hél".into()),
            Event::Text("lo".into()), // the rest came only in the .done event
            Event::Call {
                call_id: "call_9".into(),
                name: "f".into(),
                custom: false,
            },
            Event::Arguments("{\"a\":".into()),
            Event::Arguments("1}".into()),
            Event::Usage {
                input: Some(300),
                cached: Some(256),
                output: Some(12),
                reasoning: None,
            },
        ];
        let body = stream();
        for step in [1, 2, 7, 50, body.len()] {
            let (decoder, events) = decode(&body, step);
            assert_eq!(events, Ok(expected.clone()), "step {step}");
            assert!(decoder.done && decoder.started);
            assert_eq!(decoder.response_id.as_deref(), Some("resp_up"));
        }
    }

    #[test]
    fn a_streamed_refusal_is_emitted_once() {
        let body = [
            (
                "response.output_item.added",
                r#"{"type":"response.output_item.added","item":{"id":"m","type":"message","content":[]}}"#,
            ),
            (
                "response.refusal.delta",
                r#"{"type":"response.refusal.delta","item_id":"m","delta":"I can"}"#,
            ),
            (
                "response.refusal.done",
                r#"{"type":"response.refusal.done","item_id":"m","refusal":"I can't"}"#,
            ),
            (
                "response.output_item.done",
                r#"{"type":"response.output_item.done","item":{"id":"m","type":"message","content":[{"type":"refusal","refusal":"I can't"}]}}"#,
            ),
        ]
        .iter()
        .map(|(kind, data)| sse(kind, data))
        .collect::<String>()
            + "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\"}}\n\n";
        for step in [1, 7, body.len()] {
            let (_decoder, events) = decode(&body, step);
            let expected = vec![
                Event::MessageStart,
                Event::Refusal("I can".into()),
                Event::Refusal("'t".into()),
            ];
            assert_eq!(events, Ok(expected), "step {step}");
        }
    }

    #[test]
    fn finished_items_without_deltas_are_emitted_whole() {
        let body = sse(
            "response.output_item.done",
            r#"{"type":"response.output_item.done","item":{"id":"m","type":"message","content":[{"type":"output_text","text":"All "},{"type":"refusal","refusal":"x"},{"type":"output_text","text":"at once"}]}}"#,
        ) + "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\"}}";
        let (decoder, events) = decode(&body, 5);
        assert_eq!(
            events,
            Ok(vec![
                Event::Text("All at once".into()),
                Event::Refusal("x".into())
            ])
        );
        assert!(
            decoder.done,
            "a last event without a blank line still counts"
        );
    }

    #[test]
    fn a_reasoning_item_streams_then_comes_whole_from_its_done_event() {
        let item = r#"{"id":"rs_1","type":"reasoning","summary":[{"type":"summary_text","text":"Plan"}],"content":[{"type":"reasoning_text","text":"Hm"}],"encrypted_content":"gAAA"}"#;
        let events = [
            (
                "response.output_item.added",
                r#"{"type":"response.output_item.added","output_index":0,"item":{"id":"rs_1","type":"reasoning","summary":[]}}"#.to_owned(),
            ),
            (
                "response.reasoning_summary_part.added",
                r#"{"type":"response.reasoning_summary_part.added","item_id":"rs_1","output_index":0,"summary_index":0,"part":{"type":"summary_text","text":""}}"#.to_owned(),
            ),
            (
                "response.reasoning_summary_text.delta",
                r#"{"type":"response.reasoning_summary_text.delta","item_id":"rs_1","output_index":0,"summary_index":0,"delta":"Plan"}"#.to_owned(),
            ),
            (
                "response.reasoning_text.delta",
                r#"{"type":"response.reasoning_text.delta","item_id":"rs_1","output_index":0,"content_index":0,"delta":"Hm"}"#.to_owned(),
            ),
            (
                "response.output_item.done",
                format!(r#"{{"type":"response.output_item.done","output_index":0,"item":{item}}}"#),
            ),
            (
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","item_id":"m","output_index":1,"content_index":0,"delta":"Hi"}"#.to_owned(),
            ),
        ];
        let body: String = events.iter().map(|(name, data)| sse(name, data)).collect();
        let expected_item: serde_json::Value = serde_json::from_str(item).unwrap();
        let check = |decoded: &[Event]| {
            assert_eq!(decoded.len(), 5, "{decoded:?}");
            assert_eq!(decoded[0], Event::ReasoningStart("rs_1".into()));
            let delta = |summary, delta: &str| Event::ReasoningDelta {
                summary,
                index: 0,
                delta: delta.into(),
            };
            assert_eq!(decoded[1], delta(true, "Plan"));
            assert_eq!(decoded[2], delta(false, "Hm"));
            let Event::Item(json) = &decoded[3] else {
                panic!("{decoded:?}");
            };
            let got: serde_json::Value = serde_json::from_slice(json).unwrap();
            assert_eq!(got, expected_item);
            assert_eq!(decoded[4], Event::Text("Hi".into()));
        };
        for step in [1, 7, body.len()] {
            let (_, decoded) = decode(&body, step);
            check(&decoded.unwrap());
        }
        let mut decoder = ResponsesDecoder::default();
        let mut out = Vec::new();
        for (_, data) in &events {
            decoder.ws_message(data.as_bytes(), &mut out).unwrap();
        }
        check(&out);
    }

    #[test]
    fn a_custom_tool_call_streams_its_input() {
        let added = r#"{"type":"response.output_item.added","output_index":0,"item":{"id":"ctc_1","type":"custom_tool_call","call_id":"c","name":"apply_patch","input":""}}"#;
        let delta = r#"{"type":"response.custom_tool_call_input.delta","item_id":"ctc_1","output_index":0,"delta":"*** Begin"}"#;
        // The rest comes only in the .done events (servers that do not stream it).
        let done = r#"{"type":"response.custom_tool_call_input.done","item_id":"ctc_1","output_index":0,"input":"*** Begin Patch"}"#;
        let item_done = r#"{"type":"response.output_item.done","output_index":0,"item":{"id":"ctc_1","type":"custom_tool_call","call_id":"c","name":"apply_patch","input":"*** Begin Patch!"}}"#;
        let body = [
            ("response.output_item.added", added),
            ("response.custom_tool_call_input.delta", delta),
            ("response.custom_tool_call_input.done", done),
            ("response.output_item.done", item_done),
        ]
        .iter()
        .map(|(name, data)| sse(name, data))
        .collect::<String>();
        for step in [1, 5, body.len()] {
            let (_, decoded) = decode(&body, step);
            assert_eq!(
                decoded.unwrap(),
                vec![
                    Event::Call {
                        call_id: "c".into(),
                        name: "apply_patch".into(),
                        custom: true,
                    },
                    Event::Arguments("*** Begin".into()),
                    Event::Arguments(" Patch".into()),
                    Event::Arguments("!".into()),
                ]
            );
        }
    }

    #[test]
    fn other_items_are_taken_whole_from_their_done_event() {
        // A hosted tool call, and a custom tool call whose start never came.
        let items = [
            r#"{"id":"ws_1","type":"web_search_call","status":"completed","action":{"type":"search","query":"q"}}"#,
            r#"{"id":"ctc_2","type":"custom_tool_call","call_id":"c","name":"apply_patch","input":"x"}"#,
        ];
        let body: String = items
            .iter()
            .map(|item| {
                sse(
                    "response.output_item.done",
                    &format!(
                        r#"{{"type":"response.output_item.done","output_index":0,"item":{item}}}"#
                    ),
                )
            })
            .collect();
        let (_, decoded) = decode(&body, 3);
        let decoded = decoded.unwrap();
        assert_eq!(decoded.len(), 2);
        for (event, item) in decoded.iter().zip(items) {
            let Event::Item(json) = event else {
                panic!("{decoded:?}");
            };
            let got: serde_json::Value = serde_json::from_slice(json).unwrap();
            assert_eq!(
                got,
                serde_json::from_str::<serde_json::Value>(item).unwrap()
            );
        }
    }

    #[test]
    fn a_hosted_tool_call_starts_passes_its_events_and_finishes_whole() {
        let added = r#"{"id":"ws_1","type":"web_search_call","status":"in_progress"}"#;
        let done = r#"{"id":"ws_1","type":"web_search_call","status":"completed","action":{"type":"search","query":"q"}}"#;
        let event = |phase: &str, item: &str| {
            let ty = format!("response.web_search_call.{phase}");
            sse(
                &ty,
                &format!(
                    r#"{{"type":"{ty}","sequence_number":3,"output_index":0,"item_id":"{item}"}}"#
                ),
            )
        };
        let body = [
            sse(
                "response.output_item.added",
                &format!(
                    r#"{{"type":"response.output_item.added","output_index":0,"item":{added}}}"#
                ),
            ),
            event("in_progress", "ws_1"),
            event("searching", "ws_1"),
            // Not a call under way: not passed on.
            event("searching", "ws_9"),
            sse(
                "response.output_item.done",
                &format!(
                    r#"{{"type":"response.output_item.done","output_index":0,"item":{done}}}"#
                ),
            ),
            // After its done: not passed on either.
            event("completed", "ws_1"),
            // Without an id nothing could name it: it comes whole at its done.
            sse(
                "response.output_item.added",
                r#"{"type":"response.output_item.added","item":{"type":"web_search_call"}}"#,
            ),
        ]
        .concat();
        for step in [1, 7, body.len()] {
            let (_, decoded) = decode(&body, step);
            let decoded = decoded.unwrap();
            let json = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap();
            let value = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
            assert_eq!(decoded.len(), 4, "{decoded:?}");
            let Event::ItemStart(start) = &decoded[0] else {
                panic!("{decoded:?}");
            };
            assert_eq!(json(start), value(added));
            for (event, phase) in decoded[1..3].iter().zip(["in_progress", "searching"]) {
                let Event::ItemEvent(e) = event else {
                    panic!("{decoded:?}");
                };
                let e = json(e);
                assert_eq!(e["type"], format!("response.web_search_call.{phase}"));
                assert_eq!(e["item_id"], "ws_1");
            }
            let Event::Item(item) = &decoded[3] else {
                panic!("{decoded:?}");
            };
            assert_eq!(json(item), value(done));
        }
    }

    #[test]
    fn annotations_are_read_as_they_come_or_from_a_whole_message() {
        let citation = r#"{"type":"url_citation","url":"https://example.com/","title":"Ex","start_index":0,"end_index":5}"#;
        let body = [
            sse(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","item_id":"msg_1","delta":"Found"}"#,
            ),
            sse(
                "response.output_text.annotation.added",
                &format!(
                    r#"{{"type":"response.output_text.annotation.added","item_id":"msg_1","annotation_index":0,"annotation":{citation}}}"#
                ),
            ),
            // Not an object: nothing.
            sse(
                "response.output_text.annotation.added",
                r#"{"type":"response.output_text.annotation.added","annotation":"x"}"#,
            ),
            // A message that was not streamed: its text and annotations, whole.
            sse(
                "response.output_item.done",
                &format!(
                    r#"{{"type":"response.output_item.done","item":{{"id":"msg_2","type":"message","content":[{{"type":"output_text","text":"Again","annotations":[{citation},7]}}]}}}}"#
                ),
            ),
        ]
        .concat();
        let (_, decoded) = decode(&body, 5);
        let decoded = decoded.unwrap();
        let annotation = |event: &Event| match event {
            Event::Annotation(json) => serde_json::from_slice::<serde_json::Value>(json).unwrap(),
            other => panic!("{other:?}"),
        };
        let citation: serde_json::Value = serde_json::from_str(citation).unwrap();
        assert_eq!(decoded.len(), 4, "{decoded:?}");
        assert_eq!(decoded[0], Event::Text("Found".to_owned()));
        assert_eq!(annotation(&decoded[1]), citation);
        assert_eq!(decoded[2], Event::Text("Again".to_owned()));
        assert_eq!(annotation(&decoded[3]), citation);
        // A streamed message whose text is empty: its annotation comes once, not
        // again with its whole item.
        let body = [
            sse(
                "response.output_text.annotation.added",
                &format!(
                    r#"{{"type":"response.output_text.annotation.added","item_id":"msg_3","annotation":{citation}}}"#
                ),
            ),
            sse(
                "response.output_item.done",
                &format!(
                    r#"{{"type":"response.output_item.done","item":{{"id":"msg_3","type":"message","content":[{{"type":"output_text","text":"","annotations":[{citation}]}}]}}}}"#
                ),
            ),
        ]
        .concat();
        let (_, decoded) = decode(&body, 4);
        assert_eq!(decoded.unwrap().len(), 1);
    }

    #[test]
    fn failures_and_errors_stop_with_their_error_objects() {
        let failed = sse(
            "response.failed",
            r#"{"type":"response.failed","response":{"id":"r","error":{"code":"server_error","message":"x"}}}"#,
        );
        let (decoder, result) = decode(&failed, 3);
        assert_eq!(
            result,
            Err(Stop::Failed(Some(
                br#"{"code":"server_error","message":"x"}"#.to_vec()
            )))
        );
        assert!(!decoder.started);
        let flat = sse(
            "error",
            r#"{"type":"error","code":"rate_limit_exceeded","message":"slow down","param":null}"#,
        );
        match decode(&flat, 100).1 {
            Err(Stop::Error { error, status }) => {
                let text = String::from_utf8(error).unwrap();
                assert!(text.contains(r#""code":"rate_limit_exceeded""#), "{text}");
                assert!(text.contains(r#""type":"error""#), "{text}");
                assert_eq!(status, None);
            }
            other => panic!("{other:?}"),
        }
        let nested =
            r#"{"type":"error","status":400,"error":{"code":"previous_response_not_found"}}"#;
        let mut decoder = ResponsesDecoder::default();
        let stop = decoder.message(nested.as_bytes(), None, &mut Vec::new());
        assert_eq!(
            stop,
            Err(Stop::Error {
                error: br#"{"code":"previous_response_not_found"}"#.to_vec(),
                status: Some(400)
            })
        );
        assert_eq!(decode(&sse("x", "not json"), 4).1, Err(Stop::Protocol));
        assert_eq!(decode(&sse("x", "[1]"), 4).1, Err(Stop::Protocol));
    }

    /// A terminal event's reading: its events or stop, done, the response id.
    type Reading = (Result<Vec<Event>, Stop>, bool, Option<String>);

    /// What the fast terminal path and the full reading make of one terminal event.
    fn both_readings(data: &str) -> [Reading; 2] {
        let mut fast = ResponsesDecoder::default();
        let mut out = Vec::new();
        let fast_result = if fast.terminal(data.as_bytes(), &mut out) {
            Ok(out)
        } else {
            fast.message(data.as_bytes(), Some("response.completed"), &mut out)
                .map(|()| out)
        };
        let mut full = ResponsesDecoder::default();
        let mut out = Vec::new();
        let full_result = full
            .message(data.as_bytes(), Some("response.completed"), &mut out)
            .map(|()| out);
        [
            (fast_result, fast.done, fast.response_id),
            (full_result, full.done, full.response_id),
        ]
    }

    #[test]
    fn terminal_events_read_fast_agree_with_the_full_reading() {
        let big = format!(
            r#""instructions":"{}","tools":[{{"a":[1,2,{{"b":null}}]}}]"#,
            "x".repeat(500)
        );
        let cases = [
            format!(r#"{{"type":"response.completed","sequence_number":9,"response":{{"id":"r1",{big},"output":[{{"type":"message"}}],"usage":{{"input_tokens":5,"input_tokens_details":{{"cached_tokens":3}},"output_tokens":2,"output_tokens_details":{{"reasoning_tokens":1}},"total_tokens":7}}}}}}"#),
            r#"{"type":"response.incomplete","response":{"id":"r\u0031","usage":{"input_tokens":5}}}"#.to_owned(),
            r#"{"type":"response.completed","response":{"id":"r","usage":null}}"#.to_owned(),
            r#"{"type":"response.completed","response":{"id":"r","usage":{"output_tokens":4,"output_tokens_details":null}}}"#.to_owned(),
            r#"{"type":"response.completed","response":null}"#.to_owned(),
            r#"{"type":"response.completed"}"#.to_owned(),
            // Shapes the fast path declines: the full reading decides.
            r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":5.0,"output_tokens":true}}}"#.to_owned(),
            r#"{"type":"response.completed","response":{"id":7,"usage":{"input_tokens":18446744073709551615}}}"#.to_owned(),
            r#"{"type":"response.completed","response":{"id":"a","id":"b"}}"#.to_owned(),
            r#"{"type":"response.completed","response":[1]}"#.to_owned(),
            r#"{"type":"response.failed","response":{"id":"r","error":{"code":"server_error"}}}"#.to_owned(),
            r#"{"response":{"id":"r"}}"#.to_owned(),
            r#"{"type":"response.incomplete","response":{"id":"r","incomplete_details":{"reason":"content_filter"},"usage":{"output_tokens":3}}}"#.to_owned(),
            r#"{"type":"response.incomplete","response":{"id":"r","incomplete_details":null}}"#.to_owned(),
            r#"{"type":"response.incomplete","response":{"id":"r","incomplete_details":{"reason":null}}}"#.to_owned(),
            r#"{"type":"response.incomplete","response":{"id":"r","incomplete_details":{"reason":5}}}"#.to_owned(),
            r#"{"type":"response.incomplete","response":{"id":"r","incomplete_details":"x"}}"#.to_owned(),
            r#"{"type":"response.incomplete"}"#.to_owned(),
        ];
        for case in &cases {
            let [fast, full] = both_readings(case);
            assert_eq!(fast, full, "{case}");
        }
        let [fast, _] = both_readings(&cases[0]);
        assert_eq!(
            fast,
            (
                Ok(vec![Event::Usage {
                    input: Some(5),
                    cached: Some(3),
                    output: Some(2),
                    reasoning: Some(1),
                }]),
                true,
                Some("r1".to_owned())
            )
        );
        let reason = |case: &str| {
            let [(events, _, _), _] = both_readings(case);
            events.ok().and_then(|events| {
                events.into_iter().find_map(|event| match event {
                    Event::Incomplete(reason) => Some(reason),
                    _ => None,
                })
            })
        };
        assert_eq!(
            reason(&cases[1]).as_deref(),
            Some(DEFAULT_INCOMPLETE_REASON)
        );
        assert_eq!(reason(&cases[12]).as_deref(), Some("content_filter"));
        for case in &cases[13..] {
            assert_eq!(
                reason(case).as_deref(),
                Some(DEFAULT_INCOMPLETE_REASON),
                "{case}"
            );
        }
        assert_eq!(reason(&cases[0]), None);
    }

    #[test]
    fn relayed_fields_are_read_the_same_fast_and_in_full() {
        let moderation = r#"{"input":{"type":"moderation_result","flagged":false,"model":"omni","categories":{"hate":false},"category_scores":{"hate":1.5e-7},"category_applied_input_types":{"hate":["text"]}},"output":{"type":"error","code":"c","message":"m"}}"#;
        let cases = [
            format!(
                r#"{{"type":"response.completed","response":{{"id":"r","service_tier":"default","instructions":"x","moderation":{moderation},"tool_usage":{{"web_search":{{"num_requests":2}}}},"usage":{{"input_tokens":1}}}}}}"#
            ),
            r#"{"type":"response.incomplete","response":{"image":{"context_compression":"enabled"},"input_transformations":[{"id":"rs_1","type":"reasoning","action":"removed","reason":"model_mismatch"}],"prompt_cache_options":{"mode":"implicit","ttl":"30m"},"prompt_cache_diagnostics":{"type":"cache_hit"}}}"#.to_owned(),
            // Null or of another shape: left out.
            r#"{"type":"response.completed","response":{"service_tier":null,"moderation":"x","tool_usage":[1],"image":null,"input_transformations":{}}}"#.to_owned(),
            r#"{"type":"response.completed","response":{"service_tier":5,"prompt_cache_diagnostics":null}}"#.to_owned(),
            // The fast path declines a duplicate key: the full reading keeps the last.
            r#"{"type":"response.completed","response":{"service_tier":"auto","service_tier":"flex"}}"#.to_owned(),
        ];
        let fields = |case: &str| {
            let [(fast, _, _), (full, _, _)] = both_readings(case);
            assert_eq!(fast, full, "{case}");
            let found: Vec<String> = fast
                .unwrap_or_default()
                .into_iter()
                .filter_map(|event| match event {
                    Event::ResponseFields(json) => String::from_utf8(json).ok(),
                    _ => None,
                })
                .collect();
            assert!(found.len() <= 1, "{case}");
            found.into_iter().next()
        };
        let first = fields(&cases[0]).unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_str(&first).unwrap_or_default();
        let expected_moderation: serde_json::Value =
            serde_json::from_str(moderation).unwrap_or_default();
        assert_eq!(parsed["service_tier"], "default");
        assert_eq!(parsed["moderation"], expected_moderation);
        assert_eq!(parsed["tool_usage"]["web_search"]["num_requests"], 2);
        assert_eq!(parsed.as_object().map(|o| o.len()), Some(3), "{first}");
        assert_eq!(
            fields(&cases[1]).as_deref(),
            Some(
                r#"{"prompt_cache_diagnostics":{"type":"cache_hit"},"prompt_cache_options":{"mode":"implicit","ttl":"30m"},"input_transformations":[{"action":"removed","id":"rs_1","reason":"model_mismatch","type":"reasoning"}],"image":{"context_compression":"enabled"}}"#
            )
        );
        assert_eq!(fields(&cases[2]), None);
        assert_eq!(fields(&cases[3]), None);
        assert_eq!(
            fields(&cases[4]).as_deref(),
            Some(r#"{"service_tier":"flex"}"#)
        );
    }

    #[test]
    fn a_skipped_event_renamed_after_its_data_fails_to_decode() {
        // The `event:` line came first, so the data lines were not kept; a second
        // `event:` line then gave the event a name that is read (documented limit).
        let body = "event: response.created\ndata: {\"type\":\"response.output_text.delta\",\ndata: \"delta\":\"x\"}\nevent: response.output_text.delta\n\n";
        assert_eq!(decode(body, body.len()).1, Err(Stop::Protocol));
        // Renamed before any data: read in full.
        let body = "event: response.created\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"m\",\"delta\":\"x\"}\n\n";
        assert_eq!(decode(body, 3).1, Ok(vec![Event::Text("x".into())]));
    }

    /// The data of each SSE event of `body`, as WebSocket messages.
    fn ws_messages(body: &str) -> Vec<String> {
        body.split("\n\n")
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn websocket_messages_read_by_their_type_agree_with_the_full_reading() {
        let messages = ws_messages(&stream());
        assert!(messages.len() > 5);
        let (mut fast, mut full) = (ResponsesDecoder::default(), ResponsesDecoder::default());
        let (mut fast_out, mut full_out) = (Vec::new(), Vec::new());
        for message in &messages {
            assert_eq!(
                fast.ws_message(message.as_bytes(), &mut fast_out),
                full.message(message.as_bytes(), None, &mut full_out),
                "{message}"
            );
        }
        assert_eq!(fast_out, full_out);
        assert_eq!((fast.done, fast.started), (full.done, full.started));
        assert_eq!(fast.response_id, full.response_id);
        assert!(fast.done && fast.response_id.is_some());
    }

    #[test]
    fn a_websocket_lifecycle_message_is_not_parsed() {
        let mut decoder = ResponsesDecoder::default();
        let mut out = Vec::new();
        // The rest of a skipped message is never read: even broken JSON after its type.
        let created = br#"{"type":"response.created","response":{"instructions":"#;
        assert_eq!(decoder.ws_message(created, &mut out), Ok(()));
        assert!(decoder.started && !decoder.done && out.is_empty());
        // No readable type: read in full (and refused when it is not JSON).
        assert_eq!(
            decoder.ws_message(b"{not json", &mut out),
            Err(Stop::Protocol)
        );
    }

    #[test]
    fn the_lifecycle_events_are_not_parsed_and_an_unfinished_stream_is_not_done() {
        // Invalid JSON under a skipped name is never read.
        let body = sse("response.created", "{not json") + &sse("response.in_progress", "{}");
        let (decoder, events) = decode(&body, 4);
        assert_eq!(events, Ok(vec![]));
        assert!(decoder.started && !decoder.done);
    }
}
