//! `rust_heap()`: the counts of `crate::heap`, for `/metrics` and the tests.

use pyo3::prelude::*;

/// What this library's Rust code holds on the heap now: `(bytes, blocks)`.
#[pyfunction]
pub fn rust_heap() -> (usize, usize) {
    crate::heap::held()
}
