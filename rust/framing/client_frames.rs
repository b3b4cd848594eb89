//! A client's WebSocket frames split off the byte stream, the common ones unmasked
//! here (RFC 6455 section 5).
//!
//! Almost every frame a client sends is a final, unfragmented, uncompressed text or
//! binary frame: a whole message. `ClientFrames` hands such a frame's payload on at
//! once, unmasked in 8-byte steps. Every other frame (ping, pong, close, the pieces
//! of a fragmented message) goes on as its raw bytes, whole, to the `websockets`
//! protocol object, which keeps doing what it does for them (pongs, the closing
//! handshake, protocol errors). Because that object only ever receives whole frames,
//! it always sits at a frame boundary, and the two readers never disagree about where
//! a frame starts.
//!
//! Anything this reader does not accept as a well-formed client frame (an unmasked
//! frame, RSV bits, an unknown opcode, a fragmented control frame, a frame longer
//! than the size limit) hands the rest of the stream, from that frame on, to the
//! protocol object for good: it then fails the connection with the close code it
//! gives such input. An oversized frame is handed over as soon as its header is
//! read, so its payload is never buffered here.

/// What one `feed` produced, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The unmasked payload of a final text (`true`) or binary (`false`) frame.
    Message { text: bool, payload: Vec<u8> },
    /// Raw bytes for the protocol object: whole frames, or (once handed over)
    /// everything from the first frame this reader did not accept.
    Raw(Vec<u8>),
}

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The parsed header of a complete frame in the buffer.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Where the payload starts (after the header and mask).
    start: usize,
    len: usize,
}

enum Next {
    /// A whole frame at the start of the buffer.
    Frame(Header),
    /// More bytes are needed: the whole frame's length when its header is read.
    Incomplete(Option<usize>),
    /// Not a frame this reader accepts: hand the stream over.
    HandOver,
}

/// Splits a client's byte stream into frames (see the module docs).
#[derive(Debug)]
pub struct ClientFrames {
    buffer: Vec<u8>,
    max_size: Option<u64>,
    /// Inside a fragmented message: its frames go to the protocol object.
    fragmented: bool,
    handed_over: bool,
}

impl ClientFrames {
    /// `max_size`: the protocol object's limit on a frame's payload (None: none).
    pub fn new(max_size: Option<u64>) -> ClientFrames {
        ClientFrames {
            buffer: Vec::new(),
            max_size,
            fragmented: false,
            handed_over: false,
        }
    }

