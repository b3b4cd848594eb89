//! A `Transfer-Encoding: chunked` HTTP/1.1 body, decoded.
//!
//! The upstream client (`warmsocket/httpclient.py`) parses a response's head
//! (`http_head.rs`), once, and hands the chunked body here: one call per read, whatever the
//! number of chunks in it (an SSE stream is usually one chunk per event). The server's
//! request parser (`warmsocket/http11.py`) decodes chunked request bodies here too, and
//! takes the bytes after the body back (`rest`) for the next request on the connection.
//! Chunk extensions (`;name=value`) and trailers are read past and dropped; what the
//! framing may buffer is bounded (a size line, the trailers), not only the data.

/// Why a chunked body is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk-size line that is not hexadecimal, or longer than any sane one.
    InvalidSize,
    /// Chunk data not followed by CRLF.
    MissingCrlf,
    /// Trailers longer than `MAX_TRAILERS` bytes.
    TrailersTooLarge,
}

impl ChunkError {
    pub fn message(self) -> &'static str {
        match self {
            ChunkError::InvalidSize => "invalid chunk size",
            ChunkError::MissingCrlf => "chunk not followed by CRLF",
            ChunkError::TrailersTooLarge => "chunked body trailers too large",
        }
    }
}

/// Longest chunk-size line (size and extensions) accepted.
const MAX_SIZE_LINE: usize = 1024;
/// Most bytes of trailers (after the last chunk's size line) accepted, as for a head.
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    /// Bytes not consumed yet (a partial size line, CRLF or trailers).
    pending: Vec<u8>,
    /// Data bytes left in the current chunk; `None` between chunks.
    left: Option<usize>,
    /// In the trailers (`pending` starts at the CRLF that ended the last chunk's size
    /// line), with this many of their bytes searched for the end already.
    trailers: Option<usize>,
    /// The last chunk and its trailers have been read.
    pub done: bool,
    /// Bytes came after the end of the body (a response's connection is not reusable).
    pub trailing: bool,
    /// The bytes that came after the end of the body, in the read that ended it.
    pub rest: Vec<u8>,
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
            self.rest = std::mem::take(&mut self.pending);
        }
        Ok(())
    }

    /// Data bytes of the current chunk not received yet (0 between chunks).
    pub fn chunk_left(&self) -> usize {
        self.left.unwrap_or(0)
    }

    /// Decode what `buf` holds; returns how many bytes were consumed.
    fn decode(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut pos = 0;
        loop {
            if let Some(searched) = self.trailers {
                // Up to the empty line that ends the trailers; each byte searched once.
                let from = searched.saturating_sub(3);
                return match find(&buf[pos + from..], b"\r\n\r\n") {
                    Some(at) if from + at <= MAX_TRAILERS => {
                        self.done = true;
                        self.trailers = None;
                        Ok(pos + from + at + 4)
                    }
                    None if buf.len() - pos <= MAX_TRAILERS => {
                        self.trailers = Some(buf.len() - pos);
                        Ok(pos)
                    }
                    _ => Err(ChunkError::TrailersTooLarge),
                };
            }
            match self.left {
                None => {
                    let Some(line) = find_crlf(&buf[pos..]) else {
                        if buf.len() - pos > MAX_SIZE_LINE {
                            return Err(ChunkError::InvalidSize);
                        }
                        return Ok(pos);
                    };
                    if line > MAX_SIZE_LINE {
                        // (Arrived whole in one read: the limit holds all the same.)
                        return Err(ChunkError::InvalidSize);
                    }
                    let size = chunk_size(&buf[pos..pos + line])?;
                    if size == 0 {
                        // The last chunk: the trailers follow, up to an empty line.
                        pos += line;
                        self.trailers = Some(0);
                        continue;
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
        assert_eq!(decoder.rest, b"HTTP/1.1 200 OK");
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
        // A long extension arriving whole, its line end with it, in one read or many.
        let mut extended = b"1;".to_vec();
        extended.extend(vec![b'x'; MAX_SIZE_LINE]);
        extended.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        for step in [extended.len(), 7] {
            assert_eq!(decode_in(&extended, step).1, Err(ChunkError::InvalidSize));
        }
        assert_eq!(
            decode_in(b"1ffffffffffffffff\r\n", 40).1,
            Err(ChunkError::InvalidSize)
        );
        for sign in [&b"-1\r\n"[..], b"+1\r\n", b"0x1\r\n", b"1_0\r\n"] {
            assert_eq!(decode_in(sign, 8).1, Err(ChunkError::InvalidSize));
        }
        // An unfinished body is not an error, just not done.
        let (decoder, body) = decode_in(b"5\r\nhel", 2);
        assert_eq!(body.unwrap(), b"hel");
        assert!(!decoder.done);
        assert_eq!(decoder.chunk_left(), 2);
    }

    #[test]
    fn trailers_are_bounded_whatever_the_split() {
        let mut endless = b"0\r\n".to_vec();
        while endless.len() <= MAX_TRAILERS + 16 {
            endless.extend_from_slice(b"T: x\r\n");
        }
        for step in [7, 4096, endless.len()] {
            assert_eq!(
                decode_in(&endless, step).1,
                Err(ChunkError::TrailersTooLarge),
                "step {step}"
            );
        }
        let mut fine = b"0\r\n".to_vec();
        fine.extend_from_slice(&b"T: x\r\n".repeat(100));
        fine.extend_from_slice(b"\r\n");
        let (decoder, body) = decode_in(&fine, 5);
        assert!(body.unwrap().is_empty() && decoder.done && !decoder.trailing);
    }
}
