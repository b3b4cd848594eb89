//! Writing a known number of bytes straight into a new Python `bytes` object, with
//! the GIL released while large outputs are copied.
//!
//! Performance notes: `PyBytes::new_with` zero-fills its buffer under the GIL before
//! handing it out, and building a `Vec` first costs a second full copy. Here the
//! object is allocated uninitialised (`PyBytes_FromStringAndSize(NULL, n)`, the
//! documented way to build a bytes object in place) and filled under `py.detach`:
//! no other code holds a reference to the object until we return it, so no Python
//! thread can observe it half-written. Page faults of a large fresh buffer are taken
//! with the GIL released too.
//!
//! Outputs under `DETACH_COPY_BYTES` are copied with the GIL held (see `detach_if`).
//! See `docs/architecture.md` for the numbers.

use pyo3::exceptions::PySystemError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::{ffi, Bound};

use crate::py::{detach_if, DETACH_COPY_BYTES};

/// A bounds-checked cursor over the uninitialised buffer of a new bytes object.
pub struct Sink {
    ptr: *mut u8,
    len: usize,
    pos: usize,
    overflow: bool,
}

// SAFETY: the buffer belongs to a bytes object that nothing else references while
// the sink exists; moving the cursor to the thread that runs `detach` is fine.
unsafe impl Send for Sink {}

impl Sink {
    /// Append `chunk`; bytes past the end are dropped (and reported by `bytes_with`).
    #[inline]
    pub fn write(&mut self, chunk: &[u8]) {
        let n = chunk.len();
        if n > self.len - self.pos {
            self.overflow = true;
            return;
        }
        // SAFETY: `pos + n <= len`, the buffer is `len` bytes long and writable, and
        // a fresh allocation cannot overlap `chunk`.
        unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), self.ptr.add(self.pos), n) };
        self.pos += n;
    }
}

/// A new `bytes` object of exactly `len` bytes, filled by `fill` (with the GIL
/// released when `len >= DETACH_COPY_BYTES`). `fill` must write exactly `len` bytes; anything else is a bug, reported
/// as `SystemError` (with the buffer zeroed) rather than exposing uninitialised memory.
pub fn bytes_with<'py, F>(py: Python<'py>, len: usize, fill: F) -> PyResult<Bound<'py, PyBytes>>
where
    F: FnOnce(&mut Sink) + Send,
{
    let size = isize::try_from(len).map_err(|_| PySystemError::new_err("result too large"))?;
    // SAFETY: a NULL source asks CPython for an uninitialised buffer of `size` bytes;
    // the result is a new reference or NULL with an exception set.
    let bytes = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), size))?
            .cast_into_unchecked::<PyBytes>()
    };
    // SAFETY: `bytes` is a bytes object, so this is its `len`-byte buffer.
    let ptr = unsafe { ffi::PyBytes_AsString(bytes.as_ptr()) }.cast::<u8>();
    let mut sink = Sink {
        ptr,
        len,
        pos: 0,
        overflow: false,
    };
    let sink = detach_if(py, len, DETACH_COPY_BYTES, move || {
        fill(&mut sink);
        sink
    });
    if sink.overflow || sink.pos != len {
        // SAFETY: as above; zero the whole buffer so nothing uninitialised escapes.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        return Err(PySystemError::new_err(
            "internal error: size mismatch while writing bytes",
        ));
    }
    Ok(bytes)
}
