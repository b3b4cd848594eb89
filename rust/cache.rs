//! The session cache: an index of response nodes by id, with owners, connection
//! scopes, pins and an LRU memory budget.
//!
//! Rules (the Python `_reference.py` states the same rules the slow, obvious way):
//!
//! * **Scope.** A node is local to connection `c` when created with `store=false` on
//!   `c`, or when its parent is local to `c` (the taint rule: content sent with
//!   `store=false` never outlives its connection, even through a stored descendant).
//!   Otherwise it is stored. Local entries are visible only to lookups that pass
//!   `connection=c`; stored entries to any lookup by the same owner.
//! * **Owner.** A visible entry looked up by another owner is `OwnerMismatch`, which
//!   prints exactly like `NotFound`.
//! * **Live children.** An entry's live children are the indexed entries whose nearest
//!   indexed ancestor it is. The count is kept exact on insert and removal.
//! * **Candidates.** An entry with no live children and no pins may be evicted by the
//!   budget; candidates sit in a `BTreeMap` keyed by their LRU tick, so the oldest is
//!   found in O(log n).
//! * **Budget.** Before inserting, evict the oldest candidate (never the new entry's
//!   nearest indexed ancestor) while the live bytes exceed the budget. Eviction
//!   cascades: an evicted leaf's nearest indexed ancestor goes too when that leaves
//!   it a candidate, so an idle chain goes as a whole. Only an entry larger than the
//!   whole budget is refused (`CacheFull`); pinned state may push the cache over.
//! * **Never dangling.** Nodes hold their parents by `Arc`, so removing an entry never
//!   breaks a descendant, a binding or a view: the memory goes when the last holder
//!   does (and the [`Meter`] sees it go).
//!
//! * **Tokens.** With a [`TokenConfig`], every item is tokenised once, when it enters
//!   (`items`, `match_prefix`, `create`), and every node stores its chain's token
//!   count and the block hashes its own tokens completed (`node.rs`).
//! * **Prefix index.** With `prefix_index`, every node's item positions are indexed
//!   by their *chain digest* (the items' semantic digests chained from the owner's
//!   seed) and scope, so `match_prefix` finds the longest cached prefix of a
//!   re-sent history in O(items sent) hashing and O(log items) lookups. The index
//!   holds weak references; dead entries are swept in amortised O(1).
//!
//! Locking: one `parking_lot::Mutex` around the index, held for O(1)-ish work per call
//! (plus the entries a call removes). Nodes removed by `delete`, `evict` and
//! `close_connection` are let go of after the lock is released; budget eviction lets
//! go of them under the lock, because it must see the memory go to know when to
//! stop. Either way a node leaves the meter at once, and what is slow to free of it
//! (its items) goes to the reaper thread (`reaper.rs`), off the caller's thread: the
//! event loop does not stall for a long chain's frees.
//! Nothing here calls into Python, so holding the lock can never wait for the GIL.

use std::cell::Cell;
use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::blocks::ROOT_PARENT;
use crate::error::{Error, Result};
use crate::item::Items;
use crate::node::{
    chain_seed, chain_step, Meter, Node, NodeSpec, NodeTokens, Remains, TokenConfig,
};
use crate::reaper;
use crate::view::ContextView;

/// Where a new response's parent comes from.
#[derive(Clone, Copy)]
pub enum Parent<'a> {
    None,
    /// Looked up like `get`, with the create's owner and connection.
    Id(&'a str),
    /// A bound response, usable even if its entry left the index since.
    Binding(&'a Binding),
}

/// Everything `create` needs.
pub struct NewResponse<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub input: Items,
    pub output: Items,
    pub parent: Parent<'a>,
    pub settings: &'a [u8],
    pub meta: &'a [u8],
    pub store: bool,
    pub connection: Option<u64>,
}

/// What the cache knows about one response. Copies the small fields, so holding it
/// does not keep the chain alive.
#[derive(Debug, Clone)]
pub struct ResponseInfo {
    pub id: Arc<str>,
    /// What the client sent: `None` when the parent was found by prefix matching.
    pub previous_response_id: Option<Arc<str>>,
    /// The node this one continues (also when it was found by prefix matching).
    pub parent_id: Option<Arc<str>>,
    pub owner: Arc<str>,
    pub store: bool,
    pub connection: Option<u64>,
    pub depth: u32,
    pub items: u64,
    pub bytes: u64,
    pub tokens: u64,
    pub input_items: usize,
    pub output_items: usize,
    pub settings: Arc<[u8]>,
    pub meta: Arc<[u8]>,
}

