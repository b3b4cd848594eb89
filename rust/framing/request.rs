//! Client messages: `response.create` (WebSocket and HTTP bodies) and `response.steer`,
//! decoded and validated in one pass, with the verdicts of `client_events.py`.
//!
//! `parse_message` never fails: bad input comes back as `Rejected`, carrying the
//! error `client_events.py` raises for it and the stage it belongs to (spec §2.1's
//! processing order):
//!
//! * `Stage::Message`: step 1, reported at once — not JSON (or msgpack), not an
//!   object, no or unknown `type`, a bad `stream_id`;
//! * `Stage::Create`: the body of a create whose `type` and `stream_id` are fine;
//!   the session reports it on that lane when the request reaches the front;
//! * `Stage::Steer`: a `response.steer` with invalid fields or input.
//!
//! A valid create carries its new input as cache-ready `Items` (strings and "easy"
//! messages normalised as the reference does) and its echoed settings as canonical
//! JSON. The checks run in the reference's order, so the first problem found is the
//! one reported. Converting the input to `Items` is checked last, as `Engine.prepare`
//! did: integers outside 64 bits, nesting deeper than `MAX_DEPTH` (100 levels) and
//! items larger than `max_item_bytes` are `invalid_value` on `input`.

use std::borrow::Cow;
use std::sync::Arc;

use super::error::RequestError;
use super::json::{self, JsonError};
use super::msgpack;
use super::value::{self, write_canonical, Object, Value};
use crate::error::Error as ItemError;
use crate::item::{too_deep, Item, Items, MAX_DEPTH};

/// How the message is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Msgpack,
}

/// How to read a message.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A WebSocket message (with `type`, `stream_id`, `generate`) rather than an HTTP body.
    pub websocket: bool,
    pub format: Format,
    pub max_item_bytes: usize,
}

/// Which step of the processing order an error belongs to (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Message,
    Create,
    Steer,
}

/// A message that was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub error: RequestError,
    pub stage: Stage,
    /// The create's lane, when the message got past step 1.
    pub stream_id: Option<String>,
    /// The body's `previous_response_id` when it is a string (a create's parent, a
    /// steer's target), whatever else is wrong.
    pub previous_response_id: Option<String>,
    /// A refused steer's input as canonical JSON when the input itself is valid
    /// (another field was wrong): `response.steer.failed` gives it back.
    pub steer_input_json: Option<Vec<u8>>,
}

/// A valid `response.create`.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub model: String,
    pub stream_id: Option<String>,
    pub previous_response_id: Option<String>,
    pub generate: bool,
    pub store: bool,
    pub stream: bool,
    /// `background: true` (HTTP only): the response runs on after the request.
    pub background: bool,
    pub input: Items,
    /// The echoed fields of the Response object and `model`, as one canonical JSON
    /// object (keys sorted at every depth, defaults filled in).
    pub settings: Vec<u8>,
    pub instructions: Option<String>,
    /// `max_output_tokens` (at least 16; saturated to `u64::MAX`), as in `settings`.
    pub max_output_tokens: Option<u64>,
    /// Names of the `function` tools, in order.
    pub function_names: Vec<String>,
    pub has_tools: bool,
    /// Where the `tools` array is in `settings` (its canonical JSON), when it has
    /// any tool.
    pub tools_span: Option<std::ops::Range<usize>>,
    /// Body fields the API does not know, sorted.
    pub ignored_fields: Vec<String>,
    /// Server-side compaction asked for (`context_management`, validated as the
    /// API's schema has it: an array of `{type: "compaction", compact_threshold?}`):
    /// its `compact_threshold` when given, else [`DEFAULT_COMPACT_THRESHOLD`].
    pub compact_threshold: Option<u64>,
    /// `include`: the output the client asks to be included (such as
    /// `reasoning.encrypted_content`), as sent; empty when absent or null. Values are
    /// not checked against a list (new ones keep working), only their type.
    pub include: Vec<String>,
    /// The body fields only an upstream acts on, for a Responses upstream: `image`,
    /// `prompt` and `moderation` (see [`CreateRequest::responses_only`]),
    /// `access_programs`, and `prompt_cache_options` less what warmsocket reads itself (`prewarm`) and
    /// what names a response (`comparison_response_id`: an upstream knows warmsocket's
    /// ids by other names), their null members left out, as one canonical JSON
    /// object; None when there is none.
    pub upstream_options: Option<Vec<u8>>,
    /// The settings of [`UPSTREAM_DEFAULTS`] the client gave at the API's default
    /// value (which `settings` cannot tell from not giving them), in that order.
    pub given_defaults: Vec<&'static str>,
    /// The input has an `item_reference` (to be replaced by the item it names).
    pub has_item_references: bool,
    /// The fields of [`RESPONSES_ONLY`] the body has: what only a Responses upstream
    /// (OpenAI) can honour, so another backend must refuse them rather than drop them.
    pub responses_only: Vec<&'static str>,
    /// The body gave no `model`: the `prompt`'s template names it (`model` is then
    /// `"default"`, and an upstream gets none).
    pub model_from_prompt: bool,
    /// `conversation` (an id, or an object with its `id`): the Conversations API's
    /// conversation whose items come before the input, and which gets this
    /// response's input and output. Never with `previous_response_id`.
    pub conversation: Option<String>,
}

/// Fields only a Responses upstream (OpenAI) can honour: `prompt`, a template stored
/// there, and `moderation`, moderated completions (its `block` policy must not be
/// dropped). Both are in [`CreateRequest::upstream_options`].
pub const RESPONSES_ONLY: [&str; 2] = ["prompt", "moderation"];

/// Settings whose API default an upstream need not share, so one the client gives,
/// even at that default, is forwarded: a vLLM or SGLang model's own sampling
/// defaults (its `generation_config`: a `temperature` of 0.6, say) apply to a
/// request that leaves `temperature` and `top_p` out, and OpenAI takes a missing
/// `service_tier` as `auto`, not the `default` the Response echoes.
pub const UPSTREAM_DEFAULTS: [&str; 3] = ["temperature", "top_p", "service_tier"];

/// [`CreateRequest::given_defaults`]; the body's types already checked.
fn given_defaults(body: &Object<'_>) -> Vec<&'static str> {
    UPSTREAM_DEFAULTS
        .into_iter()
        .filter(|name| match present(body.get(name)) {
            Some(Value::Str(tier)) => *name == "service_tier" && tier == "default",
            Some(Value::Int(n)) => *n == 1,
            Some(Value::UInt(n)) => *n == 1,
            Some(Value::Float(n)) => *n == 1.0,
            _ => false,
        })
        .collect()
}

/// The context size in tokens at which a request that asks for server-side
/// compaction without a `compact_threshold` is compacted.
pub const DEFAULT_COMPACT_THRESHOLD: u64 = 100_000;

/// The smallest `compact_threshold` the API accepts (its OpenAPI schema's `minimum`).
pub const MIN_COMPACT_THRESHOLD: u64 = 1000;

/// `context_management` (see [`CreateRequest::compact_threshold`]), validated as the
/// API's schema has it: null, or a non-empty array of objects whose `type` is
/// `compaction` (the only one the API has) with an optional integer
/// `compact_threshold` of at least [`MIN_COMPACT_THRESHOLD`]. The first entry's
/// threshold applies.
fn compact_threshold(body: &Object<'_>) -> Result<Option<u64>, RequestError> {
    let Some(value) = present(body.get("context_management")) else {
        return Ok(None);
    };
    let Value::Array(entries) = value else {
        return Err(RequestError::invalid_type(
            "context_management",
            "an array or null",
        ));
    };
    if entries.is_empty() {
        return Err(RequestError::invalid_value(
            "context_management",
            "Invalid 'context_management': empty array. Expected at least one entry, or \
             null.",
        ));
    }
    let mut threshold = None;
    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(RequestError::invalid_type(
                format!("context_management[{index}]"),
                "an object",
            ));
        };
        match entry.get("type") {
            None => {
                return Err(RequestError::missing(format!(
                    "context_management[{index}].type"
                )))
            }
            Some(Value::Str(kind)) if kind == "compaction" => {}
            Some(Value::Str(_)) => {
                return Err(RequestError::invalid_value(
                    format!("context_management[{index}].type"),
                    format!(
                        "Invalid value for 'context_management[{index}].type': only \
                         'compaction' is supported."
                    ),
                ))
            }
            Some(_) => {
                return Err(RequestError::invalid_type(
                    format!("context_management[{index}].type"),
                    "a string",
                ))
            }
        }
        let param = || format!("context_management[{index}].compact_threshold");
        let entry_threshold = match present(entry.get("compact_threshold")) {
            None => DEFAULT_COMPACT_THRESHOLD,
            Some(value) if value.is_int() => {
                in_range(&param(), value, MIN_COMPACT_THRESHOLD, None)?
            }
            Some(_) => return Err(RequestError::invalid_type(param(), "an integer or null")),
        };
        threshold.get_or_insert(entry_threshold);
    }
    Ok(threshold)
}

/// Members of `prompt_cache_options` an upstream does not get (see
/// [`CreateRequest::upstream_options`]).
const LOCAL_CACHE_OPTIONS: [&str; 2] = ["prewarm", "comparison_response_id"];

