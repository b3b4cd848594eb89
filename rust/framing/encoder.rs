//! The events of one response, encoded and framed the moment they are produced.
//!
//! A `ResponseEncoder` owns the per-response `sequence_number` (from 0), assigns
//! `output_index` / `content_index` and item ids, echoes `stream_id` on every event
//! of a named lane, and keeps each finished output item as a canonical `Item`, so
//! the response goes into the cache without being serialised again. The static part
//! of the Response object (id, settings, tools, ...) is encoded once; lifecycle
//! events splice status, output, usage, error and incomplete details around it.
//!
//! Event objects are those of `warmsocket/response_stream.py` (same keys and values;
//! output items have their keys sorted). Each call returns the events it produced as
//! one buffer, framed as asked:
//!
//! * `Json`: each event followed by `\n` (no JSON text holds a raw newline);
//! * `WebSocket`: each event as an unmasked server text frame (FIN, opcode 1);
//! * `Msgpack`: each event as msgpack in a binary frame (FIN, opcode 2);
//! * `Sse`: `event: <type>\ndata: <json>\n\n`.

use std::borrow::Cow;
use std::sync::Arc;

use super::msgpack;
use super::value::{write_str, Value};
use crate::error::{Error, Result};
use crate::item::{Item, Items};

/// How events are framed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Json,
    WebSocket,
    Msgpack,
    Sse,
}

impl Framing {
    pub fn from_name(name: &str) -> Option<Framing> {
        Some(match name {
            "json" => Framing::Json,
            "websocket" => Framing::WebSocket,
            "msgpack" => Framing::Msgpack,
            "sse" => Framing::Sse,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Framing::Json => "json",
            Framing::WebSocket => "websocket",
            Framing::Msgpack => "msgpack",
            Framing::Sse => "sse",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A background response not started yet.
    Queued,
    InProgress,
    Completed,
    Failed,
    Incomplete,
    /// A background response cancelled.
    Cancelled,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Cancelled => "cancelled",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Incomplete => "incomplete",
        }
    }
}

/// Token counts of a response; `total_tokens` is input + output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Of `output_tokens`, those the model spent reasoning.
    pub reasoning_tokens: u64,
}

/// What a new encoder needs to know about its response.
#[derive(Debug, Clone)]
pub struct ResponseHead<'a> {
    pub response_id: &'a str,
    /// The echoed settings and `model`, one JSON object (e.g. `CreateRequest::settings`).
    pub settings: &'a [u8],
    pub previous_response_id: Option<&'a str>,
    pub store: bool,
    pub created_at: i64,
    pub stream_id: Option<&'a str>,
    pub framing: Framing,
    /// A background response (HTTP `background: true`): it starts `queued`.
    pub background: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    Message,
    /// A message whose one content part is the model's refusal (`refusal_delta`).
    Refusal,
    FunctionCall,
    /// A custom (freeform) tool call: its text is the call's input.
    CustomToolCall,
}

impl ItemKind {
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Message => "message",
            ItemKind::Refusal => "refusal",
            ItemKind::FunctionCall => "function_call",
            ItemKind::CustomToolCall => "custom_tool_call",
        }
    }
}

#[derive(Debug)]
struct OpenItem {
    kind: ItemKind,
    id: String,
    index: usize,
    /// The text (message) or arguments (function call) so far.
    text: String,
    call_id: String,
    name: String,
    /// A message's annotations so far (`text_annotation`).
    annotations: Vec<serde_json::Value>,
    /// A message's log probabilities so far, as its deltas carried them
    /// (`text_logprobs`).
    logprobs: Vec<serde_json::Value>,
}

/// A hosted tool call (or another item whose own events tell its progress) shown
/// since its `output_item.added` and not finished yet.
#[derive(Debug)]
struct OpenHosted {
    index: usize,
    /// The item as its start gave it: what `output_item.done` carries if it is closed
    /// before its whole item comes.
    item: Arc<Item>,
    id: String,
}

/// The static entries of the Response object, encoded once.
#[derive(Debug)]
struct Statics {
    /// `"id":...,"object":"response",...` (JSON entries, no braces).
    json: Vec<u8>,
    /// The same entries as msgpack key/value pairs (msgpack framing only).
    msgpack: Vec<u8>,
    count: usize,
    /// Where the settings' entries start in `json` (after their comma), and in
    /// `msgpack`: what comes before is the entries of `STATIC_FIELDS`.
    settings_at: usize,
    msgpack_settings_at: usize,
}

/// The event stream of one response.
#[derive(Debug)]
pub struct ResponseEncoder {
    framing: Framing,
    stream_id: Option<String>,
    background: bool,
    created_at: i64,
    statics: Statics,
    sequence_number: u64,
    status: Status,
    completed_at: Option<i64>,
    usage: Option<Usage>,
    /// The `error` object of a failed response (JSON).
    error: Option<Vec<u8>>,
    incomplete: Option<String>,
    /// What `set_response_fields` was given (a JSON object), kept in the meta.
    response_fields: Option<Vec<u8>>,
    output: Vec<Arc<Item>>,
    open: Option<OpenItem>,
    /// The `status` `open` gets when it is closed (`completed`; `incomplete` in
    /// `close_item_incomplete`).
    open_item_status: &'static str,
    /// Log probabilities for the next text delta (`text_logprobs`).
    pending_logprobs: Option<Vec<serde_json::Value>>,
    /// The response id after its first `_` (all of it without one): what the ids of
    /// the items this response makes are built from (`item_id`).
    item_id_stem: String,
    /// The reasoning item being streamed (never at the same time as `open`).
    reasoning: Option<OpenReasoning>,
    /// The hosted tool call under way (never at the same time as the other two).
    hosted: Option<OpenHosted>,
    /// Hosted tool calls closed before their whole item came: (id, output index).
    closed_early: Vec<(String, usize)>,
    out: Vec<u8>,
}

const STATIC_FIELDS: usize = 6;

/// Hosted tool calls closed early whose whole item may still replace them (a bound
/// on what a misbehaving upstream can make a response remember).
const MAX_CLOSED_EARLY: usize = 64;

impl ResponseEncoder {
    /// A new encoder. Fails when `settings` is not a JSON object.
    pub fn new(head: ResponseHead<'_>) -> Result<ResponseEncoder> {
        let settings = head.settings;
        let inner = match settings {
            [b'{', inner @ .., b'}'] => inner,
            _ => return Err(Error::invalid_argument("settings must be a JSON object")),
        };
        let mut json = Vec::with_capacity(settings.len() + head.response_id.len() + 128);
        json.extend_from_slice(b"\"id\":");
        write_str(head.response_id, &mut json);
        json.extend_from_slice(b",\"object\":\"response\",\"created_at\":");
        json.extend_from_slice(itoa::Buffer::new().format(head.created_at).as_bytes());
        json.extend_from_slice(b",\"previous_response_id\":");
        match head.previous_response_id {
            Some(id) => write_str(id, &mut json),
            None => json.extend_from_slice(b"null"),
        }
        json.extend_from_slice(if head.store {
            b",\"store\":true"
        } else {
            b",\"store\":false"
        });
        json.extend_from_slice(if head.background {
            b",\"background\":true"
        } else {
            b",\"background\":false"
        });
        if !inner.iter().all(u8::is_ascii_whitespace) {
            json.push(b',');
        }
        let settings_at = json.len();
        json.extend_from_slice(inner);
        let mut statics = Statics {
            json,
            msgpack: Vec::new(),
            count: STATIC_FIELDS,
            settings_at,
            msgpack_settings_at: 0,
        };
        if head.framing == Framing::Msgpack {
            let value = super::json::parse(
                std::str::from_utf8(settings)
                    .map_err(|_| Error::invalid_argument("settings must be UTF-8 JSON"))?,
            )
            .map_err(|_| Error::invalid_argument("settings must be a JSON object"))?;
            let Value::Object(object) = value else {
                return Err(Error::invalid_argument("settings must be a JSON object"));
            };
            let mp = &mut statics.msgpack;
            msgpack::write_str("id", mp);
            msgpack::write_str(head.response_id, mp);
            msgpack::write_str("object", mp);
            msgpack::write_str("response", mp);
            msgpack::write_str("created_at", mp);
            msgpack::write_int(head.created_at, mp);
            msgpack::write_str("previous_response_id", mp);
            match head.previous_response_id {
                Some(id) => msgpack::write_str(id, mp),
                None => msgpack::write_nil(mp),
            }
            msgpack::write_str("store", mp);
            msgpack::write_bool(head.store, mp);
            msgpack::write_str("background", mp);
            msgpack::write_bool(head.background, mp);
            statics.msgpack_settings_at = mp.len();
            for (k, v) in object.iter() {
                msgpack::write_str(k, mp);
                msgpack::write_value(v, mp);
            }
            statics.count += object.len();
        }
        Ok(ResponseEncoder {
            framing: head.framing,
            stream_id: head.stream_id.map(str::to_owned),
            background: head.background,
            created_at: head.created_at,
            statics,
            sequence_number: 0,
            status: Status::InProgress,
            completed_at: None,
            usage: None,
            error: None,
            incomplete: None,
            response_fields: None,
            output: Vec::new(),
            open: None,
            open_item_status: "completed",
            pending_logprobs: None,
            item_id_stem: head
                .response_id
                .split_once('_')
                .map_or(head.response_id, |(_, stem)| stem)
                .to_owned(),
            reasoning: None,
            hosted: None,
            closed_early: Vec::new(),
            out: Vec::with_capacity(1024),
        })
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }
    /// The number the next event gets.
    pub fn sequence_number(&self) -> u64 {
        self.sequence_number
    }
    pub fn status(&self) -> Status {
        self.status
    }
    pub fn created_at(&self) -> i64 {
        self.created_at
    }
    pub fn completed_at(&self) -> Option<i64> {
        self.completed_at
    }
    /// The kind of the open item, if any.
    /// Whether a reasoning item is being streamed (`reasoning_start`).
    pub fn reasoning_open(&self) -> bool {
        self.reasoning.is_some()
    }
    pub fn open_kind(&self) -> Option<ItemKind> {
        self.open.as_ref().map(|i| i.kind)
    }
    /// Whether a hosted tool call is under way (`item_start`).
    pub fn hosted_open(&self) -> bool {
        self.hosted.is_some()
    }
    /// The id of the item under way, of any kind.
    pub fn open_item_id(&self) -> Option<&str> {
        if let Some(item) = &self.open {
            return Some(&item.id);
        }
        if let Some(r) = &self.reasoning {
            return Some(&r.id);
        }
        self.hosted.as_ref().map(|h| h.id.as_str())
    }
    /// What the last call wrote (the bytes it returned).
    pub fn written(&self) -> &[u8] {
        &self.out
    }
    /// The finished output items.
    pub fn output(&self) -> &[Arc<Item>] {
        &self.output
    }
    pub fn output_items(&self) -> Items {
        Items::from_vec(self.output.clone())
    }

    // -- lifecycle ---------------------------------------------------------------------

    /// `response.created` and `response.in_progress`; for a background response
    /// `response.created` and `response.queued`, status `queued` until `in_progress`.
    pub fn start(&mut self) -> &[u8] {
        self.out.clear();
        if self.background {
            self.status = Status::Queued;
            self.lifecycle("response.created");
            self.lifecycle("response.queued");
            return &self.out;
        }
        self.lifecycle("response.created");
        self.lifecycle("response.in_progress");
        &self.out
    }

    /// A queued (background) response starts: `response.in_progress`.
    pub fn in_progress(&mut self) -> &[u8] {
        self.out.clear();
        self.status = Status::InProgress;
        self.lifecycle("response.in_progress");
        &self.out
    }

    /// A background response is cancelled: the open item is closed (its `.done`
    /// events) and the status is `cancelled`. No terminal event: the API has none
    /// for a cancellation; the stream ends.
    pub fn cancel(&mut self) -> &[u8] {
        self.out.clear();
        // Cut short, as an item a response ends `incomplete` in is.
        self.open_item_status = "incomplete";
        self.close_open();
        self.status = Status::Cancelled;
        &self.out
    }

    /// Close the open item, then `response.completed`.
    pub fn complete(&mut self, usage: Usage, completed_at: i64) -> &[u8] {
        self.out.clear();
        self.close_open();
        self.status = Status::Completed;
        self.completed_at = Some(completed_at);
        self.usage = Some(usage);
        self.lifecycle("response.completed");
        &self.out
    }

    /// Close the open item, then `response.failed` with `error` (a JSON object, at
    /// least `{code, message}`; upstream errors add `type` and `param`).
    pub fn fail(&mut self, error: &[u8], usage: Option<Usage>) -> Result<&[u8]> {
        match super::json::decode(error) {
            Ok(Value::Object(_)) => {}
            _ => return Err(Error::invalid_argument("error must be a JSON object")),
        }
        self.out.clear();
        self.close_open();
        self.status = Status::Failed;
        self.usage = usage;
        self.error = Some(error.to_vec());
        self.lifecycle("response.failed");
        Ok(&self.out)
    }

    /// Close the open item, then `response.incomplete` with `incomplete_details.reason`.
    pub fn incomplete(&mut self, reason: &str, usage: Usage, completed_at: i64) -> &[u8] {
        self.out.clear();
        self.close_open();
        self.status = Status::Incomplete;
        self.completed_at = Some(completed_at);
        self.usage = Some(usage);
        self.incomplete = Some(reason.to_owned());
        self.lifecycle("response.incomplete");
        &self.out
    }

    // -- items -------------------------------------------------------------------------

