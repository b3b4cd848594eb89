//! `SessionCache`, `ResponseInfo`, `CacheStats`, `ContextView` and `Binding`.
//!
//! Each method converts its arguments, makes one call into `crate::cache` (whose lock
//! is held only inside that call, never while Python runs), and converts the result.
//! Work that grows with the input (parsing items, materialising a context, snapshots)
//! runs with the GIL released.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::cache::{self, CacheOptions, NewResponse, Parent, ResponseInfo, Stats};
use crate::error::Error;
use crate::item::{semantic_digest, Items};
use crate::node::TokenConfig;
use crate::py::buffer::bytes_with;
use crate::py::items::{items_arg, sent_arg, PyItems, Sent};
use crate::py::json::item_to_py;
use crate::py::token::{hash_bytes, to_py_err, token_array, Tokenizer};
use crate::py::{detach_if, DETACH_TOKENIZE_BYTES};
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
    #[pyo3(signature = (
        memory_budget = 1073741824, *, max_item_bytes = 33554432, tokenizer = None,
        block_size = 16, seed = 0, keep_token_ids = false, prefix_index = false,
    ))]
    fn new(
        memory_budget: u64,
        max_item_bytes: usize,
        tokenizer: Option<&Tokenizer>,
        block_size: usize,
        seed: u64,
        keep_token_ids: bool,
        prefix_index: bool,
    ) -> PyResult<Self> {
        let tokens = match tokenizer {
            None => None,
            Some(t) => Some(
                TokenConfig::new(t.inner.clone(), block_size, seed, keep_token_ids)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?,
            ),
        };
        Ok(PySessionCache {
            inner: cache::SessionCache::with_options(CacheOptions {
                memory_budget,
                max_item_bytes,
                tokens,
                prefix_index,
            }),
        })
    }

    #[getter]
    fn tokenizer(&self) -> Option<Tokenizer> {
        self.inner.token_config().map(|cfg| Tokenizer {
            inner: cfg.tokenizer.clone(),
        })
    }

    #[getter]
    fn block_size(&self) -> Option<usize> {
        self.inner.token_config().map(|cfg| cfg.block_size)
    }

    #[getter]
    fn seed(&self) -> Option<u64> {
        self.inner.token_config().map(|cfg| cfg.seed)
    }

    #[getter]
    fn keep_token_ids(&self) -> bool {
        self.inner.token_config().is_some_and(|cfg| cfg.keep_ids)
    }

    #[getter]
    fn prefix_index(&self) -> bool {
        self.inner.prefix_index()
    }

    /// Validate items and, with a tokenizer, count their tokens (ids kept until they
    /// enter a chain, so `create` hashes them without tokenising again). Raises the
    /// InvalidItems subclasses, TokenizationFailed.
    fn items(&self, py: Python<'_>, items: &Bound<'_, PyAny>) -> PyResult<PyItems> {
        let items = items_arg(py, Some(items), self.inner.max_item_bytes())?;
        items.check_item_limit(self.inner.max_item_bytes())?;
        let size = items.nbytes() as usize;
        let inner = &self.inner;
        let items = detach_if(py, size, DETACH_TOKENIZE_BYTES, || inner.items(items))?;
        Ok(PyItems { inner: items })
    }

    /// Match a re-sent history against the cached chains of `owner` (stored ones,
    /// and those local to `connection`) by the items' semantic digests.
    ///
    /// Finds the longest cached prefix in O(items sent) hashing and O(log items)
    /// index lookups; only the unmatched suffix is validated and tokenised
    /// (`PrefixMatch.new_items`). With `tokenize=False` the suffix is validated only
    /// (`items` tokenises it later; `create` does, at the latest). Without
    /// `prefix_index` nothing ever matches. Raises the InvalidItems subclasses for
    /// the suffix, TokenizationFailed.
    #[pyo3(signature = (input, *, owner, connection = None, tokenize = true))]
    fn r#match(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        owner: &str,
        connection: Option<u64>,
        tokenize: bool,
    ) -> PyResult<PyPrefixMatch> {
        let sent = sent_arg(py, input)?;
        let (weight, total) = match &sent {
            Sent::Items(items) => (items.nbytes() as usize, items.len()),
            // Decoded values: no size at hand (one may be megabytes), so the GIL is
            // released whatever their count.
            Sent::Values(values) => (usize::MAX, values.len()),
        };
        let inner = &self.inner;
        let owner = owner.to_owned();
        let work = move || -> Result<(cache::PrefixMatch, Items), Error> {
            let max = inner.max_item_bytes();
            match sent {
                Sent::Items(items) => {
                    let digests: Vec<u128> = items.iter().map(|i| i.digest()).collect();
                    let m = inner.match_prefix(&owner, connection, &digests)?;
                    let rest = items.slice(m.items..items.len());
                    rest.check_item_limit(max)?;
                    let rest = if tokenize { inner.items(rest)? } else { rest };
                    Ok((m, rest))
                }
                Sent::Values(values) => {
                    let mut buf = Vec::new();
                    let digests: Vec<u128> = values
                        .iter()
                        .map_while(|v| semantic_digest(v, &mut buf))
                        .collect();
                    let m = inner.match_prefix(&owner, connection, &digests)?;
                    let rest = Items::from_values_at(&values[m.items..], m.items, max)?;
                    let rest = if tokenize { inner.items(rest)? } else { rest };
                    Ok((m, rest))
                }
            }
        };
        let (m, rest) = detach_if(py, weight, DETACH_TOKENIZE_BYTES, work)?;
        let tokens = m
            .binding
            .as_ref()
            .and_then(|b| b.node().ok())
            .map_or(0, |n| n.tokens);
        let parent_id = m.binding.as_ref().map(|b| b.response_id().to_owned());
        let binding = match m.binding {
            None => None,
            Some(inner) => Some(Py::new(py, PyBinding { inner })?),
        };
        Ok(PyPrefixMatch {
            binding,
            items: m.items,
            tokens,
            sent: total,
            parent_id,
            new_items: rest,
        })
    }

    /// The input the client sent for a response: its own input items, preceded by
    /// its parent's whole context when the parent was found by `match` (the client
    /// re-sent that history; listed as cached, i.e. the first form seen).
    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn input_items(
        &self,
        response_id: &str,
        owner: &str,
        connection: Option<u64>,
    ) -> PyResult<PyItems> {
        Ok(PyItems {
            inner: self.inner.input_items(response_id, owner, connection)?,
        })
    }

    /// Bytes the LRU eviction keeps the cache under (see `CacheStats.bytes`).
    #[getter]
    fn memory_budget(&self) -> u64 {
        self.inner.memory_budget()
    }

    /// The largest item accepted, as canonical JSON.
    #[getter]
    fn max_item_bytes(&self) -> usize {
        self.inner.max_item_bytes()
    }

    /// A new connection id for connection-local entries.
    fn open_connection(&self) -> u64 {
        self.inner.open_connection()
    }

    /// Remove every entry local to the connection and release its bindings.
    ///
    /// Entries local to it include stored (`store=True`) descendants of its
    /// `store=False` responses. Returns the number of entries removed. Unknown ids
    /// are a no-op.
    fn close_connection(&self, py: Python<'_>, connection: u64) -> usize {
        // Frees the connection's chains: that grows with their size.
        py.detach(|| self.inner.close_connection(connection))
    }

    /// Add a response whose own items are `input` followed by `output`.
    ///
    /// `settings` and `meta` are the caller's bytes, kept and snapshotted as they
    /// are (warmsocket's server gives JSON objects; they are not parsed here).
    /// `previous_response_id` is a parent id (looked up like `get`) or a Binding of
    /// this cache (which must be visible from `connection`, like a lookup; one of
    /// another cache is a ValueError). `store=False`
    /// requires an open `connection` (ValueError otherwise). Raises ResponseNotFound /
    /// OwnerMismatch for the parent, DuplicateResponseId, InvalidItems subclasses,
    /// CacheFull. On any error the cache is unchanged (except the miss counter of a
    /// failed parent lookup). May evict least-recently-used entries to fit.
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
        let mut parent_id: Option<&str> = None;
        let mut parent_binding: Option<Arc<cache::Binding>> = None;
        if let Some(p) = previous_response_id {
            if let Ok(b) = p.cast::<PyBinding>() {
                parent_binding = Some(b.get().inner.clone());
            } else if let Ok(s) = p.cast::<PyString>() {
                parent_id = Some(s.to_str()?);
            } else {
                return Err(PyTypeError::new_err(
                    "previous_response_id must be a str, a Binding or None",
                ));
            }
        }
        // Tokenising the new items is the part that grows with them.
        let size = if self.inner.token_config().is_some() {
            (input.nbytes() + output.nbytes()) as usize
        } else {
            0
        };
        let inner = &self.inner;
        let create = || {
            let parent = match (&parent_binding, parent_id) {
                (Some(b), _) => Parent::Binding(b),
                (None, Some(id)) => Parent::Id(id),
                (None, None) => Parent::None,
            };
            inner.create(NewResponse {
                id: response_id,
                owner,
                input,
                output,
                parent,
                settings,
                meta,
                store,
                connection,
            })
        };
        let info = detach_if(py, size, DETACH_TOKENIZE_BYTES, create)?;
        Ok(PyResponseInfo { inner: info })
    }

    /// Look up a response: stored entries of `owner`, plus entries local to `connection`.
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

    /// Look up a response like `get` and pin it (see `Binding`).
    #[pyo3(signature = (response_id, *, owner, connection = None))]
    fn bind(&self, response_id: &str, owner: &str, connection: Option<u64>) -> PyResult<PyBinding> {
        Ok(PyBinding {
            inner: self.inner.bind(response_id, owner, connection)?,
        })
    }

    /// The context of `response_id` followed by `extra`; None gives just `extra`.
    ///
    /// `extra` is tokenised now (with a tokenizer) unless `tokenize` is false, as in
    /// `Binding.view`.
    #[pyo3(signature = (response_id, *, owner, connection = None, extra = None, tokenize = true))]
    #[allow(clippy::too_many_arguments)]
    fn view(
        &self,
        py: Python<'_>,
        response_id: Option<&str>,
        owner: &str,
        connection: Option<u64>,
        extra: Option<&PyItems>,
        tokenize: bool,
    ) -> PyResult<PyContextView> {
        let extra = extra.map(|e| e.inner.clone());
        let inner = &self.inner;
        let view = detach_if(
            py,
            extra_work(&extra, tokenize),
            DETACH_TOKENIZE_BYTES,
            || inner.view_with(response_id, owner, connection, extra, tokenize),
        )?;
        Ok(PyContextView { inner: view })
    }

    /// The full context of a response as one JSON array (`view(...).json()`).
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

    /// The full context of a response decoded to Python dicts.
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

    /// This response's own (input, output) items.
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

    /// Remove a connection-local entry of `connection` (the failed-continuation rule).
    ///
    /// Stored entries are left alone (they stay loadable). Descendants keep their
    /// context. Returns whether an entry was removed.
    #[pyo3(signature = (response_id, *, owner, connection))]
    fn evict(&self, response_id: &str, owner: &str, connection: u64) -> bool {
        self.inner.evict(response_id, owner, connection)
    }

    /// Remove a stored entry (HTTP DELETE). Descendants keep their context.
    ///
    /// Returns whether an entry was removed (False for another owner's entry).
    #[pyo3(signature = (response_id, *, owner))]
    fn delete(&self, response_id: &str, owner: &str) -> bool {
        self.inner.delete(response_id, owner)
    }

    /// The ids evicted for the memory budget since the last call (the first
    /// 4,096; deletes and closed connections are not evictions), so that copies kept
    /// beside the cache can go too.
    fn take_evicted(&self) -> Vec<String> {
        self.inner
            .take_evicted()
            .iter()
            .map(|id| id.to_string())
            .collect()
    }

    /// `(owner, response id)` of every stored entry (not local to a connection), in
    /// no order.
    fn stored_ids(&self, py: Python<'_>) -> Vec<(String, String)> {
        py.detach(|| {
            self.inner
                .stored_ids()
                .iter()
                .map(|(owner, id)| (owner.to_string(), id.to_string()))
                .collect()
        })
    }

    /// Evict for the memory budget now, as the next `create` would, and return how
    /// many entries went. The cache may be over its budget: a new response's parent
    /// is never evicted to make room for it, nor an entry a `Binding` pins, and
    /// nothing is evicted when those are released (e.g. before a `snapshot` that a
    /// cache with the same budget must restore whole).
    fn apply_budget(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.apply_budget())
    }

    /// Drop the prefix index's positions of removed responses now, with the memory
    /// they keep. The index does so by itself once they pass a quarter of its live
    /// positions plus 4,096 (amortised); this is for a count of the heap with no
    /// slack in it (the steady-state test).
    fn sweep_prefix_index(&self, py: Python<'_>) {
        py.detach(|| self.inner.sweep_prefix_index());
    }

    /// The cache's counters now.
    fn stats(&self) -> PyCacheStats {
        PyCacheStats {
            inner: self.inner.stats(),
        }
    }

    /// The stored entries (and the nodes their chains need) as msgpack bytes.
    fn snapshot<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let data = py.detach(|| snapshot::snapshot(&self.inner));
        PyBytes::new(py, &data)
    }

    /// Add the entries of a snapshot, skipping ids already present. Returns entries added.
    ///
    /// Everything is validated first (items against this cache's `max_item_bytes`);
    /// bad data raises SnapshotError and changes nothing. The memory budget applies
    /// afterwards, as for `create`.
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

