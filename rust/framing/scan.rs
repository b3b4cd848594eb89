//! JSON string scanning eight bytes at a time.
//!
//! Reading and writing a JSON string both look for the same bytes: `"`, `\` and
//! control characters (below 0x20). Most of a string has none, so the loops here
//! test eight bytes per step with word arithmetic and only fall back to a byte at
//! a time in the word that has one.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any byte of `word` is below `n` (exact for `n <= 128`).
#[inline]
fn has_less(word: u64, n: u8) -> bool {
    word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS != 0
}

/// Whether any byte of `word` equals `byte`.
#[inline]
fn has_byte(word: u64, byte: u8) -> bool {
    has_less(word ^ (ONES * u64::from(byte)), 1)
}

/// Whether any byte of `word` is `"`, `\` or a control character.
#[inline]
fn has_special(word: u64) -> bool {
    has_less(word, 0x20) || has_byte(word, b'"') || has_byte(word, b'\\')
}

#[inline]
fn is_special(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// The index of the first `"`, `\` or control character in `bytes` at or after
/// `from`, or `bytes.len()` when there is none.
#[inline]
pub fn next_special(bytes: &[u8], from: usize) -> usize {
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if has_special(u64::from_le_bytes(word)) {
            break;
        }
        i += 8;
    }
    while i < bytes.len() && !is_special(bytes[i]) {
        i += 1;
    }
    i
}

/// The value of one hexadecimal digit (either case).
#[inline]
pub fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// `s` as a JSON string, escaped exactly as serde_json escapes it: `\"`, `\\`,
/// `\b`, `\f`, `\n`, `\r`, `\t`, and `\u00xx` (lower-case hex) for the other
/// control characters; everything else, non-ASCII included, as it is.
pub fn write_escaped(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    loop {
        let at = next_special(bytes, start);
        out.extend_from_slice(&bytes[start..at]);
        let Some(&byte) = bytes.get(at) else {
            break;
        };
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
        start = at + 1;
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde(s: &str) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    #[test]
    fn escapes_every_byte_as_serde_json_does() {
        for byte in 0u8..128 {
            let s = format!("ab{}cdefghij{}k", byte as char, byte as char);
            let mut out = Vec::new();
            write_escaped(&s, &mut out);
            assert_eq!(out, serde(&s), "byte {byte}");
        }
        for s in [
            "",
            "\"",
            "\\",
            "plain ascii text of some length",
            "é東京😀\u{7f}\u{2028}",
        ] {
            let mut out = Vec::new();
            write_escaped(s, &mut out);
            assert_eq!(out, serde(s));
        }
    }

    #[test]
    fn finds_the_first_special_byte_at_any_offset() {
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0u8, 0x1f] {
                    let mut bytes = vec![b'x'; len];
                    if at < len {
                        bytes[at] = special;
                    }
                    // Bytes that look close to special ones are not.
                    if let Some(b) = bytes.get_mut(0) {
                        if at != 0 {
                            *b = 0x20;
                        }
                    }
                    for from in 0..=at.min(len) {
                        let want = if at < len { at } else { len };
                        assert_eq!(next_special(&bytes, from), want, "{len} {at} {from}");
                    }
                }
            }
        }
        let high = "é".repeat(20);
        assert_eq!(next_special(high.as_bytes(), 0), high.len());
    }
}
