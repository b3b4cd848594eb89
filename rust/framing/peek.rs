//! One top-level string field of a JSON object, read without parsing the rest: the
//! `stream_id` of a message too large to parse, so that its error goes to its lane.
//!
//! The scan only tracks nesting and skips strings (eight bytes at a time), so it is
//! linear and allocates nothing until it finds the field. A key written with escapes
//! (`"stream\u005fid"`) is not recognised; malformed JSON gives `None`.

use super::scan::next_special;

/// The string value of `key` at the top level of the JSON object in `bytes` (its
/// first occurrence), if there is one and it is a string.
pub fn top_level_string(bytes: &[u8], key: &str) -> Option<String> {
    let mut i = skip_whitespace(bytes, 0);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut expect_key = false;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'"' => {
                let end = string_end(bytes, i + 1)?;
                let is_key = depth == 1 && expect_key;
                if is_key && bytes.get(i + 1..end) == Some(key.as_bytes()) {
                    let colon = skip_whitespace(bytes, end + 1);
                    if bytes.get(colon) != Some(&b':') {
                        return None;
                    }
                    let start = skip_whitespace(bytes, colon + 1);
                    if bytes.get(start) != Some(&b'"') {
                        return None;
                    }
                    let value_end = string_end(bytes, start + 1)?;
                    return serde_json::from_slice(bytes.get(start..=value_end)?).ok();
                }
                expect_key = false;
                i = end + 1;
                continue;
            }
            b'{' => {
                depth += 1;
                expect_key = depth == 1;
            }
            b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return None; // the object ended without the key
                }
            }
            b',' if depth == 1 => expect_key = true,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index of the `"` that ends the string whose content starts at `from`.
fn string_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        i = next_special(bytes, i);
        match bytes.get(i)? {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1, // a raw control character: not JSON, but keep going
        }
    }
}

fn skip_whitespace(bytes: &[u8], from: usize) -> usize {
    let mut i = from;
    while matches!(bytes.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peek(text: &str) -> Option<String> {
        top_level_string(text.as_bytes(), "stream_id")
    }

    #[test]
    fn finds_the_top_level_field_only() {
        assert_eq!(
            peek(r#"{"type":"x","stream_id":"lane_1"}"#).as_deref(),
            Some("lane_1")
        );
        assert_eq!(
            peek(r#" { "stream_id" : "a" , "x" : 1 } "#).as_deref(),
            Some("a")
        );
        assert_eq!(peek(r#"{"stream_id":"a\u0062"}"#).as_deref(), Some("ab"));
        // Nested, inside strings, as a value, or not a string: not the field.
        assert_eq!(peek(r#"{"input":{"stream_id":"no"}}"#), None);
        assert_eq!(peek(r#"{"input":[{"stream_id":"no"}],"x":1}"#), None);
        assert_eq!(peek(r#"{"input":"\"stream_id\":\"no\""}"#), None);
        assert_eq!(peek(r#"{"x":"stream_id","y":"stream_id"}"#), None);
        assert_eq!(peek(r#"{"stream_id":5}"#), None);
        assert_eq!(
            peek(r#"{"a":{"b":[1,{"c":"}"}]},"stream_id":"after"}"#).as_deref(),
            Some("after")
        );
    }

    #[test]
    fn malformed_input_gives_none() {
        for text in [
            "",
            "[]",
            "\"stream_id\"",
            "{\"stream_id\"",
            "{\"stream_id\":\"open",
            "}}}",
            "{\"a\":\"\\",
        ] {
            assert_eq!(peek(text), None, "{text}");
        }
        let deep = "[".repeat(100_000);
        assert_eq!(peek(&format!("{{\"a\":{deep}")), None);
    }
}
