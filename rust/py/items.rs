//! `Items` and `ItemMeta`, and the conversion of any `ItemsLike` argument.

use std::sync::Arc;

use pyo3::exceptions::{PyIndexError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList, PyMemoryView, PyString};

use crate::error::Error;
use crate::item::{Item, Items};
use crate::py::buffer::bytes_with;
use crate::py::json::{item_to_py, to_value};
use crate::py::{detach_if, DETACH_PARSE_BYTES};
use serde_json::Value;

/// An immutable batch of validated items, each kept as canonical JSON bytes.
#[pyclass(name = "Items", module = "warmsocket._core", frozen)]
pub struct PyItems {
    pub inner: Items,
}

/// Parse JSON text (bytes or str) with the GIL released.
fn parse(py: Python<'_>, data: &Bound<'_, PyAny>, max_item_bytes: usize) -> PyResult<Items> {
    if let Ok(b) = data.cast::<PyBytes>() {
        let bytes = b.as_bytes();
        let parse = || Items::parse(bytes, max_item_bytes);
        return Ok(detach_if(py, bytes.len(), DETACH_PARSE_BYTES, parse)?);
    }
    if let Ok(s) = data.cast::<PyString>() {
        let text = s.to_str()?;
        let parse = || Items::parse(text.as_bytes(), max_item_bytes);
        return Ok(detach_if(py, text.len(), DETACH_PARSE_BYTES, parse)?);
    }
    Err(PyTypeError::new_err(
        "expected bytes or str holding a JSON array",
    ))
}

/// Build a batch from a sequence of mappings.
fn from_objects(items: &Bound<'_, PyAny>, max_item_bytes: usize) -> PyResult<Items> {
    let values = values_from_objects(items)?;
    // Walking the Python objects needs the GIL and costs more than canonicalising
    // the result, so releasing it for the second half would gain little.
    Ok(Items::from_values(&values, max_item_bytes)?)
}

/// What a client sent, decoded but not validated: the JSON values of the items.
pub enum Sent {
    /// Already validated items.
    Items(Items),
    /// Decoded values, one per item.
    Values(Vec<Value>),
}

/// Decode any `ItemsLike` argument without validating the items (JSON text is
/// parsed with the GIL released when large).
pub fn sent_arg(py: Python<'_>, arg: &Bound<'_, PyAny>) -> PyResult<Sent> {
    if let Ok(items) = arg.cast::<PyItems>() {
        return Ok(Sent::Items(items.get().inner.clone()));
    }
    let text: Option<&[u8]> = if let Ok(b) = arg.cast::<PyBytes>() {
        Some(b.as_bytes())
    } else if let Ok(s) = arg.cast::<PyString>() {
        Some(s.to_str()?.as_bytes())
    } else {
        None
    };
    if let Some(text) = text {
        let parse = || crate::item::parse_values(text);
        return Ok(Sent::Values(detach_if(
            py,
            text.len(),
            DETACH_PARSE_BYTES,
            parse,
        )?));
    }
    Ok(Sent::Values(values_from_objects(arg)?))
}

/// The JSON values of a sequence of mappings.
fn values_from_objects(items: &Bound<'_, PyAny>) -> PyResult<Vec<Value>> {
    if items.is_instance_of::<PyByteArray>() || items.is_instance_of::<PyMemoryView>() {
        // (Iterated, its bytes would read as numbers: "Item 0 is a JSON number".)
        return Err(PyTypeError::new_err(
            "items as JSON text are bytes or str: pass bytes(buffer) for a bytearray \
             or memoryview",
        ));
    }
    if items.is_instance_of::<PyString>()
        || items.is_instance_of::<PyBytes>()
        || items.is_instance_of::<pyo3::types::PyDict>()
    {
        return Err(PyTypeError::new_err("expected a sequence of mappings"));
    }
    let iter = items
        .try_iter()
        .map_err(|_| PyTypeError::new_err("expected a sequence of mappings"))?;
    let mut values = Vec::new();
    for (index, obj) in iter.enumerate() {
        let value = to_value(&obj?, 1).map_err(|detail| Error::ItemNotJson {
            index: Some(index),
            detail,
        })?;
        values.push(value);
    }
    Ok(values)
}

