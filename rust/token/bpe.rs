//! Exact, faster encoding for the built-in OpenAI encodings.
//!
//! tiktoken splits text into pieces with a regex and merges each piece with
//! byte-pair ranks. Its split patterns have one lookahead, `\s+(?!\S)`, which
//! forces a backtracking engine (fancy-regex) on every text, and most of the
//! time of an encode goes there. [`FastBpe`] splits with the `regex` crate's
//! automata instead: the pattern has that alternative written as `\s+`, and the
//! lookahead is applied afterwards. A whitespace run matched by that alternative
//! (one with no line break: a run with one is taken by `\s*[\r\n]` first) and
//! followed by a non-whitespace character gives back its last character, which
//! is what the backtracking engine's `\s+(?!\S)` matches; a run of one character
//! is matched whole by the pattern's next alternative in both. Every other
//! alternative is the same in both patterns, and the `regex` crate's
//! leftmost-first matching prefers alternatives as a backtracking engine does, so
//! the pieces, and so the tokens, are tiktoken's. Unlike fancy-regex, the split
//! never gives up on long whitespace runs.
//!
//! The merge (`byte_pair_encode`) is tiktoken's (MIT licence, Copyright (c) 2022
//! OpenAI, Shantanu Jain), over a rank table rebuilt once from tiktoken-rs's
//! embedded one. Tests compare the ids with tiktoken-rs on generated text.

use std::collections::BinaryHeap;

use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::Arc;

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::meta::Regex;
use regex_automata::util::pool::Pool;
use regex_automata::{Anchored, Input};
use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

type Rank = u32;

/// `o200k_base`'s split pattern (tiktoken-rs's `O200K_BASE_PAT_STR`) with its
/// final `\s+(?!\S)|\s+` written as `\s+`.
const O200K_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+",
);

/// `cl100k_base`'s split pattern with its final `\s+(?!\S)|\s` written as `\s+`
/// and its possessive quantifiers as greedy ones (no alternative backtracks into
/// them, so the matches are the same).
const CL100K_SPLIT: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)",
    r"|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s+$",
    r"|\s*[\r\n]",
    r"|\s+",
);

type CacheMaker = Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe>;

/// The split automata and rank table of one built-in encoding.
pub struct FastBpe {
    /// The lazy DFA of the split pattern, searched anchored: one forward scan per
    /// piece gives its end. Its transition caches are per thread (the pool).
    dfa: Arc<DFA>,
    caches: Pool<Cache, CacheMaker>,
    /// The same pattern as a full regex, for a piece the DFA cannot give.
    split: Regex,
    ranks: Ranks,
}

/// Byte strings to ranks. A merge looks up every pair of neighbours, so one- and
/// two-byte strings are read from flat tables (a two-byte one is 256 KiB, which
/// stays in cache); strings of up to seven bytes are keyed by the bytes and length
/// packed into one `u64` (no key comparison, no pointer to follow); the rest by
/// their bytes.
struct Ranks {
    pairs: Box<[Rank]>,
    short: FxHashMap<u64, Rank>,
    long: FxHashMap<Box<[u8]>, Rank>,
}

impl Default for Ranks {
    fn default() -> Self {
        Ranks {
            pairs: vec![Rank::MAX; 256 + 65536].into_boxed_slice(),
            short: FxHashMap::default(),
            long: FxHashMap::default(),
        }
    }
}

impl Ranks {
    const SHORT: usize = 7;

    /// Slot of a one- or two-byte string in `pairs`.
    #[inline]
    fn slot(bytes: &[u8]) -> Option<usize> {
        match *bytes {
            [a] => Some(usize::from(a)),
            [a, b] => Some(256 + (usize::from(a) << 8 | usize::from(b))),
            _ => None,
        }
    }

    fn pack(bytes: &[u8]) -> u64 {
        let mut key = [0u8; 8];
        key[..bytes.len()].copy_from_slice(bytes);
        key[7] = bytes.len() as u8;
        u64::from_le_bytes(key)
    }

