//! Response nodes: one response's own items, settings and meta, and a link to its
//! parent. A chain of responses is a linked list of `Arc<Node>` from the newest
//! response back to the root, so forks share their common prefix and a node's full
//! context stays alive for as long as anything (an index entry, a child, a binding, a
//! view) holds the node.
//!
//! Each node stores its chain's cumulative counts (depth, items, bytes, tokens),
//! computed from its parent's in O(1), so creating a turn costs O(its own items)
//! whatever the chain length.
//!
//! With a tokenizer ([`TokenConfig`]), a node also stores the block hashes its own
//! items' tokens completed and the token tail after it (with the last hash, that is
//! the whole [`BlockHasher`] state), so a child extends the chain's hashes in
//! O(its own tokens). Every node also carries the *chain digest* of its context
//! (the semantic digests of its items chained from the owner's seed), the key the
//! cache's prefix index is built from.
//!
//! Memory accounting: a node adds its estimated cost to a shared [`Meter`] when built
//! and subtracts it in `Drop`, so the meter counts exactly the nodes alive anywhere.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_128;

use crate::blocks::{BlockHash, BlockHasher, BlockSizeError, HASH_BYTES, ROOT_PARENT};
use crate::item::{array_len, Item, Items};
use crate::token::{TokenError, Tokenizer};

/// Estimated fixed cost of one node beyond its bytes: the `Node` itself, two item
/// batches, the `Arc` headers and the index entry that usually points at it.
pub const NODE_OVERHEAD: u64 = 320;
/// Estimated fixed cost of one item beyond its canonical JSON: the `Item`, its `Arc`
/// header, the slot in its batch and the extracted strings of a typical item.
pub const ITEM_OVERHEAD: u64 = 160;
/// Estimated cost of one prefix-index entry (one per item of an indexed node): its
/// slot in the index's hash map (64 bytes, at the map's load factor), measured at
/// about 85 bytes a position with `_core.rust_heap`.
pub const INDEX_OVERHEAD: u64 = 96;
/// Bytes per stored token id (kept ids, and the tails of the block state).
pub const TOKEN_ID_BYTES: u64 = 4;

/// Bytes held by live nodes, shared by a cache and every node it built.
#[derive(Debug, Default)]
pub struct Meter {
    bytes: AtomicU64,
    /// Nodes built so far: each node's `serial`.
    nodes: AtomicU64,
    /// Prefix index positions of the nodes alive now (`Node::note_indexed`): the
    /// index's other positions are dead, and hold their node's allocation until swept.
    indexed: AtomicU64,
}

impl Meter {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    pub fn indexed_positions(&self) -> u64 {
        self.indexed.load(Ordering::Acquire)
    }
}

/// How a cache tokenises: the tokenizer and the block hashing of the chains.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub tokenizer: Arc<Tokenizer>,
    pub block_size: usize,
    pub seed: u64,
    /// Keep every item's token ids (4 bytes per token) for upstreams that take
    /// token ids; otherwise only counts, block hashes and tails are kept.
    pub keep_ids: bool,
    empty: BlockHasher,
}

impl TokenConfig {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        block_size: usize,
        seed: u64,
        keep_ids: bool,
    ) -> Result<TokenConfig, BlockSizeError> {
        Ok(TokenConfig {
            tokenizer,
            block_size,
            seed,
            keep_ids,
            empty: BlockHasher::new(block_size, seed)?,
        })
    }

    /// Token counts (and, transiently, ids) for a batch.
    pub fn tokenize(&self, items: &Items) -> Result<Items, TokenError> {
        items.tokenize(&self.tokenizer)
    }

    /// The block state after `node` (an empty sequence for `None`).
    pub fn state_after(&self, node: Option<&Node>) -> BlockHasher {
        let (last, tokens, tail) = match node {
            None => (ROOT_PARENT, 0, &[][..]),
            Some(n) => (n.last_hash, n.tokens, n.tail()),
        };
        let blocks = tokens / self.block_size as u64;
        // Tails come from states of this block size, so `resume` cannot fail.
        BlockHasher::resume(self.block_size, self.seed, last, blocks, tail)
            .unwrap_or_else(|_| self.empty.clone())
    }

    /// The token fields of a node with these items under `parent`, and the
    /// batches to store (without token ids unless they are kept). Both batches
    /// must have been tokenised by this config's tokenizer. O(own tokens).
    pub fn node_tokens(
        &self,
        parent: Option<&Node>,
        input: &Items,
        output: &Items,
    ) -> Result<(NodeTokens, Items, Items), TokenError> {
        let input = self.tokenize(input)?;
        let output = self.tokenize(output)?;
        let mut state = self.state_after(parent);
        let mut hashes = Vec::new();
        state.extend(input.token_ids().unwrap_or_default(), &mut hashes);
        let input_tail = state.tail().to_vec();
        state.extend(output.token_ids().unwrap_or_default(), &mut hashes);
        let tokens = NodeTokens::new(
            hashes.into_boxed_slice(),
            state.tail(),
            &input_tail,
            state.last_hash().unwrap_or(ROOT_PARENT),
        );
        if self.keep_ids {
            Ok((tokens, input.own_batch(), output.own_batch()))
        } else {
            let (input, output) = Items::pair_without_token_ids(&input, &output);
            Ok((tokens, input, output))
        }
    }
}

