//! Glue for `rust/framing`: `parse_client_message` (one call per client message),
//! `CreateRequest`, `SteerRequest`, `Rejection`, `ResponseEncoder` (one call per
//! model event, returning every frame it produced as one `bytes`) and `frame_event`.
//!
//! Bad client input is never an exception here: it comes back as a `Rejection`.
//! Only misuse by the server (an unknown framing name, settings that are not a JSON
//! object) raises `ValueError`.

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

use crate::framing::client_frames::{ClientFrames, Piece};
use crate::framing::encoder::{self, Framing, ResponseEncoder, ResponseHead, Usage};
use crate::framing::request::{
    self, ClientMessage, CreateRequest, Format, Options, Rejected, Stage, SteerRequest,
};
use crate::py::items::PyItems;
use crate::py::{detach_if, DETACH_COPY_BYTES, DETACH_PARSE_BYTES};

static JSON_LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `json.loads`, looked up once. Looked up per call, each call's fresh name string
/// was kept by the interpreter, up to 256 of them (tracemalloc, in
/// tests/test_steady_state.py).
fn json_loads(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    JSON_LOADS
        .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(py.import("json")?.getattr("loads")?.unbind())
        })
        .map(|loads| loads.bind(py))
}

fn framing_arg(name: &str) -> PyResult<Framing> {
    Framing::from_name(name).ok_or_else(|| {
        PyValueError::new_err("framing must be 'json', 'websocket', 'msgpack' or 'sse'")
    })
}

/// The lane (`stream_id`) a JSON message names at its top level, read without
/// parsing the message (see `_core.pyi`).
#[pyfunction]
pub fn message_stream_id(py: Python<'_>, data: &[u8]) -> Option<String> {
    detach_if(py, data.len(), DETACH_COPY_BYTES, || {
        crate::framing::peek::top_level_string(data, "stream_id")
            .filter(|id| request::is_stream_id(id))
    })
}

/// Decode and validate one client message (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (data, *, websocket = true, max_item_bytes = 33554432, format = "json"))]
pub fn parse_client_message(
    py: Python<'_>,
    data: &[u8],
    websocket: bool,
    max_item_bytes: usize,
    format: &str,
) -> PyResult<Py<PyAny>> {
    let format = match format {
        "json" => Format::Json,
        "msgpack" => Format::Msgpack,
        _ => return Err(PyValueError::new_err("format must be 'json' or 'msgpack'")),
    };
    let options = Options {
        websocket,
        format,
        max_item_bytes,
    };
    let parsed = detach_if(py, data.len(), DETACH_PARSE_BYTES, || {
        request::parse_message(data, options)
    });
    Ok(match parsed {
        ClientMessage::Create(inner) => Py::new(
            py,
            PyCreateRequest {
                inner: *inner,
                settings: PyOnceLock::new(),
            },
        )?
        .into_any(),
        ClientMessage::Steer(inner) => Py::new(py, PySteerRequest { inner })?.into_any(),
        ClientMessage::Ignored => py.None(),
        ClientMessage::Rejected(rejected) => Py::new(py, PyRejection::new(rejected))?.into_any(),
    })
}

/// A valid `response.create`.
#[pyclass(name = "CreateRequest", module = "warmsocket._core", frozen)]
pub struct PyCreateRequest {
    inner: CreateRequest,
    /// `settings` decoded (without `model`) the first time it is asked for.
    settings: PyOnceLock<Py<PyDict>>,
}

