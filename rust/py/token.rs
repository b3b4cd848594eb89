//! Glue for `rust/token` and `rust/blocks`: `Tokenizer`, `BlockHasher`, the
//! block-hash functions and the tokenizer exceptions.
//!
//! Token ids cross as `array('I')` (built from bytes: two copies at memcpy
//! speed, never a Python int per token), hashes as `bytes` (8 bytes per block,
//! canonical XXH64 form); every call that grows with its input releases the GIL.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple, PyType};

use crate::blocks::{self, BlockHash, HASH_BYTES};
use crate::token::{self, TokenError};

// ---------------------------------------------------------------- exceptions

/// The tokenizer exception types, created once (they have stdlib co-bases,
/// which `create_exception!` cannot express).
struct Exceptions {
    base: Py<PyType>,
    unknown_encoding: Py<PyType>,
    file_unreadable: Py<PyType>,
    invalid_file: Py<PyType>,
    invalid_item: Py<PyType>,
    failed: Py<PyType>,
}

static EXCEPTIONS: PyOnceLock<Exceptions> = PyOnceLock::new();

fn exceptions(py: Python<'_>) -> PyResult<&Exceptions> {
    EXCEPTIONS.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let builtin = |name: &str| -> PyResult<Bound<'_, PyAny>> { builtins.getattr(name) };
        let new = |name: &str, bases: Vec<Bound<'_, PyAny>>, doc: &str| -> PyResult<Py<PyType>> {
            let namespace = PyDict::new(py);
            namespace.set_item("__module__", "warmsocket._core")?;
            namespace.set_item("__doc__", doc)?;
            let ty = py
                .get_type::<PyType>()
                .call1((name, PyTuple::new(py, bases)?, namespace))?;
            Ok(ty.cast_into::<PyType>()?.unbind())
        };
        let base = new(
            "TokenizerError",
            vec![crate::py::errors::warmsocket_error(py)?],
            "Base of the errors raised by Tokenizer.",
        )?;
        let sub = |name: &str, std: &str, doc: &str| {
            new(
                name,
                vec![base.bind(py).clone().into_any(), builtin(std)?],
                doc,
            )
        };
        Ok(Exceptions {
            unknown_encoding: sub(
                "UnknownEncoding",
                "LookupError",
                "Tokenizer.builtin() was given a name that is not a built-in encoding.",
            )?,
            file_unreadable: sub(
                "TokenizerFileUnreadable",
                "OSError",
                "The tokenizer.json file could not be read.",
            )?,
            invalid_file: sub(
                "InvalidTokenizerFile",
                "ValueError",
                "The data is not a valid Hugging Face tokenizer.json.",
            )?,
            invalid_item: sub(
                "InvalidItemJson",
                "ValueError",
                "Item JSON that is not UTF-8 JSON of an object.",
            )?,
            failed: sub(
                "TokenizationFailed",
                "ValueError",
                "The tokenizer failed on a text (a regex limit on pathological input).",
            )?,
            base,
        })
    })
}

/// Add the exception types to the module (called from the module init).
pub fn add_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let e = exceptions(m.py())?;
    for ty in [
        &e.base,
        &e.unknown_encoding,
        &e.file_unreadable,
        &e.invalid_file,
        &e.invalid_item,
        &e.failed,
    ] {
        let ty = ty.bind(m.py());
        m.add(ty.name()?, ty)?;
    }
    Ok(())
}

pub(crate) fn to_py_err(py: Python<'_>, err: TokenError) -> PyErr {
    let e = match exceptions(py) {
        Ok(e) => e,
        Err(failed) => return failed,
    };
    let ty = match err {
        TokenError::UnknownEncoding { .. } => &e.unknown_encoding,
        TokenError::TokenizerFileUnreadable { .. } => &e.file_unreadable,
        TokenError::InvalidTokenizerFile { .. } => &e.invalid_file,
        TokenError::InvalidItem { .. } => &e.invalid_item,
        TokenError::Encode { .. } => &e.failed,
    };
    PyErr::from_type(ty.bind(py).clone(), (err.to_string(),))
}