/// The block-hash fields of a node: empty without a tokenizer.
#[derive(Debug, Clone, Default)]
pub struct NodeTokens {
    /// Hashes of the blocks this node's tokens completed.
    pub hashes: Box<[BlockHash]>,
    /// [`NodeTokens::tail`] then [`NodeTokens::input_tail`], in one allocation.
    tails: Box<[u32]>,
    tail_len: u32,
    /// Hash of the chain's last full block after this node (`ROOT_PARENT` if none).
    pub last_hash: BlockHash,
}

impl NodeTokens {
    pub fn new(
        hashes: Box<[BlockHash]>,
        tail: &[u32],
        input_tail: &[u32],
        last_hash: BlockHash,
    ) -> NodeTokens {
        NodeTokens {
            hashes,
            tails: [tail, input_tail].concat().into_boxed_slice(),
            // A tail is shorter than a block, whose size is a u32 count of tokens.
            tail_len: u32::try_from(tail.len()).unwrap_or(u32::MAX),
            last_hash,
        }
    }

    /// The tokens after the chain's last full block, after this node.
    pub fn tail(&self) -> &[u32] {
        split_tails(&self.tails, self.tail_len).0
    }

    /// The same after this node's input (before its output).
    pub fn input_tail(&self) -> &[u32] {
        split_tails(&self.tails, self.tail_len).1
    }

    fn cost(&self) -> u64 {
        HASH_BYTES as u64 * self.hashes.len() as u64 + TOKEN_ID_BYTES * self.tails.len() as u64
    }
}

fn split_tails(tails: &[u32], tail_len: u32) -> (&[u32], &[u32]) {
    tails.split_at((tail_len as usize).min(tails.len()))
}

/// The first link of every chain digest of an owner's chains.
pub fn chain_seed(owner: &str) -> u128 {
    xxh3_128(owner.as_bytes())
}

/// The chain digest after one more item.
pub fn chain_step(chain: u128, digest: u128) -> u128 {
    let mut buf = [0u8; 32];
    buf[..16].copy_from_slice(&chain.to_le_bytes());
    buf[16..].copy_from_slice(&digest.to_le_bytes());
    xxh3_128(&buf)
}

/// The caller-supplied parts of a node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: Arc<str>,
    pub owner: Arc<str>,
    pub store: bool,
    pub input: Items,
    pub output: Items,
    pub settings: Arc<[u8]>,
    pub meta: Arc<[u8]>,
    /// The parent was found by matching the input against cached chains; the
    /// client sent no `previous_response_id`.
    pub implicit: bool,
    /// Block-hash fields ([`TokenConfig::node_tokens`]); empty without a tokenizer.
    pub tokens: NodeTokens,
    /// Whether the cache indexes this node's items for prefix matching.
    pub indexed: bool,
}

impl NodeSpec {
    /// The settings to store for a child of `parent`: the parent's own `Arc` when the
    /// bytes are equal, so a chain with unchanging settings keeps one copy.
    pub fn settings_for(parent: Option<&Node>, settings: &[u8]) -> Arc<[u8]> {
        match parent {
            Some(p) if *p.settings == *settings => p.settings.clone(),
            _ => Arc::from(settings),
        }
    }

