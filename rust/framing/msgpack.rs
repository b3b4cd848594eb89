//! msgpack for the `warmsocket.msgpack` subprotocol: decoding a client message into
//! the same `Value` a JSON message gives, and the primitives of writing events.
//!
//! Only what JSON can say is accepted: nil, booleans, integers, finite floats, UTF-8
//! strings, arrays, and maps with string keys. `bin`, `ext` (timestamps included),
//! non-string keys, NaN and infinities, trailing bytes, truncation and nesting deeper
//! than `json::MAX_NESTING` are all one error: the message is not valid msgpack.
//! A float32 is widened to the float64 Python's `msgpack` gives.

use std::borrow::Cow;

use super::json::MAX_NESTING;
use super::value::{Object, Value};

/// The message is not msgpack of a JSON-like value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotMsgpack;

/// Decode one whole message.
pub fn decode(data: &[u8]) -> Result<Value<'_>, NotMsgpack> {
    let mut reader = Reader { data, pos: 0 };
    let value = reader.value(0)?;
    if reader.pos != data.len() {
        return Err(NotMsgpack);
    }
    Ok(value)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NotMsgpack> {
        let end = self.pos.checked_add(n).ok_or(NotMsgpack)?;
        let bytes = self.data.get(self.pos..end).ok_or(NotMsgpack)?;
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, NotMsgpack> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], NotMsgpack> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len16(&mut self) -> Result<usize, NotMsgpack> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }

    fn len32(&mut self) -> Result<usize, NotMsgpack> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, NotMsgpack> {
        let marker = self.byte()?;
        Ok(match marker {
            0x00..=0x7f => Value::Int(i64::from(marker)),
            0x80..=0x8f => return self.map(usize::from(marker & 0x0f), depth),
            0x90..=0x9f => return self.array(usize::from(marker & 0x0f), depth),
            0xa0..=0xbf => return self.str(usize::from(marker & 0x1f)),
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xca => float(f64::from(f32::from_be_bytes(self.be()?)))?,
            0xcb => float(f64::from_be_bytes(self.be()?))?,
            0xcc => Value::Int(i64::from(self.byte()?)),
            0xcd => Value::Int(i64::from(u16::from_be_bytes(self.be()?))),
            0xce => Value::Int(i64::from(u32::from_be_bytes(self.be()?))),
            0xcf => {
                let u = u64::from_be_bytes(self.be()?);
                match i64::try_from(u) {
                    Ok(i) => Value::Int(i),
                    Err(_) => Value::UInt(u),
                }
            }
            0xd0 => Value::Int(i64::from(i8::from_be_bytes(self.be()?))),
            0xd1 => Value::Int(i64::from(i16::from_be_bytes(self.be()?))),
            0xd2 => Value::Int(i64::from(i32::from_be_bytes(self.be()?))),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?)),
            0xd9 => {
                let n = usize::from(self.byte()?);
                return self.str(n);
            }
            0xda => {
                let n = self.len16()?;
                return self.str(n);
            }
            0xdb => {
                let n = self.len32()?;
                return self.str(n);
            }
            0xdc => {
                let n = self.len16()?;
                return self.array(n, depth);
            }
            0xdd => {
                let n = self.len32()?;
                return self.array(n, depth);
            }
            0xde => {
                let n = self.len16()?;
                return self.map(n, depth);
            }
            0xdf => {
                let n = self.len32()?;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::Int(i64::from(marker as i8)),
            // 0xc1 (never used), bin 0xc4-0xc6, ext 0xc7-0xc9 and 0xd4-0xd8.
            _ => return Err(NotMsgpack),
        })
    }

    fn str(&mut self, n: usize) -> Result<Value<'a>, NotMsgpack> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| NotMsgpack)?;
        Ok(Value::Str(Cow::Borrowed(s)))
    }

    /// Each element takes at least one byte: a length beyond what is left is a lie,
    /// and must not size an allocation.
    fn capacity(&self, n: usize) -> usize {
        n.min(self.data.len() - self.pos)
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>, NotMsgpack> {
        if depth >= MAX_NESTING {
            return Err(NotMsgpack);
        }
        let mut values = Vec::with_capacity(self.capacity(n));
        for _ in 0..n {
            values.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(values))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>, NotMsgpack> {
        if depth >= MAX_NESTING {
            return Err(NotMsgpack);
        }
        let mut entries = Vec::with_capacity(self.capacity(n));
        for _ in 0..n {
            let Value::Str(key) = self.key()? else {
                return Err(NotMsgpack);
            };
            let value = self.value(depth + 1)?;
            entries.push((key, value));
        }
        Ok(Value::Object(Object::from_entries(entries)))
    }

    fn key(&mut self) -> Result<Value<'a>, NotMsgpack> {
        let marker = *self.data.get(self.pos).ok_or(NotMsgpack)?;
        match marker {
            0xa0..=0xbf | 0xd9..=0xdb => self.value(0),
            _ => Err(NotMsgpack),
        }
    }
}

fn float(f: f64) -> Result<Value<'static>, NotMsgpack> {
    if f.is_finite() {
        Ok(Value::Float(f))
    } else {
        Err(NotMsgpack)
    }
}

// -- writing ---------------------------------------------------------------------------

pub fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

pub fn write_bool(b: bool, out: &mut Vec<u8>) {
    out.push(if b { 0xc3 } else { 0xc2 });
}