#[pymethods]
impl PyCreateRequest {
    #[getter]
    fn model(&self) -> &str {
        &self.inner.model
    }
    /// The lane (WebSocket only).
    #[getter]
    fn stream_id(&self) -> Option<&str> {
        self.inner.stream_id.as_deref()
    }
    #[getter]
    fn previous_response_id(&self) -> Option<&str> {
        self.inner.previous_response_id.as_deref()
    }
    /// False for a warm-up (`generate: false` or `prompt_cache_options.prewarm`).
    #[getter]
    fn generate(&self) -> bool {
        self.inner.generate
    }
    #[getter]
    fn store(&self) -> bool {
        self.inner.store
    }
    /// `background: true` (HTTP only): the response runs on after the request.
    #[getter]
    fn background(&self) -> bool {
        self.inner.background
    }
    #[getter]
    fn stream(&self) -> bool {
        self.inner.stream
    }
    /// The new input items, normalised (a string or an "easy" message is a typed message).
    #[getter]
    fn input(&self) -> PyItems {
        PyItems {
            inner: self.inner.input.clone(),
        }
    }
    /// The echoed Response fields and `model` as one canonical JSON object.
    #[getter]
    fn settings_json<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.settings)
    }
    /// `settings_json` decoded, without `model` (decoded once, then shared).
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = self
            .settings
            .get_or_try_init(py, || -> PyResult<Py<PyDict>> {
                let dict = json_loads(py)?
                    .call1((PyBytes::new(py, &self.inner.settings),))?
                    .cast_into::<PyDict>()?;
                dict.del_item(intern!(py, "model"))?;
                Ok(dict.unbind())
            })?;
        Ok(dict.bind(py).clone())
    }
    #[getter]
    fn instructions(&self) -> Option<&str> {
        self.inner.instructions.as_deref()
    }
    /// Names of the `function` tools, in order.
    #[getter]
    fn function_names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.function_names)
    }
    #[getter]
    fn has_tools(&self) -> bool {
        self.inner.has_tools
    }
    /// The `tools` array as canonical JSON (as in `settings_json`); None when
    /// there is no tool.
    #[getter]
    fn tools_json<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let span = self.inner.tools_span.clone()?;
        Some(PyBytes::new(py, self.inner.settings.get(span)?))
    }
    /// Bytes of the instructions (UTF-8) and of `tools_json`: what the prompt
    /// starts with, for deciding where to tokenise it.
    #[getter]
    fn prompt_bytes(&self) -> usize {
        let tools = self.inner.tools_span.as_ref().map_or(0, |span| span.len());
        self.inner.instructions.as_ref().map_or(0, String::len) + tools
    }
    /// XXH3-64 of `tools_json` (to tell one set of tools from another without
    /// comparing them); None when there is no tool.
    #[getter]
    fn tools_digest(&self) -> Option<u64> {
        let span = self.inner.tools_span.clone()?;
        Some(xxhash_rust::xxh3::xxh3_64(self.inner.settings.get(span)?))
    }
    /// Server-side compaction asked for (`context_management`, validated as the
    /// API's schema has it): the first entry's `compact_threshold` in tokens (at least
    /// 1,000), else 100,000; None when none was asked for.
    #[getter]
    fn compact_threshold(&self) -> Option<u64> {
        self.inner.compact_threshold
    }
    /// The input has an `item_reference` item (`{"type": "item_reference", "id"}`),
    /// which the engine replaces with the stored item it names.
    #[getter]
    fn has_item_references(&self) -> bool {
        self.inner.has_item_references
    }
    /// `max_output_tokens` (as in `settings`; at most 2**64 - 1), without decoding
    /// the settings.
    #[getter]
    fn max_output_tokens(&self) -> Option<u64> {
        self.inner.max_output_tokens
    }
    /// The body fields only an upstream acts on, for a Responses upstream: `image`,
    /// `prompt` and `moderation` (`responses_only`), `access_programs`, and
    /// `prompt_cache_options` less `prewarm` (warmsocket's own) and
    /// `comparison_response_id` (a response id), null members left out, as one
    /// canonical JSON object; None when there is none.
    #[getter]
    fn upstream_options_json<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let json = self.inner.upstream_options.as_ref()?;
        Some(PyBytes::new(py, json))
    }
    /// `include` as sent (validated: an array of strings, or null), such as
    /// `("reasoning.encrypted_content",)`; empty when absent or null.
    #[getter]
    fn include<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.include)
    }
    /// Of `prompt` (a template stored at OpenAI) and `moderation` (moderated
    /// completions), in that order, those the body has: only a Responses upstream
    /// can honour them (they are in `upstream_options_json`), so another backend
    /// refuses them.
    #[getter]
    fn responses_only<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.responses_only)
    }
    /// The body gave no `model` (its `prompt`'s template names one): `model` is
    /// `"default"`, and an upstream is sent none.
    #[getter]
    fn model_from_prompt(&self) -> bool {
        self.inner.model_from_prompt
    }
    /// The `conversation`'s id (sent as it, or as an object's `id`): its items come
    /// before the input, and it gets this response's input and output.
    #[getter]
    fn conversation(&self) -> Option<&str> {
        self.inner.conversation.as_deref()
    }
    /// Of `temperature`, `top_p` and `service_tier` (in that order), those the
    /// client gave at the API's default value (1, 1, `"default"`), which `settings`
    /// cannot tell from leaving them out. They are still forwarded: an upstream's
    /// own default may differ (a model's sampling defaults; OpenAI's `auto` tier).
    #[getter]
    fn given_defaults<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.given_defaults)
    }
    /// Body fields the API does not know (ignored), sorted.
    #[getter]
    fn ignored_fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.ignored_fields)
    }

    /// The same request with new input, chained to `previous_response_id`, generating.
    fn successor(&self, input: &PyItems, previous_response_id: &str) -> PyCreateRequest {
        let mut inner = self.inner.clone();
        inner.input = input.inner.clone();
        inner.previous_response_id = Some(previous_response_id.to_owned());
        inner.has_item_references = false;
        inner.generate = true;
        PyCreateRequest {
            inner,
            settings: PyOnceLock::new(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<CreateRequest model={:?} stream_id={:?} previous_response_id={:?} items={}>",
            self.inner.model,
            self.inner.stream_id,
            self.inner.previous_response_id,
            self.inner.input.len()
        )
    }
}

