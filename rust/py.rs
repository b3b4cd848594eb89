//! PyO3 glue: argument conversion, calls into the domain modules, conversion of
//! results, and the one mapping from `crate::error::Error` to Python exceptions.
//! The domain modules (`item`, `node`, `view`, `cache`, `snapshot`) never import
//! pyo3; everything Python-facing lives under `py/`.

pub mod buffer;
pub mod cache;
pub mod errors;
pub mod items;
pub mod json;
