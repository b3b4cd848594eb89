//! The one error type of the Rust core, with the one place its messages are written.
//!
//! Messages say what is wrong and where (an item index, a size, a limit), never echo
//! conversation content, and never reveal whether a response id exists for another
//! owner or connection: `NotFound` and `OwnerMismatch` print the same text.
//! The PyO3 glue maps each variant to one Python exception (`py/errors.rs`).

use std::fmt;

use crate::token::TokenError;

/// Ids are echoed in messages; bound their length so a hostile id cannot bloat logs.
const MAX_ECHOED_ID: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Unknown id, not visible from this connection, evicted, or a released binding.
    NotFound {
        id: String,
    },
    /// The id exists but belongs to another owner (same message as `NotFound`).
    OwnerMismatch {
        id: String,
    },
    DuplicateResponseId {
        id: String,
    },
    /// The input is not UTF-8 JSON, not an array, or holds a value JSON cannot express.
    ItemNotJson {
        index: Option<usize>,
        detail: String,
    },
    /// An array element is not a JSON object; `found` names what it is.
    ItemNotObject {
        index: usize,
        found: &'static str,
    },
    ItemTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    /// One new entry is larger than the whole memory budget.
    CacheFull {
        size: u64,
        budget: u64,
    },
    Snapshot {
        detail: String,
    },
    /// A bad argument that is not about items (maps to `ValueError`).
    InvalidArgument {
        detail: String,
    },
    /// The cache's tokenizer failed on an item (maps to the tokenizer's errors).
    Token(TokenError),
}

impl From<TokenError> for Error {
    fn from(e: TokenError) -> Self {
        Error::Token(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(id: &str) -> Self {
        Error::NotFound { id: id.to_owned() }
    }

    pub fn snapshot(detail: impl Into<String>) -> Self {
        Error::Snapshot {
            detail: detail.into(),
        }
    }

    pub fn invalid_argument(detail: impl Into<String>) -> Self {
        Error::InvalidArgument {
            detail: detail.into(),
        }
    }
}

fn shown(id: &str) -> String {
    match id.char_indices().nth(MAX_ECHOED_ID) {
        None => id.to_owned(),
        Some((cut, _)) => format!("{}...", &id[..cut]),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound { id } | Error::OwnerMismatch { id } => {
                write!(f, "Response with id '{}' not found.", shown(id))
            }
            Error::DuplicateResponseId { id } => {
                write!(f, "A response with id '{}' is already cached.", shown(id))
            }
            Error::ItemNotJson {
                index: None,
                detail,
            } => write!(f, "Items are not a JSON array of objects: {detail}."),
            Error::ItemNotJson {
                index: Some(i),
                detail,
            } => write!(f, "Item {i} is not valid JSON: {detail}."),
            Error::ItemNotObject { index, found } => {
                write!(f, "Item {index} is a JSON {found}, expected an object.")
            }
            Error::ItemTooLarge { index, size, limit } => write!(
                f,
                "Item {index} is {size} bytes as JSON, larger than the limit of {limit} bytes."
            ),
            Error::CacheFull { size, budget } => write!(
                f,
                "The response needs {size} bytes, more than the cache's whole memory budget \
                 of {budget} bytes."
            ),
            Error::Snapshot { detail } => write!(f, "Cannot restore the snapshot: {detail}."),
            Error::InvalidArgument { detail } => f.write_str(detail),
            Error::Token(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_and_owner_mismatch_read_the_same() {
        let a = Error::not_found("resp_1").to_string();
        let b = Error::OwnerMismatch {
            id: "resp_1".into(),
        }
        .to_string();
        assert_eq!(a, b);
        assert_eq!(a, "Response with id 'resp_1' not found.");
    }

    #[test]
    fn long_ids_are_cut() {
        let id = "é".repeat(500);
        let msg = Error::not_found(&id).to_string();
        assert!(msg.len() < 300, "{msg}");
        assert!(msg.contains("..."));
    }

    #[test]
    fn item_errors_name_the_index() {
        let e = Error::ItemTooLarge {
            index: 3,
            size: 10,
            limit: 5,
        };
        assert_eq!(
            e.to_string(),
            "Item 3 is 10 bytes as JSON, larger than the limit of 5 bytes."
        );
        let e = Error::ItemNotObject {
            index: 0,
            found: "string",
        };
        assert_eq!(
            e.to_string(),
            "Item 0 is a JSON string, expected an object."
        );
    }
}