/// A valid `response.steer`.
#[pyclass(name = "SteerRequest", module = "warmsocket._core", frozen)]
pub struct PySteerRequest {
    inner: SteerRequest,
}

#[pymethods]
impl PySteerRequest {
    #[getter]
    fn previous_response_id(&self) -> &str {
        &self.inner.previous_response_id
    }
    /// The steering input as user messages.
    #[getter]
    fn input(&self) -> PyItems {
        PyItems {
            inner: self.inner.input.clone(),
        }
    }
    /// The `input` field as sent (a string or an array), as JSON.
    #[getter]
    fn input_json<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.input_json)
    }

    fn __repr__(&self) -> String {
        format!(
            "<SteerRequest previous_response_id={:?} items={}>",
            self.inner.previous_response_id,
            self.inner.input.len()
        )
    }
}

/// A refused client message.
#[pyclass(name = "Rejection", module = "warmsocket._core", frozen)]
pub struct PyRejection {
    #[pyo3(get)]
    code: &'static str,
    /// Never holds conversation content.
    #[pyo3(get)]
    message: String,
    #[pyo3(get)]
    param: Option<String>,
    #[pyo3(get)]
    status: u16,
    #[pyo3(get)]
    r#type: &'static str,
    /// `message`: step 1 (JSON, type, stream_id), report at once; `create`: a create
    /// body error, reported on its lane when the request reaches the front; `steer`: an
    /// invalid `response.steer` (`response.steer.failed` with `invalid_input`).
    #[pyo3(get)]
    stage: &'static str,
    /// The create's lane, once step 1 passed.
    #[pyo3(get)]
    stream_id: Option<String>,
    /// The body's `previous_response_id` when it is a string.
    #[pyo3(get)]
    previous_response_id: Option<String>,
    steer_input_json: Option<Vec<u8>>,
}

impl PyRejection {
    #[cold]
    fn new(rejected: Rejected) -> PyRejection {
        let error = rejected.error;
        PyRejection {
            code: error.code(),
            message: error.to_string(),
            param: error.param().map(str::to_owned),
            status: error.status(),
            r#type: error.error_type(),
            stage: match rejected.stage {
                Stage::Message => "message",
                Stage::Create => "create",
                Stage::Steer => "steer",
            },
            stream_id: rejected.stream_id,
            previous_response_id: rejected.previous_response_id,
            steer_input_json: rejected.steer_input_json,
        }
    }
}