    fn insert(&mut self, bytes: Vec<u8>, rank: Rank) {
        if let Some(slot) = Self::slot(&bytes) {
            self.pairs[slot] = rank;
        } else if bytes.len() <= Self::SHORT {
            self.short.insert(Self::pack(&bytes), rank);
        } else {
            self.long.insert(bytes.into_boxed_slice(), rank);
        }
    }

    #[inline]
    fn get(&self, bytes: &[u8]) -> Option<Rank> {
        if let Some(slot) = Self::slot(bytes) {
            let rank = self.pairs[slot];
            (rank != Rank::MAX).then_some(rank)
        } else if bytes.len() <= Self::SHORT {
            self.short.get(&Self::pack(bytes)).copied()
        } else {
            self.long.get(bytes).copied()
        }
    }
}

impl FastBpe {
    pub fn o200k(core: &CoreBPE) -> FastBpe {
        FastBpe::new(core, O200K_SPLIT)
    }

    pub fn cl100k(core: &CoreBPE) -> FastBpe {
        FastBpe::new(core, CL100K_SPLIT)
    }

    /// The ranks are read back from `core` (every id that decodes and is not a
    /// special token); the pattern is a constant of this module.
    fn new(core: &CoreBPE, pattern: &str) -> FastBpe {
        let special: Vec<Rank> = core
            .special_tokens()
            .into_iter()
            .flat_map(|token| core.encode_with_special_tokens(token))
            .collect();
        let mut ranks = Ranks::default();
        let mut missing = 0;
        let mut rank: Rank = 0;
        // Ranks are dense from 0; stop after a long run of ids that do not decode.
        while missing < 1024 {
            match core.decode_bytes(&[rank]) {
                Ok(bytes) if !special.contains(&rank) => {
                    ranks.insert(bytes, rank);
                    missing = 0;
                }
                _ => missing += 1,
            }
            rank += 1;
        }
        #[allow(clippy::expect_used)] // a constant pattern, compiled by the tests
        let (dfa, split) = (
            Arc::new(DFA::new(pattern).expect("the split pattern compiles")),
            Regex::new(pattern).expect("the split pattern compiles"),
        );
        let maker = dfa.clone();
        let caches: Pool<Cache, CacheMaker> = Pool::new(Box::new(move || maker.create_cache()));
        FastBpe {
            dfa,
            caches,
            split,
            ranks,
        }
    }