    /// Assistant text: opens a message item first when none is open.
    pub fn text_delta(&mut self, text: &str) -> &[u8] {
        self.out.clear();
        if self.open_kind() != Some(ItemKind::Message) {
            self.close_open();
            self.open_item(ItemKind::Message, String::new(), String::new());
        }
        let logprobs = self.pending_logprobs.take();
        let Some(item) = self.open.as_mut() else {
            return &self.out;
        };
        item.text.push_str(text);
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let ty = "response.output_text.delta";
        emit(&mut self.out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 5);
            locate(s, item);
            s.key("content_index");
            s.uint(0);
            s.key("logprobs");
            json_array(s, logprobs.as_deref().unwrap_or_default());
            s.key("delta");
            s.str(text);
            s.end();
        });
        if let Some(logprobs) = logprobs {
            item.logprobs.extend(logprobs);
        }
        self.sequence_number += 1;
        &self.out
    }

    /// The model's refusal: opens a message whose one content part is a `refusal`
    /// first when none is open (closing the open item, a message of text too).
    pub fn refusal_delta(&mut self, text: &str) -> &[u8] {
        self.out.clear();
        if self.open_kind() != Some(ItemKind::Refusal) {
            self.close_open();
            self.open_item(ItemKind::Refusal, String::new(), String::new());
        }
        let Some(item) = self.open.as_mut() else {
            return &self.out;
        };
        item.text.push_str(text);
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let ty = "response.refusal.delta";
        emit(&mut self.out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 4);
            locate(s, item);
            s.key("content_index");
            s.uint(0);
            s.key("delta");
            s.str(text);
            s.end();
        });
        self.sequence_number += 1;
        &self.out
    }

    /// The log probabilities of the next text delta (a JSON array, as an upstream's
    /// `response.output_text.delta` carried them): written in that delta's event and
    /// kept with the message (its `output_text.done` and its part, where each gets
    /// the `bytes` of its token when it has none).
    pub fn text_logprobs(&mut self, logprobs: &[u8]) -> Result<()> {
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(logprobs)
            .map_err(|_| Error::invalid_argument("logprobs must be a JSON array"))?;
        self.pending_logprobs = Some(parsed);
        Ok(())
    }

    /// Starts a function_call item (closing the open one).
    pub fn tool_call_start(&mut self, call_id: &str, name: &str) -> &[u8] {
        self.out.clear();
        self.close_open();
        self.open_item(ItemKind::FunctionCall, call_id.to_owned(), name.to_owned());
        &self.out
    }

    /// Starts a custom (freeform) tool call item (closing the open one); its input
    /// comes as `tool_arguments_delta`s.
    pub fn custom_tool_call_start(&mut self, call_id: &str, name: &str) -> &[u8] {
        self.out.clear();
        self.close_open();
        self.open_item(
            ItemKind::CustomToolCall,
            call_id.to_owned(),
            name.to_owned(),
        );
        &self.out
    }

    /// Arguments of the open function_call item, or input of the open custom tool
    /// call; nothing when neither is open.
    pub fn tool_arguments_delta(&mut self, delta: &str) -> &[u8] {
        self.out.clear();
        let Some(item) = self
            .open
            .as_mut()
            .filter(|i| !matches!(i.kind, ItemKind::Message | ItemKind::Refusal))
        else {
            return &self.out;
        };
        item.text.push_str(delta);
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let ty = if item.kind == ItemKind::CustomToolCall {
            "response.custom_tool_call_input.delta"
        } else {
            "response.function_call_arguments.delta"
        };
        emit(&mut self.out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 3);
            locate(s, item);
            s.key("delta");
            s.str(delta);
            s.end();
        });
        self.sequence_number += 1;
        &self.out
    }

    /// A whole output item of a type the encoder does not build itself, as a JSON
    /// object: a reasoning item (`reasoning_item`), or a custom or hosted tool call
    /// and the like, which closes the open item and is given as it is in an
    /// `output_item.added` and an `output_item.done` (its own deltas are not
    /// relayed). Kept as an output item, so it stays in the chain. Fails, with
    /// nothing changed, for anything but an object with a string `type` other than
    /// `message` and `function_call` (those are built from deltas) or for an item
    /// over the item limits.
    pub fn output_item(&mut self, item: &[u8]) -> Result<&[u8]> {
        let invalid = || Error::invalid_argument("item must be a JSON object with a type");
        let value: serde_json::Value = serde_json::from_slice(item).map_err(|_| invalid())?;
        match value.get("type").and_then(serde_json::Value::as_str) {
            Some("reasoning") => return self.reasoning_item(item),
            Some("message" | "function_call") => {
                return Err(Error::invalid_argument(
                    "messages and function calls are built from their deltas",
                ))
            }
            Some(_) if value.is_object() => {}
            _ => return Err(invalid()),
        }
        let index = self.output.len();
        let done = Arc::new(Item::from_value(index, &value, usize::MAX)?);
        self.out.clear();
        let id = value.get("id").and_then(serde_json::Value::as_str);
        if let Some(hosted) = self.hosted.take_if(|h| Some(h.id.as_str()) == id) {
            // It finishes the hosted tool call under way: only its `.done`.
            let ty = "response.output_item.done";
            let at = (self.stream_id.as_deref(), self.sequence_number, ty);
            item_event(&mut self.out, self.framing, at, hosted.index, done.json());
            self.sequence_number += 1;
            self.output.push(done);
            return Ok(&self.out);
        }
        let early = self
            .closed_early
            .iter()
            .position(|(i, _)| Some(i.as_str()) == id);
        if let Some(at) = early {
            // It finishes one closed early (another item came first): its `.done`
            // again, at its index, with the whole item in its place.
            let (_, index) = self.closed_early.swap_remove(at);
            let ty = "response.output_item.done";
            let at = (self.stream_id.as_deref(), self.sequence_number, ty);
            item_event(&mut self.out, self.framing, at, index, done.json());
            self.sequence_number += 1;
            if let Some(slot) = self.output.get_mut(index) {
                *slot = done;
            }
            return Ok(&self.out);
        }
        self.close_open();
        let index = self.output.len();
        let (stream_id, framing) = (self.stream_id.as_deref(), self.framing);
        let mut seq = self.sequence_number;
        for ty in ["response.output_item.added", "response.output_item.done"] {
            item_event(
                &mut self.out,
                framing,
                (stream_id, seq, ty),
                index,
                done.json(),
            );
            seq += 1;
        }
        self.sequence_number = seq;
        self.output.push(done);
        Ok(&self.out)
    }

    /// A hosted tool call starts (web search, file search, code interpreter, image
    /// generation, an MCP call, ...: any item type not built here from deltas but
    /// reasoning): closes the open item and gives its `output_item.added` with the
    /// item as it is (usually `status: in_progress`). Its own progress events then
    /// come through `item_event`, and the whole item of the same id (`output_item`)
    /// finishes it with its `output_item.done`; an item closed before that (another
    /// item starts, the response ends) is kept as its start gave it. Fails, with
    /// nothing changed, for anything but an object with a non-empty string `id` and
    /// a string `type` other than `message`, `function_call`, `custom_tool_call` and
    /// `reasoning`, or for an item over the item limits.
    pub fn item_start(&mut self, item: &[u8]) -> Result<&[u8]> {
        let invalid = || {
            Error::invalid_argument("item must be a JSON object with an id and a hosted tool type")
        };
        let value: serde_json::Value = serde_json::from_slice(item).map_err(|_| invalid())?;
        match value.get("type").and_then(serde_json::Value::as_str) {
            Some("message" | "function_call" | "custom_tool_call" | "reasoning") | None => {
                return Err(invalid())
            }
            Some(_) => {}
        }
        let id = match value.get("id").and_then(serde_json::Value::as_str) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => return Err(invalid()),
        };
        let started = Arc::new(Item::from_value(self.output.len(), &value, usize::MAX)?);
        self.out.clear();
        self.close_open();
        let index = self.output.len();
        let ty = "response.output_item.added";
        let at = (self.stream_id.as_deref(), self.sequence_number, ty);
        item_event(&mut self.out, self.framing, at, index, started.json());
        self.sequence_number += 1;
        self.hosted = Some(OpenHosted {
            index,
            item: started,
            id,
        });
        Ok(&self.out)
    }

    /// A progress event of the hosted tool call under way (such as
    /// `response.web_search_call.searching` or
    /// `response.code_interpreter_call_code.delta`), a JSON object with a string
    /// `type` and the item's `item_id`: given with this response's
    /// `sequence_number`, `stream_id` and the item's `output_index`, its other
    /// fields as they are. Nothing when its `item_id` is not the call under way's
    /// (closed already by another item). Fails, with nothing changed, for anything
    /// but a JSON object with a string `type`.
    pub fn item_event(&mut self, event: &[u8]) -> Result<&[u8]> {
        let invalid = || Error::invalid_argument("event must be a JSON object with a type");
        let value = super::json::decode(event).map_err(|_| invalid())?;
        let Value::Object(object) = value else {
            return Err(invalid());
        };
        let Some(ty) = object.get("type").and_then(Value::as_str) else {
            return Err(invalid());
        };
        // The type names the SSE event: a line break in it would end that line and
        // start fields (or whole events) of the upstream's choosing.
        if !is_event_name(ty) {
            return Err(Error::invalid_argument(
                "event type must be letters, digits, '.', '_' or '-'",
            ));
        }
        self.out.clear();
        let Some(hosted) = &self.hosted else {
            return Ok(&self.out);
        };
        if object.get("item_id").and_then(Value::as_str) != Some(hosted.id.as_str()) {
            return Ok(&self.out);
        }
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let own = |k: &str| matches!(k, "type" | "stream_id" | "sequence_number" | "output_index");
        emit(&mut self.out, self.framing, ty, |s| {
            let fields = object.iter().filter(|(k, _)| !own(k)).count();
            head(s, stream_id, seq, ty, fields + 1);
            s.key("output_index");
            s.uint(hosted.index as u64);
            for (k, v) in object.iter() {
                if !own(k) {
                    s.key(k);
                    s.value(v);
                }
            }
            s.end();
        });
        self.sequence_number += 1;
        Ok(&self.out)
    }

    /// An annotation of the message's text (a web search's `url_citation`, a file
    /// citation, ...), a JSON object with a string `type`:
    /// `response.output_text.annotation.added` with its `annotation_index`, and kept
    /// in the text part (`content_part.done`, `output_item.done`, the chain). Opens a
    /// message first when none is open. Fails, with nothing changed, for anything but
    /// such an object.
    pub fn text_annotation(&mut self, annotation: &[u8]) -> Result<&[u8]> {
        let invalid = || Error::invalid_argument("annotation must be a JSON object with a type");
        let value: serde_json::Value = serde_json::from_slice(annotation).map_err(|_| invalid())?;
        if !value.get("type").is_some_and(serde_json::Value::is_string) {
            return Err(invalid());
        }
        let json = serde_json::to_vec(&value).map_err(|_| invalid())?;
        self.out.clear();
        if self.open_kind() != Some(ItemKind::Message) {
            self.close_open();
            self.open_item(ItemKind::Message, String::new(), String::new());
        }
        let Some(item) = self.open.as_mut() else {
            return Ok(&self.out);
        };
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let ty = "response.output_text.annotation.added";
        let index = item.annotations.len();
        emit(&mut self.out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 5);
            locate(s, item);
            s.key("content_index");
            s.uint(0);
            s.key("annotation_index");
            s.uint(index as u64);
            s.key("annotation");
            s.json(&json);
            s.end();
        });
        self.sequence_number += 1;
        item.annotations.push(value);
        Ok(&self.out)
    }

    /// Opens a reasoning item (`output_item.added`), closing the open item: its
    /// parts then come as deltas (`reasoning_delta`), and it ends with the whole
    /// item (`output_item`, which adds what was not streamed, such as
    /// `encrypted_content`) or when another item starts (built from the deltas).
    /// `id` is the upstream's item id (a new `rs_` id when None or empty).
    pub fn reasoning_start(&mut self, id: Option<&str>) -> &[u8] {
        self.out.clear();
        self.close_open();
        self.open_reasoning(id.filter(|id| !id.is_empty()), false);
        &self.out
    }

    /// Reasoning text, streamed: a delta of summary part `index` (`summary`) or of
    /// `reasoning_text` content part `index`. Opens a reasoning item first when none
    /// is open; a delta of another part than the last closes that part.
    pub fn reasoning_delta(&mut self, summary: bool, index: usize, delta: &str) -> &[u8] {
        self.out.clear();
        if self.reasoning.is_none() {
            self.close_open();
            self.open_reasoning(None, false);
        }
        let (stream_id, framing) = (self.stream_id.as_deref(), self.framing);
        let mut seq = self.sequence_number;
        let Some(r) = self.reasoning.as_mut() else {
            return &self.out;
        };
        let kind = if summary {
            PartKind::Summary
        } else {
            PartKind::Text
        };
        // A part index far past the parts so far is not a part of a real stream.
        let index = index.min(r.parts(kind).len());
        if r.current != Some((kind, index)) {
            seq = r.close_part(&mut self.out, framing, stream_id, seq);
            let parts = r.parts_mut(kind);
            if parts.len() <= index {
                parts.push(String::new());
            }
            let at = (r.id.as_str(), r.index);
            let step = PartStep::Added;
            part_event(
                &mut self.out,
                framing,
                (stream_id, seq),
                at,
                (kind, index),
                step,
                "",
            );
            seq += 1;
            r.current = Some((kind, index));
        }
        let at = (r.id.as_str(), r.index);
        let step = PartStep::Delta;
        part_event(
            &mut self.out,
            framing,
            (stream_id, seq),
            at,
            (kind, index),
            step,
            delta,
        );
        seq += 1;
        if let Some(part) = r.parts_mut(kind).get_mut(index) {
            part.push_str(delta);
        }
        self.sequence_number = seq;
        &self.out
    }

    /// A whole reasoning item (an upstream's, or the built-in model's) as a JSON
    /// object: it finishes the open reasoning item of the same id (or the one opened
    /// without an id), else closes the open item and gives the item's events in the
    /// order OpenAI streams them: `output_item.added`; per summary part, the part
    /// added, its text in one delta, the text done, the part done; per
    /// `reasoning_text` content part the same with `content_part` and
    /// `reasoning_text` events; `output_item.done`. Parts streamed already are not
    /// given again. The item keeps its `id` (a new `rs_` id when it has none),
    /// `summary`, `content` and `encrypted_content`, so that it can go back to the
    /// upstream that made it. Fails, with nothing changed, when `item` is not a
    /// `reasoning` object whose parts have the right types.
    pub fn reasoning_item(&mut self, item: &[u8]) -> Result<&[u8]> {
        let reasoning = Reasoning::parse(item)?;
        self.out.clear();
        let continues = self
            .reasoning
            .as_ref()
            .is_some_and(|r| match &reasoning.id {
                Some(id) => *id == r.id || r.generated_id,
                None => true,
            });
        if !continues {
            self.close_open();
            self.open_reasoning(reasoning.id.as_deref(), reasoning.content.is_some());
        }
        if let Some(r) = self.reasoning.take() {
            self.finish_reasoning(r, Some(reasoning));
        }
        Ok(&self.out)
    }

    /// Finish the open item, if any (its `.done` events).
    pub fn close_item(&mut self) -> &[u8] {
        self.out.clear();
        self.close_open();
        &self.out
    }

    /// Finish the open item, if any, cut short: a message or function call gets
    /// `status: incomplete` (the model stopped in it, at its output token limit).
    pub fn close_item_incomplete(&mut self) -> &[u8] {
        self.out.clear();
        self.open_item_status = "incomplete";
        self.close_open();
        self.open_item_status = "completed";
        &self.out
    }

    /// An event of another kind (steering) numbered in this response's sequence: the
    /// JSON object `event` gets this response's `sequence_number` and `stream_id`.
    pub fn event(&mut self, event: &[u8]) -> Result<&[u8]> {
        self.out.clear();
        let value = super::json::decode(event)
            .map_err(|_| Error::invalid_argument("event must be a JSON object"))?;
        let Value::Object(object) = value else {
            return Err(Error::invalid_argument("event must be a JSON object"));
        };
        let ty = object.get("type").and_then(Value::as_str).unwrap_or("");
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        emit(&mut self.out, self.framing, ty, |s| {
            let fields = object
                .iter()
                .filter(|(k, _)| !matches!(*k, "stream_id" | "sequence_number"))
                .count();
            s.begin(fields + 1 + usize::from(stream_id.is_some()));
            if let Some(id) = stream_id {
                s.key("stream_id");
                s.str(id);
            }
            s.key("sequence_number");
            s.uint(seq);
            for (k, v) in object.iter() {
                if !matches!(k, "stream_id" | "sequence_number") {
                    s.key(k);
                    s.value(v);
                }
            }
            s.end();
        });
        self.sequence_number += 1;
        Ok(&self.out)
    }

    /// Fields the upstream's Response gave about what it did (the `response_fields` of
    /// `rust/framing/upstream.rs`), a JSON object: from now on the Response has them,
    /// each in place of a setting of the same name (`service_tier`) or added. Fails,
    /// changing nothing, when `fields` is not a JSON object.
    pub fn set_response_fields(&mut self, fields: &[u8]) -> Result<()> {
        let not_object = || Error::invalid_argument("response fields must be a JSON object");
        let text = std::str::from_utf8(fields).map_err(|_| not_object())?;
        let Ok(Value::Object(fields)) = super::json::parse(text) else {
            return Err(not_object());
        };
        if fields.is_empty() {
            return Ok(());
        }
        let statics = &self.statics;
        let settings = std::str::from_utf8(&statics.json[statics.settings_at..])
            .ok()
            .map(|inner| format!("{{{inner}}}"));
        let settings = match settings.as_deref().map(super::json::parse) {
            Some(Ok(Value::Object(settings))) => settings,
            _ => return Err(Error::invalid_argument("settings must be a JSON object")),
        };
        let kept: Vec<(&str, &Value<'_>)> = settings
            .iter()
            .filter(|(k, _)| !fields.contains_key(k))
            .chain(fields.iter())
            .collect();
        // The static fields, then (`kept` has the fields at least) a comma and the rest.
        let head = &statics.json[..statics.settings_at];
        let mut json = head.strip_suffix(b",").unwrap_or(head).to_vec();
        json.push(b',');
        let settings_at = json.len();
        for (i, (k, v)) in kept.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            write_str(k, &mut json);
            json.push(b':');
            super::value::write_canonical(v, &mut json);
        }
        let mut msgpack = Vec::new();
        if self.framing == Framing::Msgpack {
            msgpack.extend_from_slice(&statics.msgpack[..statics.msgpack_settings_at]);
            for (k, v) in &kept {
                msgpack::write_str(k, &mut msgpack);
                msgpack::write_value(v, &mut msgpack);
            }
        }
        self.statics = Statics {
            json,
            msgpack,
            count: STATIC_FIELDS + kept.len(),
            settings_at,
            msgpack_settings_at: statics.msgpack_settings_at,
        };
        // The meta keeps every field given so far, the later of two of one name.
        let earlier = self.response_fields.take();
        let earlier = earlier
            .as_deref()
            .and_then(|json| std::str::from_utf8(json).ok())
            .and_then(|json| super::json::parse(json).ok());
        let mut entries: Vec<(Cow<'_, str>, Value<'_>)> = match earlier {
            Some(Value::Object(earlier)) => earlier
                .into_entries()
                .into_iter()
                .filter(|(k, _)| !fields.contains_key(k))
                .collect(),
            _ => Vec::new(),
        };
        entries.extend(fields.into_entries());
        let mut kept = Vec::with_capacity(text.len());
        let merged = Value::Object(super::value::Object::from_entries(entries));
        super::value::write_canonical(&merged, &mut kept);
        self.response_fields = Some(kept);
        Ok(())
    }

    // -- whole objects -----------------------------------------------------------------

    /// The Response object now, as JSON (the terminal event's `response`).
    pub fn response_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.statics.json.len() + 256);
        self.write_response(&mut JsonSink(&mut out));
        out
    }

    /// What the cache keeps beside the settings: status, times, usage, error, details,
    /// and the `response_fields` given (`set_response_fields`).
    pub fn meta_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let s = &mut JsonSink(&mut out);
        s.begin(6);
        s.key("status");
        s.str(self.status.name());
        s.key("created_at");
        s.int(self.created_at);
        s.key("completed_at");
        opt_int(s, self.completed_at);
        s.key("usage");
        usage(s, self.usage);
        s.key("error");
        self.write_error(s);
        s.key("incomplete_details");
        self.write_incomplete(s);
        self.write_response_fields(s);
        s.end();
        out
    }

    /// The meta [`ResponseEncoder::meta_json`] will give once this response ends
    /// `completed` or (with `incomplete`, its reason) `incomplete`, plus the
    /// `instructions` key of its prompt, last: what the cache stores before the
    /// terminal event is sent. Changes nothing.
    pub fn terminal_meta(
        &self,
        usage_counts: Usage,
        completed_at: i64,
        incomplete: Option<&str>,
        instructions: Option<&str>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        let s = &mut JsonSink(&mut out);
        s.begin(7);
        s.key("status");
        s.str(match incomplete {
            None => Status::Completed.name(),
            Some(_) => Status::Incomplete.name(),
        });
        s.key("created_at");
        s.int(self.created_at);
        s.key("completed_at");
        s.int(completed_at);
        s.key("usage");
        usage(s, Some(usage_counts));
        s.key("error");
        s.null();
        s.key("incomplete_details");
        incomplete_details(s, incomplete);
        self.write_response_fields(s);
        s.key("instructions");
        match instructions {
            None => s.null(),
            Some(key) => s.str(key),
        }
        if self.background {
            s.key("background");
            s.json(b"true");
        }
        s.end();
        out
    }

    // -- internals ---------------------------------------------------------------------

    /// Start a reasoning item: `output_item.added` (with `content: []` when
    /// `with_content`). The open item must be closed already.
    fn open_reasoning(&mut self, id: Option<&str>, with_content: bool) {
        let (id, generated_id) = match id {
            Some(id) => (id.to_owned(), false),
            None => (self.item_id("rs", self.output.len()), true),
        };
        let index = self.output.len();
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let ty = "response.output_item.added";
        emit(&mut self.out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 2);
            s.key("output_index");
            s.uint(index as u64);
            s.key("item");
            s.begin(3 + usize::from(with_content));
            s.key("id");
            s.str(&id);
            s.key("type");
            s.str("reasoning");
            s.key("summary");
            s.begin_array(0);
            s.end_array();
            if with_content {
                s.key("content");
                s.begin_array(0);
                s.end_array();
            }
            s.end();
            s.end();
        });
        self.sequence_number += 1;
        self.reasoning = Some(OpenReasoning {
            id,
            generated_id,
            index,
            summary: Vec::new(),
            content: Vec::new(),
            current: None,
        });
    }

    /// Close the streamed reasoning item `r`: its open part's `done` events, then,
    /// with the whole item (`last`), the parts not streamed yet given whole; then
    /// `output_item.done` with the item, under the id its events carried: `last`
    /// as it came, else the item the deltas made.
    fn finish_reasoning(&mut self, mut r: OpenReasoning, last: Option<Reasoning>) {
        let (stream_id, framing) = (self.stream_id.as_deref(), self.framing);
        let mut seq = r.close_part(&mut self.out, framing, stream_id, self.sequence_number);
        let at = (r.id.as_str(), r.index);
        let (summary, content, encrypted) = match last {
            Some(last) => {
                for (i, text) in last.summary.iter().enumerate().skip(r.summary.len()) {
                    let part = (PartKind::Summary, i);
                    seq = whole_part(&mut self.out, framing, (stream_id, seq), at, part, text);
                }
                let streamed = r.content.len();
                for (i, text) in last.content.iter().flatten().enumerate().skip(streamed) {
                    let part = (PartKind::Text, i);
                    seq = whole_part(&mut self.out, framing, (stream_id, seq), at, part, text);
                }
                // The id stays the one its events carried (the upstream's, unless
                // its deltas came before any id).
                (last.summary, last.content, last.encrypted_content)
            }
            None => {
                let content = (!r.content.is_empty()).then(|| std::mem::take(&mut r.content));
                (std::mem::take(&mut r.summary), content, None)
            }
        };
        let parts = |texts: &[String], ty: &str| {
            texts
                .iter()
                .map(|t| serde_json::json!({"type": ty, "text": t}))
                .collect::<Vec<_>>()
        };
        let mut value = serde_json::json!({
            "id": r.id,
            "type": "reasoning",
            "summary": parts(&summary, "summary_text"),
        });
        if let Some(content) = &content {
            value["content"] = parts(content, "reasoning_text").into();
        }
        if let Some(encrypted) = encrypted {
            value["encrypted_content"] = encrypted.into();
        }
        // An object of strings: building it cannot fail.
        if let Ok(done) = Item::from_value(r.index, &value, usize::MAX) {
            let done = Arc::new(done);
            let ty = "response.output_item.done";
            item_event(
                &mut self.out,
                framing,
                (stream_id, seq, ty),
                r.index,
                done.json(),
            );
            seq += 1;
            self.output.push(done);
        }
        self.sequence_number = seq;
    }

    /// The id of the item this response makes at output `index`: `<prefix>_<the
    /// response id after its first '_'>_<index>`, so an `item_reference` to it names
    /// the response that holds it (`warmsocket.ids.response_of_item`).
    fn item_id(&self, prefix: &str, index: usize) -> String {
        let stem = &self.item_id_stem;
        let mut id = String::with_capacity(prefix.len() + stem.len() + 8);
        id.push_str(prefix);
        id.push('_');
        id.push_str(stem);
        id.push('_');
        id.push_str(itoa::Buffer::new().format(index));
        id
    }

    fn open_item(&mut self, kind: ItemKind, call_id: String, name: String) {
        let prefix = match kind {
            ItemKind::Message | ItemKind::Refusal => "msg",
            ItemKind::FunctionCall => "fc",
            ItemKind::CustomToolCall => "ctc",
        };
        let item = OpenItem {
            kind,
            id: self.item_id(prefix, self.output.len()),
            index: self.output.len(),
            text: String::new(),
            annotations: Vec::new(),
            logprobs: Vec::new(),
            call_id,
            name,
        };
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let ty = "response.output_item.added";
        emit(&mut self.out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 2);
            s.key("output_index");
            s.uint(item.index as u64);
            s.key("item");
            match kind {
                ItemKind::Message | ItemKind::Refusal => {
                    s.begin(5);
                    s.key("id");
                    s.str(&item.id);
                    s.key("type");
                    s.str("message");
                    s.key("status");
                    s.str("in_progress");
                    s.key("role");
                    s.str("assistant");
                    s.key("content");
                    s.begin_array(0);
                    s.end_array();
                    s.end();
                }
                ItemKind::FunctionCall => {
                    s.begin(6);
                    s.key("id");
                    s.str(&item.id);
                    s.key("type");
                    s.str("function_call");
                    s.key("status");
                    s.str("in_progress");
                    s.key("call_id");
                    s.str(&item.call_id);
                    s.key("name");
                    s.str(&item.name);
                    s.key("arguments");
                    s.str("");
                    s.end();
                }
                ItemKind::CustomToolCall => {
                    s.begin(5);
                    s.key("id");
                    s.str(&item.id);
                    s.key("type");
                    s.str("custom_tool_call");
                    s.key("call_id");
                    s.str(&item.call_id);
                    s.key("name");
                    s.str(&item.name);
                    s.key("input");
                    s.str("");
                    s.end();
                }
            }
            s.end();
        });
        self.sequence_number += 1;
        if matches!(kind, ItemKind::Message | ItemKind::Refusal) {
            let seq = self.sequence_number;
            let ty = "response.content_part.added";
            emit(&mut self.out, self.framing, ty, |s| {
                head(s, stream_id, seq, ty, 4);
                locate(s, &item);
                s.key("content_index");
                s.uint(0);
                s.key("part");
                if kind == ItemKind::Refusal {
                    refusal_part(s, "");
                } else {
                    text_part(s, "", &[], &[]);
                }
                s.end();
            });
            self.sequence_number += 1;
        }
        self.open = Some(item);
    }

    /// Append the open item's `.done` events to `self.out` and keep the item.
    fn close_open(&mut self) {
        if let Some(r) = self.reasoning.take() {
            self.finish_reasoning(r, None);
        }
        if let Some(hosted) = self.hosted.take() {
            let ty = "response.output_item.done";
            let at = (self.stream_id.as_deref(), self.sequence_number, ty);
            item_event(
                &mut self.out,
                self.framing,
                at,
                hosted.index,
                hosted.item.json(),
            );
            self.sequence_number += 1;
            self.output.push(hosted.item);
            if self.closed_early.len() < MAX_CLOSED_EARLY {
                self.closed_early.push((hosted.id, hosted.index));
            }
        }
        let Some(item) = self.open.take() else {
            return;
        };
        let stream_id = self.stream_id.as_deref();
        let framing = self.framing;
        let mut seq = self.sequence_number;
        let value = match item.kind {
            ItemKind::Refusal => {
                let ty = "response.refusal.done";
                emit(&mut self.out, framing, ty, |s| {
                    head(s, stream_id, seq, ty, 4);
                    locate(s, &item);
                    s.key("content_index");
                    s.uint(0);
                    s.key("refusal");
                    s.str(&item.text);
                    s.end();
                });
                seq += 1;
                let ty = "response.content_part.done";
                emit(&mut self.out, framing, ty, |s| {
                    head(s, stream_id, seq, ty, 4);
                    locate(s, &item);
                    s.key("content_index");
                    s.uint(0);
                    s.key("part");
                    refusal_part(s, &item.text);
                    s.end();
                });
                seq += 1;
                serde_json::json!({
                    "id": item.id,
                    "type": "message",
                    "status": self.open_item_status,
                    "role": "assistant",
                    "content": [{"type": "refusal", "refusal": item.text}],
                })
            }
            ItemKind::Message => {
                let ty = "response.output_text.done";
                emit(&mut self.out, framing, ty, |s| {
                    head(s, stream_id, seq, ty, 5);
                    locate(s, &item);
                    s.key("content_index");
                    s.uint(0);
                    s.key("logprobs");
                    json_array(s, &item.logprobs);
                    s.key("text");
                    s.str(&item.text);
                    s.end();
                });
                let part_logprobs: Vec<serde_json::Value> =
                    item.logprobs.iter().map(part_logprob).collect();
                seq += 1;
                let ty = "response.content_part.done";
                emit(&mut self.out, framing, ty, |s| {
                    head(s, stream_id, seq, ty, 4);
                    locate(s, &item);
                    s.key("content_index");
                    s.uint(0);
                    s.key("part");
                    text_part(s, &item.text, &item.annotations, &part_logprobs);
                    s.end();
                });
                seq += 1;
                serde_json::json!({
                    "id": item.id,
                    "type": "message",
                    "status": self.open_item_status,
                    "role": "assistant",
                    "content": [{
                        "type": "output_text",
                        "text": item.text,
                        "annotations": item.annotations,
                        "logprobs": part_logprobs,
                    }],
                })
            }
            ItemKind::FunctionCall => {
                let ty = "response.function_call_arguments.done";
                emit(&mut self.out, framing, ty, |s| {
                    head(s, stream_id, seq, ty, 3);
                    locate(s, &item);
                    s.key("arguments");
                    s.str(&item.text);
                    s.end();
                });
                seq += 1;
                serde_json::json!({
                    "id": item.id,
                    "type": "function_call",
                    "status": self.open_item_status,
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.text,
                })
            }
            ItemKind::CustomToolCall => {
                let ty = "response.custom_tool_call_input.done";
                emit(&mut self.out, framing, ty, |s| {
                    head(s, stream_id, seq, ty, 3);
                    locate(s, &item);
                    s.key("input");
                    s.str(&item.text);
                    s.end();
                });
                seq += 1;
                serde_json::json!({
                    "id": item.id,
                    "type": "custom_tool_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "input": item.text,
                })
            }
        };
        // An object under the size limit: building it cannot fail.
        let done = match Item::from_value(item.index, &value, usize::MAX) {
            Ok(done) => Arc::new(done),
            Err(_) => return,
        };
        let ty = "response.output_item.done";
        item_event(
            &mut self.out,
            framing,
            (stream_id, seq, ty),
            item.index,
            done.json(),
        );
        self.sequence_number = seq + 1;
        self.output.push(done);
    }

    fn lifecycle(&mut self, ty: &'static str) {
        let (stream_id, seq) = (self.stream_id.as_deref(), self.sequence_number);
        let mut out = std::mem::take(&mut self.out);
        emit(&mut out, self.framing, ty, |s| {
            head(s, stream_id, seq, ty, 1);
            s.key("response");
            self.write_response(s);
            s.end();
        });
        self.out = out;
        self.sequence_number += 1;
    }

    fn write_response(&self, s: &mut dyn Sink) {
        s.begin(6 + self.statics.count);
        s.key("status");
        s.str(self.status.name());
        s.key("completed_at");
        opt_int(s, self.completed_at);
        s.key("error");
        self.write_error(s);
        s.key("incomplete_details");
        self.write_incomplete(s);
        s.key("usage");
        usage(s, self.usage);
        s.key("output");
        s.begin_array(self.output.len());
        for item in &self.output {
            s.elem();
            s.json(item.json());
        }
        s.end_array();
        s.statics(&self.statics);
        s.end();
    }

    fn write_error(&self, s: &mut dyn Sink) {
        match &self.error {
            None => s.null(),
            Some(error) => s.json(error),
        }
    }

    fn write_incomplete(&self, s: &mut dyn Sink) {
        incomplete_details(s, self.incomplete.as_deref());
    }

    /// `"response_fields":{...}` when there are any (a meta's member).
    fn write_response_fields(&self, s: &mut dyn Sink) {
        if let Some(fields) = &self.response_fields {
            s.key("response_fields");
            s.json(fields);
        }
    }
}

