//! `SessionCache`, `ResponseInfo`, `CacheStats`, `ContextView` and `Binding`.
//!
//! Each method converts its arguments, makes one call into `crate::cache` (whose lock
//! is held only inside that call, never while Python runs), and converts the result.
//! Work that grows with the input (parsing items, materialising a context, snapshots)
//! runs with the GIL released.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::cache::{self, NewResponse, Parent, ResponseInfo, Stats};
use crate::py::buffer::bytes_with;
use crate::py::items::{items_arg, PyItems};
use crate::py::json::item_to_py;
use crate::snapshot;
use crate::view::ContextView;

/// Response chains with structural sharing, scopes, owners and an LRU memory budget.
#[pyclass(name = "SessionCache", module = "warmsocket._core", frozen)]
pub struct PySessionCache {
    inner: cache::SessionCache,
}

#[pymethods]
impl PySessionCache {
    #[new]
    #[pyo3(signature = (memory_budget = 1073741824, *, max_item_bytes = 33554432))]
    fn new(memory_budget: u64, max_item_bytes: usize) -> Self {
        PySessionCache {
            inner: cache::SessionCache::new(memory_budget, max_item_bytes),
        }
    }

    #[getter]
    fn memory_budget(&self) -> u64 {
        self.inner.memory_budget()
    }

    #[getter]
    fn max_item_bytes(&self) -> usize {
        self.inner.max_item_bytes()
    }

    fn open_connection(&self) -> u64 {
        self.inner.open_connection()
    }

    fn close_connection(&self, py: Python<'_>, connection: u64) -> usize {
        // Frees the connection's chains: that grows with their size.
        py.detach(|| self.inner.close_connection(connection))
    }

    #[pyo3(signature = (
        response_id, *, owner, input = None, output = None, previous_response_id = None,
        settings = &b"{}"[..], meta = &b"{}"[..], store = true, connection = None,
    ))]
    #[pyo3(
        text_signature = "($self, response_id, *, owner, input=None, output=None, \
        previous_response_id=None, settings=b'{}', meta=b'{}', store=True, connection=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        py: Python<'_>,
        response_id: &str,
        owner: &str,
        input: Option<&Bound<'_, PyAny>>,
        output: Option<&Bound<'_, PyAny>>,
        previous_response_id: Option<&Bound<'_, PyAny>>,
        settings: &[u8],
        meta: &[u8],
        store: bool,
        connection: Option<u64>,
    ) -> PyResult<PyResponseInfo> {
        let max = self.inner.max_item_bytes();
        let input = items_arg(py, input, max)?;
        let output = items_arg(py, output, max)?;
        let parent = match previous_response_id {
            None => Parent::None,
            Some(p) => {
                if let Ok(b) = p.cast::<PyBinding>() {
                    Parent::Binding(&b.get().inner)
                } else if let Ok(s) = p.cast::<PyString>() {
                    Parent::Id(s.to_str()?)
                } else {
                    return Err(PyTypeError::new_err(
                        "previous_response_id must be a str, a Binding or None",
                    ));
                }
            }
        };
        let info = self.inner.create(NewResponse {
            id: response_id,
            owner,
            input,
            output,
            parent,
            settings,
            meta,
            store,
            connection,
        })?;
        Ok(PyResponseInfo { inner: info })
    }

    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn get(
        &self,
        response_id: &str,
        owner: &str,
        connection: Option<u64>,
    ) -> PyResult<PyResponseInfo> {
        Ok(PyResponseInfo {
            inner: self.inner.get(response_id, owner, connection)?,
        })
    }

    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn bind(&self, response_id: &str, owner: &str, connection: Option<u64>) -> PyResult<PyBinding> {
        Ok(PyBinding {
            inner: self.inner.bind(response_id, owner, connection)?,
        })
    }

    #[pyo3(signature = (response_id, *, owner, connection = None, extra = None))]
    fn view(
        &self,
        response_id: Option<&str>,
        owner: &str,
        connection: Option<u64>,
        extra: Option<&PyItems>,
    ) -> PyResult<PyContextView> {
        let extra = extra.map(|e| e.inner.clone());
        Ok(PyContextView {
            inner: self.inner.view(response_id, owner, connection, extra)?,
        })
    }

    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn context<'py>(
        &self,
        py: Python<'py>,
        response_id: &str,
        owner: &str,
        connection: Option<u64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let view = self
            .inner
            .view(Some(response_id), owner, connection, None)?;
        view_json(py, &view)
    }

    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn context_objects<'py>(
        &self,
        py: Python<'py>,
        response_id: &str,
        owner: &str,
        connection: Option<u64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let view = self
            .inner
            .view(Some(response_id), owner, connection, None)?;
        view_objects(py, &view)
    }

    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn own_items<'py>(
        &self,
        py: Python<'py>,
        response_id: &str,
        owner: &str,
        connection: Option<u64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let (input, output) = self.inner.own_items(response_id, owner, connection)?;
        PyTuple::new(py, [PyItems { inner: input }, PyItems { inner: output }])
    }

    #[pyo3(signature = (response_id, *, owner, connection))]
    fn evict(&self, response_id: &str, owner: &str, connection: u64) -> bool {
        self.inner.evict(response_id, owner, connection)
    }

    #[pyo3(signature = (response_id, *, owner))]
    fn delete(&self, response_id: &str, owner: &str) -> bool {
        self.inner.delete(response_id, owner)
    }

    fn stats(&self) -> PyCacheStats {
        PyCacheStats {
            inner: self.inner.stats(),
        }
    }

    fn snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let data = py.detach(|| snapshot::snapshot(&self.inner));
        PyBytes::new(py, &data)
    }

    fn restore(&self, py: Python<'_>, data: &[u8]) -> PyResult<usize> {
        Ok(py.detach(|| snapshot::restore(&self.inner, data))?)
    }

    fn __repr__(&self) -> String {
        let s = self.inner.stats();
        format!(
            "<SessionCache: {} entries, {} of {} bytes>",
            s.entries, s.bytes, s.memory_budget
        )
    }
}