    /// The cost a node built from this spec under `parent` will add to the meter.
    pub fn cost(&self, parent: Option<&Node>) -> u64 {
        let shared_settings = parent.is_some_and(|p| Arc::ptr_eq(&p.settings, &self.settings));
        let settings = if shared_settings {
            0
        } else {
            self.settings.len() as u64
        };
        let items = (self.input.len() + self.output.len()) as u64;
        let index = if self.indexed { INDEX_OVERHEAD } else { 0 };
        let ids = self.input.token_ids().map_or(0, <[u32]>::len)
            + self.output.token_ids().map_or(0, <[u32]>::len);
        NODE_OVERHEAD
            + self.id.len() as u64
            + settings
            + self.meta.len() as u64
            + items * (ITEM_OVERHEAD + index)
            + self.input.nbytes()
            + self.output.nbytes()
            + self.tokens.cost()
            + TOKEN_ID_BYTES * ids as u64
    }
}

#[derive(Debug)]
pub struct Node {
    pub id: Arc<str>,
    pub owner: Arc<str>,
    pub parent: Option<Arc<Node>>,
    pub store: bool,
    /// The connection whose lifetime bounds this node: its own when created with
    /// `store=false`, otherwise its parent's (the taint rule). `None` = stored.
    pub scope: Option<u64>,
    pub input: Items,
    pub output: Items,
    pub settings: Arc<[u8]>,
    pub meta: Arc<[u8]>,
    /// Number of responses in the chain, this one included.
    pub depth: u32,
    /// Items of the whole chain.
    pub items: u64,
    /// Canonical item bytes of the whole chain (without brackets and commas).
    pub item_bytes: u64,
    pub tokens: u64,
    /// Block hashes of this node's own tokens, and the state after it: the tail
    /// after the node, then the tail after its input (see [`NodeTokens`]).
    pub hashes: Box<[BlockHash]>,
    tails: Box<[u32]>,
    tail_len: u32,
    pub last_hash: BlockHash,
    /// The parent was found by prefix matching (see [`NodeSpec::implicit`]).
    pub implicit: bool,
    /// The chain digest after this node's items (see [`chain_step`]).
    pub chain: u128,
    /// Order of creation among the nodes of one cache.
    pub serial: u64,
    /// What this node added to the meter.
    pub cost: u64,
    /// Its positions in the prefix index (`note_indexed`).
    indexed: AtomicU32,
    /// Out of the cache's index with no indexed ancestor (`mark_unanchored`).
    unanchored: AtomicBool,
    meter: Arc<Meter>,
}

impl Node {
    /// Build a node in O(1) and add its cost to the meter. `scope` must already follow
    /// the taint rule (the cache decides it).
    pub fn new(
        spec: NodeSpec,
        parent: Option<Arc<Node>>,
        scope: Option<u64>,
        meter: &Arc<Meter>,
    ) -> Node {
        let cost = spec.cost(parent.as_deref());
        let own_items = (spec.input.len() + spec.output.len()) as u64;
        let own_bytes = spec.input.nbytes() + spec.output.nbytes();
        let own_tokens = spec.input.tokens() + spec.output.tokens();
        let (depth, items, item_bytes, tokens) = match parent.as_deref() {
            None => (1, own_items, own_bytes, own_tokens),
            Some(p) => (
                p.depth.saturating_add(1),
                p.items + own_items,
                p.item_bytes + own_bytes,
                p.tokens + own_tokens,
            ),
        };
        let mut chain = parent
            .as_deref()
            .map_or_else(|| chain_seed(&spec.owner), |p| p.chain);
        for item in spec.input.iter().chain(spec.output.iter()) {
            chain = chain_step(chain, item.digest());
        }
        meter.bytes.fetch_add(cost, Ordering::AcqRel);
        let serial = meter.nodes.fetch_add(1, Ordering::AcqRel) + 1;
        let t = spec.tokens;
        Node {
            id: spec.id,
            owner: spec.owner,
            parent,
            store: spec.store,
            scope,
            input: spec.input,
            output: spec.output,
            settings: spec.settings,
            meta: spec.meta,
            depth,
            items,
            item_bytes,
            tokens,
            hashes: t.hashes,
            tails: t.tails,
            tail_len: t.tail_len,
            last_hash: t.last_hash,
            implicit: spec.implicit,
            chain,
            serial,
            cost,
            indexed: AtomicU32::new(0),
            unanchored: AtomicBool::new(false),
            meter: meter.clone(),
        }
    }

    /// The cache removed this node from its index when no ancestor of it was indexed.
    /// That lasts: only new nodes are indexed, and a node's ancestors are fixed. So
    /// the search for a removed descendant's nearest indexed ancestor stops here
    /// (deleting a chain oldest first costs O(1) per response, not O(depth)).
    pub(crate) fn mark_unanchored(&self) {
        self.unanchored.store(true, Ordering::Release);
    }

