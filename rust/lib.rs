//! warmsocket's Rust core, exposed to Python as `warmsocket._core`.
//!
//! This file is a table of contents: domain logic lives in plain-Rust modules
//! that never import pyo3, and all conversion between Python and Rust lives in
//! `py.rs` and `py/`.

/// The session cache: index, owners, scopes, pins, LRU budget.
pub mod cache;
/// The one error type and its messages.
pub mod error;
/// Message framing: client messages in, response events out.
pub mod framing;
/// The Rust heap, counted (`rust_heap()`).
pub mod heap;
/// Conversation items: validation, canonical JSON, extracted fields.
pub mod item;
/// Response nodes: structural sharing, cumulative counts, memory metering.
pub mod node;
/// Freeing evicted and closed state on a background thread, off the event loop.
pub mod reaper;
/// Versioned msgpack snapshots of the stored entries.
pub mod snapshot;
/// Context views: materialising a chain as one JSON array.
pub mod view;

/// Chained token-block hashes (prefix comparison, routing).
pub mod blocks;
mod py;
/// Tokenisers and the item rendering they count.
pub mod token;

use pyo3::prelude::*;

#[global_allocator]
static HEAP: heap::CountingAllocator = heap::CountingAllocator;

/// The Python module `warmsocket._core`.
#[pymodule(gil_used = false)]
mod _core {
    use super::*;

    #[pymodule_export]
    use crate::py::cache::PyBinding;
    #[pymodule_export]
    use crate::py::cache::PyCacheStats;
    #[pymodule_export]
    use crate::py::cache::PyContextView;
    #[pymodule_export]
    use crate::py::cache::PyPrefixMatch;
    #[pymodule_export]
    use crate::py::cache::PyResponseInfo;
    #[pymodule_export]
    use crate::py::cache::PySessionCache;
    #[pymodule_export]
    use crate::py::framing::frame_event;
    #[pymodule_export]
    use crate::py::framing::message_stream_id;
    #[pymodule_export]
    use crate::py::framing::parse_client_message;
    #[pymodule_export]
    use crate::py::framing::PyClientFrames;
    #[pymodule_export]
    use crate::py::framing::PyCreateRequest;
    #[pymodule_export]
    use crate::py::framing::PyRejection;
    #[pymodule_export]
    use crate::py::framing::PyResponseEncoder;
    #[pymodule_export]
    use crate::py::framing::PySteerRequest;
    #[pymodule_export]
    use crate::py::heap::rust_heap;
    #[pymodule_export]
    use crate::py::items::PyItemMeta;
    #[pymodule_export]
    use crate::py::items::PyItems;
    #[pymodule_export]
    use crate::py::token::block_hashes;
    #[pymodule_export]
    use crate::py::token::encoding_for_model;
    #[pymodule_export]
    use crate::py::token::shared_prefix_blocks;
    #[pymodule_export]
    use crate::py::token::shared_prefix_tokens;
    #[pymodule_export]
    use crate::py::token::BlockHasher;
    #[pymodule_export]
    use crate::py::token::Tokenizer;
    #[pymodule_export]
    use crate::py::upstream::parse_response_head;
    #[pymodule_export]
    use crate::py::upstream::PyChunkedBody;
    #[pymodule_export]
    use crate::py::upstream::PyResponsesStreamDecoder;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        m.add("BUILD_PROFILE", profile)?;
        m.add(
            "MAX_UPSTREAM_EVENT_BYTES",
            crate::framing::upstream::MAX_EVENT_BYTES,
        )?;
        m.add("ItemsLike", crate::py::items::items_like(m.py())?)?;
        crate::py::errors::add_exceptions(m)?;
        // TokenizerError, UnknownEncoding, TokenizerFileUnreadable,
        // InvalidTokenizerFile, InvalidItemJson, TokenizationFailed.
        crate::py::token::add_exceptions(m)?;
        Ok(())
    }
}