/// `prompt_cache_options`, `image`, `prompt`, `moderation` and `access_programs`,
/// validated as the API's schema has them (null, or an object whose known members
/// have their types, a `prompt` its `id`, a `moderation` its `model`; values are not
/// checked against a list): whether `prewarm` is true, and
/// [`CreateRequest::upstream_options`].
fn upstream_options(body: &Object<'_>) -> Result<(bool, Option<Vec<u8>>), RequestError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Bool,
        Str,
        Obj,
    }
    let members = [
        (
            "prompt_cache_options",
            &[
                ("prewarm", Kind::Bool, "a boolean or null"),
                ("mode", Kind::Str, "a string"),
                ("ttl", Kind::Str, "a string"),
                ("comparison_response_id", Kind::Str, "a string or null"),
            ][..],
        ),
        (
            "image",
            &[("context_compression", Kind::Str, "a string")][..],
        ),
        (
            "prompt",
            &[
                ("id", Kind::Str, "a string"),
                ("version", Kind::Str, "a string or null"),
                ("variables", Kind::Obj, "an object or null"),
            ][..],
        ),
        (
            "moderation",
            &[
                ("model", Kind::Str, "a string"),
                ("policy", Kind::Obj, "an object or null"),
            ][..],
        ),
        ("access_programs", &[("cyber", Kind::Str, "a string")][..]),
    ];
    let mut prewarm = false;
    let mut kept: Vec<(Cow<'_, str>, Value<'_>)> = Vec::new();
    for (field, typed) in members {
        let Some(value) = present(body.get(field)) else {
            continue;
        };
        let Value::Object(options) = value else {
            return Err(RequestError::invalid_type(field, "an object or null"));
        };
        for &(member, kind, expected) in typed {
            let ok = match present(options.get(member)) {
                None => true,
                Some(Value::Bool(_)) => kind == Kind::Bool,
                Some(Value::Str(_)) => kind == Kind::Str,
                Some(Value::Object(_)) => kind == Kind::Obj,
                Some(_) => false,
            };
            if !ok {
                return Err(RequestError::invalid_type(
                    format!("{field}.{member}"),
                    expected,
                ));
            }
        }
        for (object, required) in [("prompt", "id"), ("moderation", "model")] {
            if field == object && present(options.get(required)).is_none() {
                return Err(RequestError::missing(format!("{object}.{required}")));
            }
        }
        if field == "prompt_cache_options" {
            prewarm = matches!(options.get("prewarm"), Some(Value::Bool(true)));
        }
        let entries: Vec<(Cow<'_, str>, Value<'_>)> = options
            .iter()
            .filter(|(k, v)| {
                let local = field == "prompt_cache_options" && LOCAL_CACHE_OPTIONS.contains(k);
                !(v.is_null() || local)
            })
            .map(|(k, v)| (Cow::Owned(k.to_owned()), v.clone()))
            .collect();
        if !entries.is_empty() {
            kept.push((
                Cow::Borrowed(field),
                Value::Object(Object::from_entries(entries)),
            ));
        }
    }
    if kept.is_empty() {
        return Ok((prewarm, None));
    }
    let mut json = Vec::new();
    write_canonical(&Value::Object(Object::from_entries(kept)), &mut json);
    Ok((prewarm, Some(json)))
}

/// `include`, validated as the API's schema has it: null, or an array of strings.
fn include(body: &Object<'_>) -> Result<Vec<String>, RequestError> {
    let Some(value) = present(body.get("include")) else {
        return Ok(Vec::new());
    };
    let Value::Array(values) = value else {
        return Err(RequestError::invalid_type(
            "include",
            "an array of strings or null",
        ));
    };
    let mut include = Vec::with_capacity(values.len());
    for (index, value) in values.iter().enumerate() {
        let Value::Str(text) = value else {
            return Err(RequestError::invalid_type(
                format!("include[{index}]"),
                "a string",
            ));
        };
        include.push(text.to_string());
    }
    Ok(include)
}

/// An integer field's value checked against the bounds the API's schema gives it
/// (`minimum`, `maximum`): the integer, saturated to `u64` (a negative one is below
/// any minimum here, which are all >= 0), or the error the API gives. `value` is
/// an integer (`Value::is_int`).
fn in_range(
    param: &str,
    value: &Value<'_>,
    min: u64,
    max: Option<u64>,
) -> Result<u64, RequestError> {
    let (number, text) = match value {
        Value::Int(n) => (u64::try_from(*n).ok(), n.to_string()),
        Value::UInt(n) => (Some(*n), n.to_string()),
        Value::BigInt(t) => ((!t.starts_with('-')).then_some(u64::MAX), t.to_string()),
        _ => (None, String::new()),
    };
    let (bound, relation, limit) = match number {
        Some(n) if n < min => ("below minimum", ">=", min),
        None => ("below minimum", ">=", min),
        Some(n) => match max {
            Some(max) if n > max => ("above maximum", "<=", max),
            _ => return Ok(n),
        },
    };
    Err(RequestError::invalid_value(
        param,
        format!(
            "Invalid '{param}': integer {bound} value. Expected a value {relation} {limit}, \
             but got {text} instead."
        ),
    ))
}

/// The API's bounds of the create's integer fields (`minimum`, `maximum`).
const INTEGER_BOUNDS: [(&str, u64, Option<u64>); 3] = [
    ("max_output_tokens", 16, None),
    ("max_tool_calls", 0, None),
    ("top_logprobs", 0, Some(20)),
];

/// A valid `response.steer`.
#[derive(Debug, Clone)]
pub struct SteerRequest {
    pub previous_response_id: String,
    /// The steering input as user messages.
    pub input: Items,
    /// The `input` field as sent (a string or an array), for echoing in failures.
    pub input_json: Vec<u8>,
}

#[derive(Debug, Clone)]
pub enum ClientMessage {
    Create(Box<CreateRequest>),
    Steer(SteerRequest),
    /// `response.processed` (sent by Codex): not part of the API, ignored.
    Ignored,
    Rejected(Rejected),
}

/// Fields of a create body that are echoed on the Response object (`ECHOED_DEFAULTS`).
const ECHOED: [&str; 18] = [
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "text",
    "reasoning",
    "truncation",
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Every body field the API knows (`KNOWN_CREATE_FIELDS`); others are ignored.
const KNOWN_OTHER: [&str; 19] = [
    "type",
    "model",
    "input",
    "previous_response_id",
    "store",
    "stream",
    "stream_options",
    "stream_id",
    "generate",
    "background",
    "background_options",
    "conversation",
    "include",
    "prompt",
    "prompt_cache_options",
    "context_management",
    "moderation",
    "image",
    "access_programs",
];

const MESSAGE_ROLES: [&str; 4] = ["user", "assistant", "system", "developer"];
const CONTENT_PART_TYPES: [&str; 8] = [
    "input_text",
    "input_image",
    "input_file",
    "input_audio",
    "output_text",
    "refusal",
    "summary_text",
    "reasoning_text",
];
const TEXT_PARTS: [&str; 4] = [
    "input_text",
    "output_text",
    "summary_text",
    "reasoning_text",
];
const ITEM_TYPES: [&str; 29] = [
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "custom_tool_call",
    "custom_tool_call_output",
    "compaction",
    "web_search_call",
    "file_search_call",
    "computer_call",
    "computer_call_output",
    "code_interpreter_call",
    "image_generation_call",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "tool_search_call",
    "tool_search_output",
    "additional_tools",
    "program",
    "program_output",
    "compaction_trigger",
];
/// The item that asks for a compaction of the context: the input's last item only.
pub const COMPACTION_TRIGGER: &str = "compaction_trigger";
const NO_WARM_UP_COMPACTION: &str = "Invalid 'input': a compaction_trigger asks for a \
     compaction, which a warm-up (generate: false, or prompt_cache_options.prewarm) does not \
     run; send it in a create that generates.";
const MAX_METADATA_PAIRS: usize = 16;
/// The longest `metadata` key and value, in characters (the API's documentation).
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;
/// The longest `safety_identifier`, in characters (the API's schema).
const MAX_SAFETY_IDENTIFIER_CHARS: usize = 64;
const MAX_STREAM_ID: usize = 256;

/// The echo default of an echoed field (`ECHOED_DEFAULTS[name]`).
fn echoed_default(name: &str) -> Value<'static> {
    use std::borrow::Cow::Borrowed as B;
    let object = |entries: Vec<(&'static str, Value<'static>)>| {
        Value::Object(Object::from_entries(
            entries.into_iter().map(|(k, v)| (B(k), v)).collect(),
        ))
    };
    match name {
        "tools" => Value::Array(Vec::new()),
        "tool_choice" => Value::Str(B("auto")),
        "parallel_tool_calls" => Value::Bool(true),
        "temperature" | "top_p" => Value::Float(1.0),
        "top_logprobs" => Value::Int(0),
        "metadata" => object(Vec::new()),
        "text" => object(vec![
            ("format", object(vec![("type", Value::Str(B("text")))])),
            ("verbosity", Value::Str(B("medium"))),
        ]),
        "reasoning" => object(vec![("effort", Value::Null), ("summary", Value::Null)]),
        "truncation" => Value::Str(B("disabled")),
        "service_tier" => Value::Str(B("default")),
        _ => Value::Null,
    }
}