/// `incomplete_details`: `{"reason": ...}`, or null.
fn incomplete_details(s: &mut dyn Sink, reason: Option<&str>) {
    match reason {
        None => s.null(),
        Some(reason) => {
            s.begin(1);
            s.key("reason");
            s.str(reason);
            s.end();
        }
    }
}

/// Frame one event as a stand-alone message (errors, failed steering): `event` is a
/// JSON object, written as it is except in msgpack framing.
pub fn frame_event(event: &[u8], framing: Framing, out: &mut Vec<u8>) -> Result<()> {
    let not_object = || Error::invalid_argument("event must be a JSON object");
    match framing {
        Framing::Json => {
            out.extend_from_slice(event);
            out.push(b'\n');
        }
        Framing::WebSocket => {
            frame_header(out, 0x81, event.len());
            out.extend_from_slice(event);
        }
        Framing::Sse | Framing::Msgpack => {
            let value = super::json::decode(event).map_err(|_| not_object())?;
            let Value::Object(object) = &value else {
                return Err(not_object());
            };
            if framing == Framing::Sse {
                let ty = object.get("type").and_then(Value::as_str).unwrap_or("");
                event_line(out, ty);
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(event);
                out.extend_from_slice(b"\n\n");
            } else {
                let mut payload = Vec::with_capacity(event.len());
                msgpack::write_value(&value, &mut payload);
                frame_header(out, 0x82, payload.len());
                out.extend_from_slice(&payload);
            }
        }
    }
    Ok(())
}