    /// Appends the ids of `text` (ordinary text) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<Rank>) {
        let bytes = text.as_bytes();
        let mut cache = self.caches.get();
        let mut start = 0;
        while let Some(found) = self.next_piece(&mut cache, text, start) {
            let matched = &text[found.clone()];
            let mut end = found.end;
            if end < text.len() && ends_a_lookahead_run(matched) {
                // `\s+(?!\S)`: a run before a non-whitespace character gives back
                // its last character (`end` is the run's end: the next character
                // is not whitespace, or `\s+` would have taken it).
                if let Some(last) = matched.chars().next_back() {
                    if matched.len() > last.len_utf8() {
                        end -= last.len_utf8();
                    }
                }
            }
            let piece = &bytes[found.start..end];
            match self.ranks.get(piece) {
                Some(rank) => out.push(rank),
                None => self.byte_pair_encode(piece, out),
            }
            start = end;
        }
    }

    /// The next piece at or after `start`. The alternatives of both patterns match
    /// every character, so pieces tile the text and the search is anchored at
    /// `start`: the lazy DFA's forward scan gives the piece's end. An unanchored
    /// search of the full regex is the fallback all the same.
    fn next_piece(
        &self,
        cache: &mut Cache,
        text: &str,
        start: usize,
    ) -> Option<std::ops::Range<usize>> {
        if start >= text.len() {
            return None;
        }
        let anchored = Input::new(text).range(start..).anchored(Anchored::Yes);
        if let Ok(Some(end)) = self.dfa.try_search_fwd(cache, &anchored) {
            if end.offset() > start {
                return Some(start..end.offset());
            }
        }
        let found = self.split.find(Input::new(text).range(start..))?;
        Some(found.range())
    }

    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        self.ranks.get(bytes)
    }

    fn byte_pair_encode(&self, piece: &[u8], out: &mut Vec<Rank>) {
        if piece.len() == 1 {
            out.extend(self.rank(piece));
        } else if piece.len() < 100 {
            let parts = self.merge(piece);
            out.extend(
                parts
                    .windows(2)
                    .filter_map(|w| self.rank(&piece[w[0].0..w[1].0])),
            );
        } else {
            self.merge_large(piece, out);
        }
    }

    /// tiktoken's `_byte_pair_merge`: O(pieces × merges), fast for short pieces.
    fn merge(&self, piece: &[u8]) -> Vec<(usize, Rank)> {
        let mut parts = Vec::with_capacity(piece.len() + 1);
        let mut min_rank: (Rank, usize) = (Rank::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = self.rank(&piece[i..i + 2]).unwrap_or(Rank::MAX);
            if rank < min_rank.0 {
                min_rank = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, Rank::MAX));
        parts.push((piece.len(), Rank::MAX));

        let get_rank = |parts: &Vec<(usize, Rank)>, i: usize| {
            if i + 3 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 3].0])
                    .unwrap_or(Rank::MAX)
            } else {
                Rank::MAX
            }
        };
        while min_rank.0 != Rank::MAX {
            let i = min_rank.1;
            if i > 0 {
                parts[i - 1].1 = get_rank(&parts, i - 1);
            }
            parts[i].1 = get_rank(&parts, i);
            parts.remove(i + 1);
            min_rank = (Rank::MAX, usize::MAX);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min_rank.0 {
                    min_rank = (rank, i);
                }
            }
        }
        parts
    }

    /// tiktoken's `_byte_pair_merge_large`: a heap of candidate merges,
    /// O(n log n) for long pieces; the same merges in the same order.
    fn merge_large(&self, piece: &[u8], out: &mut Vec<Rank>) {
        let mut state = Vec::with_capacity(piece.len());
        state.push(State {
            prev: usize::MAX,
            end: 1,
            next_end: 2,
            next_rank: Rank::MAX,
            cur_rank: Rank::MAX,
        });
        let mut heap = BinaryHeap::with_capacity(piece.len());
        for i in 0..piece.len() - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                heap.push(Merge { start: i, rank });
                state[i].next_rank = rank;
            }
            state.push(State {
                prev: i,
                end: i + 2,
                next_end: i + 3,
                next_rank: Rank::MAX,
                cur_rank: Rank::MAX,
            });
        }
        let potential_merge = |state: &mut Vec<State>,
                               heap: &mut BinaryHeap<Merge>,
                               start: usize,
                               next_end: usize| {
            state[start].next_end = next_end;
            state[start].next_rank = Rank::MAX;
            if next_end <= piece.len() {
                if let Some(rank) = self.rank(&piece[start..next_end]) {
                    heap.push(Merge { start, rank });
                    state[start].next_rank = rank;
                }
            }
        };
        while let Some(left) = heap.pop() {
            if left.rank == Rank::MAX {
                break;
            }
            if left.rank != state[left.start].next_rank {
                continue; // invalidated
            }
            let left_start = left.start;
            let right_start = state[left_start].end;
            let right_end = state[left_start].next_end;
            let right_next_end = state[right_start].next_end;
            state[left_start].cur_rank = state[left_start].next_rank;
            state[left_start].end = right_end;
            potential_merge(&mut state, &mut heap, left_start, right_next_end);
            if right_end < state.len() {
                state[right_end].prev = left_start;
            }
            if left_start > 0 {
                let prev_start = state[left_start].prev;
                potential_merge(&mut state, &mut heap, prev_start, right_end);
            }
            state[right_start].next_rank = Rank::MAX;
        }
        let mut i = 0;
        while i < state.len() {
            if state[i].cur_rank != Rank::MAX {
                out.push(state[i].cur_rank);
            } else {
                out.extend(self.rank(&piece[i..state[i].end]));
            }
            i = state[i].end;
        }
    }
}

