//! Glue for reading an upstream's answers: `ResponsesStreamDecoder`
//! (`rust/framing/upstream.rs`), one call per chunk of an SSE body or per WebSocket
//! message, returning the model events as tuples; `parse_response_head`
//! (`rust/framing/http_head.rs`), once per HTTP response; and `ChunkedBody`
//! (`rust/framing/chunked.rs`), one call per read of a chunked HTTP body (see
//! `_core.pyi`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::framing::chunked::ChunkedDecoder;
use crate::framing::http_head;
use crate::framing::upstream::{Event, ResponsesDecoder, Stop};
use crate::py::{detach_if, DETACH_PARSE_BYTES};

/// An upstream's streamed Responses events -> model events (see `_core.pyi`).
#[pyclass(name = "ResponsesStreamDecoder", module = "warmsocket._core")]
#[derive(Default)]
pub struct PyResponsesStreamDecoder {
    inner: ResponsesDecoder,
}

#[pymethods]
impl PyResponsesStreamDecoder {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// The events completed by a chunk of the SSE body.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        // The work is the event this chunk may complete, held from earlier chunks too
        // (up to MAX_EVENT_BYTES: a terminal event repeats the whole Response).
        let size = self.inner.sse_buffered().saturating_add(data.len());
        let inner = &mut self.inner;
        let (events, stop) = detach_if(py, size, DETACH_PARSE_BYTES, || {
            let mut events = Vec::new();
            let stop = inner.feed_sse(data, &mut events).err();
            (events, stop)
        });
        events_list(py, events, stop)
    }

    /// The events left when the SSE body ends without a final blank line.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut events = Vec::new();
        let stop = self.inner.finish_sse(&mut events).err();
        events_list(py, events, stop)
    }

    /// One event as a JSON message (WebSocket mode). Its `type` is read first:
    /// `response.created` / `in_progress` (which repeat the whole Response) are not
    /// parsed, terminal events are read for their id, usage and relayed fields
    /// only; the GIL is released for a large message.
    fn message<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        let inner = &mut self.inner;
        let (events, stop) = detach_if(py, data.len(), DETACH_PARSE_BYTES, || {
            let mut events = Vec::new();
            let stop = inner.ws_message(data, &mut events).err();
            (events, stop)
        });
        events_list(py, events, stop)
    }

    /// A terminal event (`response.completed` / `response.incomplete`) arrived.
    #[getter]
    fn done(&self) -> bool {
        self.inner.done
    }

    /// An event other than an error arrived.
    #[getter]
    fn started(&self) -> bool {
        self.inner.started
    }

    /// The upstream's id of the response, from its terminal event.
    #[getter]
    fn response_id(&self) -> Option<&str> {
        self.inner.response_id.as_deref()
    }
}

fn events_list<'py>(
    py: Python<'py>,
    events: Vec<Event>,
    stop: Option<Stop>,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for event in events {
        let tuple = match event {
            Event::Text(text) => ("text", text).into_pyobject(py)?,
            Event::Refusal(text) => ("refusal", text).into_pyobject(py)?,
            Event::Arguments(delta) => ("args", delta).into_pyobject(py)?,
            Event::Call {
                call_id,
                name,
                custom,
            } => ("call", call_id, name, custom).into_pyobject(py)?,
            Event::Item(item) => ("item", PyBytes::new(py, &item)).into_pyobject(py)?,
            Event::MessageStart => ("message",).into_pyobject(py)?,
            Event::Annotation(annotation) => {
                ("annotation", PyBytes::new(py, &annotation)).into_pyobject(py)?
            }
            Event::ItemStart(item) => ("item_start", PyBytes::new(py, &item)).into_pyobject(py)?,
            Event::ItemEvent(event) => {
                ("item_event", PyBytes::new(py, &event)).into_pyobject(py)?
            }
            Event::ReasoningStart(id) => ("reasoning", id).into_pyobject(py)?,
            Event::ReasoningDelta {
                summary,
                index,
                delta,
            } => ("reasoning_delta", summary, index, delta).into_pyobject(py)?,
            Event::Usage {
                input,
                cached,
                output,
                reasoning,
            } => ("usage", input, cached, output, reasoning).into_pyobject(py)?,
            Event::Incomplete(reason) => ("incomplete", reason).into_pyobject(py)?,
            Event::ResponseFields(fields) => {
                ("response_fields", PyBytes::new(py, &fields)).into_pyobject(py)?
            }
            Event::TextLogprobs(logprobs) => {
                ("logprobs", PyBytes::new(py, &logprobs)).into_pyobject(py)?
            }
        };
        list.append(tuple)?;
    }
    if let Some(stop) = stop {
        let tuple: Bound<'py, PyTuple> = match stop {
            Stop::Failed(error) => {
                ("failed", error.map(|e| PyBytes::new(py, &e))).into_pyobject(py)?
            }
            Stop::Error { error, status } => {
                ("error", PyBytes::new(py, &error), status).into_pyobject(py)?
            }
            Stop::Protocol => ("protocol",).into_pyobject(py)?,
        };
        list.append(tuple)?;
    }
    Ok(list)
}

/// The head of an HTTP/1.1 response at the start of `data` (see `_core.pyi`).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn parse_response_head<'py>(
    py: Python<'py>,
    data: &[u8],
) -> PyResult<Option<(usize, u16, bool, Bound<'py, PyDict>)>> {
    let head = http_head::parse(data).map_err(|e| PyValueError::new_err(e.message()))?;
    let Some(head) = head else {
        return Ok(None);
    };
    let headers = PyDict::new(py);
    for (name, value) in &head.headers {
        headers.set_item(name, value)?;
    }
    Ok(Some((head.length, head.status, head.http10, headers)))
}

/// An HTTP/1.1 `Transfer-Encoding: chunked` body, decoded (see `_core.pyi`).
#[pyclass(name = "ChunkedBody", module = "warmsocket._core")]
#[derive(Default)]
pub struct PyChunkedBody {
    inner: ChunkedDecoder,
}

#[pymethods]
impl PyChunkedBody {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// The body bytes `data` completes. ValueError for an invalid chunk size line
    /// (hexadecimal digits only, at most 1 KiB with extensions), chunk data not
    /// followed by CRLF, or trailers over 64 KiB.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(data.len());
        self.inner
            .feed(data, &mut out)
            .map_err(|e| PyValueError::new_err(e.message()))?;
        Ok(PyBytes::new(py, &out))
    }

    /// The last chunk and its trailers were read.
    #[getter]
    fn done(&self) -> bool {
        self.inner.done
    }

    /// Bytes came after the end of the body (do not reuse the connection).
    #[getter]
    fn trailing(&self) -> bool {
        self.inner.trailing
    }

    /// Data bytes of the current chunk not received yet (0 between chunks).
    #[getter]
    fn chunk_left(&self) -> usize {
        self.inner.chunk_left()
    }

    /// The bytes that came after the body in the read that ended it (once).
    fn take_rest<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &std::mem::take(&mut self.inner.rest))
    }
}
