//! A JSON decoder that accepts and rejects what Python's `json.loads` does (as
//! `warmsocket.client_events.decode_json` calls it), and reports the same error
//! messages at the same line and column.
//!
//! It follows the scanner of CPython's `_json` module: the grammar, the order in
//! which it looks at characters, and where each error is reported (for example a
//! bad `\uXXXX` escape is reported at its `u`, an unterminated string at its opening
//! quote). Positions are byte offsets while scanning and become Python's 1-based
//! line and column (counted in characters) only when an error is reported.
//!
//! Where `json.loads` accepts what JSON does not, `decode_json` rejects it, and so
//! does this decoder, with the same position-free messages: `NaN` / `Infinity` /
//! `-Infinity`, floats that overflow to infinity, integers longer than Python's
//! 4,300-digit conversion limit, strings holding a lone surrogate (`"\ud800"`), and
//! nesting deeper than `MAX_NESTING` (Python raises `RecursionError` somewhat later).

use std::borrow::Cow;

use super::scan;
use super::value::{Object, Value};

/// Deepest nesting of arrays and objects accepted in a message.
pub const MAX_NESTING: usize = 512;
/// Python refuses to convert longer integer texts (`sys.get_int_max_str_digits()`).
pub const MAX_INT_DIGITS: usize = 4300;

/// Why a message is not JSON; `detail` gives the text Python's decoder would give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// A syntax error: one of `_json`'s messages and the byte offset it points at.
    Syntax {
        msg: &'static str,
        pos: usize,
    },
    NotUtf8,
    /// `NaN`, `Infinity` or `-Infinity`.
    Constant(&'static str),
    OutOfRange,
    LoneSurrogate,
    TooDeep,
}

impl JsonError {
    /// The text inside "The message is not valid JSON (...)"; `text` is the message.
    pub fn detail(&self, text: &[u8]) -> String {
        match self {
            JsonError::Syntax { msg, pos } => {
                let (line, column) = line_column(text, *pos);
                format!("{msg} at line {line} column {column}")
            }
            JsonError::NotUtf8 => "not UTF-8".to_owned(),
            JsonError::Constant(name) => format!("{name} is not a JSON value"),
            JsonError::OutOfRange => "a number is out of range".to_owned(),
            JsonError::LoneSurrogate => "a string holds a lone surrogate".to_owned(),
            JsonError::TooDeep => "nested too deeply".to_owned(),
        }
    }
}

/// Python's `lineno` and `colno` of a position: 1-based, columns in characters.
fn line_column(text: &[u8], pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    // Characters = bytes that do not continue a UTF-8 sequence.
    let column = before[line_start..]
        .iter()
        .filter(|&&b| (b & 0xC0) != 0x80)
        .count()
        + 1;
    (line, column)
}

const EXPECTING_VALUE: &str = "Expecting value";
const UNTERMINATED: &str = "Unterminated string starting at";

fn syntax(msg: &'static str, pos: usize) -> JsonError {
    JsonError::Syntax { msg, pos }
}

/// Decode a whole message (UTF-8 bytes).
pub fn decode(data: &[u8]) -> Result<Value<'_>, JsonError> {
    let text = std::str::from_utf8(data).map_err(|_| JsonError::NotUtf8)?;
    parse(text)
}

/// Decode a whole message (text).
pub fn parse(text: &str) -> Result<Value<'_>, JsonError> {
    if text.starts_with('\u{feff}') {
        return Err(syntax("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0));
    }
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        pos: 0,
        depth: 0,
        lone_surrogate: false,
        scratch: String::new(),
    };
    parser.skip_whitespace();
    let value = parser.value()?;
    parser.skip_whitespace();
    if parser.pos != parser.bytes.len() {
        return Err(syntax("Extra data", parser.pos));
    }
    if parser.lone_surrogate {
        // Python accepts these; `decode_json` rejects them once the whole message decoded.
        return Err(JsonError::LoneSurrogate);
    }
    Ok(value)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
    lone_surrogate: bool,
    /// Where a string with escapes is decoded, reused from string to string: each
    /// decoded string is then one allocation of its exact size.
    scratch: String,
}

