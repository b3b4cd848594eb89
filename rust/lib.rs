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

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