    /// Whether the stream went to the protocol object for good.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// Bytes of an incomplete frame held until the rest arrives.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The held bytes of an incomplete frame, taken out: for the protocol object
    /// when the caller stops using this reader.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// The pieces that `data` completes, in order. Consecutive raw frames are
    /// joined into one piece.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Piece> {
        let mut pieces = Vec::new();
        if self.handed_over {
            if !data.is_empty() {
                pieces.push(Piece::Raw(data.to_vec()));
            }
            return pieces;
        }
        // Frames are read from `data` in place while nothing is buffered; a partial
        // frame at the end is kept for the next call. A buffered partial frame is
        // appended to, never copied again, so a large message arriving in many reads
        // costs linear time.
        if self.buffer.is_empty() {
            let (pos, frame_len) = self.split(data, &mut pieces);
            if pos < data.len() {
                let held = data.len() - pos;
                let mut rest = Vec::with_capacity(room_for(frame_len, held));
                rest.extend_from_slice(&data[pos..]);
                self.buffer = rest;
            }
        } else {
            let mut joined = std::mem::take(&mut self.buffer);
            joined.extend_from_slice(data);
            let (pos, frame_len) = self.split(&joined, &mut pieces);
            if pos < joined.len() {
                joined.drain(..pos);
                let room = room_for(frame_len, joined.len());
                joined.reserve(room.saturating_sub(joined.len()));
                self.buffer = joined;
            }
        }
        pieces
    }

    /// Splits the whole frames off the start of `bytes` into `pieces`; returns how
    /// many bytes they took, and the length of the incomplete frame after them when
    /// its header is there.
    fn split(&mut self, bytes: &[u8], pieces: &mut Vec<Piece>) -> (usize, Option<usize>) {
        let mut pos = 0;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            match self.next(rest) {
                Next::Incomplete(frame_len) => return (pos, frame_len),
                Next::HandOver => {
                    self.handed_over = true;
                    push_raw(pieces, rest);
                    return (bytes.len(), None);
                }
                Next::Frame(header) => {
                    let end = header.start + header.len;
                    let frame = &rest[..end];
                    let whole_message = header.fin
                        && (header.opcode == OP_TEXT || header.opcode == OP_BINARY)
                        && !self.fragmented;
                    if whole_message {
                        let mut payload = vec![0; header.len];
                        unmask(&frame[header.start..], header.mask, &mut payload);
                        pieces.push(Piece::Message {
                            text: header.opcode == OP_TEXT,
                            payload,
                        });
                    } else {
                        self.track_fragments(&header);
                        push_raw(pieces, frame);
                    }
                    pos += end;
                }
            }
        }
        (pos, None)
    }

    fn track_fragments(&mut self, header: &Header) {
        match header.opcode {
            OP_TEXT | OP_BINARY if !header.fin => self.fragmented = true,
            OP_CONT if header.fin => self.fragmented = false,
            _ => {}
        }
    }

    /// The frame at the start of `bytes`, if it is whole and acceptable.
    fn next(&self, bytes: &[u8]) -> Next {
        let [b0, b1, ..] = *bytes else {
            return Next::Incomplete(None);
        };
        let fin = b0 & 0x80 != 0;
        let rsv = b0 & 0x70;
        let opcode = b0 & 0x0F;
        let masked = b1 & 0x80 != 0;
        let control = opcode >= OP_CLOSE;
        let known = matches!(
            opcode,
            OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        );
        if rsv != 0 || !masked || !known || (control && !fin) {
            return Next::HandOver;
        }
        let (len, mut start) = match b1 & 0x7F {
            126 => match bytes.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Next::Incomplete(None),
            },
            127 => match bytes.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(b) => (u64::from_be_bytes(b), 10),
                None => return Next::Incomplete(None),
            },
            small => (u64::from(small), 2),
        };
        if (control && len > 125) || self.max_size.is_some_and(|max| len > max) {
            return Next::HandOver;
        }
        let Some(mask) = bytes
            .get(start..start + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
        else {
            return Next::Incomplete(None);
        };
        start += 4;
        let Ok(len) = usize::try_from(len) else {
            return Next::HandOver;
        };
        match start.checked_add(len) {
            Some(end) if end <= bytes.len() => Next::Frame(Header {
                fin,
                opcode,
                mask,
                start,
                len,
            }),
            Some(end) => Next::Incomplete(Some(end)),
            None => Next::HandOver,
        }
    }
}

/// Bytes reserved past what an incomplete frame has brought so far.
const RESERVE_AHEAD: usize = 4 << 20;

/// The capacity to hold an incomplete frame of `frame_len` bytes (when its header has
/// come) of which `held` are here: the whole frame at once when it is within
/// `RESERVE_AHEAD` of what came, instead of growing by doubling; past that, what came
/// plus `RESERVE_AHEAD` (then doubling: still linear). A header's length is the
/// client's word: a frame that says 2^40 bytes must not reserve them.
fn room_for(frame_len: Option<usize>, held: usize) -> usize {
    frame_len
        .unwrap_or(0)
        .min(held.saturating_add(RESERVE_AHEAD))
}

fn push_raw(pieces: &mut Vec<Piece>, bytes: &[u8]) {
    if let Some(Piece::Raw(raw)) = pieces.last_mut() {
        raw.extend_from_slice(bytes);
    } else {
        pieces.push(Piece::Raw(bytes.to_vec()));
    }
}

