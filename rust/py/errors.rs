//! The Python exception tree, and the one place Rust errors become Python ones.
//!
//! The classes are created at import with `type(name, bases, namespace)` rather than
//! `create_exception!`, because several need two bases (`ResponseNotFound` is both a
//! `CacheError` and a `LookupError`, so callers can catch either).

use pyo3::exceptions::{PyException, PyLookupError, PyMemoryError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

const MODULE: &str = "warmsocket._core";

/// The exception classes, created once per process.
struct Tree {
    warmsocket: Py<PyType>,
    cache: Py<PyType>,
    not_found: Py<PyType>,
    owner_mismatch: Py<PyType>,
    duplicate: Py<PyType>,
    invalid_items: Py<PyType>,
    not_json: Py<PyType>,
    not_object: Py<PyType>,
    too_large: Py<PyType>,
    cache_full: Py<PyType>,
    snapshot: Py<PyType>,
}

static TREE: PyOnceLock<Tree> = PyOnceLock::new();

fn class<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: &[&Bound<'py, PyType>],
) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", MODULE)?;
    namespace.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    let class = py.get_type::<PyType>().call1((name, bases, namespace))?;
    Ok(class.cast_into::<PyType>()?.unbind())
}

fn tree(py: Python<'_>) -> PyResult<&Tree> {
    TREE.get_or_try_init(py, || {
        let exception = py.get_type::<PyException>();
        let lookup = py.get_type::<PyLookupError>();
        let value = py.get_type::<PyValueError>();
        let memory = py.get_type::<PyMemoryError>();
        let warmsocket = class(
            py,
            "WarmsocketError",
            "Base of warmsocket's errors.",
            &[&exception],
        )?;
        let ws = warmsocket.bind(py);
        let cache = class(py, "CacheError", "An error of the session cache.", &[ws])?;
        let c = cache.bind(py);
        let not_found = class(
            py,
            "ResponseNotFound",
            "No response with this id is visible to this owner and connection.",
            &[c, &lookup],
        )?;
        let owner_mismatch = class(
            py,
            "OwnerMismatch",
            "The response exists but belongs to another owner (same message as not found).",
            &[not_found.bind(py)],
        )?;
        let duplicate = class(
            py,
            "DuplicateResponseId",
            "A response with this id is already cached.",
            &[c, &value],
        )?;
        let invalid_items = class(
            py,
            "InvalidItems",
            "Items that cannot be cached.",
            &[c, &value],
        )?;
        let ii = invalid_items.bind(py);
        let not_json = class(
            py,
            "ItemNotJson",
            "Not UTF-8 JSON, or not a JSON array.",
            &[ii],
        )?;
        let not_object = class(
            py,
            "ItemNotObject",
            "An array element is not a JSON object.",
            &[ii],
        )?;
        let too_large = class(
            py,
            "ItemTooLarge",
            "One item is larger than max_item_bytes.",
            &[ii],
        )?;
        let cache_full = class(
            py,
            "CacheFull",
            "An entry larger than the cache's whole memory budget.",
            &[c, &memory],
        )?;
        let snapshot = class(
            py,
            "SnapshotError",
            "A snapshot that cannot be restored.",
            &[c, &value],
        )?;
        Ok(Tree {
            warmsocket,
            cache,
            not_found,
            owner_mismatch,
            duplicate,
            invalid_items,
            not_json,
            not_object,
            too_large,
            cache_full,
            snapshot,
        })
    })
}

/// `WarmsocketError`, the base of every exception the extension raises (the
/// tokenizer's exceptions derive from it too).
pub fn warmsocket_error(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    Ok(tree(py)?.warmsocket.bind(py).clone().into_any())
}

/// Add the exception classes to the module.
pub fn add_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let t = tree(py)?;
    for class in [
        &t.warmsocket,
        &t.cache,
        &t.not_found,
        &t.owner_mismatch,
        &t.duplicate,
        &t.invalid_items,
        &t.not_json,
        &t.not_object,
        &t.too_large,
        &t.cache_full,
        &t.snapshot,
    ] {
        let class = class.bind(py);
        m.add(class.name()?, class)?;
    }
    Ok(())
}

fn to_py(py: Python<'_>, err: Error) -> PyErr {
    let t = match tree(py) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let class = match &err {
        Error::NotFound { .. } => &t.not_found,
        Error::OwnerMismatch { .. } => &t.owner_mismatch,
        Error::DuplicateResponseId { .. } => &t.duplicate,
        Error::ItemNotJson { .. } => &t.not_json,
        Error::ItemNotObject { .. } => &t.not_object,
        Error::ItemTooLarge { .. } => &t.too_large,
        Error::CacheFull { .. } => &t.cache_full,
        Error::Snapshot { .. } => &t.snapshot,
        Error::InvalidArgument { .. } => return PyValueError::new_err(err.to_string()),
        Error::Token(e) => return crate::py::token::to_py_err(py, e.clone()),
    };
    PyErr::from_type(class.bind(py).clone(), err.to_string())
}

impl From<Error> for PyErr {
    #[cold]
    fn from(err: Error) -> PyErr {
        Python::attach(|py| to_py(py, err))
    }
}
