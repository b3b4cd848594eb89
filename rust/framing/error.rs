//! The request errors a client message can get, with the one place their messages
//! are written. Codes, params and texts are those of `warmsocket/errors.py` (the
//! constructors `client_events.py` calls); `request.rs` picks which one applies.
//! Messages never hold conversation content; the only client text they echo is an
//! unknown event type (at most 64 characters) and field names.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// `errors.invalid_json(detail)`.
    InvalidJson { detail: String },
    /// `errors.invalid_msgpack()` (the `warmsocket.msgpack` subprotocol).
    InvalidMsgpack,
    /// `errors.invalid_type(param, expected)`.
    InvalidType {
        param: String,
        expected: &'static str,
    },
    /// `errors.invalid_value(param, message)`.
    InvalidValue { param: String, message: String },
    /// `errors.missing_parameter(param)`.
    MissingParameter { param: String },
    /// `errors.unknown_parameter(param)`.
    UnknownParameter { param: &'static str },
    /// `errors.unsupported_parameter(param, message)`.
    UnsupportedParameter {
        param: String,
        message: &'static str,
    },
    /// `errors.unknown_event_type(event_type)`: `shown` is the type when it is a
    /// string of at most 64 characters, else `...`.
    UnknownEventType { shown: String },
    /// `errors.invalid_stream_id()`.
    InvalidStreamId,
    /// `errors.steer_error("invalid_input", message)`.
    InvalidSteer { message: String },
}

pub const INVALID_REQUEST: &str = "invalid_request_error";

impl RequestError {
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::InvalidJson { .. } => "invalid_json",
            RequestError::InvalidMsgpack => "invalid_msgpack",
            RequestError::InvalidType { .. } => "invalid_type",
            RequestError::InvalidValue { .. } | RequestError::UnknownEventType { .. } => {
                "invalid_value"
            }
            RequestError::MissingParameter { .. } => "missing_required_parameter",
            RequestError::UnknownParameter { .. } => "unknown_parameter",
            RequestError::UnsupportedParameter { .. } => "unsupported_parameter",
            RequestError::InvalidStreamId => "invalid_stream_id",
            RequestError::InvalidSteer { .. } => "invalid_input",
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            RequestError::InvalidJson { .. }
            | RequestError::InvalidMsgpack
            | RequestError::InvalidSteer { .. } => None,
            RequestError::InvalidType { param, .. }
            | RequestError::InvalidValue { param, .. }
            | RequestError::MissingParameter { param }
            | RequestError::UnsupportedParameter { param, .. } => Some(param),
            RequestError::UnknownParameter { param } => Some(param),
            RequestError::UnknownEventType { .. } => Some("type"),
            RequestError::InvalidStreamId => Some("stream_id"),
        }
    }

    /// Every request error is a 400 `invalid_request_error`.
    pub fn status(&self) -> u16 {
        400
    }

    pub fn error_type(&self) -> &'static str {
        INVALID_REQUEST
    }

    // Constructors for the common shapes.

    pub fn invalid_type(param: impl Into<String>, expected: &'static str) -> Self {
        RequestError::InvalidType {
            param: param.into(),
            expected,
        }
    }

    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        RequestError::InvalidValue {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn missing(param: impl Into<String>) -> Self {
        RequestError::MissingParameter {
            param: param.into(),
        }
    }

    pub fn steer(message: impl Into<String>) -> Self {
        RequestError::InvalidSteer {
            message: message.into(),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::InvalidJson { detail } => write!(
                f,
                "The message is not valid JSON ({detail}). Send one JSON object per message."
            ),
            RequestError::InvalidMsgpack => f.write_str(
                "The message is not valid msgpack of a JSON-like value. Send one msgpack map \
                 per message.",
            ),
            RequestError::InvalidType { param, expected } => {
                write!(f, "Invalid type for '{param}': expected {expected}.")
            }
            RequestError::InvalidValue { message, .. } => f.write_str(message),
            RequestError::MissingParameter { param } => {
                write!(f, "Missing required parameter: '{param}'.")
            }
            RequestError::UnknownParameter { param } => write!(f, "Unknown parameter: '{param}'."),
            RequestError::UnsupportedParameter { message, .. } => f.write_str(message),
            RequestError::UnknownEventType { shown } => write!(
                f,
                "Unknown event type '{shown}'. Supported client events: 'response.create', \
                 'response.steer'."
            ),
            RequestError::InvalidStreamId => f.write_str(
                "Invalid 'stream_id': it must be 1 to 256 characters of A-Z, a-z, 0-9, '_', \
                 '.' or '-'.",
            ),
            RequestError::InvalidSteer { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for RequestError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_match_errors_py() {
        let e = RequestError::InvalidJson {
            detail: "Expecting value at line 1 column 1".into(),
        };
        assert_eq!(e.code(), "invalid_json");
        assert_eq!(e.param(), None);
        assert_eq!(
            e.to_string(),
            "The message is not valid JSON (Expecting value at line 1 column 1). Send one JSON \
             object per message."
        );
        let e = RequestError::invalid_type("input[0]", "an object");
        assert_eq!(
            e.to_string(),
            "Invalid type for 'input[0]': expected an object."
        );
        assert_eq!(e.param(), Some("input[0]"));
        let e = RequestError::missing("model");
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            (
                "missing_required_parameter",
                "Missing required parameter: 'model'."
            )
        );
        let e = RequestError::UnknownEventType {
            shown: "response.cancel".into(),
        };
        assert_eq!(
            e.to_string(),
            "Unknown event type 'response.cancel'. Supported client events: 'response.create', \
             'response.steer'."
        );
        assert_eq!((e.code(), e.param()), ("invalid_value", Some("type")));
        assert_eq!(RequestError::InvalidStreamId.param(), Some("stream_id"));
        assert_eq!(RequestError::steer("x").code(), "invalid_input");
        assert_eq!(RequestError::InvalidMsgpack.status(), 400);
    }
}