/// Any `ItemsLike` argument (`None` = no items).
pub fn items_arg(
    py: Python<'_>,
    arg: Option<&Bound<'_, PyAny>>,
    max_item_bytes: usize,
) -> PyResult<Items> {
    let Some(arg) = arg else {
        return Ok(Items::default());
    };
    if let Ok(items) = arg.cast::<PyItems>() {
        return Ok(items.get().inner.clone());
    }
    if arg.is_instance_of::<PyBytes>() || arg.is_instance_of::<PyString>() {
        return parse(py, arg, max_item_bytes);
    }
    from_objects(arg, max_item_bytes)
}

/// The runtime value of the stub's `ItemsLike` alias:
/// `Items | bytes | str | Sequence[Mapping[str, Any]]`.
pub fn items_like(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let abc = py.import("collections.abc")?;
    let any = py.import("typing")?.getattr("Any")?;
    let mapping = abc
        .getattr("Mapping")?
        .get_item((py.get_type::<PyString>(), any))?;
    let sequence = abc.getattr("Sequence")?.get_item(mapping)?;
    py.get_type::<PyItems>()
        .into_any()
        .bitor(py.get_type::<PyBytes>())?
        .bitor(py.get_type::<PyString>())?
        .bitor(sequence)
}

fn index(len: usize, i: isize) -> PyResult<usize> {
    let j = if i < 0 { i + len as isize } else { i };
    if j < 0 || j as usize >= len {
        return Err(PyIndexError::new_err("item index out of range"));
    }
    Ok(j as usize)
}

/// A new bytes object holding `items` as one JSON array.
pub fn items_json<'py>(py: Python<'py>, items: &Items) -> PyResult<Bound<'py, PyBytes>> {
    let len = crate::item::array_len(items.len() as u64, items.nbytes()) as usize;
    bytes_with(py, len, |sink| {
        crate::item::write_array(items.iter().map(|i| i.json()), |c| sink.write(c))
    })
}

#[pymethods]
impl PyItems {
    /// Validate a JSON array of objects, each nested at most 100 levels (the item is
    /// level 1). Raises ItemNotJson, ItemNotObject, ItemTooLarge.
    #[staticmethod]
    #[pyo3(signature = (data, *, max_item_bytes = 33554432))]
    fn parse(py: Python<'_>, data: &Bound<'_, PyAny>, max_item_bytes: usize) -> PyResult<PyItems> {
        Ok(PyItems {
            inner: parse(py, data, max_item_bytes)?,
        })
    }

    /// Build a batch from Python dicts, with the same canonical form as `parse`.
    ///
    /// Keys must be str; values str, int (64-bit), finite float, bool, None, list,
    /// tuple or mapping, nested at most 100 levels. Anything else raises ItemNotJson;
    /// a non-mapping element raises ItemNotObject.
    #[staticmethod]
    #[pyo3(signature = (items, *, max_item_bytes = 33554432))]
    fn from_objects(items: &Bound<'_, PyAny>, max_item_bytes: usize) -> PyResult<PyItems> {
        Ok(PyItems {
            inner: from_objects(items, max_item_bytes)?,
        })
    }