fn view_json<'py>(py: Python<'py>, view: &ContextView) -> PyResult<Bound<'py, PyBytes>> {
    bytes_with(py, view.nbytes() as usize, |sink| {
        view.write_json(|c| sink.write(c))
    })
}

fn view_objects<'py>(py: Python<'py>, view: &ContextView) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    let mut result = Ok(());
    view.for_each_item(|item| {
        if result.is_ok() {
            result = item_to_py(py, item.json()).and_then(|obj| list.append(obj));
        }
    });
    result.map(|()| list)
}

/// What the cache knows about one cached response.
#[pyclass(name = "ResponseInfo", module = "warmsocket._core", frozen)]
pub struct PyResponseInfo {
    inner: ResponseInfo,
}

#[pymethods]
impl PyResponseInfo {
    #[getter]
    fn id(&self) -> &str {
        &self.inner.id
    }
    #[getter]
    fn previous_response_id(&self) -> Option<&str> {
        self.inner.previous_response_id.as_deref()
    }
    #[getter]
    fn owner(&self) -> &str {
        &self.inner.owner
    }
    #[getter]
    fn store(&self) -> bool {
        self.inner.store
    }
    #[getter]
    fn connection(&self) -> Option<u64> {
        self.inner.connection
    }
    #[getter]
    fn depth(&self) -> u32 {
        self.inner.depth
    }
    #[getter]
    fn items(&self) -> u64 {
        self.inner.items
    }
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens
    }
    #[getter]
    fn input_items(&self) -> usize {
        self.inner.input_items
    }
    #[getter]
    fn output_items(&self) -> usize {
        self.inner.output_items
    }
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.settings)
    }
    #[getter]
    fn meta<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.meta)
    }

    fn __repr__(&self) -> String {
        format!(
            "<ResponseInfo id={:?} depth={} items={} bytes={}>",
            &*self.inner.id, self.inner.depth, self.inner.items, self.inner.bytes
        )
    }
}

#[pyclass(name = "CacheStats", module = "warmsocket._core", frozen)]
pub struct PyCacheStats {
    inner: Stats,
}

#[pymethods]
impl PyCacheStats {
    #[getter]
    fn entries(&self) -> u64 {
        self.inner.entries
    }
    #[getter]
    fn stored_entries(&self) -> u64 {
        self.inner.stored_entries
    }
    #[getter]
    fn local_entries(&self) -> u64 {
        self.inner.local_entries
    }
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }
    #[getter]
    fn memory_budget(&self) -> u64 {
        self.inner.memory_budget
    }
    #[getter]
    fn hits(&self) -> u64 {
        self.inner.hits
    }
    #[getter]
    fn misses(&self) -> u64 {
        self.inner.misses
    }
    #[getter]
    fn evictions(&self) -> u64 {
        self.inner.evictions
    }
    #[getter]
    fn connections(&self) -> u64 {
        self.inner.connections
    }
    #[getter]
    fn pinned(&self) -> u64 {
        self.inner.pinned
    }

    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, value) in self.inner.fields() {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        let fields: Vec<String> = self
            .inner
            .fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("CacheStats({})", fields.join(", "))
    }
}

/// The full context of a chain (optionally followed by new items), frozen at creation.
#[pyclass(name = "ContextView", module = "warmsocket._core", frozen)]
pub struct PyContextView {
    inner: ContextView,
}

#[pymethods]
impl PyContextView {
    #[getter]
    fn items(&self) -> u64 {
        self.inner.items()
    }
    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.nbytes()
    }
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens()
    }

    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        view_json(py, &self.inner)
    }

    fn objects<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        view_objects(py, &self.inner)
    }

    #[pyo3(signature = (*, from_last_role = "user"))]
    fn tail<'py>(&self, py: Python<'py>, from_last_role: &str) -> PyResult<Bound<'py, PyBytes>> {
        let tail = self.inner.tail(from_last_role);
        bytes_with(py, tail.nbytes() as usize, |sink| {
            tail.write_json(|c| sink.write(c))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "<ContextView: {} items, {} bytes>",
            self.inner.items(),
            self.inner.nbytes()
        )
    }
}

/// A pin on one cached response, held while a request builds on it.
#[pyclass(name = "Binding", module = "warmsocket._core", frozen)]
pub struct PyBinding {
    inner: Arc<cache::Binding>,
}

#[pymethods]
impl PyBinding {
    #[getter]
    fn response_id(&self) -> &str {
        self.inner.response_id()
    }

    fn info(&self) -> PyResult<PyResponseInfo> {
        Ok(PyResponseInfo {
            inner: self.inner.info()?,
        })
    }

    #[pyo3(signature = (extra = None))]
    fn view(&self, extra: Option<&PyItems>) -> PyResult<PyContextView> {
        Ok(PyContextView {
            inner: self.inner.view(extra.map(|e| e.inner.clone()))?,
        })
    }

    fn release(&self) {
        self.inner.release();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, _exc_info: &Bound<'_, PyTuple>) {
        self.inner.release();
    }

    fn __repr__(&self) -> String {
        let state = if self.inner.is_released() {
            "released"
        } else {
            "held"
        };
        format!("<Binding {:?} {state}>", self.inner.response_id())
    }
}
