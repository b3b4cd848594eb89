//! Snapshots: the stored entries of a cache, and the nodes their chains need, as
//! versioned msgpack.
//!
//! Format (msgpack map, field names included so a reader can check them):
//!
//! ```text
//! {"format": "warmsocket-cache", "version": 1, "nodes": [node, ...]}
//! node = {"parent": index of an earlier node | nil, "indexed": bool, "id": str,
//!         "owner": str, "store": bool, "n_input": int,
//!         "items": [canonical item JSON as str, ...],       # input then output
//!         "settings": bin | nil (nil: the parent's), "meta": bin,
//!         "implicit": true}        # only when the parent was found by matching
//! ```
//!
//! Tokens are not stored: a tokenising cache counts and block-hashes the restored
//! items again (so a snapshot never carries tokens of another tokenizer or of an
//! older template).
//!
//! Nodes come parents first, each once, so sharing survives the round trip. Only
//! stored nodes are written: every ancestor of a stored node is stored (the taint
//! rule), so no connection-local content ever reaches a snapshot. `indexed` is false
//! for an ancestor whose entry was deleted or evicted but that a stored descendant
//! still needs.
//!
//! Restoring validates everything before touching the cache (items are re-parsed
//! with the cache's item limit, counts are recomputed), so bad data changes nothing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::cache::SessionCache;
use crate::error::{Error, Result};
use crate::item::{json_error_detail, Item, Items};
use crate::node::{Node, NodeSpec, NodeTokens};

const FORMAT: &str = "warmsocket-cache";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    format: String,
    version: u32,
    nodes: Vec<Record>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    parent: Option<u32>,
    indexed: bool,
    id: String,
    owner: String,
    store: bool,
    n_input: u32,
    items: Vec<String>,
    settings: Option<Bytes>,
    meta: Bytes,
    #[serde(default, skip_serializing_if = "is_false")]
    implicit: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_false(b: &bool) -> bool {
    !*b
}

/// Bytes written as msgpack `bin` (serde's default for `Vec<u8>` is an array of ints).
struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Bytes, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> std::result::Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Bytes, E> {
                Ok(Bytes(v.as_bytes().to_vec()))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Bytes, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        d.deserialize_byte_buf(BytesVisitor)
    }
}

/// Serialise the cache's stored entries and the nodes their chains need.
pub fn snapshot(cache: &SessionCache) -> Vec<u8> {
    encode(&cache.stored_nodes())
}

/// Encode `leaves` (indexed nodes) and their ancestors, parents first, each once.
fn encode(leaves: &[Arc<Node>]) -> Vec<u8> {
    let indexed: HashSet<*const Node> = leaves.iter().map(Arc::as_ptr).collect();
    let mut position: HashMap<*const Node, u32> = HashMap::new();
    let mut nodes: Vec<Record> = Vec::new();
    for leaf in leaves {
        let fresh: Vec<&Node> = leaf
            .ancestors()
            .take_while(|n| !position.contains_key(&std::ptr::from_ref(*n)))
            .collect();
        for node in fresh.into_iter().rev() {
            let parent = node.parent.as_deref();
            let settings_shared = parent.is_some_and(|p| Arc::ptr_eq(&p.settings, &node.settings));
            let record = Record {
                parent: parent.and_then(|p| position.get(&std::ptr::from_ref(p)).copied()),
                indexed: indexed.contains(&std::ptr::from_ref(node)),
                id: node.id.to_string(),
                owner: node.owner.to_string(),
                store: node.store,
                n_input: node.input.len() as u32,
                items: node
                    .own_items()
                    .map(|i| String::from_utf8_lossy(i.json()).into_owned())
                    .collect(),
                settings: (!settings_shared).then(|| Bytes(node.settings.to_vec())),
                meta: Bytes(node.meta.to_vec()),
                implicit: node.implicit,
            };
            position.insert(std::ptr::from_ref(node), nodes.len() as u32);
            nodes.push(record);
        }
    }
    let snapshot = Snapshot {
        format: FORMAT.to_owned(),
        version: VERSION,
        nodes,
    };
    // Serialising plain structs into a Vec cannot fail; an empty result would be
    // refused by `restore` rather than misread.
    rmp_serde::to_vec_named(&snapshot).unwrap_or_default()
}