#[pymethods]
impl PyRejection {
    /// A refused steer's input as canonical JSON when the input itself is valid
    /// (another field was wrong), for `response.steer.failed` to give back.
    #[getter]
    fn steer_input_json<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.steer_input_json
            .as_deref()
            .map(|json| PyBytes::new(py, json))
    }

    fn __repr__(&self) -> String {
        format!(
            "<Rejection stage={} code={} param={:?}>",
            self.stage, self.code, self.param
        )
    }
}

/// A `str` as UTF-8; each lone surrogate (which no JSON text can hold) becomes U+FFFD.
fn text<'a>(s: &'a Bound<'_, PyString>) -> std::borrow::Cow<'a, str> {
    match s.to_str() {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(replace_surrogates(s)),
    }
}

#[cold]
fn replace_surrogates(s: &Bound<'_, PyString>) -> String {
    // UTF-16 keeps a lone surrogate as one code unit, which decoding replaces once.
    let replaced = s
        .call_method1("encode", ("utf-16-le", "surrogatepass"))
        .and_then(|b| b.call_method1("decode", ("utf-16-le", "replace")))
        .and_then(|t| t.extract::<String>());
    replaced.unwrap_or_else(|_| s.to_string_lossy().into_owned())
}

/// `(input_tokens, cached_tokens, output_tokens[, reasoning_tokens])`.
#[derive(FromPyObject)]
enum UsageArg {
    WithReasoning((u64, u64, u64, u64)),
    Plain((u64, u64, u64)),
}

fn usage(usage: UsageArg) -> Usage {
    let (input_tokens, cached_tokens, output_tokens, reasoning_tokens) = match usage {
        UsageArg::WithReasoning(four) => four,
        UsageArg::Plain((input, cached, output)) => (input, cached, output, 0),
    };
    Usage {
        input_tokens,
        cached_tokens,
        output_tokens,
        reasoning_tokens,
    }
}

/// The event stream of one response.
#[pyclass(name = "ResponseEncoder", module = "warmsocket._core")]
pub struct PyResponseEncoder {
    inner: ResponseEncoder,
}

/// An encoder method that takes a JSON argument (an item, an event).
type EncodeJson =
    for<'a, 'b> fn(&'a mut ResponseEncoder, &'b [u8]) -> crate::error::Result<&'a [u8]>;

impl PyResponseEncoder {
    /// `encode` with a JSON argument, without the GIL when it is large enough for
    /// parsing it to take a while (an upstream's partial image, a big tool call);
    /// the events it wrote.
    fn encode_json<'py>(
        &mut self,
        py: Python<'py>,
        json: &[u8],
        encode: EncodeJson,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        detach_if(py, json.len(), DETACH_PARSE_BYTES, || {
            encode(inner, json).map(|_| ())
        })?;
        Ok(PyBytes::new(py, self.inner.written()))
    }
}