/// `out[i] = masked[i] ^ mask[i % 4]`, eight bytes at a time (`out.len() == masked.len()`).
pub fn unmask(masked: &[u8], mask: [u8; 4], out: &mut [u8]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = masked.chunks_exact(8);
    let mut outs = out.chunks_exact_mut(8);
    for (chunk, dst) in (&mut chunks).zip(&mut outs) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        dst.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Eight bytes per step keep the mask's phase: the tail starts at phase 0.
    for (i, (byte, dst)) in chunks
        .remainder()
        .iter()
        .zip(outs.into_remainder())
        .enumerate()
    {
        *dst = byte ^ mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame: FIN bit, opcode, masked payload.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    #[test]
    fn a_declared_length_reserves_no_more_than_what_came_and_a_margin() {
        // No size limit, a header that says a terabyte, one byte of it.
        let mut frames = ClientFrames::new(None);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&MASK);
        header.push(b'x');
        assert!(frames.feed(&header).is_empty());
        assert!(frames.buffer.capacity() <= header.len() + RESERVE_AHEAD);
        assert!(frames.feed(&[b'y'; 1000]).is_empty());
        assert!(frames.buffer.capacity() <= 2 * (header.len() + 1000 + RESERVE_AHEAD));
        // A frame within the margin is still held in one allocation.
        let mut frames = ClientFrames::new(None);
        let whole = frame(true, OP_BINARY, &vec![7; 300_000]);
        assert!(frames.feed(&whole[..20]).is_empty());
        let room = frames.buffer.capacity();
        assert!(room >= whole.len(), "{room}");
        assert!(frames.feed(&whole[20..]).len() == 1);
    }

    fn message(text: bool, payload: &[u8]) -> Piece {
        Piece::Message {
            text,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn unmask_matches_the_bytewise_definition_at_every_length() {
        let data: Vec<u8> = (0..100u8).map(|b| b.wrapping_mul(31)).collect();
        for len in 0..data.len() {
            let mut out = vec![0; len];
            unmask(&data[..len], MASK, &mut out);
            let expected: Vec<u8> = data[..len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(out, expected, "length {len}");
        }
    }

    #[test]
    fn whole_messages_of_every_length_class_come_out_unmasked() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut reader = ClientFrames::new(None);
            let pieces = reader.feed(&frame(true, OP_TEXT, &payload));
            assert_eq!(pieces, vec![message(true, &payload)], "length {len}");
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn frames_split_at_every_byte_come_out_the_same() {
        let mut stream = frame(true, OP_TEXT, br#"{"type":"response.create"}"#);
        stream.extend(frame(true, OP_PING, b"hi"));
        stream.extend(frame(true, OP_BINARY, &[1, 2, 3, 4, 5, 6, 7, 8, 9]));
        let mut whole = ClientFrames::new(Some(1 << 20));
        let expected = whole.feed(&stream);
        assert_eq!(expected.len(), 3);
        for cut in 0..=stream.len() {
            let mut reader = ClientFrames::new(Some(1 << 20));
            let mut pieces = reader.feed(&stream[..cut]);
            pieces.extend(reader.feed(&stream[cut..]));
            assert_eq!(pieces, expected, "cut at {cut}");
            assert_eq!(reader.buffered(), 0);
        }
        // One byte at a time, too.
        let mut reader = ClientFrames::new(Some(1 << 20));
        let pieces: Vec<Piece> = stream.iter().flat_map(|b| reader.feed(&[*b])).collect();
        assert_eq!(pieces, expected);
    }

    #[test]
    fn a_large_frame_in_many_reads_is_buffered_once_at_its_full_length() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut stream = frame(true, OP_PING, b"p");
        stream.extend(frame(true, OP_TEXT, &payload));
        stream.extend(frame(true, OP_TEXT, b"after"));
        let big_end = stream.len() - frame(true, OP_TEXT, b"after").len();
        let mut reader = ClientFrames::new(Some(1 << 20));
        let mut pieces = Vec::new();
        let mut capacity = None;
        for chunk in stream[..big_end].chunks(4096) {
            pieces.extend(reader.feed(chunk));
            if reader.buffered() > 16 {
                // The header is read: room for the whole frame, allocated once.
                let now = reader.buffer.capacity();
                assert!(now >= payload.len(), "capacity {now}");
                assert_eq!(
                    *capacity.get_or_insert(now),
                    now,
                    "the buffer never regrows"
                );
            }
        }
        pieces.extend(reader.feed(&stream[big_end..]));
        assert_eq!(
            pieces,
            vec![
                Piece::Raw(frame(true, OP_PING, b"p")),
                message(true, &payload),
                message(true, b"after"),
            ]
        );
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn control_frames_go_raw_in_order_between_messages() {
        let ping = frame(true, OP_PING, b"x");
        let close = frame(true, OP_CLOSE, &[0x03, 0xe8]);
        let mut stream = frame(true, OP_TEXT, b"a");
        stream.extend(&ping);
        stream.extend(&close);
        stream.extend(frame(true, OP_TEXT, b"b"));
        let pieces = ClientFrames::new(None).feed(&stream);
        let raw: Vec<u8> = [ping, close].concat(); // adjacent raw frames joined
        assert_eq!(
            pieces,
            vec![message(true, b"a"), Piece::Raw(raw), message(true, b"b")]
        );
    }

    #[test]
    fn a_fragmented_message_goes_raw_until_its_last_frame() {
        let parts = [
            frame(false, OP_TEXT, b"he"),
            frame(true, OP_PING, b""), // allowed between fragments
            frame(false, OP_CONT, b"ll"),
            frame(true, OP_CONT, b"o"),
        ];
        let mut stream = parts.concat();
        stream.extend(frame(true, OP_BINARY, b"next"));
        let pieces = ClientFrames::new(None).feed(&stream);
        assert_eq!(
            pieces,
            vec![Piece::Raw(parts.concat()), message(false, b"next")]
        );
    }

    #[test]
    fn a_text_frame_inside_a_fragmented_message_goes_raw() {
        // A protocol error the protocol object must see (it closes with 1002).
        let mut stream = frame(false, OP_TEXT, b"he");
        stream.extend(frame(true, OP_TEXT, b"oops"));
        let pieces = ClientFrames::new(None).feed(&stream);
        assert_eq!(pieces, vec![Piece::Raw(stream)]);
    }

    #[test]
    fn frames_it_does_not_accept_hand_the_stream_over_for_good() {
        let unmasked = {
            let mut f = vec![0x81, 0x01, b'a'];
            f.extend(frame(true, OP_TEXT, b"after"));
            f
        };
        let mut rsv = frame(true, OP_TEXT, b"a");
        rsv[0] |= 0x40;
        let mut unknown_opcode = frame(true, OP_TEXT, b"a");
        unknown_opcode[0] = 0x83;
        let fragmented_ping = frame(false, OP_PING, b"a");
        let long_ping = frame(true, OP_PING, &[0; 126]);
        for bad in [unmasked, rsv, unknown_opcode, fragmented_ping, long_ping] {
            let mut stream = frame(true, OP_TEXT, b"first");
            stream.extend(&bad);
            let mut reader = ClientFrames::new(None);
            let pieces = reader.feed(&stream);
            assert_eq!(
                pieces,
                vec![message(true, b"first"), Piece::Raw(bad.clone())]
            );
            assert!(reader.handed_over());
            let later = frame(true, OP_TEXT, b"later");
            assert_eq!(reader.feed(&later), vec![Piece::Raw(later.clone())]);
        }
    }

    #[test]
    fn an_oversized_frame_is_handed_over_from_its_header_alone() {
        let mut reader = ClientFrames::new(Some(100));
        let header = &frame(true, OP_TEXT, &[b'x'; 101])[..8];
        assert_eq!(reader.feed(header), vec![Piece::Raw(header.to_vec())]);
        assert!(reader.handed_over());
        assert_eq!(reader.buffered(), 0);
        // At the limit it is a message.
        let mut reader = ClientFrames::new(Some(100));
        let payload = [b'x'; 100];
        assert_eq!(
            reader.feed(&frame(true, OP_TEXT, &payload)),
            vec![message(true, &payload)]
        );
    }

    #[test]
    fn a_64_bit_length_beyond_memory_is_handed_over() {
        let mut bytes = vec![0x81, 0x80 | 127];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&MASK);
        let mut reader = ClientFrames::new(None);
        assert_eq!(reader.feed(&bytes), vec![Piece::Raw(bytes.clone())]);
        assert!(reader.handed_over());
    }

    #[test]
    fn a_partial_header_waits() {
        let mut reader = ClientFrames::new(None);
        let f = frame(true, OP_TEXT, &[7; 300]);
        assert_eq!(reader.feed(&f[..3]), vec![]);
        assert_eq!(reader.buffered(), 3);
        assert_eq!(reader.feed(&f[3..]), vec![message(true, &[7; 300])]);
        assert_eq!(reader.feed(&f[..10]), vec![]);
        assert_eq!(reader.take_buffered(), f[..10].to_vec());
        assert_eq!(reader.buffered(), 0);
    }
}
