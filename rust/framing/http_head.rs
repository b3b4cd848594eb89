//! The head of an HTTP/1.1 response (status line and headers), parsed.
//!
//! The upstream client (`warmsocket/httpclient.py`) calls this once per response,
//! on the bytes read so far; the body is then read as it is framed (chunked:
//! `chunked.rs`). It was Python string work before, ~14 µs of a turn's answer path
//! in the server (timestamps in an instrumented copy; docs/benchmarks.md).
//!
//! What is accepted is what that Python parser accepted: a status line
//! `HTTP/1.<x> <digits>[ <reason>]`, then header lines `name: value`, the name
//! trimmed and lowercased, the value trimmed of spaces and tabs, repeated headers
//! joined with `", "`; bytes are read as Latin-1. A header line without a colon
//! (including an obsolete folded continuation) makes the head invalid.

use std::collections::HashMap;

/// Longest head accepted (the status line, headers and the blank line).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the input the head took, its blank line included.
    pub length: usize,
    pub status: u16,
    /// `HTTP/1.0` (no keep-alive unless asked for).
    pub http10: bool,
    /// Lowercased names, in first-seen order; repeated headers joined with `", "`.
    pub headers: Vec<(String, String)>,
}

/// Why a head is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    StatusLine,
    HeaderLine,
    TooLarge,
}

impl HeadError {
    pub fn message(self) -> &'static str {
        match self {
            HeadError::StatusLine => "invalid status line",
            HeadError::HeaderLine => "invalid header line",
            HeadError::TooLarge => "response head too large",
        }
    }
}

/// The head at the start of `data`; `Ok(None)` while its blank line has not arrived.
pub fn parse(data: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    let Some(end) = memchr::memmem::find(data, b"\r\n\r\n") else {
        return if data.len() > MAX_HEAD_BYTES {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end + 4 > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let mut lines = data[..end].split(|&b| b == b'\n').map(|line| {
        // Lines end in CRLF; a bare LF inside the head leaves its CR on the line before.
        line.strip_suffix(b"\r").unwrap_or(line)
    });
    let (status, http10) = status_line(lines.next().unwrap_or_default())?;
    let mut headers: Vec<(String, String)> = Vec::new();
    // Where each name is in `headers` (a head may hold thousands of lines).
    let mut positions: HashMap<String, usize> = HashMap::new();
    for line in lines {
        let colon = memchr::memchr(b':', line).ok_or(HeadError::HeaderLine)?;
        let name = latin1(trim(&line[..colon])).to_ascii_lowercase();
        let value = latin1(trim(&line[colon + 1..]));
        match positions.get(&name) {
            Some(&at) => {
                let joined = &mut headers[at].1;
                joined.push_str(", ");
                joined.push_str(&value);
            }
            None => {
                positions.insert(name.clone(), headers.len());
                headers.push((name, value));
            }
        }
    }
    Ok(Some(ResponseHead {
        length: end + 4,
        status,
        http10,
        headers,
    }))
}

fn status_line(line: &[u8]) -> Result<(u16, bool), HeadError> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().ok_or(HeadError::StatusLine)?;
    if !version.starts_with(b"HTTP/1.")
        || code.is_empty()
        || code.len() > 5
        || !code.iter().all(u8::is_ascii_digit)
    {
        return Err(HeadError::StatusLine);
    }
    let status = code.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    let status = u16::try_from(status).map_err(|_| HeadError::StatusLine)?;
    Ok((status, version == b"HTTP/1.0"))
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Latin-1 bytes as a string (every byte is the code point of the same value).
fn latin1(bytes: &[u8]) -> String {
    if bytes.is_ascii() {
        // ASCII is valid UTF-8 as it is.
        return String::from_utf8_lossy(bytes).into_owned();
    }
    bytes.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> ResponseHead {
        match parse(text.as_bytes()) {
            Ok(Some(head)) => head,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn a_head_and_what_follows_it() {
        let text = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                    Transfer-Encoding:  chunked \r\n\r\n5\r\nhello\r\n";
        let parsed = head(text);
        assert_eq!(parsed.status, 200);
        assert!(!parsed.http10);
        assert_eq!(&text[parsed.length..], "5\r\nhello\r\n");
        assert_eq!(
            parsed.headers,
            vec![
                ("content-type".into(), "text/event-stream".into()),
                ("transfer-encoding".into(), "chunked".into()),
            ]
        );
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        for text in [
            "",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK\r\nA: b\r\n",
            "HTTP/1.1 200 OK\r\n\r",
        ] {
            assert_eq!(parse(text.as_bytes()), Ok(None), "{text:?}");
        }
    }

    #[test]
    fn repeated_headers_are_joined_and_names_lowercased() {
        let parsed = head("HTTP/1.0 404 Not Found\r\nX-A: 1\r\nx-a: 2\r\nVia:\r\n\r\n");
        assert_eq!((parsed.status, parsed.http10), (404, true));
        assert_eq!(
            parsed.headers,
            vec![("x-a".into(), "1, 2".into()), ("via".into(), String::new())]
        );
    }

    #[test]
    fn a_status_line_without_a_reason_and_latin1_values() {
        let mut bytes = b"HTTP/1.1 204\r\nX-Name: caf".to_vec();
        bytes.push(0xe9);
        bytes.extend_from_slice(b"\r\n\r\n");
        let parsed = parse(&bytes).unwrap().unwrap();
        assert_eq!(parsed.status, 204);
        assert_eq!(parsed.headers, vec![("x-name".into(), "café".into())]);
    }

    #[test]
    fn invalid_heads_are_refused() {
        for text in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 2x0 OK\r\n\r\n",
            "HTTP/1.1\r\n\r\n",
            "HTTP/1.1  200 OK\r\n\r\n",
            "HTTP/1.1 999999 OK\r\n\r\n",
            "SIP/1.1 200 OK\r\n\r\n",
        ] {
            assert_eq!(
                parse(text.as_bytes()),
                Err(HeadError::StatusLine),
                "{text:?}"
            );
        }
        for text in [
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
        ] {
            assert_eq!(
                parse(text.as_bytes()),
                Err(HeadError::HeaderLine),
                "{text:?}"
            );
        }
    }

    #[test]
    fn many_repeated_headers_are_joined_in_order() {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..3000 {
            text.push_str(&format!("X-{}: {i}\r\n", i % 3));
        }
        text.push_str("\r\n");
        let parsed = head(&text);
        assert_eq!(parsed.headers.len(), 3);
        assert!(parsed.headers[1].1.starts_with("1, 4, 7, "));
        assert_eq!(parsed.headers[2].1.split(", ").count(), 1000);
    }

    #[test]
    fn oversized_heads_are_refused_complete_or_not() {
        let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long.as_bytes()), Err(HeadError::TooLarge));
        assert_eq!(
            parse(format!("{long}\r\n\r\n").as_bytes()),
            Err(HeadError::TooLarge)
        );
    }
}