impl ResponseInfo {
    pub fn of(node: &Node) -> ResponseInfo {
        ResponseInfo {
            id: node.id.clone(),
            previous_response_id: node
                .parent
                .as_ref()
                .filter(|_| !node.implicit)
                .map(|p| p.id.clone()),
            parent_id: node.parent.as_ref().map(|p| p.id.clone()),
            owner: node.owner.clone(),
            store: node.store,
            connection: node.scope,
            depth: node.depth,
            items: node.items,
            bytes: node.context_bytes(),
            tokens: node.tokens,
            input_items: node.input.len(),
            output_items: node.output.len(),
            settings: node.settings.clone(),
            meta: node.meta.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    pub stored_entries: u64,
    pub local_entries: u64,
    pub bytes: u64,
    pub memory_budget: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub connections: u64,
    pub pinned: u64,
}

impl Stats {
    /// Field names and values, in declaration order.
    pub fn fields(&self) -> [(&'static str, u64); 10] {
        [
            ("entries", self.entries),
            ("stored_entries", self.stored_entries),
            ("local_entries", self.local_entries),
            ("bytes", self.bytes),
            ("memory_budget", self.memory_budget),
            ("hits", self.hits),
            ("misses", self.misses),
            ("evictions", self.evictions),
            ("connections", self.connections),
            ("pinned", self.pinned),
        ]
    }
}

/// A thread-safe session cache. Clones share one cache.
#[derive(Clone)]
pub struct SessionCache {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    meter: Arc<Meter>,
    memory_budget: u64,
    max_item_bytes: usize,
    tokens: Option<Arc<TokenConfig>>,
    prefix_index: bool,
}

/// How to build a cache.
#[derive(Clone)]
pub struct CacheOptions {
    pub memory_budget: u64,
    pub max_item_bytes: usize,
    /// Tokenise items as they enter and block-hash the chains.
    pub tokens: Option<TokenConfig>,
    /// Index item positions for [`SessionCache::match_prefix`].
    pub prefix_index: bool,
}

/// One position of the prefix index: a node and how many of its own items the
/// position covers.
type Position = (Weak<Node>, u32);

/// The positions of one chain digest, oldest first. Almost always one (the same
/// prefix in two nodes is a fork, or a node and its prefix node), kept in place: a
/// `Vec` of its own made a position cost about 150 bytes instead of about 70.
#[derive(Clone)]
enum Positions {
    One(Position),
    Many(Vec<Position>),
}

impl Positions {
    fn push(&mut self, position: Position) {
        match self {
            Positions::One(first) => *self = Positions::Many(vec![first.clone(), position]),
            Positions::Many(all) => all.push(position),
        }
    }

    fn as_slice(&self) -> &[Position] {
        match self {
            Positions::One(one) => std::slice::from_ref(one),
            Positions::Many(all) => all,
        }
    }

    /// Drop the positions of dead nodes; whether any is left.
    fn retain_live(&mut self) -> bool {
        match self {
            Positions::One((node, _)) => node.strong_count() > 0,
            Positions::Many(all) => {
                all.retain(|(node, _)| node.strong_count() > 0);
                match all.as_slice() {
                    [] => false,
                    [one] => {
                        *self = Positions::One(one.clone());
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

/// What [`SessionCache::match_prefix`] found.
pub struct PrefixMatch {
    /// Holds (and, when it is an indexed response, pins) the node whose context is
    /// the matched prefix; `None` when nothing matched.
    pub binding: Option<Arc<Binding>>,
    /// Leading items of the input that the binding's context covers.
    pub items: usize,
}

#[derive(Default)]
struct State {
    index: HashMap<Arc<str>, Entry>,
    /// Eviction candidates by LRU tick (ticks are unique).
    candidates: BTreeMap<u64, Arc<str>>,
    connections: HashMap<u64, Connection>,
    /// Prefix index: (chain digest, scope or 0) -> positions, oldest first.
    prefix: HashMap<(u128, u64), Positions>,
    /// Positions in `prefix`, live or dead (`Meter::indexed_positions` counts the
    /// live ones).
    prefix_positions: usize,
    next_connection: u64,
    next_serial: u64,
    tick: u64,
    /// Counted by `lookup`, which only reads the index (hence `Cell`).
    hits: Cell<u64>,
    misses: Cell<u64>,
    evictions: u64,
    /// Ids evicted for the budget since `take_evicted` last ran, the first
    /// `EVICTED_KEPT`.
    evicted: VecDeque<Arc<str>>,
    stored_entries: u64,
    pinned: u64,
}

/// Positions of removed nodes the prefix index keeps before it sweeps them, besides
/// a quarter of its live ones (each keeps its node's allocation, not its items).
const PREFIX_SWEEP_SLACK: usize = 4096;

/// How many evicted ids wait for `take_evicted` at most (later ones are not kept: an
/// eviction pass takes a chain from its newest response back, and the newest are
/// those whose copies beside the cache matter).
const EVICTED_KEPT: usize = 4096;

struct Entry {
    /// Its `id` is the `Arc` the index and the candidates map use as key.
    node: Arc<Node>,
    /// Distinguishes this entry from a later one with the same id.
    serial: u64,
    pins: u32,
    tick: u64,
    live_children: u32,
}

impl Entry {
    fn is_candidate(&self) -> bool {
        self.pins == 0 && self.live_children == 0
    }
}

#[derive(Default)]
struct Connection {
    /// Ids of the entries local to this connection.
    entries: HashSet<Arc<str>>,
    /// Live bindings of nodes local to this connection, invalidated on close.
    bindings: HashMap<u64, Weak<Binding>>,
}

/// What a removal leaves to drop once the lock is released.
#[derive(Default)]
struct Garbage {
    nodes: Vec<Arc<Node>>,
    bindings: Vec<Arc<Binding>>,
}

impl Garbage {
    /// Let go of everything: the nodes leave the meter now, and what is slow to
    /// free of them is freed by the reaper thread, off the caller's (the event loop).
    fn free(mut self) {
        // Children first (a child is built after its parent), so each node is let go
        // of by its last holder here and its remains are taken, not freed in place.
        self.nodes
            .sort_unstable_by_key(|node| std::cmp::Reverse(node.serial));
        let remains: Vec<Remains> = self.nodes.drain(..).filter_map(Node::release).collect();
        drop(self.bindings);
        free_later(remains);
    }
}

/// Hand nodes' remains to the reaper thread (nothing to hand: nothing to do).
fn free_later(remains: Vec<Remains>) {
    if !remains.is_empty() {
        reaper::free_later(remains);
    }
}

/// The scope part of a prefix-index key: 0 for stored nodes (connection ids start
/// at 1).
fn scope_key(scope: Option<u64>) -> u64 {
    scope.unwrap_or(0)
}

impl SessionCache {
    /// A cache without a tokenizer and without a prefix index.
    pub fn new(memory_budget: u64, max_item_bytes: usize) -> SessionCache {
        SessionCache::with_options(CacheOptions {
            memory_budget,
            max_item_bytes,
            tokens: None,
            prefix_index: false,
        })
    }

    pub fn with_options(options: CacheOptions) -> SessionCache {
        let state = State {
            next_connection: 1,
            ..State::default()
        };
        SessionCache {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                meter: Arc::new(Meter::default()),
                memory_budget: options.memory_budget,
                max_item_bytes: options.max_item_bytes,
                tokens: options.tokens.map(Arc::new),
                prefix_index: options.prefix_index,
            }),
        }
    }

    pub fn memory_budget(&self) -> u64 {
        self.shared.memory_budget
    }

    pub fn max_item_bytes(&self) -> usize {
        self.shared.max_item_bytes
    }

    pub fn token_config(&self) -> Option<&Arc<TokenConfig>> {
        self.shared.tokens.as_ref()
    }

    pub fn prefix_index(&self) -> bool {
        self.shared.prefix_index
    }

    /// Items as this cache stores them: counted with its tokenizer (the ids kept
    /// until the items enter a chain), or without token counts when it has none.
    pub fn items(&self, items: Items) -> Result<Items> {
        match &self.shared.tokens {
            Some(cfg) => Ok(cfg.tokenize(&items)?),
            None if items.tokenized_by().is_some() => {
                Ok(Items::from_vec(items.as_slice().to_vec()))
            }
            None => Ok(items),
        }
    }

    /// The token fields of a new node and the batches to store.
    fn node_tokens(
        &self,
        parent: Option<&Node>,
        input: Items,
        output: Items,
    ) -> Result<(NodeTokens, Items, Items)> {
        match &self.shared.tokens {
            Some(cfg) => Ok(cfg.node_tokens(parent, &input, &output)?),
            None => {
                let (input, output) =
                    Items::pair_without_token_ids(&self.items(input)?, &self.items(output)?);
                Ok((NodeTokens::default(), input, output))
            }
        }
    }

    pub(crate) fn meter(&self) -> &Arc<Meter> {
        &self.shared.meter
    }

    pub fn open_connection(&self) -> u64 {
        let mut st = self.shared.state.lock();
        let id = st.next_connection;
        st.next_connection += 1;
        st.connections.insert(id, Connection::default());
        id
    }

    /// Remove every entry local to the connection and invalidate its bindings.
    /// Returns the number of entries removed; unknown ids are a no-op.
    pub fn close_connection(&self, connection: u64) -> usize {
        let mut garbage = Garbage::default();
        let removed = {
            let mut st = self.shared.state.lock();
            let Some(conn) = st.connections.remove(&connection) else {
                return 0;
            };
            for weak in conn.bindings.into_values() {
                if let Some(binding) = weak.upgrade() {
                    garbage.nodes.extend(binding.node.lock().take());
                    garbage.bindings.push(binding);
                }
            }
            // Deepest first, so each removal finds its nearest indexed ancestor at
            // its parent instead of walking up through already-removed entries.
            let mut ids: Vec<(u32, Arc<str>)> = conn
                .entries
                .into_iter()
                .filter_map(|id| st.index.get(&id).map(|e| (e.node.depth, id)))
                .collect();
            ids.sort_unstable_by_key(|(depth, _)| std::cmp::Reverse(*depth));
            let removed = ids.len();
            for (_, id) in ids {
                if let Some((node, _)) = st.remove(&id, false) {
                    garbage.nodes.push(node);
                }
            }
            removed
        };
        garbage.free();
        removed
    }

    pub fn create(&self, new: NewResponse<'_>) -> Result<ResponseInfo> {
        let shared = &*self.shared;
        new.input.check_item_limit(shared.max_item_bytes)?;
        new.output.check_item_limit(shared.max_item_bytes)?;
        if !new.store && new.connection.is_none() {
            return Err(Error::invalid_argument(
                "store=False requires a connection: a response that is not stored lives \
                 only as long as its connection",
            ));
        }

        // Phase 1, under the lock: arguments that depend on state, and the parent.
        let (parent, implicit): (Option<Arc<Node>>, bool) = {
            let st = shared.state.lock();
            if !new.store {
                st.check_open(new.connection)?;
            }
            if st.index.contains_key(new.id) {
                return Err(Error::DuplicateResponseId { id: new.id.into() });
            }
            match new.parent {
                Parent::None => (None, false),
                Parent::Id(pid) => (
                    Some(st.lookup(pid, new.owner, new.connection)?.node.clone()),
                    false,
                ),
                Parent::Binding(b) => (
                    Some(b.parent_for(shared, new.owner, new.connection)?),
                    b.implicit,
                ),
            }
        };
        let scope = match (&parent, new.store) {
            (_, false) => new.connection,
            (Some(p), true) => p.scope,
            (None, true) => None,
        };

        // Unlocked: tokenise and block-hash the new items, compare settings with the
        // parent's (shared when equal) and size the node. The budget never changes,
        // so CacheFull needs no lock.
        let owner: Arc<str> = match &parent {
            Some(p) if *p.owner == *new.owner => p.owner.clone(),
            _ => new.owner.into(),
        };
        let (tokens, input, output) = self.node_tokens(parent.as_deref(), new.input, new.output)?;
        let spec = NodeSpec {
            id: new.id.into(),
            owner,
            store: new.store,
            input,
            output,
            settings: NodeSpec::settings_for(parent.as_deref(), new.settings),
            meta: new.meta.into(),
            implicit,
            tokens,
            indexed: shared.prefix_index,
        };
        let cost = spec.cost(parent.as_deref());
        if cost > shared.memory_budget {
            return Err(Error::CacheFull {
                size: cost,
                budget: shared.memory_budget,
            });
        }

        // Phase 2, under the lock: re-check what may have changed, then commit.
        let mut st = shared.state.lock();
        if st.index.contains_key(new.id) {
            return Err(Error::DuplicateResponseId { id: new.id.into() });
        }
        if let Some(c) = scope {
            if !st.connections.contains_key(&c) {
                return Err(match (&parent, new.store) {
                    (Some(p), true) => Error::not_found(&p.id),
                    _ => Error::invalid_argument(format!("connection {c} is not open")),
                });
            }
        }
        let node = Arc::new(Node::new(spec, parent, scope, &shared.meter));
        if let Some(parent) = &node.parent {
            st.touch_node(parent);
        }
        let anchor = st.nearest_indexed_ancestor(&node);
        let evicted = st.evict_for_budget(shared, anchor.as_deref());
        let info = ResponseInfo::of(&node);
        if shared.prefix_index {
            st.index_positions(&node);
        }
        st.insert(node);
        drop(st);
        free_later(evicted);
        Ok(info)
    }

    /// Find the longest prefix of a sent input (given by its items' semantic
    /// digests) that a cached chain of `owner` holds: stored chains, and chains
    /// local to `connection`. The result's binding holds the node whose context is
    /// that prefix (made on the spot, sharing the items, when the prefix ends
    /// inside a node) and pins it when it is an indexed response.
    ///
    /// O(items sent) hashing outside the lock and O(log items sent) index lookups
    /// inside it; a prefix that ends inside a node costs that node's leading
    /// items once more (tokenised again unless the cache keeps token ids).
    pub fn match_prefix(
        &self,
        owner: &str,
        connection: Option<u64>,
        digests: &[u128],
    ) -> Result<PrefixMatch> {
        let none = PrefixMatch {
            binding: None,
            items: 0,
        };
        if !self.shared.prefix_index || digests.is_empty() {
            return Ok(none);
        }
        let mut chains = Vec::with_capacity(digests.len());
        let mut chain = chain_seed(owner);
        for &d in digests {
            chain = chain_step(chain, d);
            chains.push(chain);
        }
        let scopes = [0, connection.map_or(0, |c| scope_key(Some(c)))];
        let scopes = if scopes[1] == 0 {
            &scopes[..1]
        } else {
            &scopes[..]
        };
        let found = {
            let st = self.shared.state.lock();
            // Presence is monotone: a live node at position i holds every shorter
            // prefix of its chain, in its own scope or a stored one.
            let (mut lo, mut hi) = (0usize, chains.len());
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if st.best_position(&chains[mid - 1], scopes, owner).is_some() {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            match lo {
                0 => None,
                m => st
                    .best_position(&chains[m - 1], scopes, owner)
                    .map(|(node, own)| (m, node, own)),
            }
        };
        let Some((items, node, own)) = found else {
            return Ok(none);
        };
        let node = if own == node.own_len() {
            node
        } else {
            self.prefix_node(&node, own)?
        };
        let binding = self.hold(node, true)?;
        Ok(PrefixMatch {
            binding: Some(binding),
            items,
        })
    }

    /// A node holding the first `own` items of `node`'s own items (shared, not
    /// copied) under `node`'s parent: the context of a match that ends inside
    /// `node`. Not an addressable response; its id is `<node id>#<own>` and it
    /// carries `node`'s settings and meta.
    fn prefix_node(&self, node: &Arc<Node>, own: usize) -> Result<Arc<Node>> {
        let n_in = node.input.len();
        // Batches of their own: a slice would keep the rest of `node`'s batch (its
        // output) alive, unmetered, for as long as a response continues this one.
        let (input, output) = if own <= n_in {
            (node.input.slice(0..own).own_batch(), Items::default())
        } else {
            let output = node.output.slice(0..own - n_in).own_batch();
            (node.input.own_batch(), output)
        };
        let parent = node.parent.clone();
        // The state after the input is stored: no tokenising. (Its block hashes are
        // there unless the node was made with other settings: then they are made.)
        let stored = match &self.shared.tokens {
            Some(cfg) if own == n_in => {
                let before = node.parent_tokens() / cfg.block_size as u64;
                let after = (node.parent_tokens() + input.tokens()) / cfg.block_size as u64;
                usize::try_from(after.saturating_sub(before))
                    .ok()
                    .and_then(|blocks| node.hashes.get(..blocks))
            }
            _ => None,
        };
        let tokens = match stored {
            Some(hashes) => {
                let last_hash = match hashes.last() {
                    Some(&h) => h,
                    None => parent.as_deref().map_or(ROOT_PARENT, |p| p.last_hash),
                };
                NodeTokens::new(
                    hashes.into(),
                    node.input_tail(),
                    node.input_tail(),
                    last_hash,
                )
            }
            None => {
                let (tokens, _, _) =
                    self.node_tokens(parent.as_deref(), input.clone(), output.clone())?;
                tokens
            }
        };
        let spec = NodeSpec {
            id: format!("{}#{own}", node.id).into(),
            owner: node.owner.clone(),
            store: node.store,
            input,
            output,
            settings: node.settings.clone(),
            meta: node.meta.clone(),
            implicit: node.implicit,
            tokens,
            indexed: self.shared.prefix_index,
        };
        let made = Arc::new(Node::new(spec, parent, node.scope, &self.shared.meter));
        self.shared.state.lock().index_positions(&made);
        Ok(made)
    }

    /// A binding holding `node`; pins its entry when it is the indexed one.
    fn hold(&self, node: Arc<Node>, implicit: bool) -> Result<Arc<Binding>> {
        let mut st = self.shared.state.lock();
        let pinned = match st.index.get_key_value(&*node.id) {
            Some((key, e)) if Arc::ptr_eq(&e.node, &node) => Some((key.clone(), e.serial)),
            _ => None,
        };
        if let Some((key, _)) = &pinned {
            st.touch(key);
            st.pin(key);
        }
        st.next_serial += 1;
        let binding = Arc::new(Binding {
            cache: Arc::downgrade(&self.shared),
            id: node.id.clone(),
            owner: node.owner.clone(),
            scope: node.scope,
            pinned,
            implicit,
            key: st.next_serial,
            node: Mutex::new(Some(node)),
        });
        if let Some(c) = binding.scope {
            if let Some(conn) = st.connections.get_mut(&c) {
                conn.bindings.insert(binding.key, Arc::downgrade(&binding));
            }
        }
        Ok(binding)
    }

    /// The input the client sent for a response: its own input items, preceded by
    /// the whole context of its parent when that parent was found by prefix
    /// matching (the client re-sent that history).
    pub fn input_items(&self, id: &str, owner: &str, connection: Option<u64>) -> Result<Items> {
        let node = self.lookup_touch(id, owner, connection)?;
        if !node.implicit {
            return Ok(node.input.clone());
        }
        let view = ContextView::new(node.parent.clone(), Some(node.input.clone()));
        let mut items = Vec::with_capacity(view.items() as usize);
        view.for_each_arc(|item| items.push(item.clone()));
        Ok(Items::from_vec(items))
    }

    pub fn get(&self, id: &str, owner: &str, connection: Option<u64>) -> Result<ResponseInfo> {
        let node = self.lookup_touch(id, owner, connection)?;
        Ok(ResponseInfo::of(&node))
    }

    /// Pin an entry and return a binding that holds its chain.
    pub fn bind(&self, id: &str, owner: &str, connection: Option<u64>) -> Result<Arc<Binding>> {
        let mut st = self.shared.state.lock();
        let entry = st.lookup(id, owner, connection)?;
        let (node, serial) = (entry.node.clone(), entry.serial);
        let key = node.id.clone();
        st.touch(&key);
        st.pin(&key);
        st.next_serial += 1;
        let binding = Arc::new(Binding {
            cache: Arc::downgrade(&self.shared),
            id: key.clone(),
            owner: node.owner.clone(),
            scope: node.scope,
            pinned: Some((key, serial)),
            implicit: false,
            key: st.next_serial,
            node: Mutex::new(Some(node)),
        });
        if let Some(c) = binding.scope {
            if let Some(conn) = st.connections.get_mut(&c) {
                conn.bindings.insert(binding.key, Arc::downgrade(&binding));
            }
        }
        Ok(binding)
    }

    /// The context of `id` (or nothing, for `None`) followed by `extra`.
    pub fn view(
        &self,
        id: Option<&str>,
        owner: &str,
        connection: Option<u64>,
        extra: Option<Items>,
    ) -> Result<ContextView> {
        self.view_with(id, owner, connection, extra, true)
    }

    /// [`Cache::view`], with `extra` tokenised now or, with `tokenize` false, left
    /// for later: the view then counts no tokens for it (its token ids and block
    /// hashes still tokenise it when asked).
    pub fn view_with(
        &self,
        id: Option<&str>,
        owner: &str,
        connection: Option<u64>,
        extra: Option<Items>,
        tokenize: bool,
    ) -> Result<ContextView> {
        let extra = match extra {
            Some(e) if tokenize => Some(self.items(e)?),
            Some(e) => Some(untokenized(e, self.shared.tokens.as_deref())),
            None => None,
        };
        let leaf = match id {
            None => None,
            Some(id) => Some(self.lookup_touch(id, owner, connection)?),
        };
        Ok(ContextView::new(leaf, extra).with_tokens(self.shared.tokens.clone()))
    }

    /// A response's own (input, output) items.
    pub fn own_items(
        &self,
        id: &str,
        owner: &str,
        connection: Option<u64>,
    ) -> Result<(Items, Items)> {
        let node = self.lookup_touch(id, owner, connection)?;
        Ok((node.input.clone(), node.output.clone()))
    }

    /// Remove an entry local to `connection`; stored entries are left alone.
    pub fn evict(&self, id: &str, owner: &str, connection: u64) -> bool {
        self.remove_if(id, |node| {
            node.scope == Some(connection) && *node.owner == *owner
        })
    }

    /// Remove a stored entry.
    pub fn delete(&self, id: &str, owner: &str) -> bool {
        self.remove_if(id, |node| node.scope.is_none() && *node.owner == *owner)
    }

    /// The ids evicted for the budget since the last call (the first `EVICTED_KEPT`),
    /// so that whoever keeps copies beside the cache can drop theirs.
    pub fn take_evicted(&self) -> Vec<Arc<str>> {
        let mut st = self.shared.state.lock();
        if st.evicted.is_empty() {
            return Vec::new();
        }
        st.evicted.drain(..).collect()
    }

    /// `(owner, id)` of every stored entry (not local to a connection), in no order:
    /// for whoever checks the cache against a store it copies (after missing news of
    /// that store's deletions).
    pub fn stored_ids(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let st = self.shared.state.lock();
        st.index
            .values()
            .filter(|entry| entry.node.scope.is_none())
            .map(|entry| (entry.node.owner.clone(), entry.node.id.clone()))
            .collect()
    }

    /// Evict for the budget now, as the next insert would: the cache may be over it
    /// (a new response's parent is never evicted for it, pinned heads never are, and
    /// nothing is evicted when pins are released). Returns how many entries went.
    pub fn apply_budget(&self) -> u64 {
        let (evicted, count) = {
            let mut st = self.shared.state.lock();
            let before = st.evictions;
            let evicted = st.evict_for_budget(&self.shared, None);
            (evicted, st.evictions - before)
        };
        free_later(evicted);
        count
    }

    /// Drop the prefix index's positions of removed nodes now, with what they keep
    /// allocated. The index does so by itself once they pass a quarter of the live
    /// ones plus `PREFIX_SWEEP_SLACK`; this is for whoever counts the heap and wants no slack.
    pub fn sweep_prefix_index(&self) {
        self.shared.state.lock().sweep_prefix();
    }

    pub fn stats(&self) -> Stats {
        let st = self.shared.state.lock();
        let entries = st.index.len() as u64;
        Stats {
            entries,
            stored_entries: st.stored_entries,
            local_entries: entries - st.stored_entries,
            bytes: self.shared.meter.bytes(),
            memory_budget: self.shared.memory_budget,
            hits: st.hits.get(),
            misses: st.misses.get(),
            evictions: st.evictions,
            connections: st.connections.len() as u64,
            pinned: st.pinned,
        }
    }

    /// The nodes of the stored entries, oldest entry first.
    pub(crate) fn stored_nodes(&self) -> Vec<Arc<Node>> {
        let st = self.shared.state.lock();
        let mut entries: Vec<&Entry> = st
            .index
            .values()
            .filter(|e| e.node.scope.is_none())
            .collect();
        entries.sort_unstable_by_key(|e| e.serial);
        entries.into_iter().map(|e| e.node.clone()).collect()
    }

    /// Index restored nodes (parents first) whose ids are free, then apply the
    /// budget. Returns how many were indexed.
    pub(crate) fn insert_restored(&self, nodes: Vec<(Arc<Node>, bool)>) -> usize {
        let mut unused = Garbage::default();
        let mut added = 0;
        {
            let mut st = self.shared.state.lock();
            for (node, indexed) in nodes {
                if self.shared.prefix_index {
                    st.index_positions(&node);
                }
                if indexed && !st.index.contains_key(&*node.id) {
                    st.insert(node);
                    added += 1;
                } else {
                    unused.nodes.push(node);
                }
            }
        }
        // Free what nothing indexed needs outside the lock, and before applying the
        // budget: the eviction loop must not count those bytes as live.
        unused.free();
        let evicted = self
            .shared
            .state
            .lock()
            .evict_for_budget(&self.shared, None);
        free_later(evicted);
        added
    }

    fn lookup_touch(&self, id: &str, owner: &str, connection: Option<u64>) -> Result<Arc<Node>> {
        let mut st = self.shared.state.lock();
        let node = st.lookup(id, owner, connection)?.node.clone();
        st.touch(id);
        Ok(node)
    }

    fn remove_if(&self, id: &str, matches: impl FnOnce(&Node) -> bool) -> bool {
        let removed = {
            let mut st = self.shared.state.lock();
            match st.index.get(id) {
                Some(entry) if matches(&entry.node) => st.remove(id, false),
                _ => None,
            }
        };
        // The node (and any chain only it held) is let go of outside the lock.
        let Some((node, _)) = removed else {
            return false;
        };
        free_later(Node::release(node).into_iter().collect());
        true
    }
}

impl State {
    /// Add every own item position of `node` to the prefix index.
    fn index_positions(&mut self, node: &Arc<Node>) {
        let mut chain = node
            .parent
            .as_deref()
            .map_or_else(|| chain_seed(&node.owner), |p| p.chain);
        let scope = scope_key(node.scope);
        for (j, item) in node.own_items().enumerate() {
            chain = chain_step(chain, item.digest());
            let position = (Arc::downgrade(node), j as u32 + 1);
            match self.prefix.entry((chain, scope)) {
                Slot::Occupied(mut slot) => slot.get_mut().push(position),
                Slot::Vacant(slot) => {
                    slot.insert(Positions::One(position));
                }
            }
        }
        let added = node.own_len();
        node.note_indexed(u32::try_from(added).unwrap_or(u32::MAX));
        self.prefix_positions += added;
        self.sweep_prefix_if_dead(node.meter());
    }

    /// Sweep when the dead positions (each holding its node's allocation, which the
    /// meter no longer counts) pass a quarter of the live ones plus
    /// `PREFIX_SWEEP_SLACK`: what the meter misses stays a small share of what it
    /// counts, and a sweep, O(positions), frees at least a fifth of them, so it costs
    /// amortised O(1) per position.
    fn sweep_prefix_if_dead(&mut self, meter: &Meter) {
        let live = usize::try_from(meter.indexed_positions()).unwrap_or(usize::MAX);
        let dead = self.prefix_positions.saturating_sub(live);
        if dead > live / 4 + PREFIX_SWEEP_SLACK {
            self.sweep_prefix();
        }
    }

    /// Drop the positions of dead nodes, and the map's room they leave.
    fn sweep_prefix(&mut self) {
        self.prefix.retain(|_, positions| positions.retain_live());
        self.prefix_positions = self.prefix.values().map(|p| p.as_slice().len()).sum();
        let len = self.prefix.len();
        if self.prefix.capacity() > 2 * len + PREFIX_SWEEP_SLACK {
            self.prefix.shrink_to(len + len / 4);
        }
    }

    /// The live node holding the prefix with this chain digest in one of `scopes`,
    /// and how many of its own items that prefix covers: preferably a node that
    /// ends exactly there, then the most recently made one.
    ///
    /// Only `owner`'s nodes: the digest is seeded with the owner, but it is no secret
    /// keyed hash, so a collision must not show one owner's context to another.
    fn best_position(
        &self,
        chain: &u128,
        scopes: &[u64],
        owner: &str,
    ) -> Option<(Arc<Node>, usize)> {
        let mut best: Option<(Arc<Node>, usize)> = None;
        for scope in scopes {
            let Some(positions) = self.prefix.get(&(*chain, *scope)) else {
                continue;
            };
            for (weak, own) in positions.as_slice() {
                let Some(node) = weak.upgrade() else {
                    continue;
                };
                if *node.owner != *owner {
                    continue;
                }
                let own = *own as usize;
                let rank = |n: &Node, o: usize| (o == n.own_len(), n.serial);
                if best
                    .as_ref()
                    .is_none_or(|(b, bo)| rank(&node, own) > rank(b, *bo))
                {
                    best = Some((node, own));
                }
            }
        }
        best
    }

    fn check_open(&self, connection: Option<u64>) -> Result<()> {
        match connection {
            Some(c) if !self.connections.contains_key(&c) => Err(Error::invalid_argument(format!(
                "connection {c} is not open"
            ))),
            _ => Ok(()),
        }
    }

    /// Find a visible entry, counting the hit or miss.
    fn lookup(&self, id: &str, owner: &str, connection: Option<u64>) -> Result<&Entry> {
        let found = match self.index.get(id) {
            None => Err(Error::not_found(id)),
            Some(e) if e.node.scope.is_some() && e.node.scope != connection => {
                Err(Error::not_found(id))
            }
            Some(e) if *e.node.owner != *owner => Err(Error::OwnerMismatch { id: id.into() }),
            Some(e) => Ok(e),
        };
        let counter = if found.is_ok() {
            &self.hits
        } else {
            &self.misses
        };
        counter.set(counter.get() + 1);
        found
    }

    /// Refresh an entry's LRU tick.
    fn touch(&mut self, id: &str) {
        self.tick += 1;
        let tick = self.tick;
        let Some(entry) = self.index.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut entry.tick, tick);
        if entry.is_candidate() {
            self.candidates.remove(&old);
            self.candidates.insert(tick, entry.node.id.clone());
        }
    }

    /// Touch `node`'s entry if it is still the indexed one.
    fn touch_node(&mut self, node: &Node) {
        if self
            .index
            .get(&*node.id)
            .is_some_and(|e| std::ptr::eq(&*e.node, node))
        {
            self.touch(&node.id);
        }
    }

    /// The id of the closest ancestor of `node` that is indexed (as that very node).
    fn nearest_indexed_ancestor(&self, node: &Node) -> Option<Arc<str>> {
        for a in node.ancestors().skip(1) {
            if a.is_unanchored() {
                return None; // neither it nor any ancestor of it is indexed
            }
            if let Some((key, e)) = self.index.get_key_value(&*a.id) {
                if std::ptr::eq(&*e.node, a) {
                    return Some(key.clone());
                }
            }
        }
        None
    }

    /// Apply `f` to an entry's counts and keep its candidacy in step.
    fn update(&mut self, id: &str, f: impl FnOnce(&mut Entry)) {
        let Some(entry) = self.index.get_mut(id) else {
            return;
        };
        let was = entry.is_candidate();
        f(entry);
        match (was, entry.is_candidate()) {
            (true, false) => {
                self.candidates.remove(&entry.tick);
            }
            (false, true) => {
                self.candidates.insert(entry.tick, entry.node.id.clone());
            }
            _ => {}
        }
    }

    fn pin(&mut self, id: &str) {
        let mut first = false;
        self.update(id, |e| {
            first = e.pins == 0;
            e.pins += 1;
        });
        if first {
            self.pinned += 1;
        }
    }

    fn unpin(&mut self, id: &str, serial: u64) {
        if !self
            .index
            .get(id)
            .is_some_and(|e| e.serial == serial && e.pins > 0)
        {
            return;
        }
        let mut last = false;
        self.update(id, |e| {
            e.pins -= 1;
            last = e.pins == 0;
        });
        if last {
            self.pinned -= 1;
        }
    }

    fn insert(&mut self, node: Arc<Node>) {
        if let Some(anchor) = self.nearest_indexed_ancestor(&node) {
            self.update(&anchor, |e| e.live_children += 1);
        }
        let id = node.id.clone();
        match node.scope {
            None => self.stored_entries += 1,
            Some(c) => {
                if let Some(conn) = self.connections.get_mut(&c) {
                    conn.entries.insert(id.clone());
                }
            }
        }
        self.next_serial += 1;
        self.tick += 1;
        let tick = self.tick;
        let entry = Entry {
            node,
            serial: self.next_serial,
            pins: 0,
            tick,
            live_children: 0,
        };
        self.candidates.insert(tick, id.clone());
        self.index.insert(id, entry);
    }

    /// Remove an entry; its live children now count for its nearest indexed ancestor.
    /// Returns the node and that ancestor's id.
    fn remove(&mut self, id: &str, evicted: bool) -> Option<(Arc<Node>, Option<Arc<str>>)> {
        let (key, entry) = self.index.remove_entry(id)?;
        if entry.is_candidate() {
            self.candidates.remove(&entry.tick);
        }
        if entry.pins > 0 {
            self.pinned -= 1;
        }
        match entry.node.scope {
            None => self.stored_entries -= 1,
            Some(c) => {
                if let Some(conn) = self.connections.get_mut(&c) {
                    conn.entries.remove(&key);
                }
            }
        }
        if evicted {
            self.evictions += 1;
            if self.evicted.len() < EVICTED_KEPT {
                self.evicted.push_back(key.clone());
            }
        }
        let anchor = self.nearest_indexed_ancestor(&entry.node);
        match &anchor {
            Some(anchor) => {
                let moved = entry.live_children;
                self.update(anchor, |e| {
                    e.live_children = (e.live_children + moved).saturating_sub(1)
                });
            }
            None => entry.node.mark_unanchored(),
        }
        Some((entry.node, anchor))
    }

    /// Evict the oldest candidates (never `protected`) while the live bytes exceed
    /// the budget. Evicted nodes are let go of here, under the lock, so the meter
    /// shows what each eviction really freed; what is slow to free of them is
    /// returned, to be freed once the lock is released.
    #[must_use]
    fn evict_for_budget(&mut self, shared: &Shared, protected: Option<&str>) -> Vec<Remains> {
        let mut evicted = Vec::new();
        while shared.meter.bytes() > shared.memory_budget {
            let victim = self
                .candidates
                .iter()
                .find(|(_, id)| Some(id.as_ref()) != protected)
                .map(|(tick, id)| (*tick, id.clone()));
            let Some((tick, mut victim)) = victim else {
                return evicted;
            };
            if !self.index.contains_key(&victim) {
                // Cannot happen (candidates are indexed); never loop on it regardless.
                self.candidates.remove(&tick);
                continue;
            }
            // The cascade: the chain goes up to a pinned or shared ancestor.
            while let Some((node, anchor)) = self.remove(&victim, true) {
                // A leaf first: its parent is let go of with it, so the next victim
                // (that parent, when it is the anchor) is last held here too.
                evicted.extend(Node::release(node));
                match anchor {
                    Some(a)
                        if Some(a.as_ref()) != protected
                            && self.index.get(&a).is_some_and(Entry::is_candidate) =>
                    {
                        victim = a
                    }
                    _ => break,
                }
            }
        }
        evicted
    }
}

/// `items` left to be tokenised later: without token counts that `tokens` (the
/// cache's tokenizer) did not make, so a view never sums another tokenizer's counts.
fn untokenized(items: Items, tokens: Option<&TokenConfig>) -> Items {
    let ours = tokens.map(|t| t.tokenizer.fingerprint());
    match items.tokenized_by() {
        Some(by) if Some(by) != ours => Items::from_vec(items.as_slice().to_vec()),
        _ => items,
    }
}

/// A pin on one entry, holding its node so the chain outlives the entry if need be.
///
/// Released by `release()` or on drop; a binding of a connection-local node is also
/// released when its connection closes. Releasing drops the node and, if the entry
/// it pinned is still the same entry (same serial), unpins it.
pub struct Binding {
    cache: Weak<Shared>,
    id: Arc<str>,
    owner: Arc<str>,
    scope: Option<u64>,
    /// The entry this binding pins (its key and serial), if the node is one.
    pinned: Option<(Arc<str>, u64)>,
    /// Made by prefix matching: a child created from it has an implicit parent.
    implicit: bool,
    key: u64,
    node: Mutex<Option<Arc<Node>>>,
}

impl Binding {
    pub fn response_id(&self) -> &str {
        &self.id
    }

    /// The bound node; `NotFound` once released.
    pub fn node(&self) -> Result<Arc<Node>> {
        self.node
            .lock()
            .clone()
            .ok_or_else(|| Error::not_found(&self.id))
    }

    pub fn info(&self) -> Result<ResponseInfo> {
        Ok(ResponseInfo::of(&*self.node()?))
    }

    pub fn view(&self, extra: Option<Items>) -> Result<ContextView> {
        self.view_with(extra, true)
    }

    /// [`Binding::view`], with `extra` tokenised now or (`tokenize` false) left for
    /// later, as [`Cache::view_with`].
    pub fn view_with(&self, extra: Option<Items>, tokenize: bool) -> Result<ContextView> {
        let node = self.node()?;
        let tokens = self.cache.upgrade().and_then(|s| s.tokens.clone());
        let extra = match (&tokens, extra) {
            (Some(cfg), Some(e)) if tokenize => Some(cfg.tokenize(&e)?),
            (cfg, Some(e)) => Some(untokenized(e, cfg.as_deref())),
            (_, None) => None,
        };
        Ok(ContextView::new(Some(node), extra).with_tokens(tokens))
    }

    /// Whether this binding was made by prefix matching.
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    pub fn is_released(&self) -> bool {
        self.node.lock().is_none()
    }

    /// The bound node as a parent in `cache` for `owner` on `connection`: the same
    /// visibility rule as a lookup. A binding of another cache is refused: its node
    /// would be another cache's memory (its meter, its connections, its tokenizer).
    fn parent_for(
        &self,
        cache: &Shared,
        owner: &str,
        connection: Option<u64>,
    ) -> Result<Arc<Node>> {
        if !std::ptr::eq(self.cache.as_ptr(), cache) {
            return Err(Error::InvalidArgument {
                detail: format!(
                    "the binding of {:?} was made by another SessionCache: pass a \
                     binding of this cache (its bind() or match()), or the response id",
                    &*self.id
                ),
            });
        }
        let node = self.node()?;
        if node.scope.is_some() && node.scope != connection {
            return Err(Error::not_found(&self.id));
        }
        if *self.owner != *owner {
            return Err(Error::OwnerMismatch {
                id: self.id.to_string(),
            });
        }
        Ok(node)
    }

    /// Drop the pin and the node. Idempotent.
    pub fn release(&self) {
        let Some(node) = self.node.lock().take() else {
            return;
        };
        if let Some(shared) = self.cache.upgrade() {
            let mut st = shared.state.lock();
            if let Some((key, serial)) = &self.pinned {
                st.unpin(key, *serial);
            }
            if let Some(c) = self.scope {
                if let Some(conn) = st.connections.get_mut(&c) {
                    conn.bindings.remove(&self.key);
                }
            }
        }
        drop(node);
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::Item;
    use crate::node::tests::items;
    use crate::node::{ITEM_OVERHEAD, NODE_OVERHEAD};

    const O: &str = "owner";

    fn new<'a>(id: &'a str, parent: Parent<'a>) -> NewResponse<'a> {
        NewResponse {
            id,
            owner: O,
            input: items(1, id),
            output: items(1, id),
            parent,
            settings: b"{}",
            meta: b"{}",
            store: true,
            connection: None,
        }
    }

    fn create(c: &SessionCache, id: &str, parent: Option<&str>) -> ResponseInfo {
        let parent = parent.map_or(Parent::None, Parent::Id);
        c.create(new(id, parent)).unwrap()
    }

    fn chain(c: &SessionCache, prefix: &str, n: usize) -> String {
        let mut prev: Option<String> = None;
        for i in 0..n {
            let id = format!("{prefix}{i}");
            create(c, &id, prev.as_deref());
            prev = Some(id);
        }
        prev.unwrap()
    }

    fn context(c: &SessionCache, id: &str) -> Vec<u8> {
        c.view(Some(id), O, None, None).unwrap().to_json()
    }

    /// Whether an id is indexed, without touching it.
    fn has(c: &SessionCache, id: &str) -> bool {
        c.shared.state.lock().index.contains_key(id)
    }

    fn big() -> SessionCache {
        SessionCache::new(1 << 40, 1 << 20)
    }

    #[test]
    fn a_chain_stores_each_item_once_and_forks_copy_nothing() {
        let c = big();
        let leaf = chain(&c, "r", 100);
        let before = c.stats().bytes;
        let per_turn = before / 100;
        for i in 0..32 {
            let id = format!("f{i}");
            let mut n = new(&id, Parent::Id(&leaf));
            n.input = Items::default();
            n.output = Items::default();
            c.create(n).unwrap();
        }
        let forks = c.stats().bytes - before;
        assert!(forks < 32 * per_turn, "{forks} vs {per_turn}");
        assert!(forks <= 32 * (NODE_OVERHEAD + 4 + 2));
        let info = c.get("f0", O, None).unwrap();
        assert_eq!(info.depth, 101);
        assert_eq!(info.items, 200);
        assert_eq!(context(&c, "f0"), context(&c, &leaf));
        assert_eq!(info.bytes as usize, context(&c, "f0").len());
    }

    #[test]
    fn own_items_and_settings_are_shared() {
        let c = big();
        create(&c, "a", None);
        let mut n = new("b", Parent::Id("a"));
        n.settings = b"{}";
        c.create(n).unwrap();
        let a = c.get("a", O, None).unwrap();
        let b = c.get("b", O, None).unwrap();
        assert!(Arc::ptr_eq(&a.settings, &b.settings));
        let (input, output) = c.own_items("b", O, None).unwrap();
        assert_eq!((input.len(), output.len()), (1, 1));
        assert_eq!(b.previous_response_id.as_deref(), Some("a"));
        assert_eq!((b.input_items, b.output_items), (1, 1));
    }

    #[test]
    fn duplicate_ids_and_missing_parents_leave_the_cache_unchanged() {
        let c = big();
        create(&c, "a", None);
        let before = c.stats();
        let err = c.create(new("a", Parent::None)).unwrap_err();
        assert!(matches!(err, Error::DuplicateResponseId { .. }));
        let err = c.create(new("b", Parent::Id("nope"))).unwrap_err();
        assert_eq!(err, Error::not_found("nope"));
        let after = c.stats();
        assert_eq!(after.entries, before.entries);
        assert_eq!(after.bytes, before.bytes);
        assert_eq!(after.misses, before.misses + 1);
    }

    #[test]
    fn owners_are_checked_and_mismatch_reads_like_not_found() {
        let c = big();
        create(&c, "a", None);
        let err = c.get("a", "other", None).unwrap_err();
        assert!(matches!(err, Error::OwnerMismatch { .. }));
        assert_eq!(err.to_string(), Error::not_found("a").to_string());
        let mut n = new("b", Parent::Id("a"));
        n.owner = "other";
        assert!(matches!(
            c.create(n).unwrap_err(),
            Error::OwnerMismatch { .. }
        ));
        assert!(!c.delete("a", "other"));
        assert!(c.get("a", O, None).is_ok());
    }

    #[test]
    fn stored_ids_are_those_not_local_to_a_connection() {
        let c = big();
        let conn = c.open_connection();
        create(&c, "root", None);
        create(&c, "child", Some("root"));
        let mut n = new("local", Parent::Id("root"));
        n.store = false;
        n.connection = Some(conn);
        c.create(n).unwrap();
        let mut n = new("tainted", Parent::Id("local"));
        n.connection = Some(conn);
        c.create(n).unwrap();
        let mut n = new("theirs", Parent::None);
        n.owner = "other";
        c.create(n).unwrap();
        let mut ids: Vec<(String, String)> = c
            .stored_ids()
            .iter()
            .map(|(owner, id)| (owner.to_string(), id.to_string()))
            .collect();
        ids.sort();
        let expected = [("other", "theirs"), (O, "child"), (O, "root")];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(owner, id)| (owner.to_string(), id.to_string()))
            .collect();
        assert_eq!(ids, expected);
        assert!(c.delete("child", O));
        assert_eq!(c.stored_ids().len(), 2);
    }

    #[test]
    fn scopes_and_the_taint_rule() {
        let c = big();
        let conn = c.open_connection();
        let other = c.open_connection();
        create(&c, "root", None);
        let mut n = new("local", Parent::Id("root"));
        n.store = false;
        n.connection = Some(conn);
        assert_eq!(c.create(n).unwrap().connection, Some(conn));
        // A stored child of a local parent is tainted.
        let mut n = new("tainted", Parent::Id("local"));
        n.connection = Some(conn);
        let info = c.create(n).unwrap();
        assert!(info.store);
        assert_eq!(info.connection, Some(conn));
        // Visibility.
        assert!(c.get("root", O, None).is_ok());
        assert!(c.get("root", O, Some(other)).is_ok());
        assert_eq!(
            c.get("local", O, None).unwrap_err(),
            Error::not_found("local")
        );
        assert_eq!(
            c.get("tainted", O, Some(other)).unwrap_err(),
            Error::not_found("tainted")
        );
        assert!(c.get("tainted", O, Some(conn)).is_ok());
        // A local entry is not found (not owner-mismatched) from elsewhere.
        assert_eq!(
            c.get("local", "x", None).unwrap_err(),
            Error::not_found("local")
        );
        let s = c.stats();
        assert_eq!((s.entries, s.stored_entries, s.local_entries), (3, 1, 2));
        // store=False needs an open connection.
        let mut n = new("x", Parent::None);
        n.store = false;
        assert!(matches!(
            c.create(n).unwrap_err(),
            Error::InvalidArgument { .. }
        ));
        let mut n = new("x", Parent::None);
        n.store = false;
        n.connection = Some(999);
        assert!(matches!(
            c.create(n).unwrap_err(),
            Error::InvalidArgument { .. }
        ));
        // Closing removes the local entries, tainted ones included, and frees them.
        let bytes = c.stats().bytes;
        assert_eq!(c.close_connection(conn), 2);
        assert_eq!(c.close_connection(conn), 0);
        let s = c.stats();
        assert_eq!((s.entries, s.local_entries, s.connections), (1, 0, 1));
        assert!(s.bytes < bytes);
        assert_eq!(s.bytes, c.get("root", O, None).map(|_| s.bytes).unwrap());
    }

    #[test]
    fn evict_and_delete_only_touch_their_scope_and_keep_descendants() {
        let c = big();
        let conn = c.open_connection();
        create(&c, "a", None);
        create(&c, "b", Some("a"));
        let mut n = new("l", Parent::Id("b"));
        n.store = false;
        n.connection = Some(conn);
        c.create(n).unwrap();
        let ctx = c.view(Some("l"), O, Some(conn), None).unwrap().to_json();
        assert!(!c.evict("a", O, conn), "stored entries stay loadable");
        assert!(!c.evict("l", "other", conn));
        assert!(!c.delete("l", O), "delete only removes stored entries");
        assert!(c.delete("b", O));
        assert!(!c.delete("b", O));
        assert_eq!(
            c.view(Some("l"), O, Some(conn), None).unwrap().to_json(),
            ctx
        );
        assert!(c.evict("l", O, conn));
        assert_eq!(c.stats().entries, 1);
        assert_eq!(
            c.stats().evictions,
            0,
            "explicit removal is not budget eviction"
        );
    }

    fn entry_cost(c: &SessionCache) -> u64 {
        let probe = SessionCache::new(1 << 40, 1 << 20);
        create(&probe, "r0", None);
        let one = probe.stats().bytes;
        drop(probe);
        let _ = c;
        one
    }

    #[test]
    fn budget_evicts_least_recently_used_leaves_and_cascades() {
        let unit = entry_cost(&big());
        // Room for about 5 entries.
        let c = SessionCache::new(unit * 5 + unit / 2, 1 << 20);
        create(&c, "a0", None);
        create(&c, "a1", Some("a0"));
        create(&c, "b0", None);
        create(&c, "b1", Some("b0"));
        c.get("a1", O, None).unwrap(); // a-chain is now more recent than b-chain
        create(&c, "c0", None);
        assert_eq!(c.stats().evictions, 0);
        // The sixth entry does not fit: the LRU leaf b1 goes, and its chain with it.
        create(&c, "c1", Some("c0"));
        let s = c.stats();
        assert_eq!(s.evictions, 2);
        assert!(c.get("b1", O, None).is_err());
        assert!(c.get("b0", O, None).is_err());
        assert!(c.get("a0", O, None).is_ok());
        assert!(s.bytes <= s.memory_budget);
        assert_eq!(s.entries, 4);
        // Whoever keeps copies beside the cache learns which went, once.
        let mut evicted: Vec<String> = c.take_evicted().iter().map(|id| id.to_string()).collect();
        evicted.sort();
        assert_eq!(evicted, ["b0", "b1"]);
        assert!(c.take_evicted().is_empty());
        // A delete is not an eviction.
        assert!(c.delete("a1", O));
        assert!(c.take_evicted().is_empty());
    }

    #[test]
    fn apply_budget_evicts_what_the_next_insert_would() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit + unit / 2, 1 << 20);
        create(&c, "a0", None);
        // A parent is never evicted to make room for its child: over the budget.
        create(&c, "a1", Some("a0"));
        let over = c.stats();
        assert!(over.bytes > over.memory_budget, "{over:?}");
        assert_eq!(over.evictions, 0);
        let went = c.apply_budget();
        let s = c.stats();
        assert!(went > 0 && s.bytes <= s.memory_budget, "{went} {s:?}");
        assert_eq!(s.evictions, went);
        assert_eq!(c.take_evicted().len() as u64, went);
        assert_eq!(c.apply_budget(), 0, "within the budget, nothing more goes");
    }

    /// Keeps the reaper thread busy until told to go on, so a test can see what
    /// waits for it.
    struct HoldReaper(std::sync::mpsc::Receiver<()>);

    impl Drop for HoldReaper {
        fn drop(&mut self) {
            let _ = self.0.recv_timeout(std::time::Duration::from_secs(10));
        }
    }

    /// Holds the reaper until the returned sender sends (or is dropped).
    fn hold_reaper() -> std::sync::mpsc::Sender<()> {
        let (go_on, wait) = std::sync::mpsc::channel();
        reaper::free_later(HoldReaper(wait));
        go_on
    }

    fn first_item(c: &SessionCache, id: &str, connection: Option<u64>) -> Weak<Item> {
        Arc::downgrade(&c.own_items(id, O, connection).unwrap().0.as_slice()[0])
    }

    #[test]
    fn evicted_state_leaves_the_meter_at_once_and_is_freed_off_the_callers_thread() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit * 2 + unit / 2, 1 << 20);
        create(&c, "a0", None);
        create(&c, "a1", Some("a0"));
        let (a0, a1) = (first_item(&c, "a0", None), first_item(&c, "a1", None));
        let go_on = hold_reaper();
        // The third entry does not fit: the idle chain a0 <- a1 is evicted.
        create(&c, "b0", None);
        let s = c.stats();
        assert_eq!(s.evictions, 2);
        assert!(s.bytes <= s.memory_budget, "the meter saw them go");
        assert!(
            a0.upgrade().is_some() && a1.upgrade().is_some(),
            "freed by the caller"
        );
        go_on.send(()).unwrap();
        assert!(reaper::settle(std::time::Duration::from_secs(10)));
        assert!(
            a0.upgrade().is_none() && a1.upgrade().is_none(),
            "never freed"
        );
    }

    #[test]
    fn closed_and_deleted_state_leaves_the_meter_at_once_and_is_freed_off_the_callers_thread() {
        let c = big();
        let conn = c.open_connection();
        for (id, parent) in [("l0", Parent::None), ("l1", Parent::Id("l0"))] {
            let mut n = new(id, parent);
            n.store = false;
            n.connection = Some(conn);
            c.create(n).unwrap();
        }
        create(&c, "s0", None);
        let local = [
            first_item(&c, "l0", Some(conn)),
            first_item(&c, "l1", Some(conn)),
        ];
        let stored = first_item(&c, "s0", None);
        let go_on = hold_reaper();
        assert_eq!(c.close_connection(conn), 2);
        assert!(c.delete("s0", O));
        assert_eq!(c.stats().bytes, 0, "the meter saw them go");
        assert!(local.iter().chain([&stored]).all(|i| i.upgrade().is_some()));
        go_on.send(()).unwrap();
        assert!(reaper::settle(std::time::Duration::from_secs(10)));
        assert!(local.iter().chain([&stored]).all(|i| i.upgrade().is_none()));
    }

    #[test]
    fn a_chain_whose_last_holder_is_a_view_is_freed_off_the_callers_thread() {
        let c = big();
        create(&c, "v0", None);
        create(&c, "v1", Some("v0"));
        create(&c, "v2", Some("v1"));
        let ancestors = [first_item(&c, "v0", None), first_item(&c, "v1", None)];
        // A turn's view of the chain outlives its entries (the client left mid-turn).
        let view = c.view(Some("v2"), O, None, None).unwrap();
        for id in ["v2", "v1", "v0"] {
            assert!(c.delete(id, O));
        }
        assert!(
            ancestors.iter().all(|i| i.upgrade().is_some()),
            "the view holds them"
        );
        let go_on = hold_reaper();
        drop(view);
        assert_eq!(c.stats().bytes, 0, "the meter saw them go");
        assert!(
            ancestors.iter().all(|i| i.upgrade().is_some()),
            "freed by the caller"
        );
        go_on.send(()).unwrap();
        assert!(reaper::settle(std::time::Duration::from_secs(10)));
        assert!(
            ancestors.iter().all(|i| i.upgrade().is_none()),
            "never freed"
        );
    }

    #[test]
    fn evicted_ids_wait_for_take_evicted_up_to_a_bound() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit + unit / 2, 1 << 20); // room for one
        let total = EVICTED_KEPT + 10;
        for i in 0..total {
            create(&c, &format!("r{i}"), None);
        }
        assert_eq!(c.stats().evictions, (total - 1) as u64);
        let evicted = c.take_evicted();
        assert_eq!(evicted.len(), EVICTED_KEPT);
        assert_eq!(&*evicted[0], "r0");
        assert_eq!(
            &*evicted[EVICTED_KEPT - 1],
            format!("r{}", EVICTED_KEPT - 1).as_str()
        );
    }

    #[test]
    fn a_long_chain_evicted_at_once_names_its_newest_responses() {
        // The copies kept beside the cache are of the newest responses: an eviction
        // pass taking more than `EVICTED_KEPT` names those, not the chain's oldest.
        let unit = entry_cost(&big());
        let total = EVICTED_KEPT + 100;
        let c = SessionCache::new(unit * (total as u64 + 1), 1 << 20);
        for i in 0..total {
            let parent = (i > 0).then(|| format!("r{}", i - 1));
            create(&c, &format!("r{i}"), parent.as_deref());
        }
        assert!(c.take_evicted().is_empty());
        create(&c, "other0", None);
        create(&c, "other1", None); // over: the whole chain goes (its leaf is the LRU)
        let evicted = c.take_evicted();
        assert_eq!(c.stats().evictions, total as u64);
        assert_eq!(evicted.len(), EVICTED_KEPT);
        assert_eq!(&*evicted[0], format!("r{}", total - 1).as_str());
    }

    #[test]
    fn the_cascade_stops_at_shared_and_pinned_ancestors() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit * 4 + unit / 2, 1 << 20);
        create(&c, "root", None);
        create(&c, "x", Some("root"));
        create(&c, "y", Some("root"));
        create(&c, "z", None);
        // x is the oldest leaf; root still has y, so the cascade stops there.
        create(&c, "w", None);
        assert_eq!(c.stats().evictions, 1);
        assert!(c.get("x", O, None).is_err());
        assert!(c.get("root", O, None).is_ok());
        // Pin root's last child: nothing of that chain can go.
        let binding = c.bind("y", O, None).unwrap();
        assert_eq!(c.stats().pinned, 1);
        create(&c, "v", None);
        assert!(c.get("y", O, None).is_ok());
        assert!(c.get("root", O, None).is_ok());
        assert!(c.get("z", O, None).is_err());
        binding.release();
        binding.release();
        assert_eq!(c.stats().pinned, 0);
    }

    #[test]
    fn a_binding_of_another_cache_is_no_parent() {
        let (a, b) = (
            SessionCache::new(1 << 20, 1 << 20),
            SessionCache::new(1 << 20, 1 << 20),
        );
        create(&a, "root", None);
        let binding = a.bind("root", O, None).unwrap();
        let err = b
            .create(new("child", Parent::Binding(&binding)))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
        assert!(b.get("child", O, None).is_err());
        assert!(a.create(new("child", Parent::Binding(&binding))).is_ok());
    }

    #[test]
    fn the_parent_of_a_new_entry_is_never_evicted() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit * 2 + unit / 2, 1 << 20);
        create(&c, "a", None);
        create(&c, "b", None);
        c.get("b", O, None).unwrap();
        // a is the LRU candidate and the parent: b goes instead.
        create(&c, "a1", Some("a"));
        assert!(c.get("a", O, None).is_ok());
        assert!(c.get("b", O, None).is_err());
    }

    #[test]
    fn creating_a_child_refreshes_the_parent() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit * 3 + unit / 2, 1 << 20);
        create(&c, "a", None);
        create(&c, "b", None);
        create(&c, "a1", Some("a")); // touches a: now more recent than b
        assert!(c.delete("a1", O));
        create(&c, "x", None);
        create(&c, "y", None);
        assert!(has(&c, "a"));
        assert!(!has(&c, "b"));
    }

    #[test]
    fn pinned_state_may_exceed_the_budget_but_one_entry_may_not() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit + unit / 2, 1 << 20);
        create(&c, "a", None);
        let pin = c.bind("a", O, None).unwrap();
        create(&c, "b", None);
        let s = c.stats();
        assert_eq!(s.entries, 2);
        assert!(s.bytes > s.memory_budget);
        let mut n = new("huge", Parent::None);
        n.input = items(100, "big");
        let before = c.stats();
        let err = c.create(n).unwrap_err();
        assert!(matches!(err, Error::CacheFull { .. }));
        assert_eq!(c.stats(), before);
        drop(pin);
        assert_eq!(c.stats().pinned, 0);
    }

    #[test]
    fn bindings_survive_eviction_and_deletion() {
        let c = big();
        chain(&c, "r", 3);
        let b = c.bind("r2", O, None).unwrap();
        let ctx = context(&c, "r2");
        assert!(c.delete("r2", O));
        assert!(c.delete("r1", O));
        assert!(c.delete("r0", O));
        assert_eq!(c.stats().entries, 0);
        assert!(c.stats().bytes > 0, "the binding holds the chain");
        assert_eq!(b.view(None).unwrap().to_json(), ctx);
        let child = c.create(new("next", Parent::Binding(&b))).unwrap();
        assert_eq!(child.depth, 4);
        b.release();
        assert!(matches!(b.info(), Err(Error::NotFound { .. })));
        // `next` holds the chain now; deleting it frees everything.
        assert!(c.delete("next", O));
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn releasing_an_old_binding_does_not_unpin_a_recreated_entry() {
        let c = big();
        create(&c, "a", None);
        let old = c.bind("a", O, None).unwrap();
        assert!(c.delete("a", O));
        create(&c, "a", None);
        let new_pin = c.bind("a", O, None).unwrap();
        old.release();
        assert_eq!(c.stats().pinned, 1);
        drop(new_pin);
        assert_eq!(c.stats().pinned, 0);
    }

    #[test]
    fn closing_a_connection_invalidates_its_bindings() {
        let c = big();
        let conn = c.open_connection();
        let mut n = new("l", Parent::None);
        n.store = false;
        n.connection = Some(conn);
        c.create(n).unwrap();
        let b = c.bind("l", O, Some(conn)).unwrap();
        assert!(c.stats().bytes > 0);
        c.close_connection(conn);
        assert!(b.is_released());
        assert_eq!(
            c.stats().bytes,
            0,
            "local content does not outlive its connection"
        );
        let mut n = new("next", Parent::Binding(&b));
        n.connection = Some(conn);
        assert!(matches!(c.create(n).unwrap_err(), Error::NotFound { .. }));
        b.release();
    }

    #[test]
    fn a_binding_parent_follows_the_visibility_rule() {
        let c = big();
        let conn = c.open_connection();
        let mut n = new("l", Parent::None);
        n.store = false;
        n.connection = Some(conn);
        c.create(n).unwrap();
        let b = c.bind("l", O, Some(conn)).unwrap();
        assert_eq!(
            c.create(new("x", Parent::Binding(&b))).unwrap_err(),
            Error::not_found("l")
        );
        let mut n = new("x", Parent::Binding(&b));
        n.connection = Some(conn);
        n.owner = "other";
        assert!(matches!(
            c.create(n).unwrap_err(),
            Error::OwnerMismatch { .. }
        ));
        let mut n = new("x", Parent::Binding(&b));
        n.connection = Some(conn);
        assert_eq!(c.create(n).unwrap().connection, Some(conn));
    }

    #[test]
    fn live_children_move_to_the_nearest_indexed_ancestor() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit * 4 + unit / 2, 1 << 20);
        chain(&c, "r", 3); // r0 <- r1 <- r2
        create(&c, "s", Some("r1"));
        // Deleting r1 gives r0 two live children (r2 and s).
        assert!(c.delete("r1", O));
        c.get("r0", O, None).unwrap();
        // r2 (oldest leaf) goes; r0 keeps s, so it stays.
        create(&c, "t", None);
        assert!(!has(&c, "r2"));
        assert!(has(&c, "r0"));
        assert!(has(&c, "s"));
        assert_eq!(c.stats().evictions, 1);
        // s is now the oldest leaf; its eviction cascades through the unindexed r1 to r0.
        create(&c, "u", None);
        assert!(!has(&c, "s"));
        assert!(!has(&c, "r0"));
        assert_eq!(c.stats().evictions, 3);
        assert_eq!(c.stats().entries, 2);
    }

    #[test]
    fn a_chain_deleted_oldest_first_keeps_its_leaves_evictable() {
        let unit = entry_cost(&big());
        let c = SessionCache::new(unit * 8 + unit / 2, 1 << 20);
        // New roots until `gone` is evicted: the order in which the rest went with it.
        let roots = std::cell::Cell::new(0);
        let evict_until_gone = |gone: &str, watched: &[&str]| -> Vec<bool> {
            for _ in 0..20 {
                if !has(&c, gone) {
                    return watched.iter().map(|id| has(&c, id)).collect();
                }
                roots.set(roots.get() + 1);
                create(&c, &format!("n{}", roots.get()), None);
            }
            panic!("{gone} was never evicted");
        };
        chain(&c, "r", 4); // r0 <- r1 <- r2 <- r3
        create(&c, "s", Some("r2"));
        // r0 goes with no indexed ancestor (marked unanchored); r1's search for one
        // stops at it. Then r2, whose children r3 and s are left with none.
        assert!(c.delete("r0", O));
        assert!(c.delete("r1", O));
        assert!(c.delete("r2", O));
        assert_eq!(c.stats().entries, 2);
        // Both are leaves, evicted oldest first.
        assert_eq!(evict_until_gone("r3", &["s"]), [true]);
        evict_until_gone("s", &[]);
        // Deleting below an indexed ancestor still moves the children to it: x0 is a
        // leaf again once x1 and x2 are gone (x2's search passes x1 to reach x0), and
        // evicted in its turn.
        chain(&c, "x", 3);
        assert!(c.delete("x1", O));
        assert!(c.delete("x2", O));
        let newest = format!("n{}", roots.get() + 1);
        assert_eq!(evict_until_gone("x0", &[&newest]), [true]);
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let c = big();
        create(&c, "a", None);
        c.get("a", O, None).unwrap();
        let _ = c.view(Some("a"), O, None, None).unwrap();
        let _ = c.get("b", O, None);
        let _ = c.get("a", "x", None);
        create(&c, "b", Some("a"));
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (3, 2));
    }

    #[test]
    fn item_limit_applies_to_prebuilt_batches() {
        let c = SessionCache::new(1 << 30, 10);
        let before = c.stats();
        assert!(matches!(
            c.create(new("a", Parent::None)).unwrap_err(),
            Error::ItemTooLarge { .. }
        ));
        assert_eq!(c.stats(), before);
    }

    #[test]
    fn cost_matches_the_documented_formula() {
        let c = big();
        let info = create(&c, "a", None);
        let (input, output) = c.own_items("a", O, None).unwrap();
        let expected =
            NODE_OVERHEAD + 1 + 2 + 2 + 2 * ITEM_OVERHEAD + input.nbytes() + output.nbytes();
        assert_eq!(c.stats().bytes, expected);
        assert_eq!(info.items, 2);
    }

    // ------------------------------------------------------------ tokens and matching

    fn tokenizing(keep_ids: bool) -> SessionCache {
        let tokenizer = Arc::new(crate::token::Tokenizer::builtin("o200k_base").unwrap());
        SessionCache::with_options(CacheOptions {
            memory_budget: 1 << 40,
            max_item_bytes: 1 << 20,
            tokens: Some(TokenConfig::new(tokenizer, 4, 0, keep_ids).unwrap()),
            prefix_index: true,
        })
    }

    fn parse(json: &str) -> Items {
        Items::parse(json.as_bytes(), 1 << 20).unwrap()
    }

    fn turn<'a>(id: &'a str, input: &str, output: &str, parent: Parent<'a>) -> NewResponse<'a> {
        NewResponse {
            id,
            owner: O,
            input: parse(input),
            output: parse(output),
            parent,
            settings: b"{}",
            meta: b"{}",
            store: true,
            connection: None,
        }
    }

    /// Token ids and block hashes of a view, recomputed from scratch.
    fn recount(c: &SessionCache, view: &ContextView) -> (Vec<u32>, Vec<crate::blocks::BlockHash>) {
        let cfg = c.token_config().unwrap();
        let mut ids = Vec::new();
        view.for_each_item(|i| cfg.tokenizer.encode_item_into(i.json(), &mut ids).unwrap());
        let hashes = crate::blocks::block_hashes(&ids, cfg.block_size, cfg.seed).unwrap();
        (ids, hashes)
    }

    #[test]
    fn forked_positions_shrink_back_to_one_then_none() {
        let c = tokenizing(false);
        for id in ["f1", "f2"] {
            c.create(turn(
                id,
                r#"[{"role":"user","content":"same"}]"#,
                "[]",
                Parent::None,
            ))
            .unwrap();
        }
        let key = |st: &State| st.prefix.keys().copied().collect::<Vec<_>>();
        let counts = |c: &SessionCache| {
            let st = c.shared.state.lock();
            let keys = key(&st);
            keys.iter()
                .map(|k| st.prefix[k].as_slice().len())
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(&c), vec![2]);
        assert!(c.delete("f1", O));
        c.sweep_prefix_index();
        assert_eq!(counts(&c), vec![1]);
        assert!(matches!(
            c.shared.state.lock().prefix.values().next(),
            Some(Positions::One(_))
        ));
        let sent = c
            .items(parse(r#"[{"role":"user","content":"same"}]"#))
            .unwrap();
        let m = c.match_prefix(O, None, &digests(&sent)).unwrap();
        assert_eq!(m.binding.unwrap().response_id(), "f2");
        assert!(c.delete("f2", O));
        c.sweep_prefix_index();
        assert_eq!(counts(&c), Vec::<usize>::new());
    }

    #[test]
    fn a_digest_collision_does_not_match_another_owners_chain() {
        let c = tokenizing(false);
        conversation(&c);
        let sent = c.view(Some("c"), O, None, None).unwrap();
        let sent = parse(std::str::from_utf8(&sent.to_json()).unwrap());
        assert!(c.match_prefix(O, None, &digests(&sent)).unwrap().items > 0);
        // Make every chain digest of "mallory" hold O's positions, as a collision would.
        {
            let mut st = c.shared.state.lock();
            let mut chain = chain_seed("mallory");
            let mut theirs = chain_seed(O);
            for d in digests(&sent) {
                chain = chain_step(chain, d);
                theirs = chain_step(theirs, d);
                if let Some(positions) = st.prefix.get(&(theirs, 0)).cloned() {
                    st.prefix.insert((chain, 0), positions);
                }
            }
        }
        let m = c.match_prefix("mallory", None, &digests(&sent)).unwrap();
        assert_eq!(m.items, 0);
        assert!(m.binding.is_none());
    }

    fn digests(items: &Items) -> Vec<u128> {
        items.iter().map(|i| i.digest()).collect()
    }

    fn conversation(c: &SessionCache) {
        c.create(turn(
            "a",
            r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hello there"}]"#,
            r#"[{"type":"message","role":"assistant","id":"m1","status":"completed",
                "content":[{"type":"output_text","text":"hi, how can I help?","annotations":[]}]}]"#,
            Parent::None,
        ))
        .unwrap();
        c.create(turn(
            "b",
            r#"[{"role":"user","content":"read a file"}]"#,
            r#"[{"type":"function_call","call_id":"c1","name":"read","arguments":"{}","id":"fc1"}]"#,
            Parent::Id("a"),
        ))
        .unwrap();
        c.create(turn(
            "c",
            r#"[{"type":"function_call_output","call_id":"c1","output":"file contents here"}]"#,
            r#"[{"role":"assistant","content":"done"}]"#,
            Parent::Id("b"),
        ))
        .unwrap();
    }

    #[test]
    fn tokens_and_block_hashes_follow_the_chain() {
        for keep_ids in [false, true] {
            let c = tokenizing(keep_ids);
            conversation(&c);
            for id in ["a", "b", "c"] {
                let view = c.view(Some(id), O, None, None).unwrap();
                let (ids, hashes) = recount(&c, &view);
                assert_eq!(view.tokens(), ids.len() as u64);
                assert_eq!(c.get(id, O, None).unwrap().tokens, ids.len() as u64);
                assert_eq!(view.block_hashes().unwrap().unwrap(), hashes, "{id}");
                assert_eq!(view.token_ids().unwrap().unwrap(), ids);
            }
            // A view with new items hashes them on top of the chain.
            let extra = c
                .items(parse(r#"[{"role":"user","content":"and now?"}]"#))
                .unwrap();
            let view = c.view(Some("c"), O, None, Some(extra)).unwrap();
            let (ids, hashes) = recount(&c, &view);
            assert_eq!(view.tokens(), ids.len() as u64);
            assert_eq!(view.block_hashes().unwrap().unwrap(), hashes);
            let plain = c.view(Some("b"), O, None, None).unwrap();
            let shared = view.shared_prefix_blocks(&plain).unwrap().unwrap();
            let b_tokens = c.get("b", O, None).unwrap().tokens as usize;
            assert_eq!(shared, b_tokens / 4);
        }
    }

    #[test]
    fn a_node_keeping_token_ids_holds_only_its_own_items() {
        // A stateless client re-sends its history; the new turn's input is the last
        // item of that batch. The node must not keep the rest of the batch (nor its
        // ids) alive: that was memory growing with the square of the history.
        let c = tokenizing(true);
        let sent = c
            .items(parse(
                r#"[{"role":"user","content":"one"},{"role":"user","content":"two"},
                    {"role":"user","content":"three"}]"#,
            ))
            .unwrap();
        let first = sent.get(0).unwrap().clone();
        c.create(NewResponse {
            input: sent.slice(2..3),
            ..turn("r", "[]", "[]", Parent::None)
        })
        .unwrap();
        drop(sent);
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "the batch outlived the request"
        );
        let view = c.view(Some("r"), O, None, None).unwrap();
        let (ids, _) = recount(&c, &view);
        assert_eq!(view.token_ids().unwrap().unwrap(), ids);
        assert_eq!(view.tokens(), ids.len() as u64);
    }

    #[test]
    fn views_can_leave_new_items_to_be_tokenised_later() {
        let c = tokenizing(false);
        conversation(&c);
        let raw = parse(r#"[{"role":"user","content":"and now, something longer?"}]"#);
        let counted = c.view(Some("c"), O, None, Some(raw.clone())).unwrap();
        let later = c
            .view_with(Some("c"), O, None, Some(raw.clone()), false)
            .unwrap();
        let chain = c.get("c", O, None).unwrap().tokens;
        assert!(counted.tokens() > chain);
        assert_eq!(later.tokens(), chain);
        // Ids and hashes tokenise what was left, so they agree either way.
        assert_eq!(later.token_ids().unwrap(), counted.token_ids().unwrap());
        assert_eq!(
            later.block_hashes().unwrap(),
            counted.block_hashes().unwrap()
        );
        assert_eq!(later.to_json(), counted.to_json());
        // The same through a binding; counts of another tokenizer are dropped.
        let b = c.bind("c", O, None).unwrap();
        assert_eq!(b.view_with(Some(raw), false).unwrap().tokens(), chain);
        let other = Arc::new(crate::token::Tokenizer::builtin("cl100k_base").unwrap());
        let foreign = parse(r#"[{"role":"user","content":"x"}]"#)
            .tokenize(&other)
            .unwrap();
        assert!(foreign.tokens() > 0);
        assert_eq!(
            b.view_with(Some(foreign.clone()), false).unwrap().tokens(),
            chain
        );
        let view = c
            .view_with(Some("c"), O, None, Some(foreign), false)
            .unwrap();
        assert_eq!(view.tokens(), chain);
    }

    #[test]
    fn kept_ids_are_metered() {
        let (with, without) = (tokenizing(true), tokenizing(false));
        conversation(&with);
        conversation(&without);
        let tokens = with.get("c", O, None).unwrap().tokens;
        assert_eq!(
            with.stats().bytes - without.stats().bytes,
            crate::node::TOKEN_ID_BYTES * tokens
        );
    }

    #[test]
    fn a_resent_history_matches_its_chain() {
        let c = tokenizing(false);
        conversation(&c);
        // The client re-sends everything, replayed output items without ids,
        // statuses or empty annotations, keys in another order, plus a new item.
        let sent = parse(
            r#"[{"content":"be brief","role":"system"},{"role":"user","content":"hello there"},
                {"type":"message","role":"assistant","content":"hi, how can I help?"},
                {"role":"user","content":"read a file"},
                {"arguments":"{}","name":"read","call_id":"c1","type":"function_call"},
                {"type":"function_call_output","call_id":"c1",
                 "output":[{"type":"input_text","text":"file contents here"}]},
                {"role":"assistant","content":[{"type":"output_text","text":"done"}]},
                {"role":"user","content":"thanks"}]"#,
        );
        let m = c.match_prefix(O, None, &digests(&sent)).unwrap();
        assert_eq!(m.items, 7);
        let binding = m.binding.unwrap();
        assert_eq!(binding.response_id(), "c");
        assert_eq!(c.stats().pinned, 1);
        // The next turn shares the chain; the context is turn c's bytes, then the new item.
        let new = c.items(sent.slice(7..8)).unwrap();
        let context_c = context(&c, "c");
        let info = c
            .create(NewResponse {
                input: new,
                ..turn(
                    "d",
                    "[]",
                    r#"[{"role":"assistant","content":"ok"}]"#,
                    Parent::Binding(&binding),
                )
            })
            .unwrap();
        binding.release();
        assert_eq!(info.previous_response_id, None, "the client sent none");
        assert_eq!(info.parent_id.as_deref(), Some("c"));
        assert_eq!(info.depth, 4);
        let context_d = context(&c, "d");
        assert!(context_d.starts_with(&context_c[..context_c.len() - 1]));
        let view = c.view(Some("d"), O, None, None).unwrap();
        assert_eq!(view.block_hashes().unwrap().unwrap(), recount(&c, &view).1);
        // What the client sent is what GET .../input_items lists.
        let input = c.input_items("d", O, None).unwrap();
        assert_eq!(input.len(), 8);
        assert_eq!(digests(&input), digests(&sent));
        assert_eq!(c.input_items("c", O, None).unwrap().len(), 1);
    }

    #[test]
    fn a_prefix_node_does_not_keep_the_rest_of_its_nodes_items() {
        let c = tokenizing(false);
        c.create(turn(
            "x",
            r#"[{"role":"user","content":"question"}]"#,
            r#"[{"role":"assistant","content":"a long answer"}]"#,
            Parent::None,
        ))
        .unwrap();
        let answer = c.own_items("x", O, None).unwrap().1.get(0).unwrap().clone();
        // A client re-sends the question only, with something new: a prefix node
        // ending after x's input, and a response continuing it.
        let question = c
            .items(parse(r#"[{"role":"user","content":"question"}]"#))
            .unwrap();
        let m = c.match_prefix(O, None, &digests(&question)).unwrap();
        let b = m.binding.unwrap();
        assert_eq!(b.response_id(), "x#1");
        c.create(turn(
            "y",
            r#"[{"role":"user","content":"else"}]"#,
            "[]",
            Parent::Binding(&b),
        ))
        .unwrap();
        b.release();
        assert!(c.delete("x", O));
        // Deleted state is freed by the reaper thread.
        assert!(reaper::settle(std::time::Duration::from_secs(10)));
        assert_eq!(Arc::strong_count(&answer), 1, "x's answer outlived x");
    }

    #[test]
    fn edits_and_truncations_share_only_the_common_prefix() {
        let c = tokenizing(false);
        conversation(&c);
        let full = context(&c, "c");
        let items = Items::parse(&full, 1 << 20).unwrap();
        assert_eq!(items.len(), 7);
        // An edit of item 3 (b's input): the match ends at a's end.
        let mut edited = digests(&items);
        edited[3] ^= 1;
        let m = c.match_prefix(O, None, &edited).unwrap();
        assert_eq!((m.items, m.binding.unwrap().response_id()), (3, "a"));
        // Truncated inside a's input: a prefix node sharing a's first item.
        let m = c.match_prefix(O, None, &digests(&items)[..1]).unwrap();
        assert_eq!(m.items, 1);
        let b = m.binding.unwrap();
        assert_eq!(b.response_id(), "a#1");
        let node = b.node().unwrap();
        assert!(Arc::ptr_eq(
            node.input.get(0).unwrap(),
            items_of(&c, "a").get(0).unwrap()
        ));
        assert_eq!(c.stats().pinned, 0, "a prefix node is not an entry");
        let view = b.view(None).unwrap();
        assert_eq!(view.tokens(), recount(&c, &view).0.len() as u64);
        assert_eq!(view.block_hashes().unwrap().unwrap(), recount(&c, &view).1);
        // Cut between b's input and output (a retried request): the stored state.
        let m = c.match_prefix(O, None, &digests(&items)[..4]).unwrap();
        let b = m.binding.unwrap();
        assert_eq!((m.items, b.response_id()), (4, "b#1"));
        let view = b.view(None).unwrap();
        assert_eq!(view.block_hashes().unwrap().unwrap(), recount(&c, &view).1);
        // A child of a prefix node is a normal chain.
        let child = c
            .create(turn(
                "e",
                r#"[{"role":"user","content":"x"}]"#,
                "[]",
                Parent::Binding(&b),
            ))
            .unwrap();
        assert_eq!((child.items, child.previous_response_id), (5, None));
        let view = c.view(Some("e"), O, None, None).unwrap();
        assert_eq!(view.block_hashes().unwrap().unwrap(), recount(&c, &view).1);
        // Nothing in common.
        let m = c.match_prefix(O, None, &[1, 2, 3]).unwrap();
        assert!(m.binding.is_none());
        assert_eq!(m.items, 0);
    }

    fn items_of(c: &SessionCache, id: &str) -> Items {
        c.own_items(id, O, None).unwrap().0
    }

    #[test]
    fn matching_respects_owners_and_connections() {
        let c = tokenizing(false);
        let conn = c.open_connection();
        let other = c.open_connection();
        let mut n = turn(
            "l",
            r#"[{"role":"user","content":"local"}]"#,
            "[]",
            Parent::None,
        );
        n.store = false;
        n.connection = Some(conn);
        c.create(n).unwrap();
        let sent = digests(&parse(r#"[{"role":"user","content":"local"}]"#));
        assert_eq!(c.match_prefix(O, Some(conn), &sent).unwrap().items, 1);
        assert_eq!(c.match_prefix(O, Some(other), &sent).unwrap().items, 0);
        assert_eq!(c.match_prefix(O, None, &sent).unwrap().items, 0);
        assert_eq!(c.match_prefix("x", Some(conn), &sent).unwrap().items, 0);
        // A stored chain is found from any connection of its owner, never another's.
        c.create(turn(
            "s",
            r#"[{"role":"user","content":"stored"}]"#,
            "[]",
            Parent::None,
        ))
        .unwrap();
        let sent = digests(&parse(r#"[{"role":"user","content":"stored"}]"#));
        assert_eq!(c.match_prefix(O, Some(other), &sent).unwrap().items, 1);
        assert_eq!(c.match_prefix("x", None, &sent).unwrap().items, 0);
        // A local child of the stored chain is visible to its connection only; a
        // match through it taints nothing else.
        let m = c.match_prefix(O, Some(conn), &sent).unwrap();
        let b = m.binding.unwrap();
        let mut n = turn(
            "t",
            r#"[{"role":"user","content":"more"}]"#,
            "[]",
            Parent::Binding(&b),
        );
        n.store = false;
        n.connection = Some(conn);
        c.create(n).unwrap();
        let longer = digests(&parse(
            r#"[{"role":"user","content":"stored"},{"role":"user","content":"more"}]"#,
        ));
        assert_eq!(c.match_prefix(O, Some(conn), &longer).unwrap().items, 2);
        assert_eq!(c.match_prefix(O, Some(other), &longer).unwrap().items, 1);
        // Closing the connection frees its local chains: they no longer match.
        drop(b);
        c.close_connection(conn);
        assert_eq!(c.match_prefix(O, Some(conn), &longer).unwrap().items, 1);
    }

    #[test]
    fn dead_positions_stay_a_small_share_of_the_live_ones_under_churn() {
        // Each dead position keeps its node's allocation, which the meter no longer
        // counts: under steady churn (eviction, deletes) they must not grow to as many
        // as the live ones (they did: swept only once the index had doubled since the
        // last sweep, so the heap ran some 38 % past the meter).
        let c = tokenizing(false);
        let items = |i: usize| {
            let json: Vec<String> = (0..10)
                .map(|j| format!(r#"{{"role":"user","content":"{i} {j}"}}"#))
                .collect();
            format!("[{}]", json.join(","))
        };
        let live_nodes = 2000;
        for i in 0..live_nodes {
            c.create(turn(&format!("r{i}"), &items(i), "[]", Parent::None))
                .unwrap();
        }
        let mut worst = 0;
        for i in live_nodes..live_nodes * 6 {
            assert!(c.delete(&format!("r{}", i - live_nodes), O));
            c.create(turn(&format!("r{i}"), &items(i), "[]", Parent::None))
                .unwrap();
            let st = c.shared.state.lock();
            let live = c.shared.meter.indexed_positions() as usize;
            assert_eq!(live, live_nodes * 10);
            worst = worst.max(st.prefix_positions - live);
        }
        assert!(worst <= live_nodes * 10 / 4 + PREFIX_SWEEP_SLACK, "{worst}");
        assert!(
            worst > PREFIX_SWEEP_SLACK,
            "no sweep was needed: a weaker test"
        );
    }

    #[test]
    fn dead_positions_are_swept() {
        let c = tokenizing(false);
        for i in 0..3000 {
            let id = format!("r{i}");
            c.create(turn(
                &id,
                &format!(r#"[{{"role":"user","content":"{i}"}}]"#),
                "[]",
                Parent::None,
            ))
            .unwrap();
            assert!(c.delete(&id, O));
        }
        {
            let st = c.shared.state.lock();
            let live = c.shared.meter.indexed_positions() as usize;
            assert_eq!(live, 0, "every node was deleted");
            assert!(st.prefix_positions <= live / 4 + PREFIX_SWEEP_SLACK + 1);
            assert!(st.prefix.len() <= 4097, "{}", st.prefix.len());
            assert!(st.prefix_positions > 0, "none left to sweep: a weaker test");
        }
        c.sweep_prefix_index();
        let st = c.shared.state.lock();
        assert_eq!((st.prefix_positions, st.prefix.len()), (0, 0));
    }

    #[test]
    fn threads_hammering_one_cache_keep_the_invariants() {
        let c = SessionCache::new(200_000, 1 << 20);
        let conns: Vec<u64> = (0..4).map(|_| c.open_connection()).collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let c = c.clone();
                let conns = conns.clone();
                s.spawn(move || {
                    let mut prev: Option<String> = None;
                    for i in 0..500 {
                        let id = format!("t{t}-{i}");
                        let conn = conns[(t + i) % conns.len()];
                        let mut n = new(&id, prev.as_deref().map_or(Parent::None, Parent::Id));
                        n.store = i % 3 != 0;
                        n.connection = Some(conn);
                        let _ = c.create(n);
                        if i % 7 == 0 {
                            if let Ok(b) = c.bind(&id, O, Some(conn)) {
                                let _ = b.view(None).map(|v| v.to_json());
                            }
                        }
                        if i % 11 == 0 {
                            c.delete(&id, O);
                        }
                        prev = c.get(&id, O, Some(conn)).ok().map(|_| id);
                    }
                });
            }
        });
        let s = c.stats();
        assert_eq!(s.pinned, 0);
        assert_eq!(s.entries, s.stored_entries + s.local_entries);
        for conn in conns {
            c.close_connection(conn);
        }
        let s = c.stats();
        assert_eq!(s.local_entries, 0);
        let st = c.shared.state.lock();
        assert_eq!(
            st.candidates.len(),
            st.index.values().filter(|e| e.is_candidate()).count()
        );
    }
}