/// Decode and validate one client message. Never fails: see `ClientMessage::Rejected`.
pub fn parse_message(data: &[u8], options: Options) -> ClientMessage {
    let decoded = match options.format {
        Format::Json => json::decode(data).map_err(|e| json_error(&e, data)),
        Format::Msgpack => msgpack::decode(data).map_err(|_| RequestError::InvalidMsgpack),
    };
    let value = match decoded {
        Ok(value) => value,
        Err(error) => return reject(error, Stage::Message, None, None),
    };
    let Value::Object(body) = value else {
        let what = if options.websocket { "event" } else { "body" };
        return reject(
            RequestError::invalid_type(what, "a JSON object"),
            Stage::Message,
            None,
            None,
        );
    };
    if !options.websocket {
        return create(body, None, options);
    }
    match body.get("type") {
        Some(Value::Str(t)) if t == "response.create" => {
            let stream_id = match body.get("stream_id") {
                None | Some(Value::Null) => None,
                Some(Value::Str(s)) if is_stream_id(s) => Some(s.to_string()),
                Some(_) => {
                    return reject(RequestError::InvalidStreamId, Stage::Message, None, None)
                }
            };
            create(body, stream_id, options)
        }
        Some(Value::Str(t)) if t == "response.steer" => steer(&body, options.max_item_bytes),
        Some(Value::Str(t)) if t == "response.processed" => ClientMessage::Ignored,
        None | Some(Value::Null) => {
            reject(RequestError::missing("type"), Stage::Message, None, None)
        }
        Some(other) => {
            let shown = match other {
                Value::Str(s) if s.chars().count() <= 64 => s.to_string(),
                _ => "...".to_owned(),
            };
            reject(
                RequestError::UnknownEventType { shown },
                Stage::Message,
                None,
                None,
            )
        }
    }
}

#[cold]
fn json_error(error: &JsonError, data: &[u8]) -> RequestError {
    RequestError::InvalidJson {
        detail: error.detail(data),
    }
}

#[cold]
fn reject(
    error: RequestError,
    stage: Stage,
    stream_id: Option<String>,
    previous_response_id: Option<String>,
) -> ClientMessage {
    ClientMessage::Rejected(Rejected {
        error,
        stage,
        stream_id,
        previous_response_id,
        steer_input_json: None,
    })
}

/// `STREAM_ID_RE.fullmatch`: 1 to 256 of `[A-Za-z0-9_.-]`.
pub fn is_stream_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_STREAM_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn create(body: Object<'_>, stream_id: Option<String>, options: Options) -> ClientMessage {
    let previous = body.get("previous_response_id").and_then(Value::as_str);
    let previous = previous.map(str::to_owned);
    match validate_create(body, stream_id.clone(), options) {
        Ok(request) => ClientMessage::Create(Box::new(request)),
        Err(error) => reject(error, Stage::Create, stream_id, previous),
    }
}

fn validate_create(
    body: Object<'_>,
    stream_id: Option<String>,
    options: Options,
) -> Result<CreateRequest, RequestError> {
    let websocket = options.websocket;
    if !websocket {
        for name in ["stream_id", "generate", "type"] {
            if body.contains_key(name) {
                return Err(RequestError::UnknownParameter { param: name });
            }
        }
    }
    let model_from_prompt = present(body.get("model")).is_none();
    let responses_only: Vec<&'static str> = RESPONSES_ONLY
        .into_iter()
        .filter(|name| present(body.get(name)).is_some())
        .collect();
    let model = match body.get("model") {
        None | Some(Value::Null) => {
            if present(body.get("prompt")).is_none() {
                return Err(RequestError::missing("model"));
            }
            "default"
        }
        Some(Value::Str(s)) if !s.is_empty() => s,
        Some(_) => return Err(RequestError::invalid_type("model", "a non-empty string")),
    };
    let previous = match present(body.get("previous_response_id")) {
        None => None,
        Some(Value::Str(s)) if !s.is_empty() => Some(s.as_ref()),
        Some(_) => {
            return Err(RequestError::invalid_type(
                "previous_response_id",
                "a non-empty string or null",
            ))
        }
    };
    let conversation = present(body.get("conversation"));
    if previous.is_some() && conversation.is_some() {
        return Err(RequestError::invalid_value(
            "conversation",
            "'previous_response_id' and 'conversation' cannot be used together.",
        ));
    }
    let conversation = match conversation {
        None => None,
        Some(Value::Str(id)) if !id.is_empty() => Some(id.to_string()),
        Some(Value::Object(object)) => match object.get("id") {
            Some(Value::Str(id)) if !id.is_empty() => Some(id.to_string()),
            _ => {
                return Err(RequestError::invalid_type(
                    "conversation.id",
                    "a non-empty string",
                ))
            }
        },
        Some(_) => {
            return Err(RequestError::invalid_type(
                "conversation",
                "a conversation id, or an object with its id",
            ))
        }
    };
    let background = boolean(&body, "background", false)?;
    if background && websocket {
        return Err(RequestError::UnsupportedParameter {
            param: "background".into(),
            message: "background is not supported in WebSocket mode; create background \
                      responses over HTTP (POST /v1/responses).",
        });
    }
    let store = boolean(&body, "store", true)?;
    if background && !store {
        return Err(RequestError::invalid_value(
            "store",
            "Background responses are stored: send 'store': true with 'background': true.",
        ));
    }
    let stream = boolean(&body, "stream", false)?;
    let mut generate = if websocket {
        boolean(&body, "generate", true)?
    } else {
        true
    };
    let (prewarm, upstream_options) = upstream_options(&body)?;
    if prewarm {
        generate = false;
    }
    let settings = settings(&body, model)?;
    let given_defaults = given_defaults(&body);
    let compact_threshold = compact_threshold(&body)?;
    let include = include(&body)?;
    let input = normalize_input(body.get("input"))?;
    let has_item_references = match body.get("input") {
        Some(Value::Array(values)) => values
            .iter()
            .any(|v| v.get("type").and_then(Value::as_str) == Some("item_reference")),
        _ => false,
    };
    if input.is_empty() && generate && previous.is_none() && conversation.is_none() {
        return Err(RequestError::invalid_value(
            "input",
            "Input must not be empty.",
        ));
    }
    let triggers = match body.get("input") {
        Some(Value::Array(values)) => values
            .last()
            .is_some_and(|v| v.get("type").and_then(Value::as_str) == Some(COMPACTION_TRIGGER)),
        _ => false,
    };
    if triggers && !generate {
        return Err(RequestError::invalid_value("input", NO_WARM_UP_COMPACTION));
    }
    let mut ignored_fields: Vec<String> = body
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !ECHOED.contains(k) && !KNOWN_OTHER.contains(k))
        .map(str::to_owned)
        .collect();
    ignored_fields.sort_unstable();
    let model = model.to_owned();
    let previous_response_id = previous.map(str::to_owned);
    let input = take_input(body, input);
    let input = items(input, options.max_item_bytes)
        .map_err(|e| RequestError::invalid_value("input", format!("Invalid 'input': {e}")))?;
    Ok(CreateRequest {
        model,
        stream_id: if websocket { stream_id } else { None },
        previous_response_id,
        generate,
        store,
        stream,
        background,
        input,
        settings: settings.json,
        instructions: settings.instructions,
        max_output_tokens: settings.max_output_tokens,
        function_names: settings.function_names,
        has_tools: settings.tools_span.is_some(),
        tools_span: settings.tools_span,
        ignored_fields,
        compact_threshold,
        include,
        upstream_options,
        given_defaults,
        has_item_references,
        responses_only,
        model_from_prompt,
        conversation,
    })
}

/// `None` for an absent or null field (Python's `body.get(name) is None`).
fn present<'v, 'a>(value: Option<&'v Value<'a>>) -> Option<&'v Value<'a>> {
    value.filter(|v| !v.is_null())
}

/// `_bool`: absent or null is the default; anything but a boolean is an error.
fn boolean(body: &Object<'_>, name: &str, default: bool) -> Result<bool, RequestError> {
    match present(body.get(name)) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RequestError::invalid_type(name, "a boolean")),
    }
}

struct Settings {
    json: Vec<u8>,
    instructions: Option<String>,
    function_names: Vec<String>,
    /// Where a non-empty `tools` array is in `json`.
    tools_span: Option<std::ops::Range<usize>>,
    max_output_tokens: Option<u64>,
}