#[pymethods]
impl PyResponseEncoder {
    #[new]
    #[pyo3(signature = (
        response_id, *, settings, created_at, previous_response_id = None, store = true,
        stream_id = None, framing = "json", background = false,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        response_id: &str,
        settings: &[u8],
        created_at: i64,
        previous_response_id: Option<&str>,
        store: bool,
        stream_id: Option<&str>,
        framing: &str,
        background: bool,
    ) -> PyResult<Self> {
        let inner = ResponseEncoder::new(ResponseHead {
            response_id,
            settings,
            previous_response_id,
            store,
            created_at,
            stream_id,
            framing: framing_arg(framing)?,
            background,
        })?;
        Ok(PyResponseEncoder { inner })
    }

    /// `response.created` and `response.in_progress`; for a background response
    /// `response.created` and `response.queued` (status `queued` until `in_progress`).
    fn start<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.start())
    }

    /// A queued (background) response starts: `response.in_progress`.
    fn in_progress<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.in_progress())
    }

    /// A background response is cancelled: the open item's `.done` events; the
    /// status is `cancelled` (no terminal event: the API has none for it).
    fn cancel<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.cancel())
    }

    /// Assistant text (opens a message item when none is open).
    fn text_delta<'py>(
        &mut self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.text_delta(&self::text(text)))
    }

    /// The model's refusal (`response.refusal.delta`): opens a message whose one
    /// content part is a `refusal` when none is open (closing the open item).
    fn refusal_delta<'py>(
        &mut self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.refusal_delta(&self::text(text)))
    }

    /// Close the open item and open a reasoning item (`output_item.added`) whose
    /// parts then come as `reasoning_delta`s; it ends with `output_item` (the whole
    /// item, adding what was not streamed) or when another item starts (built from
    /// its deltas). `item_id`: the upstream's (a new `rs_` id when None).
    #[pyo3(signature = (item_id = None))]
    fn reasoning_start<'py>(
        &mut self,
        py: Python<'py>,
        item_id: Option<&Bound<'py, PyString>>,
    ) -> Bound<'py, PyBytes> {
        let id = item_id.map(text);
        PyBytes::new(py, self.inner.reasoning_start(id.as_deref()))
    }

    /// A delta of summary part `index` (`summary`) or of `reasoning_text` content
    /// part `index`; opens a reasoning item when none is open, and closes the last
    /// part when this is another.
    fn reasoning_delta<'py>(
        &mut self,
        py: Python<'py>,
        summary: bool,
        index: usize,
        delta: &Bound<'py, PyString>,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.reasoning_delta(summary, index, &text(delta)))
    }

    /// `text_delta` of each text, in order, in one call: one event per text.
    fn text_deltas<'py>(
        &mut self,
        py: Python<'py>,
        texts: Vec<Bound<'py, PyString>>,
    ) -> Bound<'py, PyBytes> {
        let mut out = Vec::new();
        for text in &texts {
            out.extend_from_slice(self.inner.text_delta(&self::text(text)));
        }
        PyBytes::new(py, &out)
    }

    /// Close the open item and start a function_call item (with `custom`, a
    /// custom_tool_call item).
    #[pyo3(signature = (call_id, name, *, custom = false))]
    fn tool_call_start<'py>(
        &mut self,
        py: Python<'py>,
        call_id: &Bound<'py, PyString>,
        name: &Bound<'py, PyString>,
        custom: bool,
    ) -> Bound<'py, PyBytes> {
        let (call_id, name) = (text(call_id), text(name));
        let out = if custom {
            self.inner.custom_tool_call_start(&call_id, &name)
        } else {
            self.inner.tool_call_start(&call_id, &name)
        };
        PyBytes::new(py, out)
    }

    /// Arguments of the open function_call item, or input of the open custom tool
    /// call (nothing when neither is open).
    fn tool_arguments_delta<'py>(
        &mut self,
        py: Python<'py>,
        delta: &Bound<'py, PyString>,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.tool_arguments_delta(&text(delta)))
    }

    /// The open item's `.done` events, if an item is open; with `incomplete`, a
    /// message or function call is closed `status: incomplete` (cut short).
    #[pyo3(signature = (*, incomplete = false))]
    fn close_item<'py>(&mut self, py: Python<'py>, incomplete: bool) -> Bound<'py, PyBytes> {
        if incomplete {
            PyBytes::new(py, self.inner.close_item_incomplete())
        } else {
            PyBytes::new(py, self.inner.close_item())
        }
    }

    /// Close the open item; `response.completed`.
    #[pyo3(signature = (usage, *, completed_at))]
    fn complete<'py>(
        &mut self,
        py: Python<'py>,
        usage: UsageArg,
        completed_at: i64,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.complete(self::usage(usage), completed_at))
    }

    /// Close the open item; `response.failed` with `error`, a JSON object (`{code,
    /// message}`, plus `type` and `param` for upstream errors). ValueError otherwise.
    #[pyo3(signature = (error, usage = None))]
    fn fail<'py>(
        &mut self,
        py: Python<'py>,
        error: &[u8],
        usage: Option<UsageArg>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let usage = usage.map(self::usage);
        Ok(PyBytes::new(py, self.inner.fail(error, usage)?))
    }

    /// Close the open item; `response.incomplete` with `incomplete_details.reason`.
    #[pyo3(signature = (reason, usage, *, completed_at))]
    fn incomplete<'py>(
        &mut self,
        py: Python<'py>,
        reason: &str,
        usage: UsageArg,
        completed_at: i64,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(
            py,
            self.inner
                .incomplete(reason, self::usage(usage), completed_at),
        )
    }

    /// Another event (a JSON object, e.g. steering) numbered in this response's
    /// sequence, with its `stream_id`. ValueError when it is not a JSON object.
    fn event<'py>(&mut self, py: Python<'py>, event: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, self.inner.event(event)?))
    }

    /// A whole output item of a type not built from deltas (a JSON object): closes
    /// the open item. A `reasoning` item gives its events in OpenAI's order (added;
    /// per summary part and per `reasoning_text` content part: part added, one
    /// delta, text done, part done; done) and keeps `id` (a new `rs_` id when it has
    /// none), `summary`, `content` and `encrypted_content`; any other type (custom
    /// and hosted tool calls) is given as it is in `output_item.added` and
    /// `output_item.done`. ValueError, with nothing changed, for a `message`, a
    /// `function_call`, an object without a string `type`, or a malformed
    /// reasoning item. A reasoning item finishes the streamed one (`reasoning_start`)
    /// of its id: only the parts not streamed are given, then `output_item.done`; an
    /// item of the id of the hosted tool call under way (`item_start`) finishes it
    /// with only its `output_item.done`, and one of a call closed early replaces it
    /// (its `output_item.done` again, at its index).
    fn output_item<'py>(&mut self, py: Python<'py>, item: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        self.encode_json(py, item, ResponseEncoder::output_item)
    }

    /// The log probabilities of the next text delta (a JSON array, as an upstream's
    /// `response.output_text.delta` carried them): written in that delta's event and
    /// kept with the message (`output_text.done`, and its text part, where each gets
    /// its token's `bytes` when it has none). ValueError for anything but an array.
    fn text_logprobs(&mut self, logprobs: &[u8]) -> PyResult<()> {
        Ok(self.inner.text_logprobs(logprobs)?)
    }

    /// Fields the upstream's Response gave about what it did (a JSON object, as
    /// `ResponsesStreamDecoder` returns them: `service_tier`, `moderation`, ...): the
    /// Response object has them from now on, each in place of the setting of its name
    /// or added, and `meta_json` and `terminal_meta` keep them (`response_fields`).
    /// ValueError for anything but an object.
    fn set_response_fields(&mut self, fields: &[u8]) -> PyResult<()> {
        Ok(self.inner.set_response_fields(fields)?)
    }

    /// An annotation of the message's text (a JSON object with a string `type`: a web
    /// search's `url_citation`, ...): `response.output_text.annotation.added` with its
    /// `annotation_index`, and kept in the text part. Opens a message first when none
    /// is open. ValueError, with nothing changed, for anything else.
    fn text_annotation<'py>(
        &mut self,
        py: Python<'py>,
        annotation: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.encode_json(py, annotation, ResponseEncoder::text_annotation)
    }

    /// A hosted tool call starts (web search, code interpreter, an MCP call...: any
    /// item type but message, function, custom tool call and reasoning): closes the
    /// open item and gives `output_item.added` with the item as it is. Its progress
    /// events then go through `item_event`, and `output_item` with the whole item of
    /// the same id finishes it; closed before that, it is kept as it started.
    /// ValueError, with nothing changed, without a non-empty string `id` or for a
    /// type built from deltas.
    fn item_start<'py>(&mut self, py: Python<'py>, item: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        self.encode_json(py, item, ResponseEncoder::item_start)
    }

    /// A progress event of the hosted tool call under way (a JSON object naming its
    /// `item_id`), given whole with this response's `sequence_number`, `stream_id`
    /// and the call's `output_index`; nothing when it names no call under way.
    /// ValueError when it is not a JSON object with a string `type`.
    fn item_event<'py>(&mut self, py: Python<'py>, event: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        self.encode_json(py, event, ResponseEncoder::item_event)
    }

    /// The number the next event gets.
    #[getter]
    fn sequence_number(&self) -> u64 {
        self.inner.sequence_number()
    }
    #[getter]
    fn status(&self) -> &'static str {
        self.inner.status().name()
    }
    #[getter]
    fn open_kind(&self) -> Option<&'static str> {
        if self.inner.reasoning_open() {
            return Some("reasoning");
        }
        if self.inner.hosted_open() {
            return Some("hosted");
        }
        self.inner.open_kind().map(|k| k.name())
    }
    /// The id of the item under way, of any kind.
    #[getter]
    fn open_item_id(&self) -> Option<&str> {
        self.inner.open_item_id()
    }
    #[getter]
    fn framing(&self) -> &'static str {
        self.inner.framing().name()
    }
    #[getter]
    fn created_at(&self) -> i64 {
        self.inner.created_at()
    }
    #[getter]
    fn completed_at(&self) -> Option<i64> {
        self.inner.completed_at()
    }

    /// The finished output items, ready for `SessionCache.create(output=...)`.
    fn output_items(&self) -> PyItems {
        PyItems {
            inner: self.inner.output_items(),
        }
    }

    /// The Response object now (after a terminal event: the one it carried).
    fn response_json<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.response_json())
    }

    /// status, created_at, completed_at, usage, error, incomplete_details, and
    /// `response_fields` once `set_response_fields` gave any (JSON).
    fn meta_json<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.meta_json())
    }

    /// The `meta_json` this response will have once it ends `completed` (or,
    /// with `incomplete` as the reason, `incomplete`), plus `instructions` (the
    /// prompt's instructions key), last: what the cache stores before the terminal
    /// event is sent. Changes nothing.
    #[pyo3(signature = (usage, *, completed_at, incomplete = None, instructions = None))]
    fn terminal_meta<'py>(
        &self,
        py: Python<'py>,
        usage: UsageArg,
        completed_at: i64,
        incomplete: Option<&str>,
        instructions: Option<&str>,
    ) -> Bound<'py, PyBytes> {
        let meta =
            self.inner
                .terminal_meta(self::usage(usage), completed_at, incomplete, instructions);
        PyBytes::new(py, &meta)
    }

    fn __repr__(&self) -> String {
        format!(
            "<ResponseEncoder status={} sequence_number={} framing={}>",
            self.inner.status().name(),
            self.inner.sequence_number(),
            self.inner.framing().name()
        )
    }
}

