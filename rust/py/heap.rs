//! `rust_heap()`: the counts of `crate::heap`, for `/metrics` and the tests.

use std::time::Duration;

use pyo3::prelude::*;

/// How long `rust_heap(settle=True)` waits for the reaper thread at most.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What this library's Rust code holds on the heap now: `(bytes, blocks)`.
/// With `settle`, first wait (without the GIL) until what the cache handed to its
/// background thread to free is freed.
#[pyfunction]
#[pyo3(signature = (*, settle = false))]
pub fn rust_heap(py: Python<'_>, settle: bool) -> (usize, usize) {
    if settle {
        py.detach(|| crate::reaper::settle(SETTLE_TIMEOUT));
    }
    crate::heap::held()
}
