//! Message framing: client messages in, server events out, in one call each.
//!
//! * `json` / `msgpack`: decoding a message into `value::Value` (Python's data
//!   model: exact integers, dict semantics for duplicate keys) with the errors
//!   Python's `json.loads` gives;
//! * `request`: validating a `response.create` / `response.steer` with the verdicts
//!   of `warmsocket/client_events.py`, producing cache-ready `Items`;
//! * `encoder`: one response's events, framed as JSON lines, WebSocket text or
//!   msgpack binary frames, or SSE;
//! * `error`: the request errors and their messages;
//! * `upstream`: an upstream's streamed Responses events read back as model events;
//! * `http_head`: an upstream response's status line and headers;
//! * `chunked`: an upstream response's `Transfer-Encoding: chunked` body;
//! * `client_frames`: a client's WebSocket frames split off its byte stream, whole
//!   messages unmasked.
//!
//! Nothing here imports pyo3 (`py/framing.rs` is the glue).

pub mod chunked;
pub mod client_frames;
pub mod encoder;
pub mod error;
pub mod http_head;
pub mod json;
pub mod msgpack;
pub mod peek;
pub mod request;
pub mod scan;
pub mod upstream;
pub mod value;