/// Frame one stand-alone event (a JSON object) for a connection's framing.
#[pyfunction]
pub fn frame_event<'py>(
    py: Python<'py>,
    event: &[u8],
    framing: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut out = Vec::with_capacity(event.len() + 16);
    encoder::frame_event(event, framing_arg(framing)?, &mut out)?;
    Ok(PyBytes::new(py, &out))
}

/// A client's WebSocket frames split off its byte stream (see `_core.pyi`).
#[pyclass(name = "ClientFrames", module = "warmsocket._core")]
pub struct PyClientFrames {
    inner: ClientFrames,
}

#[pymethods]
impl PyClientFrames {
    #[new]
    #[pyo3(signature = (max_size=None))]
    fn new(max_size: Option<u64>) -> PyClientFrames {
        PyClientFrames {
            inner: ClientFrames::new(max_size),
        }
    }

    /// What `data` completes, in order: `(True, text, payload)` for a whole message
    /// (`text`: of a text frame), `(False, False, raw)` for bytes to pass to the
    /// protocol object's `receive_data` (adjacent raw frames joined). A partial
    /// frame at the end is kept.
    fn feed<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<Vec<(bool, bool, Bound<'py, PyBytes>)>> {
        let inner = &mut self.inner;
        // A read that completes a large buffered frame unmasks all of it.
        let work = data.len().saturating_add(inner.buffered());
        let pieces = detach_if(py, work, DETACH_COPY_BYTES, || inner.feed(data));
        Ok(pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Message { text, payload } => (true, text, PyBytes::new(py, &payload)),
                Piece::Raw(raw) => (false, false, PyBytes::new(py, &raw)),
            })
            .collect())
    }

    /// The stream goes to the protocol object for good.
    #[getter]
    fn handed_over(&self) -> bool {
        self.inner.handed_over()
    }

    /// Bytes of an incomplete frame held until the rest arrives.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    /// The held bytes of an incomplete frame, taken out (for the protocol object
    /// when the caller stops using this reader).
    fn take_buffered<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.take_buffered())
    }

    fn __repr__(&self) -> String {
        format!(
            "<ClientFrames buffered={} handed_over={}>",
            self.inner.buffered(),
            self.inner.handed_over()
        )
    }
}