/// `_settings`: the echoed fields with their defaults, validated in the reference's
/// order, written as one canonical JSON object together with `model`.
fn settings(body: &Object<'_>, model: &str) -> Result<Settings, RequestError> {
    let defaults: Vec<Value<'static>> = ECHOED.iter().map(|name| echoed_default(name)).collect();
    let mut values: Vec<&Value<'_>> = Vec::with_capacity(ECHOED.len());
    for (name, default) in ECHOED.iter().zip(&defaults) {
        let value = match body.get(name) {
            None => default,
            Some(Value::Null) if !default.is_null() => default,
            Some(v) => v,
        };
        values.push(value);
    }
    let get = |name: &str| values[ECHOED.iter().position(|n| *n == name).unwrap_or(0)];

    let instructions = match get("instructions") {
        Value::Null => None,
        Value::Str(s) => Some(s.to_string()),
        _ => {
            return Err(RequestError::invalid_type(
                "instructions",
                "a string or null",
            ))
        }
    };
    let Value::Array(tools) = get("tools") else {
        return Err(RequestError::invalid_type("tools", "an array"));
    };
    let mut function_names = Vec::new();
    for (index, tool) in tools.iter().enumerate() {
        let tool_type = tool
            .as_object()
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str);
        let (Some(tool), Some(tool_type)) = (tool.as_object(), tool_type) else {
            return Err(RequestError::invalid_type(
                format!("tools[{index}]"),
                "an object with a 'type'",
            ));
        };
        if tool_type == "function" {
            match tool.get("name") {
                Some(Value::Str(name)) => function_names.push(name.to_string()),
                _ => return Err(RequestError::missing(format!("tools[{index}].name"))),
            }
            // The echoed members the SDK's FunctionTool types.
            for (member, expected) in [
                ("description", "a string or null"),
                ("parameters", "an object or null"),
                ("strict", "a boolean or null"),
            ] {
                let fits = match tool.get(member) {
                    None | Some(Value::Null) => true,
                    Some(Value::Str(_)) => member == "description",
                    Some(Value::Object(_)) => member == "parameters",
                    Some(Value::Bool(_)) => member == "strict",
                    Some(_) => false,
                };
                if !fits {
                    return Err(RequestError::invalid_type(
                        format!("tools[{index}].{member}"),
                        expected,
                    ));
                }
            }
        }
    }
    match get("tool_choice") {
        Value::Object(choice) => match choice.get("type") {
            Some(Value::Str(kind)) if matches!(kind.as_ref(), "function" | "custom") => {
                if !matches!(choice.get("name"), Some(Value::Str(_))) {
                    return Err(RequestError::missing("tool_choice.name"));
                }
            }
            Some(Value::Str(_)) => {}
            _ => {
                return Err(RequestError::invalid_type(
                    "tool_choice",
                    "'auto', 'none', 'required' or an object with a 'type'",
                ))
            }
        },
        Value::Str(s) if matches!(s.as_ref(), "auto" | "none" | "required") => {}
        _ => {
            return Err(RequestError::invalid_value(
                "tool_choice",
                "Invalid value for 'tool_choice': expected 'auto', 'none', 'required' or an \
                 object.",
            ))
        }
    }
    if !matches!(get("parallel_tool_calls"), Value::Bool(_)) {
        return Err(RequestError::invalid_type(
            "parallel_tool_calls",
            "a boolean",
        ));
    }
    for (name, max) in [("temperature", 2.0), ("top_p", 1.0)] {
        let value = get(name);
        let number = match value {
            Value::Int(i) => *i as f64,
            Value::UInt(u) => *u as f64,
            Value::BigInt(_) => f64::INFINITY, // outside 64 bits: far out of range
            Value::Float(f) => *f,
            _ => return Err(RequestError::invalid_type(name, "a number")),
        };
        if !(0.0..=max).contains(&number) {
            return Err(RequestError::invalid_value(
                name,
                format!("Invalid value for '{name}': must be between 0 and {max}."),
            ));
        }
    }
    let mut max_output_tokens = None;
    for (name, min, max) in INTEGER_BOUNDS {
        let value = get(name);
        if value.is_null() {
            continue;
        }
        if !value.is_int() {
            return Err(RequestError::invalid_type(name, "an integer"));
        }
        let value = in_range(name, value, min, max)?;
        if name == "max_output_tokens" {
            max_output_tokens = Some(value);
        }
    }
    let Value::Object(metadata) = get("metadata") else {
        return Err(RequestError::invalid_type("metadata", "an object"));
    };
    if metadata.len() > MAX_METADATA_PAIRS {
        return Err(RequestError::invalid_value(
            "metadata",
            format!("Invalid 'metadata': at most {MAX_METADATA_PAIRS} key-value pairs."),
        ));
    }
    if !metadata.iter().all(|(_, v)| v.as_str().is_some()) {
        return Err(RequestError::invalid_type(
            "metadata",
            "an object of string values",
        ));
    }
    for (key, value) in metadata.iter() {
        let value = value.as_str().unwrap_or_default();
        for (what, text, max) in [
            ("key", key, MAX_METADATA_KEY_CHARS),
            ("value", value, MAX_METADATA_VALUE_CHARS),
        ] {
            let length = text.chars().count();
            if length > max {
                return Err(RequestError::invalid_value(
                    "metadata",
                    format!(
                        "Invalid 'metadata': string too long. Expected each {what} to have \
                         at most {max} characters, but got a {what} with length {length} \
                         instead."
                    ),
                ));
            }
        }
    }
    for name in ["text", "reasoning"] {
        if get(name).as_object().is_none() {
            return Err(RequestError::invalid_type(name, "an object"));
        }
    }
    // Their echoed members have the SDK's types (the values are the model's to judge:
    // new efforts and verbosities appear).
    for (object, member) in [
        ("text", "verbosity"),
        ("reasoning", "effort"),
        ("reasoning", "summary"),
    ] {
        let value = get(object).as_object().and_then(|o| o.get(member));
        if !matches!(value, None | Some(Value::Null | Value::Str(_))) {
            return Err(RequestError::invalid_type(
                format!("{object}.{member}"),
                "a string or null",
            ));
        }
    }
    if let Some(format) = get("text")
        .as_object()
        .and_then(|t| present(t.get("format")))
    {
        let (Some(format), Some(Value::Str(kind))) = (
            format.as_object(),
            format.as_object().and_then(|f| f.get("type")),
        ) else {
            return Err(RequestError::invalid_type(
                "text.format",
                "an object with a 'type'",
            ));
        };
        if kind == "json_schema" {
            // Both required (OpenAI refuses the format without them; a chat upstream
            // would be sent a response_format it refuses).
            match present(format.get("name")) {
                None => return Err(RequestError::missing("text.format.name")),
                Some(Value::Str(_)) => {}
                Some(_) => return Err(RequestError::invalid_type("text.format.name", "a string")),
            }
            match present(format.get("schema")) {
                None => return Err(RequestError::missing("text.format.schema")),
                Some(Value::Object(_)) => {}
                Some(_) => {
                    return Err(RequestError::invalid_type(
                        "text.format.schema",
                        "an object",
                    ))
                }
            }
        }
    }
    if !matches!(get("truncation"), Value::Str(s) if matches!(s.as_ref(), "auto" | "disabled")) {
        return Err(RequestError::invalid_value(
            "truncation",
            "Invalid value for 'truncation': expected 'auto' or 'disabled'.",
        ));
    }
    // Echoed strings: anything else would make a Response object the SDK's types
    // refuse.
    for name in [
        "service_tier",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    ] {
        if !matches!(get(name), Value::Null | Value::Str(_)) {
            return Err(RequestError::invalid_type(name, "a string or null"));
        }
    }
    if let Value::Str(id) = get("safety_identifier") {
        let length = id.chars().count();
        if length > MAX_SAFETY_IDENTIFIER_CHARS {
            return Err(RequestError::invalid_value(
                "safety_identifier",
                format!(
                    "Invalid 'safety_identifier': string too long. Expected a string with \
                     maximum length {MAX_SAFETY_IDENTIFIER_CHARS}, but got a string with \
                     length {length} instead."
                ),
            ));
        }
    }
    let retention = get("prompt_cache_retention");
    if !(retention.is_null() || matches!(retention.as_str(), Some("in_memory" | "24h"))) {
        return Err(RequestError::invalid_value(
            "prompt_cache_retention",
            "Invalid value for 'prompt_cache_retention': expected 'in_memory', '24h' or null.",
        ));
    }

    let model_value = Value::Str(std::borrow::Cow::Borrowed(model));
    let mut entries: Vec<(&str, &Value<'_>)> = ECHOED.iter().copied().zip(values).collect();
    entries.push(("model", &model_value));
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut json = Vec::with_capacity(512);
    let mut tools_span = None;
    json.push(b'{');
    for (i, (name, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        value::write_str(name, &mut json);
        json.push(b':');
        let start = json.len();
        write_canonical(value, &mut json);
        if name == "tools" && !tools.is_empty() {
            tools_span = Some(start..json.len());
        }
    }
    json.push(b'}');
    Ok(Settings {
        json,
        instructions,
        function_names,
        tools_span,
        max_output_tokens,
    })
}

/// What `normalize_input` makes of each input element, before it is converted.
enum Normalized {
    /// A plain string input: one user message.
    Text,
    /// An array element, with `"type": "message"` to add (an "easy" message).
    Element { add_type: bool },
}

/// `normalize_input(value, param="input")`, by reference: validates and records how
/// each item is normalised; `take_input` then moves the values out.
fn normalize_input(value: Option<&Value<'_>>) -> Result<Vec<Normalized>, RequestError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Str(_)) => return Ok(vec![Normalized::Text]),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(RequestError::invalid_type(
                "input",
                "a string or an array of input items",
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let Value::Object(item) = item else {
            return Err(RequestError::invalid_type(
                format!("input[{index}]"),
                "an object",
            ));
        };
        let (item_type, add_type) = match item.get("type") {
            None => {
                if !item.contains_key("role") {
                    return Err(RequestError::missing(format!("input[{index}].type")));
                }
                // `{"type": "message", **item}` (an easy message).
                ("message", true)
            }
            Some(Value::Str(t)) => (t.as_ref(), false),
            // An explicit null too: refused as any other non-string.
            Some(_) => {
                return Err(RequestError::invalid_type(
                    format!("input[{index}].type"),
                    "a string",
                ))
            }
        };
        check_item(item, item_type, index)?;
        if item_type == COMPACTION_TRIGGER && index + 1 < items.len() {
            let param = format!("input[{index}].type");
            let message = format!(
                "Invalid value for '{param}': a compaction_trigger must be the final input \
                 item (re-sending a history, leave out the triggers of earlier turns)."
            );
            return Err(RequestError::invalid_value(param, message));
        }
        out.push(Normalized::Element { add_type });
    }
    Ok(out)
}