// Signatures spell the defaults as literals so Python's text signature shows
// them; they are `blocks::DEFAULT_BLOCK_SIZE` and `blocks::DEFAULT_SEED`.
const _: () = assert!(blocks::DEFAULT_BLOCK_SIZE == 16 && blocks::DEFAULT_SEED == 0);

fn block_size_err(err: blocks::BlockSizeError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

// ---------------------------------------------------------------- conversions

static ARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Token ids as `array('I')`.
pub(crate) fn token_array<'py>(py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyAny>> {
    let array = ARRAY.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        let array = py.import("array")?.getattr("array")?;
        // 'I' is C `unsigned int`: 4 bytes on every platform CPython supports.
        let itemsize: usize = array.call1(("I",))?.getattr("itemsize")?.extract()?;
        if itemsize != 4 {
            return Err(PyTypeError::new_err("array('I') is not 4 bytes wide here"));
        }
        Ok(array.unbind())
    })?;
    let array = array.bind(py);
    let bytes = PyBytes::new_with(py, ids.len() * 4, |buf| {
        for (chunk, id) in buf.chunks_exact_mut(4).zip(ids) {
            chunk.copy_from_slice(&id.to_ne_bytes());
        }
        Ok(())
    })?;
    array.call1(("I", bytes))
}

/// Token ids from a buffer of uint32 (`array('I')`, a numpy uint32 array, a
/// memoryview cast to 'I') or a sequence of ints.
fn token_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "token ids must be an array('I') or a sequence of ints, not bytes or str",
        ));
    }
    match PyBuffer::<u32>::get(obj) {
        Ok(buffer) => buffer.to_vec(obj.py()),
        Err(_) => obj.extract::<Vec<u32>>(),
    }
}

/// Item JSON given as `bytes` or `str`, borrowed.
fn json_arg<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    if let Ok(bytes) = obj.cast::<PyBytes>() {
        return Ok(bytes.as_bytes());
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(text.to_str()?.as_bytes());
    }
    Err(PyTypeError::new_err("item JSON must be bytes or str"))
}

pub(crate) fn hash_bytes<'py>(py: Python<'py>, hashes: &[BlockHash]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &blocks::hashes_to_bytes(hashes))
}

// ---------------------------------------------------------------- Tokenizer

/// A tokenizer: a built-in OpenAI encoding or a Hugging Face tokenizer.json.
#[pyclass(frozen, module = "warmsocket._core")]
pub struct Tokenizer {
    pub(crate) inner: Arc<token::Tokenizer>,
}

impl Tokenizer {
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&token::Tokenizer) -> Result<T, TokenError> + Send,
    ) -> PyResult<T> {
        let inner: &token::Tokenizer = &self.inner;
        py.detach(|| f(inner)).map_err(|e| to_py_err(py, e))
    }
}