/// What went wrong decoding a snapshot, in fixed words: the decoder's own messages
/// quote what they found, which may be an item's content or an owner.
fn decode_failure(error: &rmp_serde::decode::Error) -> &'static str {
    use rmp_serde::decode::Error as E;
    match error {
        E::InvalidMarkerRead(_) | E::InvalidDataRead(_) => "it ends too early",
        E::TypeMismatch(_) | E::Syntax(_) | E::Uncategorized(_) => "unexpected structure",
        E::OutOfRange => "a number out of range",
        E::LengthMismatch(_) => "a length that does not match",
        E::Utf8Error(_) => "text that is not UTF-8",
        E::DepthLimitExceeded => "nested too deeply",
    }
}

/// Decode and validate a snapshot into nodes (parents first) paired with whether
/// each should be indexed. Touches no cache state.
pub fn decode(cache: &SessionCache, data: &[u8]) -> Result<Vec<(Arc<Node>, bool)>> {
    let snapshot: Snapshot = rmp_serde::from_slice(data)
        .map_err(|e| Error::snapshot(format!("not a cache snapshot ({})", decode_failure(&e))))?;
    if snapshot.format != FORMAT {
        return Err(Error::snapshot("not a warmsocket cache snapshot"));
    }
    if snapshot.version != VERSION {
        return Err(Error::snapshot(format!(
            "format version {} is not supported (this build reads version {VERSION})",
            snapshot.version
        )));
    }
    let max_item_bytes = cache.max_item_bytes();
    let mut owners: HashMap<String, Arc<str>> = HashMap::new();
    let mut seen_ids: HashSet<&str> = HashSet::new();
    for (i, r) in snapshot.nodes.iter().enumerate() {
        if r.indexed && !seen_ids.insert(&r.id) {
            return Err(Error::snapshot(format!("node {i}: id indexed twice")));
        }
    }
    // Pass 1: validate every record and parse its items; no node exists yet, so a
    // failure leaves even the byte meter untouched.
    let mut specs: Vec<(NodeSpec, Option<usize>, bool)> = Vec::with_capacity(snapshot.nodes.len());
    for (i, r) in snapshot.nodes.iter().enumerate() {
        let bad = |what: String| Error::snapshot(format!("node {i}: {what}"));
        let parent = match r.parent.map(|p| p as usize) {
            Some(p) if p >= i => return Err(bad("parent is not an earlier node".into())),
            p => p,
        };
        if !r.store {
            return Err(bad("a connection-local response cannot be restored".into()));
        }
        if r.id.is_empty() {
            return Err(bad("empty id".into()));
        }
        let n_input = r.n_input as usize;
        if n_input > r.items.len() {
            return Err(bad("n_input exceeds the item count".into()));
        }
        let mut items = Vec::with_capacity(r.items.len());
        for (j, text) in r.items.iter().enumerate() {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| bad(format!("item {j} is not JSON ({})", json_error_detail(&e))))?;
            let item =
                Item::from_value(j, &value, max_item_bytes).map_err(|e| bad(e.to_string()))?;
            items.push(Arc::new(item));
        }
        let parent_settings = parent.map(|p| &specs[p].0.settings);
        let settings: Arc<[u8]> = match (&r.settings, parent_settings) {
            (Some(s), Some(ps)) if **ps == *s.0 => ps.clone(),
            (Some(s), _) => s.0.as_slice().into(),
            (None, Some(ps)) => ps.clone(),
            (None, None) => return Err(bad("a root node needs its settings".into())),
        };
        let owner = owners
            .entry(r.owner.clone())
            .or_insert_with(|| Arc::from(r.owner.as_str()))
            .clone();
        if r.implicit && parent.is_none() {
            return Err(bad("an implicit parent needs a parent".into()));
        }
        if parent.is_some_and(|p| *specs[p].0.owner != *owner) {
            // A chain is one owner's: one grafted under another's would show that
            // owner's context to this one.
            return Err(bad("its parent belongs to another owner".into()));
        }
        // One batch for both, as the cache stores a node's items.
        let all = Items::from_vec(items);
        let (input, output) = (all.slice(0..n_input), all.slice(n_input..all.len()));
        let (input, output) = match cache.token_config() {
            Some(cfg) => (
                cfg.tokenize(&input).map_err(|e| bad(e.to_string()))?,
                cfg.tokenize(&output).map_err(|e| bad(e.to_string()))?,
            ),
            None => (input, output),
        };
        let spec = NodeSpec {
            id: r.id.as_str().into(),
            owner,
            store: true,
            input,
            output,
            settings,
            meta: r.meta.0.as_slice().into(),
            implicit: r.implicit,
            tokens: NodeTokens::default(),
            indexed: cache.prefix_index(),
        };
        specs.push((spec, parent, r.indexed));
    }
    // Pass 2: build the nodes, parents first (counts and block hashes recomputed;
    // the items are tokenised already, so this cannot fail).
    let mut nodes: Vec<(Arc<Node>, bool)> = Vec::with_capacity(specs.len());
    for (mut spec, parent, indexed) in specs {
        let parent = parent.map(|p| nodes[p].0.clone());
        if let Some(cfg) = cache.token_config() {
            let (tokens, input, output) = cfg
                .node_tokens(parent.as_deref(), &spec.input, &spec.output)
                .map_err(|e| Error::snapshot(e.to_string()))?;
            (spec.tokens, spec.input, spec.output) = (tokens, input, output);
        }
        let node = Node::new(spec, parent, None, cache.meter());
        nodes.push((Arc::new(node), indexed));
    }
    Ok(nodes)
}