/// `_check_item`.
fn check_item(item: &Object<'_>, item_type: &str, index: usize) -> Result<(), RequestError> {
    let at = |field: &str| format!("input[{index}].{field}");
    match item_type {
        "message" => {
            let role_ok = matches!(item.get("role"), Some(Value::Str(r)) if MESSAGE_ROLES.contains(&r.as_ref()));
            if !role_ok {
                let param = at("role");
                let message = format!(
                    "Invalid value for '{param}': expected one of 'user', 'assistant', \
                     'system', 'developer'."
                );
                return Err(RequestError::invalid_value(param, message));
            }
            check_content(item.get("content"), &at("content"))
        }
        "function_call" => {
            for name in ["call_id", "name", "arguments"] {
                require_str(item, name, index)?;
            }
            Ok(())
        }
        "function_call_output" => {
            require_str(item, "call_id", index)?;
            match item.get("output") {
                Some(Value::Str(_) | Value::Array(_)) => Ok(()),
                _ => Err(RequestError::invalid_type(
                    at("output"),
                    "a string or an array",
                )),
            }
        }
        "item_reference" => require_str(item, "id", index),
        t if ITEM_TYPES.contains(&t) => Ok(()),
        _ => {
            let param = at("type");
            let message = format!("Invalid value for '{param}': unknown item type.");
            Err(RequestError::invalid_value(param, message))
        }
    }
}

/// `_check_content`.
fn check_content(content: Option<&Value<'_>>, at: &str) -> Result<(), RequestError> {
    let parts = match content {
        Some(Value::Str(_)) => return Ok(()),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(RequestError::invalid_type(
                at,
                "a string or an array of content parts",
            ))
        }
    };
    for (index, part) in parts.iter().enumerate() {
        let Value::Object(part) = part else {
            return Err(RequestError::invalid_type(
                format!("{at}[{index}]"),
                "an object",
            ));
        };
        let part_type = match part.get("type") {
            Some(Value::Str(t)) if CONTENT_PART_TYPES.contains(&t.as_ref()) => t,
            _ => {
                let param = format!("{at}[{index}].type");
                let message = format!("Invalid value for '{param}': unknown content part type.");
                return Err(RequestError::invalid_value(param, message));
            }
        };
        if TEXT_PARTS.contains(&part_type.as_ref())
            && part.get("text").and_then(Value::as_str).is_none()
        {
            return Err(RequestError::invalid_type(
                format!("{at}[{index}].text"),
                "a string",
            ));
        }
    }
    Ok(())
}

/// `_require_str`.
fn require_str(item: &Object<'_>, name: &str, index: usize) -> Result<(), RequestError> {
    match item.get(name) {
        None | Some(Value::Null) => Err(RequestError::missing(format!("input[{index}].{name}"))),
        Some(Value::Str(_)) => Ok(()),
        Some(_) => Err(RequestError::invalid_type(
            format!("input[{index}].{name}"),
            "a string",
        )),
    }
}