#[pymethods]
impl Tokenizer {
    /// `"o200k_base"` or `"cl100k_base"`. Raises UnknownEncoding.
    ///
    /// The first use of an encoding in a process builds its rank table
    /// (about 0.2 s); later calls share it.
    #[staticmethod]
    fn builtin(py: Python<'_>, name: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| token::Tokenizer::builtin(name))
            .map_err(|e| to_py_err(py, e))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The encoding of a model by name (see `encoding_for_model`); `o200k_base` when unknown.
    #[staticmethod]
    fn for_model(py: Python<'_>, model: &str) -> Self {
        Self {
            inner: Arc::new(py.detach(|| token::Tokenizer::for_model(model))),
        }
    }

    /// A Hugging Face tokenizer from a local tokenizer.json.
    ///
    /// Truncation and padding set in the file are ignored. Raises
    /// TokenizerFileUnreadable, InvalidTokenizerFile.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .detach(|| token::Tokenizer::from_file(&path))
            .map_err(|e| to_py_err(py, e))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// A Hugging Face tokenizer from the contents of a tokenizer.json.
    ///
    /// Raises InvalidTokenizerFile.
    #[staticmethod]
    #[pyo3(signature = (data, *, name = "<tokenizer.json>"))]
    fn from_json(py: Python<'_>, data: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        let data = json_arg(data)?;
        let inner = py
            .detach(|| token::Tokenizer::from_json(data, name.to_owned()))
            .map_err(|e| to_py_err(py, e))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// `"o200k_base"`, `"cl100k_base"`, or the tokenizer.json path (or `name`).
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// The (start, sep, end) token ids that frame each rendered message.
    #[getter]
    fn framing(&self) -> (u32, u32, u32) {
        let f = self.inner.framing();
        (f.start, f.sep, f.end)
    }

    /// Number of tokens of `text`. Raises TokenizationFailed.
    fn count(&self, py: Python<'_>, text: &str) -> PyResult<usize> {
        self.run(py, |t| t.count(text))
    }

    /// Token ids of `text` as `array('I')`. Raises TokenizationFailed.
    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
        let ids = self.run(py, |t| t.encode(text))?;
        token_array(py, &ids)
    }

    /// Tokens of one Responses API item, framing included (docs/tokens.md).
    ///
    /// Raises InvalidItemJson, TokenizationFailed.
    fn count_item(&self, py: Python<'_>, item_json: &Bound<'_, PyAny>) -> PyResult<usize> {
        let json = json_arg(item_json)?;
        self.run(py, |t| t.count_item(json))
    }

    /// Token ids of one item, framing included: `start role sep content... end`.
    fn encode_item<'py>(
        &self,
        py: Python<'py>,
        item_json: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let json = json_arg(item_json)?;
        let ids = self.run(py, |t| t.encode_item(json))?;
        token_array(py, &ids)
    }

    /// Tokens of the instructions rendered as a `system` message, framing included.
    fn count_instructions(&self, py: Python<'_>, instructions: &str) -> PyResult<usize> {
        self.run(py, |t| t.count_instructions(instructions))
    }

    /// Tokens of a request's tools (a JSON array) rendered as one `system` message
    /// whose segments are the tools' JSON texts, framing included; 0 for no tools.
    ///
    /// Raises InvalidItemJson (not a JSON array), TokenizationFailed.
    fn count_tools(&self, py: Python<'_>, tools_json: &Bound<'_, PyAny>) -> PyResult<usize> {
        let json = json_arg(tools_json)?;
        self.run(py, |t| t.count_tools(json))
    }

    /// Token ids of the instructions rendered as a `system` message, framing included.
    fn encode_instructions<'py>(
        &self,
        py: Python<'py>,
        instructions: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = self.run(py, |t| t.encode_instructions(instructions))?;
        token_array(py, &ids)
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer({:?})", self.inner.name())
    }
}

/// The encoding name for a model, or None when the model is not in the table.
#[pyfunction]
pub fn encoding_for_model(model: &str) -> Option<&'static str> {
    token::known_encoding_for_model(model).map(token::Encoding::name)
}

// ---------------------------------------------------------------- blocks

/// The incremental block-hash state of a token sequence (immutable).
#[pyclass(frozen, module = "warmsocket._core")]
pub struct BlockHasher {
    inner: blocks::BlockHasher,
}

impl BlockHasher {
    fn extended<'py>(
        &self,
        py: Python<'py>,
        f: impl FnOnce(&mut blocks::BlockHasher, &mut Vec<BlockHash>) -> Result<(), TokenError> + Send,
    ) -> PyResult<(Self, Bound<'py, PyBytes>)> {
        let mut next = self.inner.clone();
        let mut hashes = Vec::new();
        py.detach(|| f(&mut next, &mut hashes))
            .map_err(|e| to_py_err(py, e))?;
        Ok((Self { inner: next }, hash_bytes(py, &hashes)))
    }
}

#[pymethods]
impl BlockHasher {
    #[new]
    #[pyo3(signature = (block_size = 16, *, seed = 0))]
    fn new(block_size: usize, seed: u64) -> PyResult<Self> {
        let inner = blocks::BlockHasher::new(block_size, seed).map_err(block_size_err)?;
        Ok(Self { inner })
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed()
    }

