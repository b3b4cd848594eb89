//! PyO3 glue: argument conversion, calls into the domain modules, conversion of
//! results, and the one mapping from `crate::error::Error` to Python exceptions.
//! The domain modules (`item`, `node`, `view`, `cache`, `snapshot`) never import
//! pyo3; everything Python-facing lives under `py/`.

pub mod buffer;
pub mod cache;
pub mod errors;
pub mod framing;
pub mod heap;
pub mod items;
pub mod json;
pub mod token;
pub mod upstream;

use pyo3::marker::Ungil;
use pyo3::Python;

/// Run `f` with the GIL released when the work (`size` bytes of it) is large enough
/// to be worth it, else with the GIL held.
///
/// Releasing and retaking the GIL costs nothing measurable when uncontended, but when
/// another thread is running Python, retaking it can wait for that thread's switch
/// interval (5 ms by default): for small inputs that wait would dwarf the work.
pub fn detach_if<T: Ungil, F: Ungil + FnOnce() -> T>(
    py: Python<'_>,
    size: usize,
    min_size: usize,
    f: F,
) -> T {
    if size >= min_size {
        py.detach(f)
    } else {
        f()
    }
}

/// Copying (about 15 us at 256 KiB) releases the GIL from this size up.
pub const DETACH_COPY_BYTES: usize = 256 * 1024;
/// Tokenising (roughly ten times slower per byte than parsing) releases the GIL
/// from this many bytes of item JSON up.
pub const DETACH_TOKENIZE_BYTES: usize = 2 * 1024;
/// Parsing and canonicalising JSON (roughly ten times slower per byte than copying)
/// releases the GIL from this size up.
pub const DETACH_PARSE_BYTES: usize = 16 * 1024;
