//! warmsocket's Rust core, exposed to Python as `warmsocket._core`.
//!
//! This file is a table of contents: domain logic lives in plain-Rust modules
//! that never import pyo3, and all conversion between Python and Rust lives in
//! `py.rs`.

pub mod blocks;
mod py;
pub mod token;

use pyo3::prelude::*;

/// The Python module `warmsocket._core`.
#[pymodule(gil_used = false)]
mod _core {
    use super::*;

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

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add(
            "BUILD_PROFILE",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        )?;
        // TokenizerError, UnknownEncoding, TokenizerFileUnreadable,
        // InvalidTokenizerFile, InvalidItemJson, TokenizationFailed.
        crate::py::token::add_exceptions(m)?;
        Ok(())
    }
}