/// Add a snapshot's entries, skipping ids already present. Returns entries added.
pub fn restore(cache: &SessionCache, data: &[u8]) -> Result<usize> {
    let nodes = decode(cache, data)?;
    Ok(cache.insert_restored(nodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{NewResponse, Parent};
    use crate::node::tests::items;

    fn create(c: &SessionCache, id: &str, parent: Option<&str>, settings: &[u8]) {
        c.create(NewResponse {
            id,
            owner: "o",
            input: items(2, id),
            output: items(1, id),
            parent: parent.map_or(Parent::None, Parent::Id),
            settings,
            meta: b"{\"m\":1}",
            store: true,
            connection: None,
        })
        .unwrap();
    }

    fn context(c: &SessionCache, id: &str) -> Vec<u8> {
        c.view(Some(id), "o", None, None).unwrap().to_json()
    }

    fn sample() -> SessionCache {
        let c = SessionCache::new(1 << 30, 1 << 20);
        create(&c, "a", None, b"{}");
        create(&c, "b", Some("a"), b"{}");
        create(&c, "c", Some("b"), b"{\"model\":\"m\"}");
        create(&c, "d", Some("b"), b"{}");
        c
    }

    #[test]
    fn round_trip_keeps_contexts_sharing_and_counts() {
        let c = sample();
        assert!(
            c.delete("b", "o"),
            "a deleted middle node is kept as unindexed"
        );
        let conn = c.open_connection();
        c.create(NewResponse {
            id: "local",
            owner: "o",
            input: items(1, "secret"),
            output: Items::default(),
            parent: Parent::Id("d"),
            settings: b"{}",
            meta: b"{}",
            store: false,
            connection: Some(conn),
        })
        .unwrap();
        let data = snapshot(&c);
        let restored = SessionCache::new(1 << 30, 1 << 20);
        assert_eq!(restore(&restored, &data).unwrap(), 3);
        for id in ["a", "c", "d"] {
            assert_eq!(context(&restored, id), context(&c, id));
            let (x, y) = (
                c.get(id, "o", None).unwrap(),
                restored.get(id, "o", None).unwrap(),
            );
            assert_eq!((x.depth, x.items, x.bytes), (y.depth, y.items, y.bytes));
            assert_eq!(x.settings, y.settings);
            assert_eq!(x.meta, y.meta);
        }
        assert!(restored.get("b", "o", None).is_err());
        assert!(restored.get("local", "o", Some(1)).is_err());
        assert!(!String::from_utf8_lossy(&data).contains("secret"));
        // Nodes were shared, not duplicated: same bytes as the original minus `local`.
        c.close_connection(conn);
        assert_eq!(restored.stats().bytes, c.stats().bytes);
        let d = restored.get("d", "o", None).unwrap();
        let a = restored.get("a", "o", None).unwrap();
        assert!(Arc::ptr_eq(&d.settings, &a.settings));
    }

    #[test]
    fn restore_skips_present_ids() {
        let c = sample();
        let data = snapshot(&c);
        assert_eq!(restore(&c, &data).unwrap(), 0);
        assert_eq!(c.stats().entries, 4);
        let other = SessionCache::new(1 << 30, 1 << 20);
        create(&other, "a", None, b"{}");
        assert_eq!(restore(&other, &data).unwrap(), 3);
        assert_eq!(context(&other, "d"), context(&c, "d"));
    }

    #[test]
    fn bad_snapshots_change_nothing() {
        let c = sample();
        let good = snapshot(&c);
        let target = SessionCache::new(1 << 30, 1 << 20);
        create(&target, "x", None, b"{}");
        let before = target.stats();
        let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
        snap.nodes[2].items[0] = "[1]".into();
        let bad_item = rmp_serde::to_vec_named(&snap).unwrap();
        let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
        snap.nodes[1].parent = Some(5);
        let bad_parent = rmp_serde::to_vec_named(&snap).unwrap();
        let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
        snap.version = 99;
        let bad_version = rmp_serde::to_vec_named(&snap).unwrap();
        let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
        snap.nodes[0].n_input = 50;
        let bad_count = rmp_serde::to_vec_named(&snap).unwrap();
        let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
        snap.nodes[3].id = "a".into();
        let twice = rmp_serde::to_vec_named(&snap).unwrap();
        // Another owner's node put under "o"'s chain: its context would be o's.
        let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
        snap.nodes[3].owner = "mallory".into();
        let grafted = rmp_serde::to_vec_named(&snap).unwrap();
        for bad in [
            &b""[..],
            b"\x93\x01\x02",
            &good[..good.len() / 2],
            &bad_item,
            &bad_parent,
            &bad_version,
            &bad_count,
            &twice,
            &grafted,
        ] {
            let err = restore(&target, bad).unwrap_err();
            assert!(matches!(err, Error::Snapshot { .. }), "{err:?}");
            assert_eq!(target.stats(), before);
        }
    }

    #[test]
    fn a_snapshot_that_does_not_decode_is_refused_without_quoting_it() {
        // The decoder's own message quotes the string it found where a node record
        // should be: an item's content, here.
        let forged = rmp_serde::to_vec_named(&serde_json::json!({
            "format": FORMAT,
            "version": VERSION,
            "nodes": [r#"{"role":"user","content":"my card is 4111-1111"}"#],
        }))
        .unwrap();
        let target = SessionCache::new(1 << 30, 1 << 20);
        let err = restore(&target, &forged).unwrap_err().to_string();
        assert_eq!(
            err,
            "Cannot restore the snapshot: not a cache snapshot (unexpected structure)."
        );
        let err = restore(&target, &forged[..forged.len() - 5])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("4111"), "{err}");
    }

    #[test]
    fn items_at_the_depth_limit_round_trip() {
        use crate::item::tests::nested_item;
        use crate::item::MAX_DEPTH;
        let c = SessionCache::new(1 << 30, 1 << 20);
        let json = format!("[{}]", nested_item(MAX_DEPTH));
        c.create(NewResponse {
            id: "deep",
            owner: "o",
            input: Items::parse(json.as_bytes(), 1 << 20).unwrap(),
            output: Items::default(),
            parent: Parent::None,
            settings: b"{}",
            meta: b"{}",
            store: true,
            connection: None,
        })
        .unwrap();
        let restored = SessionCache::new(1 << 30, 1 << 20);
        assert_eq!(restore(&restored, &snapshot(&c)).unwrap(), 1);
        assert_eq!(context(&restored, "deep"), context(&c, "deep"));
    }

    #[test]
    fn deep_items_in_a_snapshot_are_refused() {
        use crate::item::tests::nested_item;
        use crate::item::{too_deep, MAX_DEPTH};
        let good = snapshot(&sample());
        let target = SessionCache::new(1 << 30, 1 << 20);
        // One level too deep (serde_json reads it), and far deeper than serde_json
        // reads (a hostile file: refused without overflowing the stack).
        for (levels, expected) in [
            (MAX_DEPTH + 1, too_deep()),
            (1_000_000, format!("item 0 is not JSON ({})", too_deep())),
        ] {
            let mut snap: Snapshot = rmp_serde::from_slice(&good).unwrap();
            snap.nodes[1].items[0] = nested_item(levels);
            let data = rmp_serde::to_vec_named(&snap).unwrap();
            let err = restore(&target, &data).unwrap_err();
            assert!(matches!(err, Error::Snapshot { .. }), "{err:?}");
            assert!(err.to_string().contains("node 1: "), "{err}");
            assert!(err.to_string().contains(&expected), "{err}");
            assert_eq!(target.stats().entries, 0);
        }
    }

    #[test]
    fn item_limit_applies_on_restore() {
        let data = snapshot(&sample());
        let small = SessionCache::new(1 << 30, 10);
        let err = restore(&small, &data).unwrap_err();
        assert!(err.to_string().contains("larger than the limit"), "{err}");
    }
}