    pub(crate) fn is_unanchored(&self) -> bool {
        self.unanchored.load(Ordering::Acquire)
    }

    /// The meter this node counts on.
    pub(crate) fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The prefix index took `positions` positions of this node: counted live until
    /// the node is dropped.
    pub(crate) fn note_indexed(&self, positions: u32) {
        self.indexed.fetch_add(positions, Ordering::AcqRel);
        self.meter
            .indexed
            .fetch_add(u64::from(positions), Ordering::AcqRel);
    }

    /// This node and its ancestors, newest first.
    pub fn ancestors(&self) -> impl Iterator<Item = &Node> {
        std::iter::successors(Some(self), |n| n.parent.as_deref())
    }

    /// The chain from the root to this node.
    pub fn chain(&self) -> Vec<&Node> {
        let mut chain: Vec<&Node> = Vec::with_capacity(self.depth as usize);
        chain.extend(self.ancestors());
        chain.reverse();
        chain
    }

    /// This node's own items: input, then output.
    pub fn own_items(&self) -> impl DoubleEndedIterator<Item = &Arc<Item>> {
        self.input.iter().chain(self.output.iter())
    }

    /// Size of the full context as one JSON array.
    pub fn context_bytes(&self) -> u64 {
        array_len(self.items, self.item_bytes)
    }

    pub fn parent_id(&self) -> Option<&str> {
        self.parent.as_deref().map(|p| &*p.id)
    }

    /// The `previous_response_id` the client gave: the parent's id, unless the
    /// parent was found by prefix matching.
    pub fn previous_response_id(&self) -> Option<&str> {
        if self.implicit {
            None
        } else {
            self.parent_id()
        }
    }

    /// Number of this node's own items (input then output).
    pub fn own_len(&self) -> usize {
        self.input.len() + self.output.len()
    }

    /// The tokens after the chain's last full block, after this node.
    pub fn tail(&self) -> &[u32] {
        split_tails(&self.tails, self.tail_len).0
    }

    /// The same after this node's input (before its output).
    pub fn input_tail(&self) -> &[u32] {
        split_tails(&self.tails, self.tail_len).1
    }

    /// Tokens of the chain up to this node's parent.
    pub fn parent_tokens(&self) -> u64 {
        self.parent.as_deref().map_or(0, |p| p.tokens)
    }
}

/// What is slow to free of a released node (see [`Node::release`]): its items,
/// block hashes and metadata. Holding it keeps that memory, not the node.
pub struct Remains {
    _input: Items,
    _output: Items,
    _meta: Arc<[u8]>,
    _hashes: Box<[BlockHash]>,
    _tails: Box<[u32]>,
}

/// Empty metadata, shared: a released node's placeholder allocates nothing.
fn no_meta() -> Arc<[u8]> {
    static EMPTY: std::sync::OnceLock<Arc<[u8]>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(&[][..])).clone()
}

impl Node {
    /// Let go of `node`. When this was the last hold on it, the node goes now (its
    /// cost leaves the meter, its parent is let go of) and what is slow to free is
    /// returned, to be freed elsewhere (`crate::reaper`); otherwise nothing is.
    pub fn release(node: Arc<Node>) -> Option<Remains> {
        Arc::into_inner(node).map(|mut node| node.take_remains())
    }