pub fn write_int(i: i64, out: &mut Vec<u8>) {
    if i >= 0 {
        return write_uint(i as u64, out);
    }
    if i >= -32 {
        out.push(i as i8 as u8);
    } else if i >= i64::from(i8::MIN) {
        out.push(0xd0);
        out.push(i as i8 as u8);
    } else if i >= i64::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if i >= i64::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

pub fn write_uint(u: u64, out: &mut Vec<u8>) {
    if u < 0x80 {
        out.push(u as u8);
    } else if u <= u64::from(u8::MAX) {
        out.push(0xcc);
        out.push(u as u8);
    } else if u <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(u as u16).to_be_bytes());
    } else if u <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(u as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&u.to_be_bytes());
    }
}

pub fn write_f64(f: f64, out: &mut Vec<u8>) {
    out.push(0xcb);
    out.extend_from_slice(&f.to_be_bytes());
}

pub fn write_str(s: &str, out: &mut Vec<u8>) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= usize::from(u8::MAX) {
        out.push(0xd9);
        out.push(n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

pub fn write_array_len(n: usize, out: &mut Vec<u8>) {
    if n < 16 {
        out.push(0x90 | n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xdc);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

pub fn write_map_len(n: usize, out: &mut Vec<u8>) {
    if n < 16 {
        out.push(0x80 | n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xde);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdf);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

/// Write a decoded value as msgpack. An integer outside 64 bits becomes a float
/// (msgpack has no bigger integers).
pub fn write_value(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Null => write_nil(out),
        Value::Bool(b) => write_bool(*b, out),
        Value::Int(i) => write_int(*i, out),
        Value::UInt(u) => write_uint(*u, out),
        Value::BigInt(text) => write_f64(text.parse().unwrap_or(f64::MAX), out),
        Value::Float(f) => write_f64(*f, out),
        Value::Str(s) => write_str(s, out),
        Value::Array(values) => {
            write_array_len(values.len(), out);
            for v in values {
                write_value(v, out);
            }
        }
        Value::Object(object) => {
            write_map_len(object.len(), out);
            for (k, v) in object.iter() {
                write_str(k, out);
                write_value(v, out);
            }
        }
    }
}

/// Transcode JSON text (the server's own output: items, settings, events) to msgpack.
pub fn from_json(json: &[u8], out: &mut Vec<u8>) -> Result<(), NotMsgpack> {
    let value = super::json::decode(json).map_err(|_| NotMsgpack)?;
    write_value(&value, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(value: &Value<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        write_value(value, &mut out);
        assert_eq!(&decode(&out).unwrap(), value);
        out
    }

    #[test]
    fn values_roundtrip() {
        for i in [0, 1, 127, 128, 255, 256, 65535, 65536, 1 << 40, i64::MAX] {
            roundtrip(&Value::Int(i));
            roundtrip(&Value::Int(-i));
        }
        roundtrip(&Value::Int(i64::MIN));
        roundtrip(&Value::UInt(u64::MAX));
        roundtrip(&Value::Float(0.1));
        for n in [0, 31, 32, 255, 256, 70_000] {
            roundtrip(&Value::Str(Cow::Owned("x".repeat(n))));
            roundtrip(&Value::Array(vec![Value::Null; n.min(70_000)]));
        }
        let text = r#"{"a":[1,{"b":null,"c":"é"}],"d":true,"e":-1.5}"#;
        let value = crate::framing::json::parse(text).unwrap();
        roundtrip(&value);
        let mut out = Vec::new();
        from_json(text.as_bytes(), &mut out).unwrap();
        assert_eq!(decode(&out).unwrap(), value);
    }

    #[test]
    fn rejects_what_json_cannot_say() {
        let bad: &[&[u8]] = &[
            b"",
            b"\xc1",
            b"\xc4\x01x",                 // bin
            b"\xd4\x01\x00",              // fixext
            b"\xc7\x00\xff",              // ext8
            b"\x81\x01\x02",              // int key
            b"\xa2\xff\xfe",              // not UTF-8
            b"\xcb\x7f\xf8\0\0\0\0\0\0",  // NaN
            b"\xca\x7f\x80\0\0",          // float32 infinity
            b"\xc0\xc0",                  // trailing data
            b"\x92\xc0",                  // truncated
            b"\xdd\xff\xff\xff\xff",      // huge length, nothing behind it
            b"\xdf\xff\xff\xff\xff\xa1a", // same for a map
        ];
        for data in bad {
            assert_eq!(decode(data), Err(NotMsgpack), "{data:?}");
        }
        let deep = [vec![0x91u8; MAX_NESTING + 1], vec![0xc0]].concat();
        assert_eq!(decode(&deep), Err(NotMsgpack));
        let ok = [vec![0x91u8; MAX_NESTING], vec![0xc0]].concat();
        assert!(decode(&ok).is_ok());
    }

    #[test]
    fn float32_widens_like_python() {
        assert_eq!(
            decode(b"\xca\x3d\xcc\xcc\xcd").unwrap(),
            Value::Float(0.10000000149011612)
        );
    }

    #[test]
    fn no_panic_on_random_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50_000 {
            let len = (state % 16) as usize;
            let mut data = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push(state as u8);
            }
            let _ = decode(&data);
        }
    }
}
