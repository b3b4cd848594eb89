//! Chained token-block hashes: the foundation of token-prefix caching.
//!
//! A token sequence is cut into blocks of `block_size` tokens (16 by default).
//! Only full blocks are hashed; the last `len % block_size` tokens are the
//! *tail* and get a hash once the block they start is filled. Block `i`'s hash
//! depends on block `i - 1`'s hash, so two sequences share their first `n`
//! block hashes exactly when they share their first `n * block_size` tokens
//! (up to hash collisions):
//!
//! ```text
//! parent(0)   = 8 zero bytes
//! hash(i)     = XXH3-64(parent(i)                           8 bytes
//!                       ++ u32le(token(i*B)) ++ ...         4 bytes per token,
//!                       ++ u32le(token(i*B + B - 1)),       B tokens
//!                       seed)
//! parent(i+1) = hash(i)
//! ```
//!
//! A hash as bytes is XXH64's canonical (big-endian) form, which is what
//! `xxhash.xxh3_64_digest` returns in Python, so a router recomputes a chain
//! with `h = xxh3_64_digest(h + struct.pack(f"<{B}I", *block), seed)`.
//!
//! 64 bits, not 128: a cache keeps one hash per block of every cached chain (half
//! a byte per token at 16-token blocks instead of one), and nothing treats equal
//! block hashes as proof of equal content. They count shared prefixes
//! ([`shared_prefix_blocks`]) and key routing and the simulated upstream's prefix
//! cache, where a collision (about `n² / 2^65` among `n` distinct blocks) costs a
//! misreported count or a misrouted request, never wrong content. The cache's
//! prefix matching, which reuses content, uses the 128-bit semantic chain digests
//! instead (`node::chain_step`).
//!
//! That definition is all an upstream router needs to recompute the hashes;
//! `docs/tokens.md` repeats it with a Python snippet.
//!
//! A [`BlockHasher`] is the whole state needed to continue a sequence: the
//! last full block's hash, the count of blocks and the tail (fewer than
//! `block_size` tokens). Extending it costs O(new tokens) however long the
//! sequence already is, and cloning it costs O(block_size). A cache keeps, per
//! chain node, the hashes that node's extension produced plus the state after
//! it; the node's full hash list is its ancestors' lists followed by its own.

use std::fmt;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The hash of one full block.
pub type BlockHash = u64;

/// Default tokens per block (vLLM's default as well).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Default XXH3 seed. Pick a secret seed when hashes of different tenants are
/// compared (XXH3 is not collision-resistant against a chosen input).
pub const DEFAULT_SEED: u64 = 0;

/// The parent hash of the first block.
pub const ROOT_PARENT: BlockHash = 0;

/// Bytes of one hash in its canonical (big-endian) byte form.
pub const HASH_BYTES: usize = 8;

/// An invalid block-hasher configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSizeError {
    pub block_size: usize,
}

impl fmt::Display for BlockSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block_size must be at least 1 token, got {}",
            self.block_size
        )
    }
}

impl std::error::Error for BlockSizeError {}

/// The hash of one block given its parent's hash.
pub fn hash_block(parent: BlockHash, tokens: &[u32], seed: u64) -> BlockHash {
    hash_block_with(&mut Vec::new(), parent, tokens, seed)
}

/// [`hash_block`] with a caller-provided scratch buffer (reused across blocks).
#[inline]
fn hash_block_with(buf: &mut Vec<u8>, parent: BlockHash, tokens: &[u32], seed: u64) -> BlockHash {
    buf.clear();
    buf.reserve(HASH_BYTES + 4 * tokens.len());
    buf.extend_from_slice(&parent.to_be_bytes());
    for &token in tokens {
        buf.extend_from_slice(&token.to_le_bytes());
    }
    xxh3_64_with_seed(buf, seed)
}

/// The incremental state of a block-hashed token sequence.
///
/// Cheap to clone (a fixed header plus at most `block_size - 1` tail tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockHasher {
    block_size: usize,
    seed: u64,
    /// Hash of the last full block, or [`ROOT_PARENT`] before the first.
    last: BlockHash,
    blocks: u64,
    tail: Vec<u32>,
}

impl BlockHasher {
    /// An empty sequence. `block_size` must be at least 1.
    pub fn new(block_size: usize, seed: u64) -> Result<Self, BlockSizeError> {
        if block_size == 0 {
            return Err(BlockSizeError { block_size });
        }
        Ok(Self {
            block_size,
            seed,
            last: ROOT_PARENT,
            blocks: 0,
            tail: Vec::new(),
        })
    }