    fn take_remains(&mut self) -> Remains {
        Remains {
            _input: std::mem::replace(&mut self.input, Items::empty()),
            _output: std::mem::replace(&mut self.output, Items::empty()),
            _meta: std::mem::replace(&mut self.meta, no_meta()),
            _hashes: std::mem::take(&mut self.hashes),
            _tails: std::mem::take(&mut self.tails),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.meter.bytes.fetch_sub(self.cost, Ordering::AcqRel);
        let indexed = u64::from(*self.indexed.get_mut());
        if indexed > 0 {
            self.meter.indexed.fetch_sub(indexed, Ordering::AcqRel);
        }
        // Free an unshared tail of ancestors in a loop, not by recursion, so dropping
        // a very long chain cannot overflow the stack. The ancestors leave the meter
        // here; their items go to the reaper thread (a view or binding dropped on the
        // event loop may hold the last reference to a whole chain).
        let mut next = self.parent.take();
        let mut remains = Vec::new();
        while let Some(parent) = next {
            next = match Arc::into_inner(parent) {
                Some(mut node) => {
                    remains.push(node.take_remains());
                    node.parent.take()
                }
                None => None,
            };
        }
        if !remains.is_empty() {
            crate::reaper::free_later(remains);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn items(n: usize, tag: &str) -> Items {
        let json: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"role":"user","content":"{tag}-{i}"}}"#))
            .collect();
        Items::parse(format!("[{}]", json.join(",")).as_bytes(), 1 << 20).unwrap()
    }

    pub(crate) fn spec(id: &str, input: Items, output: Items) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            owner: "o".into(),
            store: true,
            input,
            output,
            settings: Arc::from(&b"{}"[..]),
            meta: Arc::from(&b"{}"[..]),
            implicit: false,
            tokens: NodeTokens::default(),
            indexed: false,
        }
    }

    fn chain_of(n: usize, meter: &Arc<Meter>) -> Arc<Node> {
        let mut node: Option<Arc<Node>> = None;
        for i in 0..n {
            let mut s = spec(&format!("r{i}"), items(1, "in"), items(1, "out"));
            s.settings = NodeSpec::settings_for(node.as_deref(), b"{}");
            node = Some(Arc::new(Node::new(s, node, None, meter)));
        }
        node.unwrap()
    }

    #[test]
    fn cumulative_counts_come_from_the_parent() {
        let meter = Arc::new(Meter::default());
        let leaf = chain_of(10, &meter);
        assert_eq!(leaf.depth, 10);
        assert_eq!(leaf.items, 20);
        let total: u64 = leaf
            .ancestors()
            .map(|n| n.input.nbytes() + n.output.nbytes())
            .sum();
        assert_eq!(leaf.item_bytes, total);
        assert_eq!(leaf.context_bytes(), 2 + total + 19);
        let ids: Vec<&str> = leaf.chain().iter().map(|n| &*n.id).collect();
        assert_eq!(ids.first(), Some(&"r0"));
        assert_eq!(ids.last(), Some(&"r9"));
        assert_eq!(leaf.parent_id(), Some("r8"));
    }

    #[test]
    fn settings_are_shared_with_an_equal_parent() {
        let meter = Arc::new(Meter::default());
        let leaf = chain_of(3, &meter);
        let parent = leaf.parent.as_deref().unwrap();
        assert!(Arc::ptr_eq(&leaf.settings, &parent.settings));
        let other = NodeSpec::settings_for(Some(parent), b"{\"model\":\"x\"}");
        assert!(!Arc::ptr_eq(&other, &parent.settings));
        // Shared settings are not counted twice.
        let mut s = spec("x", Items::default(), Items::default());
        s.settings = parent.settings.clone();
        assert_eq!(s.cost(Some(parent)), NODE_OVERHEAD + 1 + 2);
        assert_eq!(s.cost(None), NODE_OVERHEAD + 1 + 2 + 2);
    }

    #[test]
    fn meter_counts_live_nodes_exactly() {
        let meter = Arc::new(Meter::default());
        let leaf = chain_of(5, &meter);
        let total: u64 = leaf.ancestors().map(|n| n.cost).sum();
        assert_eq!(meter.bytes(), total);
        let parent = leaf.parent.clone().unwrap();
        let leaf_cost = leaf.cost;
        drop(leaf);
        // Only the leaf went: its parent is still held here.
        assert_eq!(meter.bytes(), total - leaf_cost);
        drop(parent);
        assert_eq!(meter.bytes(), 0);
    }

    #[test]
    fn dropping_a_very_long_chain_does_not_recurse() {
        let meter = Arc::new(Meter::default());
        let mut node: Option<Arc<Node>> = None;
        for i in 0..200_000 {
            let s = spec(&i.to_string(), Items::default(), Items::default());
            node = Some(Arc::new(Node::new(s, node, None, &meter)));
        }
        assert_eq!(node.as_ref().unwrap().depth, 200_000);
        drop(node);
        assert_eq!(meter.bytes(), 0);
    }

    #[test]
    fn estimates_cover_the_structs() {
        let item = std::mem::size_of::<Item>() + 16 + std::mem::size_of::<Arc<Item>>();
        assert!(item as u64 <= ITEM_OVERHEAD, "{item}");
        let node = std::mem::size_of::<Node>() + 16;
        assert!(node as u64 <= NODE_OVERHEAD, "{node}");
    }
}