#[inline]
fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl<'a> Parser<'a> {
    #[inline]
    fn skip_whitespace(&mut self) {
        while self.pos < self.bytes.len() && is_whitespace(self.bytes[self.pos]) {
            self.pos += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn rest_starts_with(&self, literal: &[u8]) -> bool {
        self.bytes[self.pos..].starts_with(literal)
    }

    /// `scan_once`: one value starting at `self.pos`.
    fn value(&mut self) -> Result<Value<'a>, JsonError> {
        let start = self.pos;
        match self.peek() {
            None => Err(syntax(EXPECTING_VALUE, start)),
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b'{') => {
                self.enter()?;
                let object = self.object();
                self.depth -= 1;
                object
            }
            Some(b'[') => {
                self.enter()?;
                let array = self.array();
                self.depth -= 1;
                array
            }
            Some(b'n') if self.rest_starts_with(b"null") => {
                self.pos += 4;
                Ok(Value::Null)
            }
            Some(b't') if self.rest_starts_with(b"true") => {
                self.pos += 4;
                Ok(Value::Bool(true))
            }
            Some(b'f') if self.rest_starts_with(b"false") => {
                self.pos += 5;
                Ok(Value::Bool(false))
            }
            Some(b'N') if self.rest_starts_with(b"NaN") => Err(JsonError::Constant("NaN")),
            Some(b'I') if self.rest_starts_with(b"Infinity") => {
                Err(JsonError::Constant("Infinity"))
            }
            Some(b'-') if self.rest_starts_with(b"-Infinity") => {
                Err(JsonError::Constant("-Infinity"))
            }
            Some(_) => self.number(),
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        if self.depth >= MAX_NESTING {
            return Err(JsonError::TooDeep);
        }
        self.depth += 1;
        Ok(())
    }

    fn object(&mut self) -> Result<Value<'a>, JsonError> {
        self.pos += 1; // '{'
        self.skip_whitespace();
        let mut entries = Vec::new();
        if self.peek() != Some(b'}') {
            loop {
                if self.peek() != Some(b'"') {
                    return Err(syntax(
                        "Expecting property name enclosed in double quotes",
                        self.pos,
                    ));
                }
                let key = self.string()?;
                self.skip_whitespace();
                if self.peek() != Some(b':') {
                    return Err(syntax("Expecting ':' delimiter", self.pos));
                }
                self.pos += 1;
                self.skip_whitespace();
                let value = self.value()?;
                entries.push((key, value));
                self.skip_whitespace();
                match self.peek() {
                    Some(b'}') => break,
                    Some(b',') => {
                        self.pos += 1;
                        self.skip_whitespace();
                    }
                    _ => return Err(syntax("Expecting ',' delimiter", self.pos)),
                }
            }
        }
        self.pos += 1; // '}'
        Ok(Value::Object(Object::from_entries(entries)))
    }

    fn array(&mut self) -> Result<Value<'a>, JsonError> {
        self.pos += 1; // '['
        self.skip_whitespace();
        let mut values = Vec::new();
        if self.peek() != Some(b']') {
            loop {
                values.push(self.value()?);
                self.skip_whitespace();
                match self.peek() {
                    Some(b']') => break,
                    Some(b',') => {
                        self.pos += 1;
                        self.skip_whitespace();
                    }
                    _ => return Err(syntax("Expecting ',' delimiter", self.pos)),
                }
            }
        }
        self.pos += 1; // ']'
        Ok(Value::Array(values))
    }

    /// `_match_number_unicode`: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`,
    /// longest match; no match at all is "Expecting value" at the start.
    fn number(&mut self) -> Result<Value<'a>, JsonError> {
        let b = self.bytes;
        let start = self.pos;
        let mut i = start;
        let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'1'..=b'9') => {
                i += 1;
                while digit(i) {
                    i += 1;
                }
            }
            Some(b'0') => i += 1,
            _ => return Err(syntax(EXPECTING_VALUE, start)),
        }
        let mut is_float = false;
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            is_float = true;
            i += 2;
            while digit(i) {
                i += 1;
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            let mut j = i + 1;
            if matches!(b.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            let digits = j;
            while digit(j) {
                j += 1;
            }
            if j > digits {
                is_float = true;
                i = j;
            }
        }
        self.pos = i;
        let text = &self.text[start..i];
        if is_float {
            // Correctly rounded, like Python's float(); overflow gives infinity.
            let f: f64 = text.parse().map_err(|_| JsonError::OutOfRange)?;
            if !f.is_finite() {
                return Err(JsonError::OutOfRange);
            }
            return Ok(Value::Float(f));
        }
        if let Ok(n) = text.parse::<i64>() {
            return Ok(Value::Int(n));
        }
        if let Ok(n) = text.parse::<u64>() {
            return Ok(Value::UInt(n));
        }
        if text.trim_start_matches('-').len() > MAX_INT_DIGITS {
            return Err(JsonError::OutOfRange);
        }
        Ok(Value::BigInt(Cow::Borrowed(text)))
    }

    /// `scanstring_unicode` (strict): `self.pos` is at the opening quote.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        let b = self.bytes;
        let text = self.text;
        let len = b.len();
        let quote = self.pos;
        let mut chunk = quote + 1;
        let mut i = chunk;
        let mut escaped = false;
        loop {
            i = scan::next_special(b, i);
            if i < len && b[i] < 0x20 {
                return Err(syntax("Invalid control character at", i));
            }
            if i >= len {
                return Err(syntax(UNTERMINATED, quote));
            }
            if b[i] == b'"' {
                self.pos = i + 1;
                let tail = &text[chunk..i];
                if !escaped {
                    return Ok(Cow::Borrowed(tail));
                }
                let mut decoded = String::with_capacity(self.scratch.len() + tail.len());
                decoded.push_str(&self.scratch);
                decoded.push_str(tail);
                return Ok(Cow::Owned(decoded));
            }
            // A backslash at `i`.
            if !escaped {
                escaped = true;
                self.scratch.clear();
            }
            let s = &mut self.scratch;
            s.push_str(&text[chunk..i]);
            let escape = i + 1;
            if escape == len {
                return Err(syntax(UNTERMINATED, quote));
            }
            if b[escape] != b'u' {
                let c = match b[escape] {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    _ => return Err(syntax("Invalid \\escape", i)),
                };
                s.push(c);
                chunk = escape + 1;
                i = chunk;
                continue;
            }
            let digits = escape + 1;
            let mut end = digits + 4;
            if end >= len {
                return Err(syntax("Invalid \\uXXXX escape", escape));
            }
            let mut code = hex4(&b[digits..end]).ok_or(syntax("Invalid \\uXXXX escape", escape))?;
            if (0xD800..0xDC00).contains(&code)
                && end + 6 < len
                && b[end] == b'\\'
                && b[end + 1] == b'u'
            {
                let low =
                    hex4(&b[end + 2..end + 6]).ok_or(syntax("Invalid \\uXXXX escape", end + 1))?;
                if (0xDC00..0xE000).contains(&low) {
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    end += 6;
                }
            }
            match char::from_u32(code) {
                Some(c) => s.push(c),
                None => {
                    self.lone_surrogate = true;
                    s.push('\u{fffd}');
                }
            }
            chunk = end;
            i = end;
        }
    }
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |code, &d| {
        scan::hex_value(d).map(|v| (code << 4) | u32::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        decode(text.as_bytes()).unwrap_err().detail(text.as_bytes())
    }

    #[test]
    fn values() {
        assert_eq!(parse(" null ").unwrap(), Value::Null);
        assert_eq!(parse("[true,false]").unwrap(), {
            Value::Array(vec![Value::Bool(true), Value::Bool(false)])
        });
        assert_eq!(parse("-12").unwrap(), Value::Int(-12));
        assert_eq!(parse("1.5e2").unwrap(), Value::Float(150.0));
        assert_eq!(parse("1E2").unwrap(), Value::Float(100.0));
        assert_eq!(
            parse("18446744073709551615").unwrap(),
            Value::UInt(u64::MAX)
        );
        assert!(matches!(
            parse("-18446744073709551616").unwrap(),
            Value::BigInt(_)
        ));
        assert_eq!(
            parse(r#""a\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00""#).unwrap(),
            Value::Str(Cow::Owned("a\"\\/\u{8}\u{c}\n\r\té😀".to_owned()))
        );
        assert!(matches!(
            parse(r#""plain""#).unwrap(),
            Value::Str(Cow::Borrowed("plain"))
        ));
    }

    #[test]
    fn python_error_messages() {
        // Each expected text is what Python 3.11's json.loads reports.
        let cases = [
            ("", "Expecting value at line 1 column 1"),
            ("   ", "Expecting value at line 1 column 4"),
            (
                "{not json",
                "Expecting property name enclosed in double quotes at line 1 column 2",
            ),
            ("{\"a\" 1}", "Expecting ':' delimiter at line 1 column 6"),
            (
                "{\"a\":1 \"b\"}",
                "Expecting ',' delimiter at line 1 column 8",
            ),
            ("[1,]", "Expecting value at line 1 column 4"),
            (
                "{\"a\":1,}",
                "Expecting property name enclosed in double quotes at line 1 column 8",
            ),
            ("[1 2]", "Expecting ',' delimiter at line 1 column 4"),
            ("[", "Expecting value at line 1 column 2"),
            (
                "{",
                "Expecting property name enclosed in double quotes at line 1 column 2",
            ),
            ("1 2", "Extra data at line 1 column 3"),
            (
                "\"abc",
                "Unterminated string starting at at line 1 column 1",
            ),
            (
                "\"a\\",
                "Unterminated string starting at at line 1 column 1",
            ),
            (
                "\"a\u{1}\"",
                "Invalid control character at at line 1 column 3",
            ),
            ("\"\\x\"", "Invalid \\escape at line 1 column 2"),
            ("\"\\u12\"", "Invalid \\uXXXX escape at line 1 column 3"),
            ("\"\\u12x4\"", "Invalid \\uXXXX escape at line 1 column 3"),
            (
                "\"\\ud800\\u12x4\"",
                "Invalid \\uXXXX escape at line 1 column 9",
            ),
            ("[-]", "Expecting value at line 1 column 2"),
            ("01", "Extra data at line 1 column 2"),
            ("1.", "Extra data at line 1 column 2"),
            ("1e", "Extra data at line 1 column 2"),
            ("nul", "Expecting value at line 1 column 1"),
            ("\n\n  é x", "Expecting value at line 3 column 3"),
            ("[\"é\", x]", "Expecting value at line 1 column 7"),
            (
                "\u{feff}{}",
                "Unexpected UTF-8 BOM (decode using utf-8-sig) at line 1 column 1",
            ),
            ("\"\\u0041", "Invalid \\uXXXX escape at line 1 column 3"),
            (
                "\"\\ud800\\udc0",
                "Invalid \\uXXXX escape at line 1 column 9",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(err(text), expected, "{text:?}");
        }
    }

    #[test]
    fn what_python_accepts_but_decode_json_rejects() {
        assert_eq!(err("[NaN]"), "NaN is not a JSON value");
        assert_eq!(err("-Infinity"), "-Infinity is not a JSON value");
        assert_eq!(err("{\"a\": Infinity}"), "Infinity is not a JSON value");
        assert_eq!(err("1e400"), "a number is out of range");
        assert_eq!(err(&"9".repeat(4301)), "a number is out of range");
        assert!(matches!(
            parse(&"9".repeat(4300)).unwrap(),
            Value::BigInt(_)
        ));
        assert_eq!(err("\"\\ud800\""), "a string holds a lone surrogate");
        assert_eq!(
            err("\"\\udc00\\ud800x\""),
            "a string holds a lone surrogate"
        );
        // A syntax error later in the message wins over an earlier lone surrogate,
        // as in Python (which only looks for them once the message decoded).
        assert_eq!(
            err("[\"\\ud800\", x]"),
            "Expecting value at line 1 column 12"
        );
        let deep = "[".repeat(MAX_NESTING + 1);
        assert_eq!(err(&deep), "nested too deeply");
        let ok = "[".repeat(MAX_NESTING) + &"]".repeat(MAX_NESTING);
        assert!(parse(&ok).is_ok());
        assert_eq!(decode(b"\xff").unwrap_err(), JsonError::NotUtf8);
        assert_eq!(decode(b"\"\xed\xa0\x80\"").unwrap_err(), JsonError::NotUtf8);
    }

    #[test]
    fn no_panic_on_random_bytes() {
        // A small deterministic generator: xorshift over bytes biased to JSON syntax.
        let alphabet = b"{}[]\",:\\u0123456789abcdefEe+-.ntrlsNaIfy \n\t\x01\xc3\xa9\xff";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (state % 24) as usize;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            if let Err(e) = decode(&data) {
                let _ = e.detail(&data);
            }
        }
    }
}