/// An unmasked server frame header (FIN set) for a payload of `len` bytes.
pub fn frame_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Whether `ty` can name an SSE event as it is: every type the API has does.
fn is_event_name(ty: &str) -> bool {
    !ty.is_empty()
        && ty
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The `event:` line of an SSE event of type `ty`, left out when `ty` is not an
/// event name (a line break in it would end the line early): the event is then
/// data only, and its data still carries the type.
fn event_line(out: &mut Vec<u8>, ty: &str) {
    if is_event_name(ty) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(ty.as_bytes());
        out.push(b'\n');
    }
}

/// Bytes reserved in front of a WebSocket payload: the header of a payload under 64 KiB.
const RESERVED: usize = 4;

/// Append one event to `out`, written by `body` and framed as `framing` asks.
#[inline]
fn emit(out: &mut Vec<u8>, framing: Framing, ty: &str, body: impl FnOnce(&mut dyn Sink)) {
    match framing {
        Framing::Json => {
            body(&mut JsonSink(out));
            out.push(b'\n');
        }
        Framing::Sse => {
            event_line(out, ty);
            out.extend_from_slice(b"data: ");
            body(&mut JsonSink(out));
            out.extend_from_slice(b"\n\n");
        }
        Framing::WebSocket | Framing::Msgpack => {
            let start = out.len();
            out.extend_from_slice(&[0; RESERVED]);
            let opcode = if framing == Framing::WebSocket {
                body(&mut JsonSink(out));
                0x81
            } else {
                body(&mut MsgpackSink(out));
                0x82
            };
            let len = out.len() - start - RESERVED;
            if len < 126 {
                out.copy_within(start + RESERVED.., start + 2);
                out.truncate(out.len() - (RESERVED - 2));
                out[start] = opcode;
                out[start + 1] = len as u8;
            } else if len <= usize::from(u16::MAX) {
                out[start] = opcode;
                out[start + 1] = 126;
                out[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
            } else {
                let mut header = Vec::with_capacity(10);
                frame_header(&mut header, opcode, len);
                out.splice(start..start + RESERVED, header);
            }
        }
    }
}

/// `stream_id` (named lanes), `sequence_number` and `type`, opening an object of
/// `fields` more entries.
fn head(s: &mut dyn Sink, stream_id: Option<&str>, seq: u64, ty: &str, fields: usize) {
    s.begin(fields + 2 + usize::from(stream_id.is_some()));
    if let Some(id) = stream_id {
        s.key("stream_id");
        s.str(id);
    }
    s.key("sequence_number");
    s.uint(seq);
    s.key("type");
    s.str(ty);
}

/// What `ResponseEncoder::reasoning_item` keeps of a reasoning item.
#[derive(Debug)]
struct Reasoning {
    id: Option<String>,
    summary: Vec<String>,
    content: Option<Vec<String>>,
    encrypted_content: Option<String>,
}

impl Reasoning {
    fn parse(item: &[u8]) -> Result<Reasoning> {
        let invalid = || Error::invalid_argument("item must be a JSON object of type reasoning");
        let value: serde_json::Value = serde_json::from_slice(item).map_err(|_| invalid())?;
        let object = value.as_object().ok_or_else(invalid)?;
        if object.get("type").and_then(serde_json::Value::as_str) != Some("reasoning") {
            return Err(invalid());
        }
        let id = match object.get("id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(id)) if !id.is_empty() => Some(id.clone()),
            Some(serde_json::Value::String(_)) => None,
            Some(_) => {
                return Err(Error::invalid_argument(
                    "a reasoning item's id must be a string",
                ))
            }
        };
        let summary = match object.get("summary") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(parts) => part_texts(parts, "summary_text")?,
        };
        let content = match object.get("content") {
            None | Some(serde_json::Value::Null) => None,
            Some(parts) => Some(part_texts(parts, "reasoning_text")?),
        };
        let encrypted_content = match object.get("encrypted_content") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(text)) => Some(text.clone()),
            Some(_) => {
                return Err(Error::invalid_argument(
                    "a reasoning item's encrypted_content must be a string",
                ))
            }
        };
        Ok(Reasoning {
            id,
            summary,
            content,
            encrypted_content,
        })
    }
}

/// The texts of an array of `{"type": part_type, "text": ...}` parts.
fn part_texts(parts: &serde_json::Value, part_type: &str) -> Result<Vec<String>> {
    let invalid = || {
        Error::invalid_argument(format!(
            "reasoning parts must be {{\"type\": \"{part_type}\", \"text\": string}} objects"
        ))
    };
    let parts = parts.as_array().ok_or_else(invalid)?;
    parts
        .iter()
        .map(|part| {
            let ty = part.get("type").and_then(serde_json::Value::as_str);
            match (ty, part.get("text").and_then(serde_json::Value::as_str)) {
                (Some(ty), Some(text)) if ty == part_type => Ok(text.to_owned()),
                _ => Err(invalid()),
            }
        })
        .collect()
}

/// The two kinds of parts of a reasoning item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Summary,
    Text,
}

impl PartKind {
    /// Part added, delta, text done, part done.
    fn names(self) -> [&'static str; 4] {
        match self {
            PartKind::Summary => [
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
            ],
            PartKind::Text => [
                "response.content_part.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.content_part.done",
            ],
        }
    }