    /// The state of a sequence known by its parts: `blocks` full blocks, the last
    /// of which hashed to `last` (ignored when `blocks` is 0), then `tail`.
    /// A chain node stores only those parts (its hashes and its tail) and
    /// resumes its state from them. `tail` must be shorter than `block_size`.
    pub fn resume(
        block_size: usize,
        seed: u64,
        last: BlockHash,
        blocks: u64,
        tail: &[u32],
    ) -> Result<Self, BlockSizeError> {
        if block_size == 0 || tail.len() >= block_size {
            return Err(BlockSizeError { block_size });
        }
        Ok(Self {
            block_size,
            seed,
            last: if blocks == 0 { ROOT_PARENT } else { last },
            blocks,
            tail: tail.to_vec(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Full blocks hashed so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Tokens seen so far (full blocks and tail).
    pub fn tokens(&self) -> u64 {
        self.blocks * self.block_size as u64 + self.tail.len() as u64
    }

    /// Tokens covered by full blocks.
    pub fn block_tokens(&self) -> u64 {
        self.blocks * self.block_size as u64
    }

    /// The tokens after the last full block (fewer than `block_size`).
    pub fn tail(&self) -> &[u32] {
        &self.tail
    }

    /// Hash of the last full block; `None` before the first block is full.
    pub fn last_hash(&self) -> Option<BlockHash> {
        (self.blocks > 0).then_some(self.last)
    }

    /// Append tokens, pushing the hash of every block they complete onto `out`.
    ///
    /// O(`tokens.len()`), independent of how many tokens came before.
    pub fn extend(&mut self, tokens: &[u32], out: &mut Vec<BlockHash>) {
        let bs = self.block_size;
        let mut rest = tokens;
        if self.tail.len() + rest.len() < bs {
            self.tail.extend_from_slice(rest);
            return;
        }
        let mut buf = Vec::with_capacity(HASH_BYTES + 4 * bs);
        if !self.tail.is_empty() {
            let need = bs - self.tail.len();
            self.tail.extend_from_slice(&rest[..need]);
            rest = &rest[need..];
            let hash = hash_block_with(&mut buf, self.last, &self.tail, self.seed);
            self.push(hash, out);
            self.tail.clear();
        }
        out.reserve(rest.len() / bs);
        let mut chunks = rest.chunks_exact(bs);
        for block in &mut chunks {
            let hash = hash_block_with(&mut buf, self.last, block, self.seed);
            self.push(hash, out);
        }
        self.tail.extend_from_slice(chunks.remainder());
    }

    /// The state after appending `tokens`, and the hashes of the blocks they complete.
    pub fn extended(&self, tokens: &[u32]) -> (BlockHasher, Vec<BlockHash>) {
        let mut next = self.clone();
        let mut out = Vec::new();
        next.extend(tokens, &mut out);
        (next, out)
    }

    #[inline]
    fn push(&mut self, hash: BlockHash, out: &mut Vec<BlockHash>) {
        self.last = hash;
        self.blocks += 1;
        out.push(hash);
    }
}

/// Hashes of every full block of `tokens`, from scratch.
pub fn block_hashes(
    tokens: &[u32],
    block_size: usize,
    seed: u64,
) -> Result<Vec<BlockHash>, BlockSizeError> {
    let (_, hashes) = BlockHasher::new(block_size, seed)?.extended(tokens);
    Ok(hashes)
}

/// Number of equal leading block hashes of two sequences. O(shared blocks).
///
/// Takes iterators so a chain stored as per-node segments can be compared
/// without concatenating it: `nodes.iter().flat_map(|n| n.hashes.iter())`.
pub fn shared_prefix_blocks<'a, 'b>(
    a: impl IntoIterator<Item = &'a BlockHash>,
    b: impl IntoIterator<Item = &'b BlockHash>,
) -> usize {
    a.into_iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokens covered by the shared leading blocks.
pub fn shared_prefix_tokens<'a, 'b>(
    a: impl IntoIterator<Item = &'a BlockHash>,
    b: impl IntoIterator<Item = &'b BlockHash>,
    block_size: usize,
) -> usize {
    shared_prefix_blocks(a, b).saturating_mul(block_size)
}

/// [`shared_prefix_blocks`] over hashes in byte form ([`hashes_to_bytes`]),
/// without decoding them; `None` when a length is not a multiple of [`HASH_BYTES`].
pub fn shared_prefix_blocks_in_bytes(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() % HASH_BYTES != 0 || b.len() % HASH_BYTES != 0 {
        return None;
    }
    Some(
        a.chunks_exact(HASH_BYTES)
            .zip(b.chunks_exact(HASH_BYTES))
            .take_while(|(x, y)| x == y)
            .count(),
    )
}

/// Hashes as bytes: [`HASH_BYTES`] canonical (big-endian) bytes per hash, concatenated.
pub fn hashes_to_bytes(hashes: &[BlockHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hashes.len() * HASH_BYTES);
    for hash in hashes {
        out.extend_from_slice(&hash.to_be_bytes());
    }
    out
}

/// The inverse of [`hashes_to_bytes`]; `None` when the length is not a multiple of
/// [`HASH_BYTES`].
pub fn hashes_from_bytes(bytes: &[u8]) -> Option<Vec<BlockHash>> {
    if bytes.len() % HASH_BYTES != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(HASH_BYTES)
            .map(|c| {
                let mut b = [0u8; HASH_BYTES];
                b.copy_from_slice(c);
                BlockHash::from_be_bytes(b)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: u32) -> Vec<u32> {
        (0..n)
            .map(|i| i.wrapping_mul(2_654_435_761) % 200_000)
            .collect()
    }

    #[test]
    fn block_size_is_validated() {
        assert!(BlockHasher::new(0, 0).is_err());
        assert!(BlockHasher::new(1, 0).is_ok());
        let msg = BlockHasher::new(0, 0).unwrap_err().to_string();
        assert!(msg.contains("at least 1"), "{msg}");
    }

    #[test]
    fn definition_matches_xxh3_of_parent_and_tokens() {
        let t = tokens(40);
        let hashes = block_hashes(&t, 16, 7).unwrap();
        assert_eq!(hashes.len(), 2);
        let mut input = vec![0u8; HASH_BYTES];
        for tok in &t[..16] {
            input.extend_from_slice(&tok.to_le_bytes());
        }
        let h0 = xxh3_64_with_seed(&input, 7);
        assert_eq!(hashes[0], h0);
        assert_eq!(hash_block(ROOT_PARENT, &t[..16], 7), h0);
        let mut input = h0.to_be_bytes().to_vec();
        for tok in &t[16..32] {
            input.extend_from_slice(&tok.to_le_bytes());
        }
        assert_eq!(hashes[1], xxh3_64_with_seed(&input, 7));
    }

    #[test]
    fn known_vectors() {
        // Pinned (and checked against python-xxhash's `xxh3_64_digest`) so a
        // change to the definition cannot go unnoticed: block hashes are stored
        // and compared across processes and by upstream routers.
        let t: Vec<u32> = (0..32).collect();
        let h = hashes_to_bytes(&block_hashes(&t, 16, DEFAULT_SEED).unwrap());
        let hex: Vec<String> = h
            .chunks(HASH_BYTES)
            .map(|c| c.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        assert_eq!(hex, ["24becc5361303c06", "e571602979b80229"]);
        let h = block_hashes(&[7, 8, 9, 10], 4, 42).unwrap();
        assert_eq!(format!("{:016x}", h[0]), "5d932b933d86e24b");
    }

    #[test]
    fn incremental_equals_from_scratch_for_every_split() {
        let t = tokens(100);
        for bs in [1, 3, 16, 64, 128] {
            let full = block_hashes(&t, bs, 1).unwrap();
            for cut in 0..=t.len() {
                let mut h = BlockHasher::new(bs, 1).unwrap();
                let mut out = Vec::new();
                h.extend(&t[..cut], &mut out);
                let first = out.len();
                h.extend(&t[cut..], &mut out);
                assert_eq!(out, full, "bs={bs} cut={cut}");
                assert_eq!(first, cut / bs);
                assert_eq!(h.tokens(), t.len() as u64);
                assert_eq!(h.blocks(), (t.len() / bs) as u64);
                assert_eq!(h.tail(), &t[t.len() / bs * bs..]);
            }
        }
    }

    #[test]
    fn token_by_token_equals_from_scratch() {
        let t = tokens(50);
        let mut h = BlockHasher::new(16, 0).unwrap();
        let mut out = Vec::new();
        for tok in &t {
            h.extend(std::slice::from_ref(tok), &mut out);
        }
        assert_eq!(out, block_hashes(&t, 16, 0).unwrap());
        assert_eq!(h.last_hash(), out.last().copied());
    }

    #[test]
    fn resume_continues_a_sequence() {
        let t = tokens(70);
        let full = block_hashes(&t, 16, 3).unwrap();
        let (first, _) = BlockHasher::new(16, 3).unwrap().extended(&t[..37]);
        let resumed = BlockHasher::resume(16, 3, full[1], 2, first.tail()).unwrap();
        assert_eq!(resumed, first);
        let (_, rest) = resumed.extended(&t[37..]);
        assert_eq!(rest, &full[2..]);
        assert_eq!(
            BlockHasher::resume(16, 3, 99, 0, &[]).unwrap(),
            BlockHasher::new(16, 3).unwrap()
        );
        assert!(BlockHasher::resume(4, 0, 0, 0, &[1, 2, 3, 4]).is_err());
    }

    #[test]
    fn extended_leaves_the_original_alone() {
        let base = BlockHasher::new(4, 0).unwrap().extended(&[1, 2, 3, 4, 5]).0;
        let (a, ha) = base.extended(&[6, 7, 8]);
        let (b, hb) = base.extended(&[9, 9, 9]);
        assert_eq!(base.tokens(), 5);
        assert_eq!(base.tail(), &[5]);
        assert_eq!((a.tokens(), b.tokens()), (8, 8));
        assert_eq!((ha.len(), hb.len()), (1, 1));
        assert_ne!(ha, hb);
    }

    #[test]
    fn empty_and_short_sequences_have_no_blocks() {
        let h = BlockHasher::new(16, 0).unwrap();
        assert_eq!(h.last_hash(), None);
        assert_eq!(h.tokens(), 0);
        let (h, out) = h.extended(&[1, 2, 3]);
        assert!(out.is_empty());
        assert_eq!(h.last_hash(), None);
        assert_eq!(h.tokens(), 3);
        assert_eq!(h.block_tokens(), 0);
    }

    #[test]
    fn seed_and_block_size_change_the_hashes() {
        let t = tokens(32);
        let a = block_hashes(&t, 16, 0).unwrap();
        assert_ne!(a, block_hashes(&t, 16, 1).unwrap());
        assert_ne!(a[0], block_hashes(&t, 8, 0).unwrap()[0]);
    }

    #[test]
    fn hashes_chain_so_an_earlier_difference_changes_every_later_block() {
        let a = tokens(64);
        let mut b = a.clone();
        b[3] += 1;
        let ha = block_hashes(&a, 16, 0).unwrap();
        let hb = block_hashes(&b, 16, 0).unwrap();
        assert!(ha.iter().zip(&hb).all(|(x, y)| x != y));
    }

    #[test]
    fn shared_prefix() {
        let a = tokens(100);
        let mut b = a.clone();
        b[40] += 1;
        let ha = block_hashes(&a, 16, 0).unwrap();
        let hb = block_hashes(&b, 16, 0).unwrap();
        assert_eq!(shared_prefix_blocks(&ha, &hb), 2);
        assert_eq!(shared_prefix_tokens(&ha, &hb, 16), 32);
        assert_eq!(shared_prefix_blocks(&ha, &ha), ha.len());
        assert_eq!(shared_prefix_blocks(&ha, &ha[..3]), 3);
        assert_eq!(shared_prefix_blocks(&ha, &[]), 0);
        let (ba, bb) = (hashes_to_bytes(&ha), hashes_to_bytes(&hb));
        assert_eq!(shared_prefix_blocks_in_bytes(&ba, &bb), Some(2));
        assert_eq!(shared_prefix_blocks_in_bytes(&ba, &ba), Some(ha.len()));
        assert_eq!(shared_prefix_blocks_in_bytes(&ba, &[]), Some(0));
        assert_eq!(shared_prefix_blocks_in_bytes(&ba[..15], &bb), None);
        assert_eq!(shared_prefix_blocks_in_bytes(&ba, &bb[1..]), None);
        // Segmented chains compare without concatenation.
        let segments = [&ha[..1], &ha[1..4], &ha[4..]];
        assert_eq!(
            shared_prefix_blocks(segments.iter().flat_map(|s| s.iter()), &ha),
            ha.len()
        );
    }

    #[test]
    fn bytes_round_trip() {
        let h = block_hashes(&tokens(64), 16, 0).unwrap();
        let bytes = hashes_to_bytes(&h);
        assert_eq!(bytes.len(), 4 * HASH_BYTES);
        assert_eq!(&bytes[..HASH_BYTES], &h[0].to_be_bytes());
        assert_eq!(hashes_from_bytes(&bytes).unwrap(), h);
        assert_eq!(hashes_from_bytes(&bytes[..15]), None);
        assert_eq!(hashes_from_bytes(&[]).unwrap(), Vec::<BlockHash>::new());
    }
}