    /// Full blocks hashed so far.
    #[getter]
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }

    /// Tokens seen so far (full blocks and tail).
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens()
    }

    /// Tokens covered by full blocks (`blocks * block_size`).
    #[getter]
    fn block_tokens(&self) -> u64 {
        self.inner.block_tokens()
    }

    /// The tokens after the last full block.
    #[getter]
    fn tail<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        token_array(py, self.inner.tail())
    }

    /// The last full block's hash, or None before the first block is full.
    #[getter]
    fn last_hash<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner
            .last_hash()
            .map(|h| PyBytes::new(py, &h.to_be_bytes()))
    }

    /// The state after appending `tokens`, and the hashes of the blocks they complete.
    fn extend<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<(Self, Bound<'py, PyBytes>)> {
        let ids = token_ids(tokens)?;
        self.extended(py, |state, out| {
            state.extend(&ids, out);
            Ok(())
        })
    }

    /// `extend(tokenizer.encode_item(item_json))` in one call.
    ///
    /// The item's token count is `new.tokens - self.tokens`.
    fn extend_item<'py>(
        &self,
        py: Python<'py>,
        tokenizer: &Bound<'_, Tokenizer>,
        item_json: &Bound<'_, PyAny>,
    ) -> PyResult<(Self, Bound<'py, PyBytes>)> {
        let json = json_arg(item_json)?;
        let tokenizer: &token::Tokenizer = &tokenizer.get().inner;
        self.extended(py, |state, out| {
            state.extend(&tokenizer.encode_item(json)?, out);
            Ok(())
        })
    }

    /// `extend(tokenizer.encode_instructions(instructions))` in one call.
    fn extend_instructions<'py>(
        &self,
        py: Python<'py>,
        tokenizer: &Bound<'_, Tokenizer>,
        instructions: &str,
    ) -> PyResult<(Self, Bound<'py, PyBytes>)> {
        let tokenizer: &token::Tokenizer = &tokenizer.get().inner;
        self.extended(py, |state, out| {
            state.extend(&tokenizer.encode_instructions(instructions)?, out);
            Ok(())
        })
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<BlockHasher>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __repr__(&self) -> String {
        format!(
            "BlockHasher(block_size={}, seed={}, tokens={}, blocks={})",
            self.inner.block_size(),
            self.inner.seed(),
            self.inner.tokens(),
            self.inner.blocks()
        )
    }
}

/// Hashes of the full blocks of `tokens`, from scratch, as bytes.
#[pyfunction]
#[pyo3(signature = (tokens, block_size = 16, *, seed = 0))]
pub fn block_hashes<'py>(
    py: Python<'py>,
    tokens: &Bound<'_, PyAny>,
    block_size: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let ids = token_ids(tokens)?;
    let hashes = py
        .detach(|| blocks::block_hashes(&ids, block_size, seed))
        .map_err(block_size_err)?;
    Ok(hash_bytes(py, &hashes))
}

/// Number of equal leading block hashes of two hash buffers.
#[pyfunction]
pub fn shared_prefix_blocks(py: Python<'_>, a: &[u8], b: &[u8]) -> PyResult<usize> {
    py.detach(|| blocks::shared_prefix_blocks_in_bytes(a, b))
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "a and b must hold {HASH_BYTES}-byte block hashes, got {} and {} bytes",
                a.len(),
                b.len()
            ))
        })
}

/// Tokens covered by the equal leading block hashes of two hash buffers.
#[pyfunction]
#[pyo3(signature = (a, b, block_size = 16))]
pub fn shared_prefix_tokens(
    py: Python<'_>,
    a: &[u8],
    b: &[u8],
    block_size: usize,
) -> PyResult<usize> {
    if block_size == 0 {
        return Err(block_size_err(blocks::BlockSizeError { block_size }));
    }
    Ok(shared_prefix_blocks(py, a, b)?.saturating_mul(block_size))
}