    fn key(self) -> &'static str {
        match self {
            PartKind::Summary => "summary_index",
            PartKind::Text => "content_index",
        }
    }

    fn part_type(self) -> &'static str {
        match self {
            PartKind::Summary => "summary_text",
            PartKind::Text => "reasoning_text",
        }
    }
}

/// The events of a reasoning item's part, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartStep {
    Added,
    Delta,
    TextDone,
    PartDone,
}

/// One event of part `(kind, position)` of reasoning item `(id, output index)`:
/// `text` is the delta, or the part's whole text for the `done` events.
fn part_event(
    out: &mut Vec<u8>,
    framing: Framing,
    (stream_id, seq): (Option<&str>, u64),
    (id, index): (&str, usize),
    (kind, position): (PartKind, usize),
    step: PartStep,
    text: &str,
) {
    let ty = kind.names()[step as usize];
    emit(out, framing, ty, |s| {
        head(s, stream_id, seq, ty, 4);
        s.key("item_id");
        s.str(id);
        s.key("output_index");
        s.uint(index as u64);
        s.key(kind.key());
        s.uint(position as u64);
        match step {
            PartStep::Delta => {
                s.key("delta");
                s.str(text);
            }
            PartStep::TextDone => {
                s.key("text");
                s.str(text);
            }
            PartStep::Added | PartStep::PartDone => {
                s.key("part");
                s.begin(2);
                s.key("type");
                s.str(kind.part_type());
                s.key("text");
                s.str(if step == PartStep::Added { "" } else { text });
                s.end();
            }
        }
        s.end();
    });
}

/// Append every event of a part given whole (no delta when it is empty); the next
/// sequence number.
fn whole_part(
    out: &mut Vec<u8>,
    framing: Framing,
    (stream_id, seq): (Option<&str>, u64),
    at: (&str, usize),
    part: (PartKind, usize),
    text: &str,
) -> u64 {
    let mut seq = seq;
    for step in [
        PartStep::Added,
        PartStep::Delta,
        PartStep::TextDone,
        PartStep::PartDone,
    ] {
        if step == PartStep::Delta && text.is_empty() {
            continue;
        }
        part_event(out, framing, (stream_id, seq), at, part, step, text);
        seq += 1;
    }
    seq
}

/// A reasoning item being streamed.
#[derive(Debug)]
struct OpenReasoning {
    id: String,
    /// The id was made here (the upstream gave none yet).
    generated_id: bool,
    index: usize,
    summary: Vec<String>,
    content: Vec<String>,
    /// The part the last delta was of, still open.
    current: Option<(PartKind, usize)>,
}

impl OpenReasoning {
    fn parts(&self, kind: PartKind) -> &Vec<String> {
        match kind {
            PartKind::Summary => &self.summary,
            PartKind::Text => &self.content,
        }
    }

    fn parts_mut(&mut self, kind: PartKind) -> &mut Vec<String> {
        match kind {
            PartKind::Summary => &mut self.summary,
            PartKind::Text => &mut self.content,
        }
    }

    /// The open part's `done` events, if a part is open; the next sequence number.
    fn close_part(
        &mut self,
        out: &mut Vec<u8>,
        framing: Framing,
        stream_id: Option<&str>,
        seq: u64,
    ) -> u64 {
        let Some((kind, position)) = self.current.take() else {
            return seq;
        };
        let text = self.parts(kind).get(position).map_or("", String::as_str);
        let at = (self.id.as_str(), self.index);
        let mut seq = seq;
        for step in [PartStep::TextDone, PartStep::PartDone] {
            part_event(
                out,
                framing,
                (stream_id, seq),
                at,
                (kind, position),
                step,
                text,
            );
            seq += 1;
        }
        seq
    }
}

/// An `output_item.added` / `.done` event: `(stream_id, sequence_number, type)`,
/// the output index and the item as JSON.
fn item_event(
    out: &mut Vec<u8>,
    framing: Framing,
    (stream_id, seq, ty): (Option<&str>, u64, &str),
    index: usize,
    item: &[u8],
) {
    emit(out, framing, ty, |s| {
        head(s, stream_id, seq, ty, 2);
        s.key("output_index");
        s.uint(index as u64);
        s.key("item");
        s.json(item);
        s.end();
    });
}

/// `item_id` and `output_index`.
fn locate(s: &mut dyn Sink, item: &OpenItem) {
    s.key("item_id");
    s.str(&item.id);
    s.key("output_index");
    s.uint(item.index as u64);
}

fn text_part(
    s: &mut dyn Sink,
    text: &str,
    annotations: &[serde_json::Value],
    logprobs: &[serde_json::Value],
) {
    s.begin(4);
    s.key("type");
    s.str("output_text");
    s.key("text");
    s.str(text);
    s.key("annotations");
    json_array(s, annotations);
    s.key("logprobs");
    json_array(s, logprobs);
    s.end();
}

/// A message's `refusal` content part.
fn refusal_part(s: &mut dyn Sink, refusal: &str) {
    s.begin(2);
    s.key("type");
    s.str("refusal");
    s.key("refusal");
    s.str(refusal);
    s.end();
}

/// An array of JSON values.
fn json_array(s: &mut dyn Sink, values: &[serde_json::Value]) {
    s.begin_array(values.len());
    for value in values {
        s.elem();
        // A parsed JSON value: writing it cannot fail.
        s.json(&serde_json::to_vec(value).unwrap_or_default());
    }
    s.end_array();
}

/// A delta's log probability as an output text part has it: with the `bytes` of
/// its token (and of each top alternative's) when it came without them.
fn part_logprob(logprob: &serde_json::Value) -> serde_json::Value {
    fn with_bytes(value: &serde_json::Value) -> serde_json::Value {
        let mut value = value.clone();
        if let serde_json::Value::Object(object) = &mut value {
            if !object.contains_key("bytes") {
                if let Some(token) = object.get("token").and_then(serde_json::Value::as_str) {
                    let bytes = token.bytes().map(serde_json::Value::from).collect();
                    object.insert("bytes".to_owned(), serde_json::Value::Array(bytes));
                }
            }
        }
        value
    }
    let mut part = with_bytes(logprob);
    if let serde_json::Value::Object(object) = &mut part {
        let top = match object.get("top_logprobs") {
            Some(serde_json::Value::Array(top)) => top.iter().map(with_bytes).collect(),
            _ => Vec::new(),
        };
        object.insert("top_logprobs".to_owned(), serde_json::Value::Array(top));
    }
    part
}

fn opt_int(s: &mut dyn Sink, value: Option<i64>) {
    match value {
        Some(v) => s.int(v),
        None => s.null(),
    }
}

fn usage(s: &mut dyn Sink, usage: Option<Usage>) {
    let Some(u) = usage else {
        s.null();
        return;
    };
    s.begin(5);
    s.key("input_tokens");
    s.uint(u.input_tokens);
    s.key("input_tokens_details");
    s.begin(2);
    s.key("cached_tokens");
    s.uint(u.cached_tokens);
    s.key("cache_write_tokens");
    s.uint(0);
    s.end();
    s.key("output_tokens");
    s.uint(u.output_tokens);
    s.key("output_tokens_details");
    s.begin(1);
    s.key("reasoning_tokens");
    s.uint(u.reasoning_tokens.min(u.output_tokens));
    s.end();
    s.key("total_tokens");
    s.uint(u.input_tokens.saturating_add(u.output_tokens));
    s.end();
}

// -- writers -------------------------------------------------------------------------

/// One set of primitives, written as JSON or as msgpack. JSON separators come from
/// the previous byte (`{` / `[` start a container), so no state is kept; msgpack
/// containers are given their entry counts up front.
trait Sink {
    fn begin(&mut self, fields: usize);
    fn end(&mut self);
    fn key(&mut self, key: &str);
    fn str(&mut self, s: &str);
    fn uint(&mut self, n: u64);
    fn int(&mut self, n: i64);
    fn null(&mut self);
    fn begin_array(&mut self, len: usize);
    /// Before each array element.
    fn elem(&mut self);
    fn end_array(&mut self);
    /// A JSON value the server wrote itself (a canonical item).
    fn json(&mut self, json: &[u8]);
    fn value(&mut self, value: &Value<'_>);
    /// The static entries of the Response object.
    fn statics(&mut self, statics: &Statics);
}

struct JsonSink<'a>(&'a mut Vec<u8>);

impl Sink for JsonSink<'_> {
    #[inline]
    fn begin(&mut self, _fields: usize) {
        self.0.push(b'{');
    }
    #[inline]
    fn end(&mut self) {
        self.0.push(b'}');
    }
    #[inline]
    fn key(&mut self, key: &str) {
        if self.0.last() != Some(&b'{') {
            self.0.push(b',');
        }
        write_str(key, self.0);
        self.0.push(b':');
    }
    #[inline]
    fn str(&mut self, s: &str) {
        write_str(s, self.0);
    }
    #[inline]
    fn uint(&mut self, n: u64) {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    #[inline]
    fn int(&mut self, n: i64) {
        self.0
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    fn null(&mut self) {
        self.0.extend_from_slice(b"null");
    }
    fn begin_array(&mut self, _len: usize) {
        self.0.push(b'[');
    }
    fn elem(&mut self) {
        if self.0.last() != Some(&b'[') {
            self.0.push(b',');
        }
    }
    fn end_array(&mut self) {
        self.0.push(b']');
    }
    fn json(&mut self, json: &[u8]) {
        self.0.extend_from_slice(json);
    }
    fn value(&mut self, value: &Value<'_>) {
        super::value::write_canonical(value, self.0);
    }
    fn statics(&mut self, statics: &Statics) {
        self.0.push(b',');
        self.0.extend_from_slice(&statics.json);
    }
}

struct MsgpackSink<'a>(&'a mut Vec<u8>);