    /// Number of items.
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Total canonical JSON bytes of the items (without array brackets and commas).
    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.nbytes()
    }

    /// Tokens of the items when a tokenising cache built them (`SessionCache.items`),
    /// else 0.
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens()
    }

    /// The batch as one JSON array.
    fn json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        items_json(py, &self.inner)
    }

    /// The items decoded to Python dicts.
    fn to_objects<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for item in self.inner.iter() {
            list.append(item_to_py(py, item.json())?)?;
        }
        Ok(list)
    }

    /// One item's canonical JSON (negative indexes count from the end). Raises IndexError.
    fn item_json<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyBytes>> {
        let i = self::index(self.inner.len(), index)?;
        Ok(PyBytes::new(py, self.inner.as_slice()[i].json()))
    }

    /// One item's extracted fields. Raises IndexError.
    fn item_meta(&self, index: isize) -> PyResult<PyItemMeta> {
        let i = self::index(self.inner.len(), index)?;
        Ok(PyItemMeta {
            item: self.inner.as_slice()[i].clone(),
            tokens: self.inner.token_counts().map(|c| c[i]),
        })
    }

    /// Each item's `id` (None where it has none), in order, without converting
    /// the items.
    fn ids(&self) -> Vec<Option<&str>> {
        self.inner.iter().map(|item| item.id()).collect()
    }

    /// The first item `id` (in order) an earlier item has too, or that `taken`
    /// holds; None when there is none. Empty ids are not ids.
    #[pyo3(signature = (taken = None))]
    fn first_duplicate_id(
        &self,
        taken: Option<&Bound<'_, pyo3::types::PySet>>,
    ) -> PyResult<Option<String>> {
        let mut failed = None;
        let found = self.inner.first_duplicate_id(|id| match taken {
            None => false,
            Some(set) => set.contains(id).unwrap_or_else(|err| {
                failed.get_or_insert(err);
                false
            }),
        });
        match failed {
            Some(err) => Err(err),
            None => Ok(found.map(str::to_owned)),
        }
    }

    /// The index of the last item whose `type` is `kind` (`message` for an item with a
    /// `role` and no `type`), None when there is none. O(items after it).
    fn last_of_type(&self, kind: &str) -> Option<usize> {
        self.inner.iter().rposition(|item| item.kind() == kind)
    }

    /// The items `start` to `end` (the end when None), sharing this batch: no copy.
    /// IndexError outside the items.
    #[pyo3(signature = (start, end = None))]
    fn slice(&self, start: i64, end: Option<i64>) -> PyResult<PyItems> {
        let len = self.inner.len();
        // (Signed, so that a negative bound is the IndexError the stub promises.)
        let bound = |b: i64| usize::try_from(b).ok();
        let range = match (bound(start), end.map_or(Some(len), bound)) {
            (Some(s), Some(e)) if s <= e && e <= len => s..e,
            _ => {
                let end = end.map_or_else(|| len.to_string(), |e| e.to_string());
                return Err(PyIndexError::new_err(format!(
                    "slice {start}..{end} is outside the {len} items"
                )));
            }
        };
        Ok(PyItems {
            inner: self.inner.slice(range),
        })
    }

    /// This batch's items followed by `other`'s (the items are shared, not copied).
    fn concat(&self, other: &PyItems) -> PyItems {
        PyItems {
            inner: self.inner.concat(&other.inner),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<Items: {} items, {} bytes>",
            self.inner.len(),
            self.inner.nbytes()
        )
    }
}

/// The few fields the server needs, extracted from one item once.
#[pyclass(name = "ItemMeta", module = "warmsocket._core", frozen)]
pub struct PyItemMeta {
    item: Arc<Item>,
    tokens: Option<u32>,
}

#[pymethods]
impl PyItemMeta {
    /// The item's `type`; `"message"` when absent but `role` is present, else `""`.
    #[getter]
    fn r#type(&self) -> &str {
        self.item.kind()
    }
    /// The item's `id` when it is a string.
    #[getter]
    fn id(&self) -> Option<&str> {
        self.item.id()
    }
    /// The item's `role` when it is a string.
    #[getter]
    fn role(&self) -> Option<&str> {
        self.item.role()
    }
    /// The item's `call_id` when it is a string.
    #[getter]
    fn call_id(&self) -> Option<&str> {
        self.item.call_id()
    }
    /// The item's `name` when it is a string.
    #[getter]
    fn name(&self) -> Option<&str> {
        self.item.name()
    }
    /// Size of the item's canonical JSON.
    #[getter]
    fn nbytes(&self) -> usize {
        self.item.nbytes()
    }
    /// The item's tokens, framing included, when a tokenising cache built its batch.
    #[getter]
    fn tokens(&self) -> Option<u32> {
        self.tokens
    }
    /// The item's semantic digest (16 bytes): XXH3-128 of its canonical JSON with
    /// the differences that do not change its meaning normalised away (top-level `id`,
    /// `status` and null members; an easy message's missing `type`; a lone
    /// `input_text`/`output_text` part vs a string; empty `annotations`/`logprobs`).
    /// Re-sent histories are matched by it (docs/architecture.md).
    #[getter]
    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.item.digest().to_be_bytes())
    }

    fn __repr__(&self) -> String {
        format!(
            "<ItemMeta type={:?} nbytes={}>",
            self.item.kind(),
            self.item.nbytes()
        )
    }
}