/// Whether a match is a run of the `\s+` alternative that stands for
/// `\s+(?!\S)`: whitespace only, and no line break (runs with one are matched by
/// the line-break alternatives, which end in one and have no lookahead).
fn ends_a_lookahead_run(matched: &str) -> bool {
    !matched.ends_with(['\r', '\n']) && matched.chars().all(char::is_whitespace)
}

#[derive(Eq, PartialEq, Clone, Copy)]
struct Merge {
    start: usize,
    rank: Rank,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.start.cmp(&self.start))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct State {
    prev: usize,
    end: usize,
    next_end: usize,
    next_rank: Rank,
    cur_rank: Rank,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn reference(core: &CoreBPE, text: &str) -> Vec<Rank> {
        core.encode(text, &HashSet::new())
            .expect("tiktoken encodes")
            .0
    }

    fn encode(bpe: &FastBpe, text: &str) -> Vec<Rank> {
        let mut out = Vec::new();
        bpe.encode_into(text, &mut out);
        out
    }

    /// A small deterministic generator (xorshift) of texts made of the characters
    /// the split patterns treat differently.
    fn texts(count: usize, seed: u64) -> Vec<String> {
        const UNITS: &[&str] = &[
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\r",
            "\u{a0}",
            "\u{3000}",
            "\u{2028}",
            "\u{85}",
            "a",
            "Z",
            "word",
            "Word",
            "WORD",
            "'s",
            "'S",
            "'ll",
            "'re",
            "'t",
            "'",
            "\"",
            "1",
            "12",
            "1234",
            "٣",
            "½",
            "é",
            "e\u{301}",
            "ǅ",
            "ʰ",
            "東京",
            "😀",
            "\u{200d}",
            "(",
            ")",
            "{",
            "}",
            ".",
            ",",
            "/",
            "//",
            "-",
            "_",
            "=>",
            "#",
            "\\",
            "\0",
            "def f(x):",
            "return x",
            "<|endoftext|>",
            "ß",
            "İ",
            "ﬁ",
            "Ⅻ",
            "ⅻ",
            "𝔘",
        ];
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..count)
            .map(|_| {
                let len = (next() % 40) as usize;
                (0..len)
                    .map(|_| UNITS[(next() % UNITS.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    fn check(core: &CoreBPE, bpe: &FastBpe) {
        for text in texts(20_000, 0x5eed) {
            assert_eq!(encode(bpe, &text), reference(core, &text), "{text:?}");
        }
        let prose = "The quick brown fox's 3 jumps  over\t\tthe   lazy dog.\n\n  Done!  ";
        let code = "fn main() {\n    let x = 42;\n    println!(\"{x}\");\n}\n";
        for text in [
            prose, code, "", " ", "  a", "a  ", "\n \n  x", "   123", " \t(x)",
        ] {
            assert_eq!(encode(bpe, text), reference(core, text), "{text:?}");
        }
        // Long pieces take the heap merge.
        let long = "x".repeat(500) + &"ab".repeat(300) + &" ".repeat(700) + "end";
        assert_eq!(encode(bpe, &long), reference(core, &long));
    }

    #[test]
    fn o200k_ids_are_tiktokens() {
        let core = tiktoken_rs::o200k_base_singleton();
        check(core, &FastBpe::o200k(core));
    }

    #[test]
    fn cl100k_ids_are_tiktokens() {
        let core = tiktoken_rs::cl100k_base_singleton();
        check(core, &FastBpe::cl100k(core));
    }

    #[test]
    fn the_patterns_are_tiktokens_but_for_the_lookahead() {
        let o200k = tiktoken_rs::O200K_BASE_PAT_STR;
        assert_eq!(o200k.replace(r"|\s+(?!\S)|\s+", r"|\s+"), O200K_SPLIT);
    }

    #[test]
    fn a_run_the_backtracking_split_gives_up_on_is_encoded() {
        let core = tiktoken_rs::o200k_base_singleton();
        let bpe = FastBpe::o200k(core);
        let text = " ".repeat(1_000_000) + "x";
        let ids = encode(&bpe, &text);
        assert_eq!(core.decode_bytes(&ids).expect("decodes"), text.as_bytes());
    }
}