/// The bytes a view's `extra` items make it tokenise (0 when it does not): that work
/// grows with them, so past a size it runs without the GIL.
fn extra_work(extra: &Option<Items>, tokenize: bool) -> usize {
    match extra {
        Some(items) if tokenize => items.nbytes() as usize,
        _ => 0,
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
    /// The `previous_response_id` the response was created with: the parent's id,
    /// or None for a root and for a response whose parent was found by prefix matching
    /// (`SessionCache.match`; the client sent none).
    #[getter]
    fn previous_response_id(&self) -> Option<&str> {
        self.inner.previous_response_id.as_deref()
    }
    /// The id of the node this response continues, also when it was found by
    /// prefix matching (then it may be `<id>#<n>`: the first n own items of `<id>`).
    /// The parent may have left the index since.
    #[getter]
    fn parent_id(&self) -> Option<&str> {
        self.inner.parent_id.as_deref()
    }
    #[getter]
    fn owner(&self) -> &str {
        &self.inner.owner
    }
    /// The `store` flag the response was created with.
    #[getter]
    fn store(&self) -> bool {
        self.inner.store
    }
    /// The connection whose lifetime bounds this entry, or None for a stored entry.
    ///
    /// An entry is connection-local when it was created with `store=False` or when any
    /// ancestor is connection-local (content sent with `store=false` never outlives
    /// its connection, even through a stored descendant).
    #[getter]
    fn connection(&self) -> Option<u64> {
        self.inner.connection
    }
    /// Number of responses in the chain, this one included.
    #[getter]
    fn depth(&self) -> u32 {
        self.inner.depth
    }
    /// Number of items in the full context (the whole chain).
    #[getter]
    fn items(&self) -> u64 {
        self.inner.items
    }
    /// Size of the full context as one JSON array, in bytes.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }
    /// Tokens of the full context (0 without a tokenizer): each item tokenised once,
    /// when it entered the cache, framing included (docs/tokens.md).
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens
    }
    /// Items this response was sent (its own, not its ancestors').
    #[getter]
    fn input_items(&self) -> usize {
        self.inner.input_items
    }
    /// Items this response produced.
    #[getter]
    fn output_items(&self) -> usize {
        self.inner.output_items
    }
    /// The bytes the response was created with as `settings` (as given).
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.settings)
    }
    /// The bytes the response was created with as `meta` (as given).
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
    /// Responses addressable by id.
    #[getter]
    fn entries(&self) -> u64 {
        self.inner.entries
    }
    /// Entries visible from any connection of their owner.
    #[getter]
    fn stored_entries(&self) -> u64 {
        self.inner.stored_entries
    }
    /// Entries bound to a connection (`store=False`, or descendants of one).
    #[getter]
    fn local_entries(&self) -> u64 {
        self.inner.local_entries
    }
    /// Estimated bytes held by live nodes: entries, the ancestors they need, and
    /// chains still held by bindings and views. Own item bytes, settings and meta,
    /// plus a fixed overhead per item and per node; settings shared with the parent
    /// are counted once.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }
    /// The budget the LRU eviction keeps `bytes` under (pins permitting).
    #[getter]
    fn memory_budget(&self) -> u64 {
        self.inner.memory_budget
    }
    /// Lookups (get, bind, view, context, create's parent) that found their entry.
    #[getter]
    fn hits(&self) -> u64 {
        self.inner.hits
    }
    /// Lookups that found nothing (including owner mismatches).
    #[getter]
    fn misses(&self) -> u64 {
        self.inner.misses
    }
    /// Entries removed by the memory budget (not by evict/delete/close).
    #[getter]
    fn evictions(&self) -> u64 {
        self.inner.evictions
    }
    /// Open connections.
    #[getter]
    fn connections(&self) -> u64 {
        self.inner.connections
    }
    /// Entries with at least one live Binding.
    #[getter]
    fn pinned(&self) -> u64 {
        self.inner.pinned
    }

    /// All the counters by name.
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
    /// Number of items in the view.
    #[getter]
    fn items(&self) -> u64 {
        self.inner.items()
    }
    /// Size of `json()` in bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.nbytes()
    }
    /// Tokens of the view (0 without a tokenizer): a sum of cached counts, O(1).
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens()
    }

    /// The `call_id` of the first `function_call_output` among the view's new items
    /// that answers no `function_call` before it in the context (None when all do).
    /// Walks back from the end until every new output is matched, not the whole
    /// context.
    fn unanswered_call_output(&self) -> Option<String> {
        self.inner.unanswered_call_output()
    }

    /// The whole context as one JSON array: one allocation, one copy of each item.
    ///
    /// Results of 256 KiB or more are copied with the GIL released.
    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        view_json(py, &self.inner)
    }

    /// The bytes of `json()` between the first `start` items (with the `[` before
    /// them) and the closing `]`: `json()` less its `]` is `b"[" + json_from(0)`, and
    /// appending `json_from(k)` to that part of a view whose items are this view's
    /// first `k` gives this view's. ValueError when `start` is past the last item.
    fn json_from<'py>(&self, py: Python<'py>, start: i64) -> PyResult<Bound<'py, PyBytes>> {
        // (Signed, so that a negative start is the ValueError the stub promises.)
        let part = u64::try_from(start)
            .ok()
            .and_then(|start| self.inner.json_from(start));
        let Some((len, part)) = part else {
            return Err(PyValueError::new_err(format!(
                "start {start} is past the view's {} items",
                self.inner.items()
            )));
        };
        bytes_with(py, len, |sink| part.write(|c| sink.write(c)))
    }

    /// The items decoded to Python dicts, oldest first.
    fn objects<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        view_objects(py, &self.inner)
    }

    /// The context's token ids as `array('I')` (None without a tokenizer).
    ///
    /// Concatenated from the kept ids when the cache keeps them (`keep_token_ids`);
    /// otherwise every item is tokenised again (O(context)).
    fn token_ids<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let view = &self.inner;
        let ids = py
            .detach(|| view.token_ids())
            .map_err(|e| to_py_err(py, e))?;
        ids.map(|ids| token_array(py, &ids)).transpose()
    }

    /// Where `truncation: "auto"` cuts the context to at most `budget` tokens:
    /// `(head, start)`, to keep the first `head` items (the system and developer
    /// messages it starts with) and the items from `start` on, `start` being the
    /// earliest user message from which they fit (whole turns go: no tool output
    /// loses its call). `start == head` when nothing need go; None when not even the
    /// last user message onward fits. Items count their cached tokens, else
    /// `tokenizer`'s count, else four bytes a token.
    #[pyo3(signature = (budget, tokenizer=None))]
    fn truncation(
        &self,
        py: Python<'_>,
        budget: u64,
        tokenizer: Option<&Tokenizer>,
    ) -> PyResult<Option<(u64, u64)>> {
        let view = &self.inner;
        let tokenizer = tokenizer.map(|t| &*t.inner);
        py.detach(|| view.truncation(budget, tokenizer))
            .map_err(|e| to_py_err(py, e))
    }

    /// Tokens of the context counted from scratch with `tokenizer`: every item
    /// tokenised again, O(context) (what a server without token caching pays per
    /// turn; `tokens` is the cached count).
    fn count_tokens(&self, py: Python<'_>, tokenizer: &Tokenizer) -> PyResult<u64> {
        let (view, tokenizer) = (&self.inner, &tokenizer.inner);
        py.detach(|| view.count_tokens(tokenizer))
            .map_err(|e| to_py_err(py, e))
    }

    /// The block hashes of the context's tokens, 8 bytes per full block (None
    /// without a tokenizer): the chain's stored hashes, then those of the new items.
    /// The same as `block_hashes(self.token_ids(), block_size, seed=seed)`.
    fn block_hashes<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let view = &self.inner;
        let hashes = py
            .detach(|| view.block_hashes())
            .map_err(|e| to_py_err(py, e))?;
        Ok(hashes.map(|h| hash_bytes(py, &h)))
    }

    /// Tokens covered by the equal leading block hashes of two views; None unless
    /// both come from caches with the same tokenizer, block size and seed.
    /// O(shared blocks) plus hashing each view's new items.
    fn shared_prefix_tokens(&self, py: Python<'_>, other: &PyContextView) -> PyResult<Option<u64>> {
        let (a, b) = (&self.inner, &other.inner);
        let blocks = py
            .detach(|| a.shared_prefix_blocks(b))
            .map_err(|e| to_py_err(py, e))?;
        let block_size = a.token_config().map_or(0, |cfg| cfg.block_size);
        Ok(blocks.map(|n| (n * block_size) as u64))
    }

    /// JSON array from the last message with this role (inclusive) to the end.
    ///
    /// The whole context when there is no such message. Costs O(items returned).
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
    /// The bound response's id (`<id>#<n>` for a prefix of a response's items).
    #[getter]
    fn response_id(&self) -> &str {
        self.inner.response_id()
    }

    /// The bound response, as it was when bound.
    fn info(&self) -> PyResult<PyResponseInfo> {
        Ok(PyResponseInfo {
            inner: self.inner.info()?,
        })
    }

    /// The bound response's context followed by `extra`, which is tokenised now
    /// (with a tokenizer) unless `tokenize` is false: then the view's `tokens`
    /// leave `extra` out until a tokenised copy (`SessionCache.items`) replaces it.
    #[pyo3(signature = (extra = None, *, tokenize = true))]
    fn view(
        &self,
        py: Python<'_>,
        extra: Option<&PyItems>,
        tokenize: bool,
    ) -> PyResult<PyContextView> {
        let extra = extra.map(|e| e.inner.clone());
        let inner = &self.inner;
        let view = detach_if(
            py,
            extra_work(&extra, tokenize),
            DETACH_TOKENIZE_BYTES,
            || inner.view_with(extra, tokenize),
        )?;
        Ok(PyContextView { inner: view })
    }

    /// Made by `SessionCache.match`: a response created on it records no
    /// `previous_response_id`.
    #[getter]
    fn implicit(&self) -> bool {
        self.inner.is_implicit()
    }

    /// Drop the pin. Idempotent; also done when the binding is garbage-collected.
    fn release(&self) {
        self.inner.release();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Release the binding.
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

/// What `SessionCache.match` found for a re-sent history.
#[pyclass(name = "PrefixMatch", module = "warmsocket._core", frozen)]
pub struct PyPrefixMatch {
    binding: Option<Py<PyBinding>>,
    items: usize,
    tokens: u64,
    sent: usize,
    parent_id: Option<String>,
    new_items: Items,
}

#[pymethods]
impl PyPrefixMatch {
    /// Holds the node whose context is the matched prefix (pinning it when it is a
    /// cached response); pass it as `previous_response_id` to `create`, then release
    /// it. None when nothing matched. When the prefix ends inside a response's own
    /// items, the node is made on the spot and shares those items (`<id>#<n>`).
    #[getter]
    fn binding(&self, py: Python<'_>) -> Option<Py<PyBinding>> {
        self.binding.as_ref().map(|b| b.clone_ref(py))
    }
    /// Leading items of the input that matched.
    #[getter]
    fn items(&self) -> usize {
        self.items
    }
    /// Tokens of the matched prefix (0 without a tokenizer).
    #[getter]
    fn tokens(&self) -> u64 {
        self.tokens
    }
    /// Items of the input.
    #[getter]
    fn sent(&self) -> usize {
        self.sent
    }
    /// The binding's node id (None when nothing matched).
    #[getter]
    fn parent_id(&self) -> Option<&str> {
        self.parent_id.as_deref()
    }
    /// The input after the matched prefix: validated and, with a tokenizer, counted.
    #[getter]
    fn new_items(&self) -> PyItems {
        PyItems {
            inner: self.new_items.clone(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<PrefixMatch {} of {} items, {} tokens, parent {:?}>",
            self.items, self.sent, self.tokens, self.parent_id
        )
    }
}
