//! The `Transfer-Encoding: chunked` body of an HTTP/1.1 response, decoded.
//!
//! The upstream client (`warmsocket/httpclient.py`) parses a response's head
//! (`http_head.rs`), once, and hands the chunked body here: one call per read, whatever the
//! number of chunks in it (an SSE stream is usually one chunk per event).
//! Chunk extensions (`;name=value`) and trailers are read past and dropped.

/// Why a chunked body is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk-size line that is not hexadecimal, or longer than any sane one.
    InvalidSize,
    /// Chunk data not followed by CRLF.
    MissingCrlf,
}

impl ChunkError {
    pub fn message(self) -> &'static str {
        match self {
            ChunkError::InvalidSize => "invalid chunk size",
            ChunkError::MissingCrlf => "chunk not followed by CRLF",
        }
    }
}

/// Longest chunk-size line (size and extensions) accepted.
const MAX_SIZE_LINE: usize = 1024;

#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    /// Bytes not consumed yet (a partial size line, CRLF or trailers).
    pending: Vec<u8>,
    /// Data bytes left in the current chunk; `None` between chunks.
    left: Option<usize>,
    /// The last chunk and its trailers have been read.
    pub done: bool,
    /// Bytes came after the end of the body (the connection is not reusable).
    pub trailing: bool,
}

impl ChunkedDecoder {
    /// Decode `data`, appending body bytes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
        if self.done {
            self.trailing |= !data.is_empty();
            return Ok(());
        }
        if self.pending.is_empty() {
            let used = self.decode(data, out)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.pending);
            buffer.extend_from_slice(data);
            let used = self.decode(&buffer, out)?;
            buffer.drain(..used);
            self.pending = buffer;
        }
        if self.done && !self.pending.is_empty() {
            self.trailing = true;
            self.pending.clear();
        }
        Ok(())
    }

    /// Decode what `buf` holds; returns how many bytes were consumed.
    fn decode(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut pos = 0;
        loop {
            match self.left {
                None => {
                    let Some(line) = find_crlf(&buf[pos..]) else {
                        if buf.len() - pos > MAX_SIZE_LINE {
                            return Err(ChunkError::InvalidSize);
                        }
                        return Ok(pos);
                    };
                    let size = chunk_size(&buf[pos..pos + line])?;
                    if size == 0 {
                        // The last chunk: read past the trailers up to the empty line.
                        let after = pos + line;
                        let end = if buf[after..].starts_with(b"\r\n\r\n") {
                            after + 4
                        } else {
                            match find(&buf[after..], b"\r\n\r\n") {
                                Some(at) => after + at + 4,
                                None => return Ok(pos),
                            }
                        };
                        self.done = true;
                        return Ok(end);
                    }
                    pos += line + 2;
                    self.left = Some(size);
                }
                Some(left) if left > 0 => {
                    let take = left.min(buf.len() - pos);
                    if take == 0 {
                        return Ok(pos);
                    }
                    out.extend_from_slice(&buf[pos..pos + take]);
                    pos += take;
                    self.left = Some(left - take);
                    if left > take {
                        return Ok(pos);
                    }
                }
                Some(_) => {
                    // The CRLF after a chunk's data.
                    if buf.len() - pos < 2 {
                        return Ok(pos);
                    }
                    if &buf[pos..pos + 2] != b"\r\n" {
                        return Err(ChunkError::MissingCrlf);
                    }
                    pos += 2;
                    self.left = None;
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = bytes[from..].iter().position(|&b| b == b'\r') {
        let at = from + at;
        if bytes.get(at + 1) == Some(&b'\n') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The size of a chunk-size line: hexadecimal digits (with surrounding spaces or
/// tabs, as Python's `int(line, 16)` allows), before any `;` extension.
fn chunk_size(line: &[u8]) -> Result<usize, ChunkError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(ChunkError::InvalidSize);
    }
    let mut size = 0usize;
    for &d in digits {
        let value = super::scan::hex_value(d).ok_or(ChunkError::InvalidSize)?;
        size = size * 16 + usize::from(value);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n";

    fn decode_in(data: &[u8], step: usize) -> (ChunkedDecoder, Result<Vec<u8>, ChunkError>) {
        let mut decoder = ChunkedDecoder::default();
        let mut out = Vec::new();
        for piece in data.chunks(step) {
            if let Err(e) = decoder.feed(piece, &mut out) {
                return (decoder, Err(e));
            }
        }
        (decoder, Ok(out))
    }

    #[test]
    fn any_split_of_the_bytes_gives_the_body() {
        for step in 1..=BODY.len() {
            let (decoder, body) = decode_in(BODY, step);
            assert_eq!(body.as_deref(), Ok(&b"hello world"[..]), "step {step}");
            assert!(decoder.done && !decoder.trailing);
        }
        let (decoder, body) = decode_in(b"A\r\n0123456789\r\n0\r\n\r\n", 3);
        assert_eq!(body.unwrap(), b"0123456789");
        assert!(decoder.done);
    }

    #[test]
    fn bytes_after_the_body_make_it_trailing() {
        let mut data = BODY.to_vec();
        data.extend_from_slice(b"HTTP/1.1 200 OK");
        let (decoder, body) = decode_in(&data, data.len());
        assert_eq!(body.unwrap(), b"hello world");
        assert!(decoder.done && decoder.trailing);
        let mut late = ChunkedDecoder::default();
        late.feed(b"0\r\n\r\n", &mut Vec::new()).unwrap();
        late.feed(b"x", &mut Vec::new()).unwrap();
        assert!(late.trailing);
    }

    #[test]
    fn invalid_bodies_are_errors() {
        assert_eq!(decode_in(b"zz\r\n", 4).1, Err(ChunkError::InvalidSize));
        assert_eq!(decode_in(b"\r\n", 4).1, Err(ChunkError::InvalidSize));
        assert_eq!(decode_in(b"2\r\nabXY", 8).1, Err(ChunkError::MissingCrlf));
        let long = vec![b'1'; MAX_SIZE_LINE + 1];
        assert_eq!(decode_in(&long, long.len()).1, Err(ChunkError::InvalidSize));
        assert_eq!(
            decode_in(b"1ffffffffffffffff\r\n", 40).1,
            Err(ChunkError::InvalidSize)
        );
        // An unfinished body is not an error, just not done.
        let (decoder, body) = decode_in(b"5\r\nhel", 2);
        assert_eq!(body.unwrap(), b"hel");
        assert!(!decoder.done);
    }
}