impl Sink for MsgpackSink<'_> {
    fn begin(&mut self, fields: usize) {
        msgpack::write_map_len(fields, self.0);
    }
    fn end(&mut self) {}
    fn key(&mut self, key: &str) {
        msgpack::write_str(key, self.0);
    }
    fn str(&mut self, s: &str) {
        msgpack::write_str(s, self.0);
    }
    fn uint(&mut self, n: u64) {
        msgpack::write_uint(n, self.0);
    }
    fn int(&mut self, n: i64) {
        msgpack::write_int(n, self.0);
    }
    fn null(&mut self) {
        msgpack::write_nil(self.0);
    }
    fn begin_array(&mut self, len: usize) {
        msgpack::write_array_len(len, self.0);
    }
    fn elem(&mut self) {}
    fn end_array(&mut self) {}
    fn json(&mut self, json: &[u8]) {
        if msgpack::from_json(json, self.0).is_err() {
            msgpack::write_nil(self.0);
        }
    }
    fn value(&mut self, value: &Value<'_>) {
        msgpack::write_value(value, self.0);
    }
    fn statics(&mut self, statics: &Statics) {
        self.0.extend_from_slice(&statics.msgpack);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &[u8] = br#"{"model":"m","tools":[],"instructions":null}"#;

    fn encoder(framing: Framing, stream_id: Option<&str>) -> ResponseEncoder {
        ResponseEncoder::new(ResponseHead {
            response_id: "resp_1",
            settings: SETTINGS,
            previous_response_id: None,
            store: false,
            created_at: 7,
            stream_id,
            framing,
            background: false,
        })
        .unwrap()
    }

    fn lines(data: &[u8]) -> Vec<serde_json::Value> {
        data.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    /// Split WebSocket frames; checks each header.
    fn frames(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let opcode = data[0];
            let (len, skip) = match data[1] {
                126 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(data[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (usize::from(n), 2),
            };
            assert!(data[1] & 0x80 == 0, "server frames are not masked");
            out.push((opcode, data[skip..skip + len].to_vec()));
            data = &data[skip + len..];
        }
        out
    }

    /// The events of WebSocket frames, text (JSON) or binary (msgpack), as JSON values.
    fn frame_events(data: &[u8]) -> Vec<serde_json::Value> {
        frames(data)
            .into_iter()
            .map(|(opcode, payload)| {
                if opcode == 0x81 {
                    return serde_json::from_slice(&payload).unwrap();
                }
                assert_eq!(opcode, 0x82);
                let unpacked = crate::framing::msgpack::decode(&payload).unwrap();
                let mut json = Vec::new();
                crate::framing::value::write_canonical(&unpacked, &mut json);
                serde_json::from_slice(&json).unwrap()
            })
            .collect()
    }

    fn turn(e: &mut ResponseEncoder) -> Vec<u8> {
        let mut all = Vec::new();
        all.extend_from_slice(e.start());
        all.extend_from_slice(e.text_delta("Hel"));
        all.extend_from_slice(e.text_delta("lo"));
        all.extend_from_slice(e.tool_call_start("call_1", "f"));
        all.extend_from_slice(e.tool_arguments_delta("{}"));
        let usage = Usage {
            input_tokens: 10,
            cached_tokens: 4,
            output_tokens: 3,
            reasoning_tokens: 0,
        };
        all.extend_from_slice(e.complete(usage, 9));
        all
    }

    #[test]
    fn response_fields_replace_settings_or_are_added_in_every_framing() {
        let settings = br#"{"model":"m","service_tier":"auto","temperature":1.0,"tools":[{"type":"function","name":"f","strict":true}]}"#;
        let fields = br#"{"service_tier":"default","moderation":{"input":{"flagged":false,"category_scores":{"hate":1.5e-7}}}}"#;
        let usage = Usage::default();
        for framing in [Framing::Json, Framing::Msgpack] {
            let mut e = ResponseEncoder::new(ResponseHead {
                response_id: "resp_1",
                settings,
                previous_response_id: None,
                store: true,
                created_at: 7,
                stream_id: None,
                framing,
                background: false,
            })
            .unwrap();
            let mut all = e.start().to_vec();
            assert!(e.set_response_fields(b"[1]").is_err());
            assert!(e.set_response_fields(b"{").is_err());
            e.set_response_fields(b"{}").unwrap();
            e.set_response_fields(fields).unwrap();
            all.extend_from_slice(e.text_delta("x"));
            all.extend_from_slice(e.complete(usage, 9));
            let events = if framing == Framing::Json {
                lines(&all)
            } else {
                frame_events(&all)
            };
            let first = &events[0]["response"];
            let last = &events[events.len() - 1]["response"];
            assert_eq!(first["service_tier"], "auto", "{framing:?}");
            assert!(first.get("moderation").is_none());
            assert_eq!(last["service_tier"], "default", "{framing:?}");
            assert_eq!(
                last["moderation"]["input"]["category_scores"]["hate"],
                1.5e-7
            );
            // The rest of the Response is as it was.
            for key in ["id", "object", "created_at", "store", "background", "model"] {
                assert_eq!(first[key], last[key], "{key}");
            }
            assert_eq!(last["temperature"], 1.0);
            assert_eq!(last["tools"][0]["strict"], true);
            let response: serde_json::Value = serde_json::from_slice(&e.response_json()).unwrap();
            assert_eq!(&response, last);
            // No key twice (the JSON text, where serde_json would keep the last).
            assert_eq!(
                String::from_utf8_lossy(&e.response_json())
                    .matches("\"service_tier\"")
                    .count(),
                1
            );
            let meta = e.terminal_meta(usage, 9, None, Some("k1"));
            let text = String::from_utf8_lossy(&meta);
            assert!(text.ends_with(r#","instructions":"k1"}"#), "{text}");
            let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap();
            assert_eq!(meta["response_fields"]["service_tier"], "default");
            let meta: serde_json::Value = serde_json::from_slice(&e.meta_json()).unwrap();
            assert_eq!(meta["response_fields"]["moderation"], last["moderation"]);
        }
        // Without settings of its own, the fields are the Response's only extras.
        let mut e = ResponseEncoder::new(ResponseHead {
            settings: b"{ }",
            ..ResponseHead {
                response_id: "resp_2",
                settings: SETTINGS,
                previous_response_id: None,
                store: false,
                created_at: 7,
                stream_id: None,
                framing: Framing::Json,
                background: false,
            }
        })
        .unwrap();
        e.set_response_fields(br#"{"service_tier":"flex","conversation":{"id":"c"}}"#)
            .unwrap();
        e.set_response_fields(br#"{"service_tier":"default","tool_usage":{}}"#)
            .unwrap();
        let response: serde_json::Value = serde_json::from_slice(&e.response_json()).unwrap();
        assert_eq!(response["service_tier"], "default");
        assert_eq!(response["conversation"]["id"], "c");
        assert_eq!(response["id"], "resp_2");
        // The meta keeps all of them, the later of two of one name.
        let meta: serde_json::Value = serde_json::from_slice(&e.meta_json()).unwrap();
        let expected = serde_json::json!(
            {"conversation": {"id": "c"}, "service_tier": "default", "tool_usage": {}}
        );
        assert_eq!(meta["response_fields"], expected);
        let meta: serde_json::Value =
            serde_json::from_slice(&encoder(Framing::Json, None).meta_json()).unwrap();
        assert!(meta.get("response_fields").is_none());
    }

    #[test]
    fn log_probabilities_go_with_their_delta_and_stay_with_the_message() {
        let mut e = encoder(Framing::Json, None);
        e.start();
        let first =
            r#"[{"token":"Hé","logprob":-0.5,"top_logprobs":[{"token":"Ho","logprob":-2.0}]}]"#;
        assert!(e.text_logprobs(b"{}").is_err());
        e.text_logprobs(first.as_bytes()).unwrap();
        let mut all = e.text_delta("Hé").to_vec();
        all.extend_from_slice(e.text_delta("!")); // a delta without any
        all.extend_from_slice(e.close_item());
        let events = lines(&all);
        let expected: serde_json::Value = serde_json::from_str(first).unwrap();
        let delta = |i: usize| &events[i]["logprobs"];
        assert_eq!(delta(2), &expected); // after output_item.added, content_part.added
        assert_eq!(delta(3), &serde_json::json!([]));
        assert_eq!(events[4]["type"], "response.output_text.done");
        assert_eq!(events[4]["logprobs"], expected);
        let part = serde_json::json!([{
            "token": "Hé", "bytes": [72, 195, 169], "logprob": -0.5,
            "top_logprobs": [{"token": "Ho", "bytes": [72, 111], "logprob": -2.0}],
        }]);
        assert_eq!(events[5]["part"]["logprobs"], part);
        assert_eq!(events[6]["item"]["content"][0]["logprobs"], part);
    }

    #[test]
    fn item_ids_name_their_response() {
        let mut e = encoder(Framing::Json, None);
        e.start();
        e.reasoning_start(None);
        e.text_delta("a");
        e.tool_call_start("call_1", "f");
        e.close_item();
        let ids: Vec<String> = (0..3)
            .filter_map(|i| {
                e.output_items()
                    .get(i)
                    .and_then(|item| item.id().map(str::to_owned))
            })
            .collect();
        // The encoder's response is `resp_1`.
        assert_eq!(ids, ["rs_1_0", "msg_1_1", "fc_1_2"]);
    }

    #[test]
    fn an_item_cut_short_is_incomplete() {
        let usage = Usage {
            input_tokens: 5,
            cached_tokens: 0,
            output_tokens: 16,
            reasoning_tokens: 0,
        };
        for call in [false, true] {
            let mut e = encoder(Framing::Json, None);
            e.start();
            if call {
                e.tool_call_start("call_1", "f");
                e.tool_arguments_delta("{\"pa");
            } else {
                e.text_delta("Hel");
            }
            let mut all = e.close_item_incomplete().to_vec();
            all.extend_from_slice(e.incomplete("max_output_tokens", usage, 9));
            let events = lines(&all);
            let done = &events[events.len() - 2];
            assert_eq!(done["type"], "response.output_item.done");
            assert_eq!(done["item"]["status"], "incomplete");
            let response = &events[events.len() - 1]["response"];
            assert_eq!(response["status"], "incomplete");
            assert_eq!(
                response["incomplete_details"]["reason"],
                "max_output_tokens"
            );
            assert_eq!(response["output"][0], done["item"]);
        }
        // Only the item closed so is incomplete: the next one is completed again.
        let mut e = encoder(Framing::Json, None);
        e.start();
        e.text_delta("a");
        let first = lines(e.close_item_incomplete());
        e.tool_call_start("call_1", "f");
        let second = lines(e.close_item());
        assert_eq!(first[first.len() - 1]["item"]["status"], "incomplete");
        assert_eq!(second[second.len() - 1]["item"]["status"], "completed");
    }

    #[test]
    fn a_turn_in_json() {
        let mut e = encoder(Framing::Json, Some("lane"));
        let events = lines(&turn(&mut e));
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
            assert_eq!(event["stream_id"], "lane");
        }
        let done = &events[13]["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["completed_at"], 9);
        assert_eq!(done["model"], "m");
        assert_eq!(done["store"], false);
        assert_eq!(done["usage"]["total_tokens"], 13);
        assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 4);
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][1]["arguments"], "{}");
        assert_eq!(done["output"][1]["call_id"], "call_1");
        assert_eq!(events[8]["item"], done["output"][0]);
        assert_eq!(events[2]["item"]["id"], done["output"][0]["id"]);
        assert_eq!(events[9]["output_index"], 1);
        let items = e.output_items();
        assert_eq!(items.len(), 2);
        assert_eq!(items.get(1).unwrap().call_id(), Some("call_1"));
        let response: serde_json::Value = serde_json::from_slice(&e.response_json()).unwrap();
        assert_eq!(&response, done);
        let meta: serde_json::Value = serde_json::from_slice(&e.meta_json()).unwrap();
        assert_eq!(meta["status"], "completed");
        assert_eq!(meta["usage"], done["usage"]);
        assert!(meta["error"].is_null());
    }

    #[test]
    fn a_reasoning_item_in_openai_order() {
        let mut e = encoder(Framing::Json, Some("lane"));
        let mut out = e.start().to_vec();
        out.extend_from_slice(e.text_delta("Hi"));
        let item = br#"{"id":"rs_up","type":"reasoning","status":"completed",
            "summary":[{"type":"summary_text","text":"First"},{"type":"summary_text","text":""}],
            "encrypted_content":"opaque=="}"#;
        out.extend_from_slice(e.reasoning_item(item).unwrap());
        out.extend_from_slice(e.reasoning_item(br#"{"type":"reasoning","summary":[],"content":[{"type":"reasoning_text","text":"Think"}]}"#).unwrap());
        let usage = Usage {
            input_tokens: 9,
            cached_tokens: 0,
            output_tokens: 5,
            reasoning_tokens: 3,
        };
        out.extend_from_slice(e.complete(usage, 9));
        let events = lines(&out);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types[5..],
            [
                // The open message closes first.
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                // An empty part has no delta.
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
            assert_eq!(event["stream_id"], "lane");
        }
        let added = &events[8];
        assert_eq!(added["output_index"], 1);
        assert_eq!(
            added["item"],
            serde_json::json!({"id": "rs_up", "type": "reasoning", "summary": []})
        );
        assert_eq!(events[9]["item_id"], "rs_up");
        assert_eq!(events[9]["summary_index"], 0);
        assert_eq!(
            events[9]["part"],
            serde_json::json!({"type": "summary_text", "text": ""})
        );
        assert_eq!(events[10]["delta"], "First");
        assert_eq!(events[11]["text"], "First");
        assert_eq!(events[12]["part"]["text"], "First");
        assert_eq!(events[13]["summary_index"], 1);
        let done = serde_json::json!({
            "id": "rs_up",
            "type": "reasoning",
            "summary": [
                {"type": "summary_text", "text": "First"},
                {"type": "summary_text", "text": ""},
            ],
            "encrypted_content": "opaque==",
        });
        assert_eq!(events[16]["item"], done);
        let own = &events[17]["item"];
        assert!(own["id"].as_str().unwrap().starts_with("rs_"));
        assert_eq!(own["content"], serde_json::json!([]));
        assert_eq!(events[18]["content_index"], 0);
        assert_eq!(events[18]["part"]["type"], "reasoning_text");
        assert_eq!(events[19]["delta"], "Think");
        let response = &events[23]["response"];
        assert_eq!(
            response["usage"]["output_tokens_details"]["reasoning_tokens"],
            3
        );
        assert_eq!(response["usage"]["total_tokens"], 14);
        assert_eq!(response["output"][1], done);
        assert_eq!(response["output"][2]["content"][0]["text"], "Think");
        assert_eq!(response["output"][2]["id"], own["id"]);
        let items = e.output_items();
        assert_eq!(items.len(), 3);
        let stored: serde_json::Value =
            serde_json::from_slice(items.get(1).unwrap().json()).unwrap();
        assert_eq!(stored, done);
    }

    #[test]
    fn reasoning_events_are_the_same_in_every_framing() {
        let item = br#"{"id":"rs_1","type":"reasoning","summary":[{"type":"summary_text","text":"s"}],"content":[{"type":"reasoning_text","text":"c"}],"encrypted_content":"e"}"#;
        let run = |framing| {
            let mut e = encoder(framing, Some("lane"));
            let mut out = e.start().to_vec();
            out.extend_from_slice(e.reasoning_item(item).unwrap());
            out.extend_from_slice(e.complete(Usage::default(), 9));
            out
        };
        let expected = lines(&run(Framing::Json));
        assert_eq!(expected.len(), 13);
        assert_eq!(frame_events(&run(Framing::WebSocket)), expected);
        assert_eq!(frame_events(&run(Framing::Msgpack)), expected);
        let sse = String::from_utf8(run(Framing::Sse)).unwrap();
        assert!(sse.contains("event: response.reasoning_text.delta\ndata: {"));
    }

    #[test]
    fn reasoning_streams_then_the_whole_item_finishes_it() {
        let mut e = encoder(Framing::Json, None);
        let mut out = e.start().to_vec();
        out.extend_from_slice(e.reasoning_start(Some("rs_up")));
        assert!(e.reasoning_open() && e.open_kind().is_none());
        out.extend_from_slice(e.reasoning_delta(true, 0, "Fir"));
        out.extend_from_slice(e.reasoning_delta(true, 0, "st"));
        out.extend_from_slice(e.reasoning_delta(true, 1, "Sec"));
        let last = br#"{"id":"rs_up","type":"reasoning","summary":[{"type":"summary_text","text":"First"},{"type":"summary_text","text":"Second"},{"type":"summary_text","text":"Third"}],"encrypted_content":"sealed"}"#;
        out.extend_from_slice(e.reasoning_item(last).unwrap());
        assert!(!e.reasoning_open());
        // Deltas without a start (a Chat Completions server's reasoning_content)
        // open an item; the next item closes it, built from its deltas.
        out.extend_from_slice(e.reasoning_delta(false, 0, "Hmm"));
        out.extend_from_slice(e.text_delta("Hi"));
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types[2..22],
            [
                "response.output_item.added",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                // The whole item: the open part closes, the part never streamed comes whole.
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.reasoning_summary_part.added",
                "response.reasoning_summary_text.delta",
                "response.reasoning_summary_text.done",
                "response.reasoning_summary_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.content_part.done",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        assert_eq!(events[6]["text"], "First");
        assert_eq!(events[8]["summary_index"], 1);
        assert_eq!(events[10]["text"], "Sec"); // what was streamed of it
        assert_eq!(events[13]["delta"], "Third");
        let whole: serde_json::Value = serde_json::from_slice(last).unwrap();
        assert_eq!(events[16]["item"], whole);
        assert_eq!(events[22]["type"], "response.output_item.done");
        let built = &events[22]["item"];
        assert!(built["id"].as_str().unwrap().starts_with("rs_"));
        assert_eq!(
            built["content"],
            serde_json::json!([{"type": "reasoning_text", "text": "Hmm"}])
        );
        assert_eq!(built["summary"], serde_json::json!([]));
        let response = &events.last().unwrap()["response"];
        assert_eq!(response["output"][0], whole);
        assert_eq!(response["output"][1], events[22]["item"]);
        assert_eq!(response["output"][2]["content"][0]["text"], "Hi");
        // An item of another id than the open one closes it and stands alone.
        let mut e = encoder(Framing::Json, None);
        e.start();
        e.reasoning_start(Some("rs_a"));
        e.reasoning_delta(true, 0, "a");
        let other = lines(
            e.reasoning_item(br#"{"id":"rs_b","type":"reasoning","summary":[]}"#)
                .unwrap(),
        );
        assert_eq!(other[2]["item"]["id"], "rs_a");
        assert_eq!(other[3]["item"]["id"], "rs_b");
        assert_eq!(e.output_items().len(), 2);
        // Deltas before any id: the whole item finishes that item, under the id its
        // events already carried.
        let mut e = encoder(Framing::Json, None);
        e.start();
        let started = lines(e.reasoning_delta(true, 0, "a"));
        let done = lines(
            e.reasoning_item(br#"{"id":"rs_late","type":"reasoning","summary":[]}"#)
                .unwrap(),
        );
        let id = &started[0]["item"]["id"];
        assert!(id.as_str().unwrap().starts_with("rs_") && *id != "rs_late");
        assert_eq!(&done.last().unwrap()["item"]["id"], id);
    }

    #[test]
    fn reasoning_deltas_in_any_order_stay_numbered_and_whole() {
        // Indices an upstream should not send (far ahead, back to a closed part,
        // summary and text interleaved): events stay numbered, the item valid.
        let mut e = encoder(Framing::Json, None);
        let mut out = e.start().to_vec();
        for (summary, index, delta) in [
            (true, 7, "a"),
            (true, 0, "b"),
            (false, 3, "c"),
            (true, 1, "d"),
            (true, 0, "e"),
            (false, 0, "f"),
        ] {
            out.extend_from_slice(e.reasoning_delta(summary, index, delta));
        }
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        let item = &events.last().unwrap()["response"]["output"][0];
        let summary: Vec<&str> = item["summary"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["text"].as_str().unwrap())
            .collect();
        assert_eq!(summary, ["abe", "d"]);
        assert_eq!(item["content"][0]["text"], "cf");
    }

    #[test]
    fn a_custom_tool_call_streams_its_input() {
        let mut e = encoder(Framing::Json, None);
        let mut out = e.start().to_vec();
        out.extend_from_slice(e.custom_tool_call_start("call_1", "apply_patch"));
        assert_eq!(e.open_kind(), Some(ItemKind::CustomToolCall));
        out.extend_from_slice(e.tool_arguments_delta("*** Begin"));
        out.extend_from_slice(e.tool_arguments_delta(" Patch"));
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types[2..7],
            [
                "response.output_item.added",
                "response.custom_tool_call_input.delta",
                "response.custom_tool_call_input.delta",
                "response.custom_tool_call_input.done",
                "response.output_item.done",
            ]
        );
        let added = &events[2]["item"];
        let id = added["id"].as_str().unwrap();
        assert!(id.starts_with("ctc_"));
        assert_eq!(added["input"], "");
        assert_eq!(events[3]["item_id"], id);
        assert_eq!(events[5]["input"], "*** Begin Patch");
        let done = serde_json::json!({
            "id": id,
            "type": "custom_tool_call",
            "call_id": "call_1",
            "name": "apply_patch",
            "input": "*** Begin Patch",
        });
        assert_eq!(events[6]["item"], done);
        assert_eq!(events[7]["response"]["output"][0], done);
    }

    #[test]
    fn other_output_items_pass_whole() {
        let mut e = encoder(Framing::Json, None);
        let mut out = e.start().to_vec();
        out.extend_from_slice(e.text_delta("Patching."));
        let call = br#"{"type":"custom_tool_call","id":"ctc_1","call_id":"call_7","name":"apply_patch","input":"*** Begin Patch"}"#;
        out.extend_from_slice(e.output_item(call).unwrap());
        let reasoning = br#"{"type":"reasoning","summary":[]}"#;
        out.extend_from_slice(e.output_item(reasoning).unwrap());
        for refused in [
            &br#"{"type":"message","content":[]}"#[..],
            br#"{"type":"function_call"}"#,
            br#"{"id":"x"}"#,
            br#"{"type":7}"#,
            br#"[{"type":"x"}]"#,
            b"nope",
        ] {
            assert!(e.output_item(refused).is_err());
        }
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types[5..11],
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.output_item.done",
                "response.output_item.added",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        let expected: serde_json::Value = serde_json::from_slice(call).unwrap();
        assert_eq!(events[8]["item"], expected);
        assert_eq!(events[9]["item"], expected);
        assert_eq!(events[9]["output_index"], 1);
        let response = &events.last().unwrap()["response"];
        assert_eq!(response["output"][1], expected);
        assert_eq!(response["output"][2]["type"], "reasoning");
        assert_eq!(e.output_items().len(), 3);
    }

    #[test]
    fn a_hosted_tool_call_shows_its_progress_and_finishes_whole() {
        let mut e = encoder(Framing::Json, Some("lane"));
        let mut out = e.start().to_vec();
        out.extend_from_slice(e.text_delta("Searching."));
        let started = br#"{"id":"ws_1","type":"web_search_call","status":"in_progress","action":{"type":"search","query":"q"}}"#;
        out.extend_from_slice(e.item_start(started).unwrap());
        assert!(e.hosted_open());
        assert_eq!(e.open_item_id(), Some("ws_1"));
        for phase in ["in_progress", "searching", "completed"] {
            // The upstream's numbers, index and lane are its own: replaced.
            let event = format!(
                r#"{{"type":"response.web_search_call.{phase}","sequence_number":40,"output_index":9,"stream_id":"up","item_id":"ws_1"}}"#
            );
            out.extend_from_slice(e.item_event(event.as_bytes()).unwrap());
        }
        // Another item's progress is not this call's: nothing.
        let stray =
            br#"{"type":"response.web_search_call.searching","item_id":"ws_2","output_index":0}"#;
        assert!(e.item_event(stray).unwrap().is_empty());
        let done = br#"{"id":"ws_1","type":"web_search_call","status":"completed","action":{"type":"search","query":"q","sources":[]}}"#;
        out.extend_from_slice(e.output_item(done).unwrap());
        assert!(!e.hosted_open());
        out.extend_from_slice(e.text_delta("Found."));
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types[5..14],
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.web_search_call.in_progress",
                "response.web_search_call.searching",
                "response.web_search_call.completed",
                "response.output_item.done",
                "response.output_item.added",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
            assert_eq!(event["stream_id"], "lane");
        }
        let started: serde_json::Value = serde_json::from_slice(started).unwrap();
        let done: serde_json::Value = serde_json::from_slice(done).unwrap();
        assert_eq!(events[8]["item"], started);
        assert_eq!(events[8]["output_index"], 1);
        for progress in &events[9..12] {
            assert_eq!(progress["output_index"], 1);
            assert_eq!(progress["item_id"], "ws_1");
            assert_eq!(progress.as_object().unwrap().len(), 5);
        }
        assert_eq!(events[12]["item"], done);
        assert_eq!(events[12]["output_index"], 1);
        assert_eq!(events[13]["output_index"], 2);
        let response = &events.last().unwrap()["response"];
        assert_eq!(response["output"][1], done);
        assert_eq!(e.output_items().len(), 3);
    }

    #[test]
    fn a_hosted_tool_call_closed_early_is_kept_as_it_started() {
        let mut e = encoder(Framing::Json, None);
        let mut out = e.start().to_vec();
        let started =
            br#"{"id":"ci_1","type":"code_interpreter_call","status":"in_progress","code":""}"#;
        out.extend_from_slice(e.item_start(started).unwrap());
        let delta = br#"{"type":"response.code_interpreter_call_code.delta","item_id":"ci_1","output_index":0,"delta":"print(1)"}"#;
        out.extend_from_slice(e.item_event(delta).unwrap());
        out.extend_from_slice(e.text_delta("No result."));
        // Its progress, too late: nothing.
        assert!(e.item_event(delta).unwrap().is_empty());
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let started: serde_json::Value = serde_json::from_slice(started).unwrap();
        assert_eq!(events[3]["delta"], "print(1)");
        assert_eq!(events[4]["type"], "response.output_item.done");
        assert_eq!(events[4]["item"], started);
        assert_eq!(events[5]["type"], "response.output_item.added");
        assert_eq!(events[5]["output_index"], 1);
        assert_eq!(events.last().unwrap()["response"]["output"][0], started);
    }

    #[test]
    fn a_hosted_tool_call_closed_early_is_replaced_by_its_whole_item() {
        let mut e = encoder(Framing::Json, None);
        let mut out = e.start().to_vec();
        let started = br#"{"id":"ws_1","type":"web_search_call","status":"in_progress"}"#;
        out.extend_from_slice(e.item_start(started).unwrap());
        out.extend_from_slice(e.text_delta("Meanwhile."));
        let done = br#"{"id":"ws_1","type":"web_search_call","status":"completed"}"#;
        out.extend_from_slice(e.output_item(done).unwrap());
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let done: serde_json::Value = serde_json::from_slice(done).unwrap();
        let last_done = events
            .iter()
            .rfind(|e| e["type"] == "response.output_item.done" && e["output_index"] == 0)
            .unwrap();
        assert_eq!(last_done["item"], done);
        let output = &events.last().unwrap()["response"]["output"];
        assert_eq!(output.as_array().unwrap().len(), 2);
        assert_eq!(output[0], done);
        assert_eq!(output[1]["type"], "message");
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
    }

    #[test]
    fn annotations_are_added_to_the_message_text_and_kept() {
        let citation = br#"{"type":"url_citation","url":"https://example.com/","title":"Ex","start_index":0,"end_index":5}"#;
        let second = br#"{"type":"file_citation","file_id":"file_1","filename":"a.txt","index":9}"#;
        let run = |framing| {
            let mut e = encoder(framing, None);
            let mut out = e.start().to_vec();
            out.extend_from_slice(e.text_delta("Found"));
            out.extend_from_slice(e.text_annotation(citation).unwrap());
            out.extend_from_slice(e.text_delta(" it."));
            out.extend_from_slice(e.text_annotation(second).unwrap());
            for bad in [&b"nope"[..], br#"[]"#, br#"{"url":"x"}"#, br#"{"type":3}"#] {
                assert!(e.text_annotation(bad).is_err());
            }
            out.extend_from_slice(e.complete(Usage::default(), 9));
            (out, e.output_items().len())
        };
        let (json, items) = run(Framing::Json);
        assert_eq!(items, 1);
        let events = lines(&json);
        let citation: serde_json::Value = serde_json::from_slice(citation).unwrap();
        let added = &events[5];
        assert_eq!(added["type"], "response.output_text.annotation.added");
        assert_eq!(added["annotation"], citation);
        assert_eq!(added["annotation_index"], 0);
        assert_eq!(added["content_index"], 0);
        assert_eq!(added["output_index"], 0);
        assert_eq!(added["item_id"], events[2]["item"]["id"]);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        let second: serde_json::Value = serde_json::from_slice(second).unwrap();
        assert_eq!(events[7]["annotation"], second);
        assert_eq!(events[7]["annotation_index"], 1);
        let part_done = events
            .iter()
            .find(|e| e["type"] == "response.content_part.done")
            .unwrap();
        let both = serde_json::json!([citation, second]);
        assert_eq!(part_done["part"]["annotations"], both);
        let output = &events.last().unwrap()["response"]["output"][0];
        assert_eq!(output["content"][0]["text"], "Found it.");
        assert_eq!(output["content"][0]["annotations"], both);
        // The same events in msgpack.
        let mp = frame_events(&run(Framing::Msgpack).0);
        assert_eq!(mp.len(), events.len());
        assert_eq!(mp[5]["annotation"], citation);
        assert_eq!(
            mp.last().unwrap()["response"]["output"][0]["content"],
            events.last().unwrap()["response"]["output"][0]["content"]
        );
    }

    #[test]
    fn a_refusal_is_a_message_with_one_refusal_part() {
        let mut e = encoder(Framing::Json, None);
        let mut all = e.start().to_vec();
        all.extend_from_slice(e.text_delta("Hm."));
        all.extend_from_slice(e.refusal_delta("I can"));
        assert_eq!(e.open_kind(), Some(ItemKind::Refusal));
        all.extend_from_slice(e.refusal_delta("'t."));
        all.extend_from_slice(e.tool_arguments_delta("ignored"));
        all.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&all);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            &types[8..],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.refusal.delta",
                "response.refusal.delta",
                "response.refusal.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(
            events[9]["part"],
            serde_json::json!({"type": "refusal", "refusal": ""})
        );
        assert_eq!(events[11]["content_index"], 0);
        assert_eq!(events[12]["refusal"], "I can't.");
        let output = &events.last().unwrap()["response"]["output"];
        assert_eq!(output[0]["content"][0]["text"], "Hm.");
        assert_eq!(
            output[1]["content"],
            serde_json::json!([{"type": "refusal", "refusal": "I can't."}])
        );
        assert_eq!(output[1]["type"], "message");
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
    }

    #[test]
    fn a_bad_hosted_start_or_event_is_refused_and_changes_nothing() {
        let mut e = encoder(Framing::Json, None);
        e.start();
        e.text_delta("open");
        let seq = e.sequence_number();
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"type":"web_search_call"}"#,
            br#"{"type":"web_search_call","id":""}"#,
            br#"{"type":"web_search_call","id":7}"#,
            br#"{"id":"x"}"#,
            br#"{"id":"x","type":"message"}"#,
            br#"{"id":"x","type":"function_call"}"#,
            br#"{"id":"x","type":"custom_tool_call"}"#,
            br#"{"id":"x","type":"reasoning"}"#,
        ] {
            assert!(
                e.item_start(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &b"nope"[..],
            br#"[]"#,
            br#"{"item_id":"x"}"#,
            br#"{"type":1}"#,
        ] {
            assert!(e.item_event(bad).is_err());
        }
        assert_eq!(e.sequence_number(), seq);
        assert_eq!(e.open_kind(), Some(ItemKind::Message));
        assert!(!e.hosted_open());
    }

    #[test]
    fn hosted_events_are_the_same_in_every_framing() {
        let run = |framing| {
            let mut e = encoder(framing, None);
            let mut out = e.start().to_vec();
            out.extend_from_slice(
                e.item_start(br#"{"id":"ws_1","type":"web_search_call","status":"in_progress"}"#)
                    .unwrap(),
            );
            out.extend_from_slice(
                e.item_event(br#"{"type":"response.web_search_call.searching","item_id":"ws_1","n":[1.5,null,{"a":true}]}"#)
                    .unwrap(),
            );
            out.extend_from_slice(e.complete(Usage::default(), 9));
            out
        };
        let json = lines(&run(Framing::Json));
        assert_eq!(json[3]["n"], serde_json::json!([1.5, null, {"a": true}]));
        assert_eq!(frame_events(&run(Framing::WebSocket)), json);
        assert_eq!(frame_events(&run(Framing::Msgpack)), json);
    }

    #[test]
    fn a_bad_reasoning_item_is_refused_and_changes_nothing() {
        let mut e = encoder(Framing::Json, None);
        e.start();
        e.text_delta("open");
        let seq = e.sequence_number();
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"type":"message"}"#,
            br#"{"type":"reasoning","summary":"x"}"#,
            br#"{"type":"reasoning","summary":[{"type":"reasoning_text","text":"x"}]}"#,
            br#"{"type":"reasoning","summary":[{"type":"summary_text","text":1}]}"#,
            br#"{"type":"reasoning","content":[{"type":"summary_text","text":"x"}]}"#,
            br#"{"type":"reasoning","encrypted_content":5}"#,
            br#"{"type":"reasoning","id":7}"#,
        ] {
            assert!(e.reasoning_item(bad).is_err());
        }
        assert_eq!(e.sequence_number(), seq);
        assert_eq!(e.open_kind(), Some(ItemKind::Message));
        assert_eq!(e.output().len(), 0);
    }

    #[test]
    fn the_terminal_meta_is_the_meta_after_the_terminal_event() {
        let usage_counts = Usage {
            input_tokens: 10,
            cached_tokens: 4,
            output_tokens: 3,
            reasoning_tokens: 0,
        };
        for incomplete in [None, Some("steered")] {
            let mut e = encoder(Framing::Json, None);
            e.start();
            e.text_delta("Hi");
            let before: serde_json::Value =
                serde_json::from_slice(&e.terminal_meta(usage_counts, 9, incomplete, Some("k1")))
                    .unwrap();
            match incomplete {
                None => e.complete(usage_counts, 9),
                Some(reason) => e.incomplete(reason, usage_counts, 9),
            };
            let mut after: serde_json::Value = serde_json::from_slice(&e.meta_json()).unwrap();
            after["instructions"] = "k1".into();
            assert_eq!(before, after);
        }
        let e = encoder(Framing::Json, None);
        let meta: serde_json::Value =
            serde_json::from_slice(&e.terminal_meta(usage_counts, 9, None, None)).unwrap();
        assert!(meta["instructions"].is_null());
    }

    #[test]
    fn websocket_and_msgpack_frames_carry_the_same_events() {
        let mut json = encoder(Framing::Json, None);
        let expected = lines(&turn(&mut json));
        let mut ws = encoder(Framing::WebSocket, None);
        let text_frames = frames(&turn(&mut ws));
        let mut mp = encoder(Framing::Msgpack, None);
        let binary_frames = frames(&turn(&mut mp));
        assert_eq!(text_frames.len(), expected.len());
        assert_eq!(binary_frames.len(), expected.len());
        for ((want, (op_t, text)), (op_b, packed)) in
            expected.iter().zip(&text_frames).zip(&binary_frames)
        {
            assert_eq!((*op_t, *op_b), (0x81, 0x82));
            let mut want = want.clone();
            let got: serde_json::Value = serde_json::from_slice(text).unwrap();
            strip_ids(&mut want);
            let mut got = got;
            strip_ids(&mut got);
            assert_eq!(got, want);
            let unpacked = crate::framing::msgpack::decode(packed).unwrap();
            let mut got = Vec::new();
            crate::framing::value::write_canonical(&unpacked, &mut got);
            let mut got: serde_json::Value = serde_json::from_slice(&got).unwrap();
            strip_ids(&mut got);
            assert_eq!(got, want);
        }
    }

    /// Item ids are random: blank them to compare two encoders' events.
    fn strip_ids(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if (k == "id" || k == "item_id")
                        && v.as_str()
                            .is_some_and(|s| s.starts_with("msg_") || s.starts_with("fc_"))
                    {
                        *v = serde_json::Value::Null;
                    } else {
                        strip_ids(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip_ids),
            _ => {}
        }
    }

    #[test]
    fn large_payloads_get_long_headers() {
        for size in [100, 200, 70_000] {
            let mut e = encoder(Framing::WebSocket, None);
            let text = "x".repeat(size);
            let data = e.text_delta(&text).to_vec();
            let parsed = frames(&data);
            assert_eq!(parsed.len(), 3);
            let delta: serde_json::Value = serde_json::from_slice(&parsed[2].1).unwrap();
            assert_eq!(delta["delta"].as_str().unwrap().len(), size);
        }
    }

    #[test]
    fn sse_lines() {
        let mut e = encoder(Framing::Sse, None);
        let data = String::from_utf8(e.start().to_vec()).unwrap();
        let blocks: Vec<&str> = data.split_terminator("\n\n").collect();
        assert_eq!(blocks.len(), 2);
        assert!(blocks[0].starts_with("event: response.created\ndata: {"));
        assert!(blocks[1].starts_with("event: response.in_progress\ndata: {"));
    }

    #[test]
    fn failure_incomplete_and_extra_events() {
        let mut e = encoder(Framing::Json, Some("a"));
        e.start();
        e.text_delta("x");
        let steer = e
            .event(br#"{"type":"response.steer.accepted","steer":{"id":"s","previous_response_id":"resp_1"}}"#)
            .unwrap()
            .to_vec();
        let steer = &lines(&steer)[0];
        assert_eq!(steer["sequence_number"], 5);
        assert_eq!(steer["stream_id"], "a");
        assert_eq!(steer["steer"]["id"], "s");
        let out = lines(e.incomplete(
            "steered",
            Usage {
                input_tokens: 1,
                cached_tokens: 0,
                output_tokens: 1,
                reasoning_tokens: 0,
            },
            3,
        ));
        let last = out.last().unwrap();
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(last["response"]["incomplete_details"]["reason"], "steered");
        assert_eq!(last["sequence_number"], 9);

        let mut e = encoder(Framing::Json, None);
        e.start();
        let out = lines(
            e.fail(br#"{"code":"server_error","message":"boom"}"#, None)
                .unwrap(),
        );
        assert_eq!(out[0]["response"]["status"], "failed");
        assert_eq!(out[0]["response"]["error"]["code"], "server_error");
        assert!(out[0]["response"]["completed_at"].is_null());
        assert!(out[0].get("stream_id").is_none());
        assert!(e.event(b"[1]").is_err());
        assert!(e.fail(b"\"x\"", None).is_err());
        assert!(e.tool_arguments_delta("ignored").is_empty());
    }

    #[test]
    fn a_background_response_is_queued_then_runs_or_is_cancelled() {
        let new = |framing| {
            ResponseEncoder::new(ResponseHead {
                response_id: "resp_bg",
                settings: SETTINGS,
                previous_response_id: None,
                store: true,
                created_at: 7,
                stream_id: None,
                framing,
                background: true,
            })
            .unwrap()
        };
        let mut e = new(Framing::Json);
        let mut out = e.start().to_vec();
        assert_eq!(e.status(), Status::Queued);
        out.extend_from_slice(e.in_progress());
        out.extend_from_slice(e.text_delta("Hi"));
        let meta: serde_json::Value =
            serde_json::from_slice(&e.terminal_meta(Usage::default(), 9, None, None)).unwrap();
        assert_eq!(meta["background"], true);
        out.extend_from_slice(e.complete(Usage::default(), 9));
        let events = lines(&out);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds[..3],
            [
                "response.created",
                "response.queued",
                "response.in_progress"
            ]
        );
        assert_eq!(events[0]["response"]["status"], "queued");
        assert_eq!(events[1]["response"]["status"], "queued");
        assert_eq!(events[2]["response"]["status"], "in_progress");
        assert!(events
            .iter()
            .all(|e| e.get("response").is_none() || e["response"]["background"] == true));
        // Cancelled while an item is open: the item is closed, no terminal event.
        let mut e = new(Framing::Msgpack);
        e.start();
        e.in_progress();
        e.text_delta("partial");
        let closed = frame_events(e.cancel());
        assert_eq!(closed.last().unwrap()["type"], "response.output_item.done");
        assert_eq!(closed.last().unwrap()["item"]["status"], "incomplete");
        assert_eq!(e.status(), Status::Cancelled);
        let response: serde_json::Value = serde_json::from_slice(&e.response_json()).unwrap();
        assert_eq!(response["status"], "cancelled");
        assert_eq!(response["background"], true);
        assert_eq!(response["output"][0]["content"][0]["text"], "partial");
    }

    #[test]
    fn bad_settings_are_refused() {
        for settings in [&b"[]"[..], b"", b"{", b"nope"] {
            let head = ResponseHead {
                response_id: "r",
                settings,
                previous_response_id: None,
                store: true,
                created_at: 0,
                stream_id: None,
                framing: Framing::Json,
                background: false,
            };
            assert!(ResponseEncoder::new(head).is_err());
        }
        let head = ResponseHead {
            response_id: "r",
            settings: b"{ }",
            previous_response_id: Some("p"),
            store: true,
            created_at: 0,
            stream_id: None,
            framing: Framing::Msgpack,
            background: false,
        };
        let mut e = ResponseEncoder::new(head).unwrap();
        assert!(!e.start().is_empty());
        let mut json = ResponseEncoder::new(ResponseHead {
            response_id: "r",
            settings: b"{}",
            previous_response_id: None,
            store: true,
            created_at: 0,
            stream_id: None,
            framing: Framing::Json,
            background: false,
        })
        .unwrap();
        let created = lines(json.start());
        assert_eq!(created[0]["response"]["id"], "r");
    }

    #[test]
    fn stand_alone_events() {
        let event = br#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"x","message":"m","param":null}}"#;
        for framing in [
            Framing::Json,
            Framing::WebSocket,
            Framing::Msgpack,
            Framing::Sse,
        ] {
            let mut out = Vec::new();
            frame_event(event, framing, &mut out).unwrap();
            assert!(!out.is_empty());
        }
        let mut out = Vec::new();
        frame_event(event, Framing::Msgpack, &mut out).unwrap();
        let (op, payload) = frames(&out).remove(0);
        assert_eq!(op, 0x82);
        let value = crate::framing::msgpack::decode(&payload).unwrap();
        assert_eq!(
            value.as_object().unwrap().get("status"),
            Some(&Value::Int(400))
        );
        assert!(frame_event(b"nope", Framing::Msgpack, &mut out).is_err());
    }

    /// An upstream's hosted-call event whose type carries line breaks must not
    /// write SSE fields or events of its own into the client's stream.
    #[test]
    fn an_event_type_cannot_break_out_of_its_sse_event_line() {
        let forged =
            br#"{"type":"response.x\n\ndata: {\"injected\":1}\n\nevent: y","item_id":"ws_1"}"#;
        let mut e = encoder(Framing::Sse, None);
        e.start();
        e.item_start(br#"{"id":"ws_1","type":"web_search_call","status":"in_progress"}"#)
            .unwrap();
        let seq = e.sequence_number();
        assert!(e.item_event(forged).is_err());
        assert_eq!(e.sequence_number(), seq, "nothing changed");
        for ty in ["response.web_search_call.searching", "a_b-c.d1"] {
            assert!(is_event_name(ty), "{ty}");
        }
        for ty in ["", "a\nb", "a\rb", "a b", "a:b"] {
            assert!(!is_event_name(ty), "{ty:?}");
        }
        // A stand-alone event with such a type is data only: one event, its type
        // still in the data.
        let mut out = Vec::new();
        frame_event(br#"{"type":"x\ndata: {}"}"#, Framing::Sse, &mut out).unwrap();
        assert_eq!(out, b"data: {\"type\":\"x\\ndata: {}\"}\n\n");
    }
}