/// Move the validated input items out of the body, normalised.
fn take_input<'a>(body: Object<'a>, plan: Vec<Normalized>) -> Vec<Value<'a>> {
    if plan.is_empty() {
        return Vec::new();
    }
    let Some((_, input)) = body.into_entries().into_iter().find(|(k, _)| k == "input") else {
        return Vec::new();
    };
    match input {
        Value::Str(text) => vec![user_message(Value::Str(text))],
        Value::Array(values) => values
            .into_iter()
            .zip(plan)
            .map(|(value, how)| match (value, how) {
                (Value::Object(item), Normalized::Element { add_type: true }) => {
                    let mut entries = item.into_entries();
                    entries.insert(
                        0,
                        (
                            std::borrow::Cow::Borrowed("type"),
                            Value::Str(std::borrow::Cow::Borrowed("message")),
                        ),
                    );
                    Value::Object(Object::from_entries(entries))
                }
                (value, _) => value,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `{"type": "message", "role": "user", "content": content}`.
fn user_message(content: Value<'_>) -> Value<'_> {
    use std::borrow::Cow::Borrowed as B;
    Value::Object(Object::from_entries(vec![
        (B("type"), Value::Str(B("message"))),
        (B("role"), Value::Str(B("user"))),
        (B("content"), content),
    ]))
}

/// `Items.from_objects(items, max_item_bytes=...)` on what `json.loads` would have
/// returned: first every item as Python objects (integers must fit 64 bits, nesting
/// at most `MAX_DEPTH`), then each item's canonical size.
pub fn items(values: Vec<Value<'_>>, max_item_bytes: usize) -> Result<Items, ItemError> {
    for (index, value) in values.iter().enumerate() {
        if let Some(detail) = python_object_error(value, 1) {
            return Err(ItemError::ItemNotJson {
                index: Some(index),
                detail,
            });
        }
    }
    let items = values
        .iter()
        .enumerate()
        .map(|(index, value)| Item::from_value(index, value, max_item_bytes).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Items::from_vec(items))
}

/// What `py/json.rs::to_value` refuses in a decoded value, walking in dict order.
fn python_object_error(value: &Value<'_>, depth: usize) -> Option<String> {
    if depth > MAX_DEPTH {
        return Some(too_deep());
    }
    match value {
        Value::BigInt(_) => Some("an integer does not fit in 64 bits".to_owned()),
        Value::Array(values) => values
            .iter()
            .find_map(|v| python_object_error(v, depth + 1)),
        Value::Object(object) => object
            .iter()
            .find_map(|(_, v)| python_object_error(v, depth + 1)),
        _ => None,
    }
}

// -- steering ----------------------------------------------------------------------

fn steer(body: &Object<'_>, max_item_bytes: usize) -> ClientMessage {
    let target = body.get("previous_response_id").and_then(Value::as_str);
    let input = steer_input(body.get("input"), max_item_bytes);
    let fields = steer_target(body);
    match (fields, input) {
        (Ok(previous_response_id), Ok((input, input_json))) => ClientMessage::Steer(SteerRequest {
            previous_response_id,
            input,
            input_json,
        }),
        (Err(error), input) => ClientMessage::Rejected(Rejected {
            error,
            stage: Stage::Steer,
            stream_id: None,
            previous_response_id: target.map(str::to_owned),
            steer_input_json: input.ok().map(|(_, json)| json),
        }),
        (Ok(_), Err(error)) => reject(error, Stage::Steer, None, target.map(str::to_owned)),
    }
}

/// A steer's target, and no fields but `type`, `previous_response_id` and `input`
/// (spec §2.2); checked before its input.
fn steer_target(body: &Object<'_>) -> Result<String, RequestError> {
    let target = match body.get("previous_response_id") {
        Some(Value::Str(s)) if !s.is_empty() => s.to_string(),
        _ => {
            return Err(RequestError::steer(
                "'previous_response_id' must name the response to steer.",
            ))
        }
    };
    let extra = body
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !matches!(*k, "type" | "previous_response_id" | "input"))
        .min();
    if let Some(extra) = extra {
        let shown: String = extra.chars().take(64).collect();
        return Err(RequestError::steer(format!(
            "Unknown field '{shown}' in response.steer."
        )));
    }
    Ok(target)
}

/// A steer's input: only user messages; as items and as its canonical JSON.
fn steer_input(
    raw: Option<&Value<'_>>,
    max_item_bytes: usize,
) -> Result<(Items, Vec<u8>), RequestError> {
    let mut input_json = Vec::new();
    let messages = match raw {
        Some(Value::Str(text)) => {
            if text.is_empty() {
                return Err(RequestError::steer("Steering input must not be empty."));
            }
            vec![user_message(Value::Str(text.clone()))]
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut messages = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let Value::Object(item) = item else {
                    return Err(RequestError::steer(format!(
                        "input[{index}] must be an object."
                    )));
                };
                let unknown = item
                    .iter()
                    .any(|(k, _)| !matches!(k, "type" | "role" | "content"));
                let is_message = match item.get("type") {
                    None => true,
                    Some(Value::Str(t)) => t == "message",
                    Some(_) => false,
                };
                let is_user = matches!(item.get("role"), Some(Value::Str(r)) if r == "user");
                if unknown || !is_message || !is_user {
                    return Err(RequestError::steer(format!(
                        "input[{index}] must be a user message: only 'type', 'role' and \
                         'content'."
                    )));
                }
                let content = item.get("content");
                check_content(content, &format!("input[{index}].content"))
                    .map_err(|e| RequestError::steer(e.to_string()))?;
                messages.push(user_message(content.cloned().unwrap_or(Value::Null)));
            }
            messages
        }
        _ => {
            return Err(RequestError::steer(
                "Steering input must be a string or a non-empty array of messages.",
            ))
        }
    };
    if let Some(raw) = raw {
        write_canonical(raw, &mut input_json);
    }
    let input = items(messages, max_item_bytes)
        .map_err(|e| RequestError::steer(format!("Invalid 'input': {e}")))?;
    Ok((input, input_json))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS: Options = Options {
        websocket: true,
        format: Format::Json,
        max_item_bytes: 1 << 20,
    };
    const HTTP: Options = Options {
        websocket: false,
        ..WS
    };

    fn parse(text: &str) -> ClientMessage {
        parse_message(text.as_bytes(), WS)
    }

    fn rejected(text: &str, options: Options) -> Rejected {
        match parse_message(text.as_bytes(), options) {
            ClientMessage::Rejected(r) => r,
            other => panic!("{text}: accepted: {other:?}"),
        }
    }

    fn error(text: &str) -> (Stage, &'static str, Option<String>) {
        let r = rejected(text, WS);
        (r.stage, r.error.code(), r.error.param().map(str::to_owned))
    }

    fn created(text: &str) -> CreateRequest {
        match parse(text) {
            ClientMessage::Create(c) => *c,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn a_conversation_is_named_by_its_id_or_an_object_with_it() {
        let body = |c: &str| {
            format!(r#"{{"type":"response.create","model":"m","input":"x","conversation":{c}}}"#)
        };
        assert_eq!(
            created(&body(r#""conv_1""#)).conversation.as_deref(),
            Some("conv_1")
        );
        let object = created(&body(r#"{"id":"conv_2","extra":1}"#));
        assert_eq!(object.conversation.as_deref(), Some("conv_2"));
        // Not a setting: the Response gets it from the server, not from the echo.
        assert!(!String::from_utf8_lossy(&object.settings).contains("conv_2"));
        assert_eq!(created(&body("null")).conversation, None);
    }

    #[test]
    fn a_compaction_trigger_is_the_last_input_item_only() {
        let body =
            |input: &str| format!(r#"{{"type":"response.create","model":"m","input":{input}}}"#);
        let trigger = r#"{"type":"compaction_trigger"}"#;
        let user = r#"{"role":"user","content":"x"}"#;
        assert_eq!(
            created(&body(&format!("[{user},{trigger}]"))).input.len(),
            2
        );
        assert_eq!(created(&body(&format!("[{trigger}]"))).input.len(), 1);
        assert_eq!(
            error(&body(&format!("[{user},{trigger},{user}]"))),
            (Stage::Create, "invalid_value", Some("input[1].type".into()))
        );
        // A warm-up runs no compaction: the trigger would be left in the chain.
        let warm_up = format!(
            r#"{{"type":"response.create","model":"m","generate":false,"input":[{trigger}]}}"#
        );
        assert_eq!(
            error(&warm_up),
            (Stage::Create, "invalid_value", Some("input".into()))
        );
        for kind in ["program", "program_output", "additional_tools"] {
            let item = format!(r#"[{{"type":"{kind}"}},{user}]"#);
            assert_eq!(created(&body(&item)).input.len(), 2, "{kind}");
        }
    }

    #[test]
    fn compact_threshold_comes_from_the_first_compaction_entry() {
        let body = |cm: &str| {
            format!(
                r#"{{"type":"response.create","model":"m","input":"x","context_management":{cm}}}"#
            )
        };
        let with = |cm: &str| created(&body(cm)).compact_threshold;
        assert_eq!(
            created(r#"{"type":"response.create","model":"m","input":"x"}"#).compact_threshold,
            None
        );
        assert_eq!(with("null"), None);
        assert_eq!(
            with(r#"[{"type":"compaction","compact_threshold":5000}]"#),
            Some(5000)
        );
        assert_eq!(
            with(r#"[{"type":"compaction","compact_threshold":1000},{"type":"compaction"}]"#),
            Some(MIN_COMPACT_THRESHOLD)
        );
        let default = Some(DEFAULT_COMPACT_THRESHOLD);
        assert_eq!(with(r#"[{"type":"compaction"}]"#), default);
        assert_eq!(
            with(r#"[{"type":"compaction","compact_threshold":null}]"#),
            default
        );
        assert_eq!(
            with(r#"[{"type":"compaction","compact_threshold":100000000000000000000}]"#),
            Some(u64::MAX)
        );
    }

    #[test]
    fn given_defaults_are_the_settings_given_at_the_api_default() {
        let given = |fields: &str| {
            created(&format!(
                r#"{{"type":"response.create","model":"m","input":"x"{fields}}}"#
            ))
            .given_defaults
        };
        assert!(given("").is_empty());
        assert!(given(r#","temperature":null,"top_p":null,"service_tier":null"#).is_empty());
        assert_eq!(
            given(r#","service_tier":"default","top_p":1,"temperature":1.0"#),
            ["temperature", "top_p", "service_tier"]
        );
        assert_eq!(
            given(r#","temperature":0.5,"top_p":1.0,"service_tier":"auto""#),
            ["top_p"]
        );
        // The settings echo the same either way: only this field tells them apart.
        let plain = created(r#"{"type":"response.create","model":"m","input":"x"}"#);
        let at_default = created(
            r#"{"type":"response.create","model":"m","input":"x","temperature":1.0,"service_tier":"default"}"#,
        );
        assert_eq!(plain.settings, at_default.settings);
    }

    #[test]
    fn a_prompt_template_is_kept_for_the_upstream_and_may_name_the_model() {
        let with = |fields: &str| {
            created(&format!(
                r#"{{"type":"response.create","input":"x",{fields}}}"#
            ))
        };
        let plain = with(r#""model":"m""#);
        assert!(plain.responses_only.is_empty() && !plain.model_from_prompt);
        let template = with(r#""prompt":{"id":"pmpt_1","version":null,"variables":{"a":"b"}}"#);
        assert!(template.responses_only == ["prompt"] && template.model_from_prompt);
        assert_eq!(template.model, "default");
        assert_eq!(
            template.upstream_options.as_deref(),
            Some(&br#"{"prompt":{"id":"pmpt_1","variables":{"a":"b"}}}"#[..])
        );
        let named = with(r#""model":"m","prompt":{"id":"p"},"moderation":{"model":"o"}"#);
        assert!(named.responses_only == ["prompt", "moderation"] && !named.model_from_prompt);
        let text = r#"{"type":"response.create","model":"m","input":"x","prompt":{"version":"1"}}"#;
        assert_eq!(
            error(text),
            (
                Stage::Create,
                "missing_required_parameter",
                Some("prompt.id".into())
            )
        );
    }

    #[test]
    fn upstream_options_keep_what_only_an_upstream_acts_on() {
        let with = |fields: &str| {
            created(&format!(
                r#"{{"type":"response.create","model":"m","input":"x",{fields}}}"#
            ))
        };
        let options = |fields: &str| {
            with(fields)
                .upstream_options
                .map(|json| String::from_utf8(json).unwrap_or_default())
        };
        assert_eq!(options(r#""store":true"#), None);
        assert_eq!(options(r#""prompt_cache_options":null,"image":{}"#), None);
        let prewarm_only = with(r#""prompt_cache_options":{"prewarm":true,"ttl":null}"#);
        assert!(!prewarm_only.generate);
        assert_eq!(prewarm_only.upstream_options, None);
        assert_eq!(
            options(
                r#""image":{"context_compression":"auto"},"prompt_cache_options":{"ttl":"12h","prewarm":false,"comparison_response_id":"resp_1","z":[1]}"#
            )
            .as_deref(),
            Some(r#"{"image":{"context_compression":"auto"},"prompt_cache_options":{"ttl":"12h","z":[1]}}"#)
        );
        let param = |p: &str| Some(p.to_owned());
        for (fields, at) in [
            (
                r#""prompt_cache_options":"12h""#,
                param("prompt_cache_options"),
            ),
            (
                r#""prompt_cache_options":{"prewarm":1}"#,
                param("prompt_cache_options.prewarm"),
            ),
            (
                r#""prompt_cache_options":{"ttl":30}"#,
                param("prompt_cache_options.ttl"),
            ),
            (
                r#""prompt_cache_options":{"mode":true}"#,
                param("prompt_cache_options.mode"),
            ),
            (r#""image":[]"#, param("image")),
            (
                r#""image":{"context_compression":0}"#,
                param("image.context_compression"),
            ),
        ] {
            let text = format!(r#"{{"type":"response.create","model":"m","input":"x",{fields}}}"#);
            assert_eq!(
                error(&text),
                (Stage::Create, "invalid_type", at),
                "{fields}"
            );
        }
    }

    #[test]
    fn include_is_an_array_of_strings_kept_as_sent() {
        let body = |include: &str| {
            format!(r#"{{"type":"response.create","model":"m","input":"x","include":{include}}}"#)
        };
        let absent = created(r#"{"type":"response.create","model":"m","input":"x"}"#);
        assert!(absent.include.is_empty());
        assert!(created(&body("null")).include.is_empty());
        assert_eq!(
            created(&body(r#"["reasoning.encrypted_content","something.new"]"#)).include,
            ["reasoning.encrypted_content", "something.new"]
        );
        let param = |p: &str| Some(p.to_owned());
        for (include, at) in [
            (r#""reasoning.encrypted_content""#, param("include")),
            (r#"{"a":1}"#, param("include")),
            (r#"["a",5]"#, param("include[1]")),
            ("[null]", param("include[0]")),
        ] {
            assert_eq!(
                error(&body(include)),
                (Stage::Create, "invalid_type", at),
                "{include}"
            );
        }
    }

    #[test]
    fn context_management_is_validated_as_the_api_schema_has_it() {
        let param = |p: &str| Some(p.to_owned());
        let cases = [
            (
                r#"{"type":"compaction"}"#,
                "invalid_type",
                param("context_management"),
            ),
            ("5", "invalid_type", param("context_management")),
            ("[]", "invalid_value", param("context_management")),
            ("[5]", "invalid_type", param("context_management[0]")),
            (
                r#"[{"compact_threshold":5000}]"#,
                "missing_required_parameter",
                param("context_management[0].type"),
            ),
            (
                r#"[{"type":7}]"#,
                "invalid_type",
                param("context_management[0].type"),
            ),
            (
                r#"[{"type":"compaction"},{"type":"other"}]"#,
                "invalid_value",
                param("context_management[1].type"),
            ),
            (
                r#"[{"type":"compaction","compact_threshold":"9000"}]"#,
                "invalid_type",
                param("context_management[0].compact_threshold"),
            ),
            (
                r#"[{"type":"compaction","compact_threshold":1500.0}]"#,
                "invalid_type",
                param("context_management[0].compact_threshold"),
            ),
            (
                r#"[{"type":"compaction","compact_threshold":999}]"#,
                "invalid_value",
                param("context_management[0].compact_threshold"),
            ),
            (
                r#"[{"type":"compaction","compact_threshold":-1}]"#,
                "invalid_value",
                param("context_management[0].compact_threshold"),
            ),
            (
                r#"[{"type":"compaction","compact_threshold":-100000000000000000000}]"#,
                "invalid_value",
                param("context_management[0].compact_threshold"),
            ),
        ];
        for (cm, code, expected_param) in cases {
            let text = format!(
                r#"{{"type":"response.create","model":"m","input":"x","context_management":{cm}}}"#
            );
            let r = rejected(&text, WS);
            assert_eq!(
                (r.stage, r.error.code(), r.error.param().map(str::to_owned)),
                (Stage::Create, code, expected_param),
                "{cm}"
            );
        }
        let text = r#"{"type":"response.create","model":"m","input":"x",
            "context_management":[{"type":"compaction","compact_threshold":999}]}"#;
        assert_eq!(
            rejected(text, WS).error.to_string(),
            "Invalid 'context_management[0].compact_threshold': integer below minimum value. \
             Expected a value >= 1000, but got 999 instead."
        );
    }

    #[test]
    fn integer_fields_have_the_api_s_bounds() {
        let message = |field: &str| {
            let text = format!(r#"{{"type":"response.create","model":"m","input":"x",{field}}}"#);
            rejected(&text, WS).error.to_string()
        };
        assert_eq!(
            message(r#""max_output_tokens":15"#),
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, \
             but got 15 instead."
        );
        assert_eq!(
            message(r#""top_logprobs":21"#),
            "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but \
             got 21 instead."
        );
        for ok in [
            r#""max_output_tokens":16"#,
            r#""max_output_tokens":100000000000000000000"#,
            r#""top_logprobs":20"#,
            r#""top_logprobs":0"#,
            r#""max_tool_calls":0"#,
        ] {
            created(&format!(
                r#"{{"type":"response.create","model":"m","input":"x",{ok}}}"#
            ));
        }
    }

    #[test]
    fn step_one_errors() {
        let cases = [
            ("{not json", "invalid_json", None),
            ("[1, 2]", "invalid_type", Some("event")),
            ("{}", "missing_required_parameter", Some("type")),
            (
                r#"{"type":null}"#,
                "missing_required_parameter",
                Some("type"),
            ),
            (
                r#"{"type":"response.cancel"}"#,
                "invalid_value",
                Some("type"),
            ),
            (r#"{"type":7}"#, "invalid_value", Some("type")),
            (
                r#"{"type":"response.create","stream_id":""}"#,
                "invalid_stream_id",
                Some("stream_id"),
            ),
            (
                r#"{"type":"response.create","stream_id":"a b"}"#,
                "invalid_stream_id",
                Some("stream_id"),
            ),
            (
                r#"{"type":"response.create","stream_id":5}"#,
                "invalid_stream_id",
                Some("stream_id"),
            ),
        ];
        for (text, code, param) in cases {
            assert_eq!(
                error(text),
                (Stage::Message, code, param.map(str::to_owned)),
                "{text}"
            );
        }
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(65));
        assert!(rejected(&long, WS).error.to_string().contains("'...'"));
        let r = rejected("[]", HTTP);
        assert_eq!(r.error.param(), Some("body"));
    }

    #[test]
    fn body_errors_carry_the_lane_and_parent() {
        let r = rejected(
            r#"{"type":"response.create","stream_id":"a","previous_response_id":"resp_1","model":3}"#,
            WS,
        );
        assert_eq!(r.stage, Stage::Create);
        assert_eq!(r.stream_id.as_deref(), Some("a"));
        assert_eq!(r.previous_response_id.as_deref(), Some("resp_1"));
        assert_eq!(
            (r.error.code(), r.error.param()),
            ("invalid_type", Some("model"))
        );
    }

    #[test]
    fn body_errors() {
        let base = r#""type":"response.create","model":"m","input":"hi""#;
        let cases: &[(&str, &str, &str)] = &[
            (r#""model":null"#, "missing_required_parameter", "model"),
            (r#""input":5"#, "invalid_type", "input"),
            (r#""input":[5]"#, "invalid_type", "input[0]"),
            (
                r#""input":[{"content":"x"}]"#,
                "missing_required_parameter",
                "input[0].type",
            ),
            (
                r#""input":[{"role":"robot","content":"x"}]"#,
                "invalid_value",
                "input[0].role",
            ),
            (
                r#""input":[{"role":["user"],"content":"x"}]"#,
                "invalid_value",
                "input[0].role",
            ),
            (
                r#""input":[{"role":"user","content":5}]"#,
                "invalid_type",
                "input[0].content",
            ),
            (
                r#""input":[{"role":"user","content":[{"type":"bogus"}]}]"#,
                "invalid_value",
                "input[0].content[0].type",
            ),
            (
                r#""input":[{"role":"user","content":[{"type":"input_text"}]}]"#,
                "invalid_type",
                "input[0].content[0].text",
            ),
            (
                r#""input":[{"type":"function_call","name":"f","arguments":"{}"}]"#,
                "missing_required_parameter",
                "input[0].call_id",
            ),
            (
                r#""input":[{"type":"function_call_output","call_id":"c","output":1}]"#,
                "invalid_type",
                "input[0].output",
            ),
            (
                r#""input":[{"type":"nonsense"}]"#,
                "invalid_value",
                "input[0].type",
            ),
            (
                r#""input":[{"type":"item_reference"}]"#,
                "missing_required_parameter",
                "input[0].id",
            ),
            (
                r#""input":[{"type":"item_reference","id":7}]"#,
                "invalid_type",
                "input[0].id",
            ),
            (r#""input":[]"#, "invalid_value", "input"),
            (r#""store":"yes""#, "invalid_type", "store"),
            (r#""generate":1"#, "invalid_type", "generate"),
            (r#""background":"true""#, "invalid_type", "background"),
            (
                r#""text":{"format":{"type":"json_schema","schema":{}}}"#,
                "missing_required_parameter",
                "text.format.name",
            ),
            (
                r#""text":{"format":{"type":"json_schema","name":"n","schema":[]}}"#,
                "invalid_type",
                "text.format.schema",
            ),
            (
                r#""background":true"#,
                "unsupported_parameter",
                "background",
            ),
            (
                r#""previous_response_id":7"#,
                "invalid_type",
                "previous_response_id",
            ),
            (
                r#""previous_response_id":"r","conversation":"c""#,
                "invalid_value",
                "conversation",
            ),
            (r#""conversation":5"#, "invalid_type", "conversation"),
            (r#""conversation":"""#, "invalid_type", "conversation"),
            (r#""conversation":{}"#, "invalid_type", "conversation.id"),
            (
                r#""conversation":{"id":3}"#,
                "invalid_type",
                "conversation.id",
            ),
            (r#""tools":{}"#, "invalid_type", "tools"),
            (
                r#""tools":[{"type":"function"}]"#,
                "missing_required_parameter",
                "tools[0].name",
            ),
            (r#""tools":[{"name":"f"}]"#, "invalid_type", "tools[0]"),
            (
                r#""tool_choice":"sometimes""#,
                "invalid_value",
                "tool_choice",
            ),
            (r#""tool_choice":["auto"]"#, "invalid_value", "tool_choice"),
            (
                r#""parallel_tool_calls":1"#,
                "invalid_type",
                "parallel_tool_calls",
            ),
            (r#""temperature":"hot""#, "invalid_type", "temperature"),
            (r#""temperature":2.5"#, "invalid_value", "temperature"),
            (r#""temperature":-1"#, "invalid_value", "temperature"),
            (r#""top_p":3"#, "invalid_value", "top_p"),
            (r#""top_p":18446744073709551615"#, "invalid_value", "top_p"),
            (
                r#""top_p":1000000000000000000000"#,
                "invalid_value",
                "top_p",
            ),
            (r#""top_p":true"#, "invalid_type", "top_p"),
            (
                r#""max_output_tokens":-1"#,
                "invalid_value",
                "max_output_tokens",
            ),
            (r#""max_tool_calls":1.0"#, "invalid_type", "max_tool_calls"),
            (
                r#""max_output_tokens":15"#,
                "invalid_value",
                "max_output_tokens",
            ),
            (r#""top_logprobs":21"#, "invalid_value", "top_logprobs"),
            (
                r#""top_logprobs":100000000000000000000"#,
                "invalid_value",
                "top_logprobs",
            ),
            (r#""max_tool_calls":-1"#, "invalid_value", "max_tool_calls"),
            (
                r#""top_logprobs":-100000000000000000000"#,
                "invalid_value",
                "top_logprobs",
            ),
            (r#""metadata":{"a":1}"#, "invalid_type", "metadata"),
            (r#""metadata":[]"#, "invalid_type", "metadata"),
            (r#""text":"plain""#, "invalid_type", "text"),
            (r#""reasoning":[]"#, "invalid_type", "reasoning"),
            (r#""truncation":"sometimes""#, "invalid_value", "truncation"),
            (r#""instructions":5"#, "invalid_type", "instructions"),
            (
                r#""input":[{"role":"user","content":"x","n":1e999}]"#,
                "invalid_json",
                "",
            ),
            (
                r#""input":[{"role":"user","content":"x","n":100000000000000000000}]"#,
                "invalid_value",
                "input",
            ),
        ];
        for (fields, code, param) in cases {
            let text = format!("{{{base},{fields}}}");
            let r = rejected(&text, WS);
            assert_eq!(r.error.code(), *code, "{text}: {}", r.error);
            assert_eq!(r.error.param().unwrap_or(""), *param, "{text}");
        }
        let metadata: Vec<String> = (0..17).map(|i| format!(r#""{i}":"v""#)).collect();
        let text = format!(r#"{{{base},"metadata":{{{}}}}}"#, metadata.join(","));
        assert_eq!(rejected(&text, WS).error.param(), Some("metadata"));
    }

    #[test]
    fn http_rejects_websocket_only_fields() {
        for (name, value) in [
            ("stream_id", "\"a\""),
            ("generate", "false"),
            ("type", "\"response.create\""),
        ] {
            let text = format!(r#"{{"model":"m","input":"hi","{name}":{value}}}"#);
            let r = rejected(&text, HTTP);
            assert_eq!(
                (r.error.code(), r.error.param()),
                ("unknown_parameter", Some(name))
            );
        }
    }

    #[test]
    fn a_create_is_normalised() {
        let c = created(
            r#"{"type":"response.create","model":"m","stream":true,"input":"hi","extra_thing":1,
                "stream_id":"lane-1","tools":[{"type":"function","name":"f"},{"type":"web_search"}],
                "temperature":0.5,"max_output_tokens":100000000000000000000}"#,
        );
        assert_eq!(c.model, "m");
        assert_eq!(c.stream_id.as_deref(), Some("lane-1"));
        assert!(c.stream && c.store && c.generate && c.has_tools);
        assert_eq!(c.function_names, ["f"]);
        assert_eq!(c.ignored_fields, ["extra_thing"]);
        assert_eq!(
            c.input.to_json(),
            br#"[{"content":"hi","role":"user","type":"message"}]"#
        );
        let tools = c.tools_span.clone().unwrap();
        assert_eq!(
            &c.settings[tools],
            br#"[{"name":"f","type":"function"},{"type":"web_search"}]"#
        );
        let settings = String::from_utf8(c.settings).unwrap();
        assert_eq!(
            settings,
            r#"{"instructions":null,"max_output_tokens":100000000000000000000,"max_tool_calls":null,"metadata":{},"model":"m","parallel_tool_calls":true,"prompt_cache_key":null,"prompt_cache_retention":null,"reasoning":{"effort":null,"summary":null},"safety_identifier":null,"service_tier":"default","temperature":0.5,"text":{"format":{"type":"text"},"verbosity":"medium"},"tool_choice":"auto","tools":[{"name":"f","type":"function"},{"type":"web_search"}],"top_logprobs":0,"top_p":1.0,"truncation":"disabled","user":null}"#
        );
        let easy = created(
            r#"{"type":"response.create","model":"m","input":[{"role":"user","content":"x"}]}"#,
        );
        assert!(easy.tools_span.is_none() && !easy.has_tools);
        assert!(
            created(r#"{"type":"response.create","model":"m","input":"x","tools":[]}"#)
                .tools_span
                .is_none()
        );
        assert_eq!(
            easy.input.to_json(),
            br#"[{"content":"x","role":"user","type":"message"}]"#
        );
        // An explicit null type is refused (it was kept as null, an item nothing reads).
        assert_eq!(
            error(
                r#"{"type":"response.create","model":"m","input":[{"type":null,"role":"user","content":"x"}]}"#
            ),
            (
                Stage::Create,
                "invalid_type",
                Some("input[0].type".to_owned())
            )
        );
        let prompt = created(r#"{"type":"response.create","prompt":{"id":"p"},"input":"x"}"#);
        assert_eq!(prompt.model, "default");
    }

    #[test]
    fn warmup_and_prewarm() {
        let c = created(r#"{"type":"response.create","model":"m","generate":false}"#);
        assert!(!c.generate && c.input.is_empty());
        let c = created(
            r#"{"type":"response.create","model":"m","prompt_cache_options":{"prewarm":true}}"#,
        );
        assert!(!c.generate);
        let c = created(r#"{"type":"response.create","model":"m","previous_response_id":"r"}"#);
        assert_eq!(c.previous_response_id.as_deref(), Some("r"));
    }

    #[test]
    fn item_conversion_errors_come_last() {
        let options = Options {
            max_item_bytes: 60,
            ..WS
        };
        let big = "x".repeat(100);
        let text = format!(
            r#"{{"type":"response.create","model":"m","input":[{{"role":"user","content":"{big}"}}]}}"#
        );
        let r = rejected(&text, options);
        assert_eq!(r.error.code(), "invalid_value");
        assert_eq!(
            r.error.to_string(),
            "Invalid 'input': Item 0 is 145 bytes as JSON, larger than the limit of 60 bytes."
        );
        let deep = format!("{}1{}", "[".repeat(130), "]".repeat(130));
        let text = format!(
            r#"{{"type":"response.create","model":"m","input":[{{"type":"reasoning","x":{deep}}}]}}"#
        );
        assert_eq!(
            rejected(&text, WS).error.to_string(),
            "Invalid 'input': Item 0 is not valid JSON: nested deeper than 100 levels."
        );
    }

    #[test]
    fn item_depth_limit_in_json_and_msgpack() {
        use crate::item::tests::nested_item;
        let msgpack = Options {
            format: Format::Msgpack,
            ..WS
        };
        for options in [WS, HTTP, msgpack] {
            for levels in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
                let item = nested_item(levels);
                let head = if options.websocket {
                    r#""type":"response.create","#
                } else {
                    ""
                };
                let text = format!(r#"{{{head}"model":"m","input":[{item}]}}"#);
                let mut data = text.clone().into_bytes();
                if matches!(options.format, Format::Msgpack) {
                    data.clear();
                    msgpack::from_json(text.as_bytes(), &mut data).unwrap();
                }
                match parse_message(&data, options) {
                    ClientMessage::Create(c) if levels <= MAX_DEPTH => {
                        // What is accepted reads back through serde_json, in an array too.
                        let json = c.input.to_json();
                        assert_eq!(Items::parse(&json, 1 << 20).unwrap().to_json(), json);
                    }
                    ClientMessage::Rejected(r) if levels > MAX_DEPTH => {
                        assert_eq!((r.stage, r.error.code()), (Stage::Create, "invalid_value"));
                        assert_eq!(r.error.param(), Some("input"));
                        assert_eq!(
                            r.error.to_string(),
                            "Invalid 'input': Item 0 is not valid JSON: nested deeper than 100 levels."
                        );
                    }
                    other => panic!("{levels} levels, {options:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn steering() {
        let ok = parse(
            r#"{"type":"response.steer","previous_response_id":"r","input":[{"type":"message","role":"user","content":"x"}]}"#,
        );
        let ClientMessage::Steer(s) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(s.previous_response_id, "r");
        assert_eq!(
            s.input.to_json(),
            br#"[{"content":"x","role":"user","type":"message"}]"#
        );
        assert_eq!(
            s.input_json,
            br#"[{"content":"x","role":"user","type":"message"}]"#
        );
        let bad = [
            r#"{"type":"response.steer","input":"x"}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":""}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":[]}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":"x","stream_id":"a"}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":[{"role":"assistant","content":"x"}]}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":[{"type":"function_call_output","call_id":"c","output":"o"}]}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":[{"role":"user","content":"x","id":"msg_1"}]}"#,
            r#"{"type":"response.steer","previous_response_id":"r","input":[{"role":"user","content":5}]}"#,
        ];
        for text in bad {
            let r = rejected(text, WS);
            assert_eq!(
                (r.stage, r.error.code()),
                (Stage::Steer, "invalid_input"),
                "{text}"
            );
        }
        let r = rejected(bad[1], WS);
        assert_eq!(r.previous_response_id.as_deref(), Some("r"));
        assert!(matches!(
            parse(r#"{"type":"response.processed","response_id":"r"}"#),
            ClientMessage::Ignored
        ));
    }

    #[test]
    fn msgpack_gives_the_same_result() {
        let text = r#"{"type":"response.create","model":"m","input":[{"role":"user","content":"x"}],"temperature":0.5}"#;
        let mut packed = Vec::new();
        msgpack::from_json(text.as_bytes(), &mut packed).unwrap();
        let options = Options {
            format: Format::Msgpack,
            ..WS
        };
        let ClientMessage::Create(a) = parse_message(&packed, options) else {
            panic!()
        };
        let b = created(text);
        assert_eq!(a.settings, b.settings);
        assert_eq!(a.input.to_json(), b.input.to_json());
        let ClientMessage::Rejected(r) = parse_message(b"\xc1", options) else {
            panic!("0xc1 is never used in msgpack")
        };
        assert_eq!(r.error.code(), "invalid_msgpack");
    }

    #[test]
    fn no_panic_on_random_messages() {
        let pieces: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"type\"",
            "\"response.create\"",
            "\"response.steer\"",
            "\"input\"",
            "\"model\"",
            "\"role\"",
            "\"user\"",
            "\"content\"",
            "\"tools\"",
            "null",
            "1",
            "-1",
            "1.5",
            "true",
            "\"stream_id\"",
            "\"previous_response_id\"",
            "\"x\"",
            "\"metadata\"",
            "\"text\"",
            "\"function\"",
            "\"name\"",
            "\"message\"",
        ];
        let mut state = 0x1234_5678_9abc_def1u64;
        for _ in 0..20_000 {
            let n = (state % 20) as usize;
            let mut text = String::new();
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(pieces[(state % pieces.len() as u64) as usize]);
            }
            let _ = parse_message(text.as_bytes(), WS);
            let _ = parse_message(text.as_bytes(), HTTP);
            let _ = parse_message(
                text.as_bytes(),
                Options {
                    format: Format::Msgpack,
                    ..WS
                },
            );
        }
    }
}
