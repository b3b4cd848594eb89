"""Tokenisation and chained block hashes (warmsocket._core, rust/token, rust/blocks).

Three groups, each with its baseline in the same process:

* `tokens-encode`: tokens/s of `Tokenizer.encode` (o200k_base) on a ~1 MB mixed
  code-and-prose corpus generated here; baseline OpenAI's `tiktoken` when it is
  installed *and* its o200k_base rank file is already cached (the benchmark
  never downloads; see docs/tokens.md to seed the cache offline).
* `tokens-hash`: `block_hashes` over the corpus's tokens; baseline the
  pure-Python reference (`warmsocket._reference_tokens`).
* `tokens-incremental`: counting and block-hashing one new ~2 KB item on a
  100k-token context vs on an empty one. Target: within 1.2x, asserted when
  timing is enabled.

Run with `pytest benches/test_bench_tokens.py --benchmark-enable` on a release build.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import xxhash

from benches.servers import interleaved_medians, require_release_build, timing_enabled
from warmsocket import _core
from warmsocket import _reference_tokens as ref

CORPUS_BYTES = 1_000_000
# Pinned from the generator below and checked against tiktoken 0.14 (o200k_base).
CORPUS_TOKENS = 272_064
CORPUS_IDS_XXH64 = "b117b4a41cc2e581"
CONTEXT_TOKENS = 100_000

WORDS = (
    "the a of and to in is that it for on with as was by this be are from at or an have "
    "not they which one you were all we when can there use each how their if will up "
    "other about out many then them these so some would make like him into time has look "
    "two more write go see number no way could people my than first water been call who "
    "cache session token prefix block hash chain model request response stream socket "
    "naïve café déjà résumé Zürich 東京 データ 缓存 مرحبا привет"
)
NAMES = "x y value items cache node parent key tokens state result buf out n i"
PROSE = WORDS.split()
IDENTIFIERS = NAMES.split()


class Rng:
    """xorshift64*: the corpus is the same on every Python version and platform."""

    def __init__(self, seed: int) -> None:
        self.state = seed

    def next(self) -> int:
        x = self.state
        x ^= (x >> 12) & 0xFFFFFFFFFFFFFFFF
        x ^= (x << 25) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 27
        self.state = x
        return (x * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF

    def pick(self, seq: list[str]) -> str:
        return seq[self.next() % len(seq)]

    def below(self, n: int) -> int:
        return self.next() % n


def _prose(rng: Rng) -> str:
    sentences = []
    for _ in range(3 + rng.below(5)):
        words = [rng.pick(PROSE) for _ in range(6 + rng.below(14))]
        if rng.below(4) == 0:
            words.insert(rng.below(len(words)), str(rng.below(100_000)))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.pick([".", ".", "?", "!"]))
    return " ".join(sentences) + "\n\n"


def _code(rng: Rng) -> str:
    name = "_".join(rng.pick(IDENTIFIERS) for _ in range(2))
    a, b = rng.pick(IDENTIFIERS), rng.pick(IDENTIFIERS)
    if rng.below(2):
        return (
            f"def {name}({a}, {b}=None):\n"
            f'    """{rng.pick(PROSE).capitalize()} {rng.pick(PROSE)}."""\n'
            f"    for i in range({rng.below(64)}):\n"
            f"        if {a}[i] != {b}:\n"
            f"            {a}[i] += {rng.below(1000)}  # {rng.pick(PROSE)}\n"
            f"    return {{'{a}': {a}, \"n\": len({b} or [])}}\n\n"
        )
    return (
        f"fn {name}({a}: &[u32], {b}: usize) -> Result<Vec<u32>, Error> {{\n"
        f"    let mut out = Vec::with_capacity({b} * {rng.below(16) + 1});\n"
        f"    for (i, t) in {a}.iter().enumerate() {{\n"
        f"        out.push(t.wrapping_mul({rng.below(1 << 31)}) ^ i as u32);\n"
        f"    }}\n"
        f"    Ok(out) // {rng.pick(PROSE)}\n}}\n\n"
    )


def make_corpus(size: int = CORPUS_BYTES, seed: int = 20240601) -> str:
    """About `size` bytes of prose paragraphs, Python and Rust code, and JSON."""
    rng = Rng(seed)
    pieces: list[str] = []
    total = 0
    while total < size:
        kind = rng.below(5)
        if kind < 2:
            piece = _prose(rng)
        elif kind < 4:
            piece = _code(rng)
        else:
            record = {rng.pick(IDENTIFIERS): rng.pick(PROSE) for _ in range(4)}
            piece = json.dumps({"id": rng.below(10**9), "data": record}) + "\n"
        pieces.append(piece)
        total += len(piece.encode())
    return "".join(pieces)


def _ids_digest(ids: Any) -> str:
    return xxhash.xxh64_hexdigest(bytes(ids))


def _cached_tiktoken(encoding: str) -> Any:
    """tiktoken's encoding if tiktoken is installed and the rank file is cached, else None.

    Checked before calling `get_encoding` so the benchmark never starts a download.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    url = f"https://openaipublic.blob.core.windows.net/encodings/{encoding}.tiktoken"
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())):
        return None
    return tiktoken.get_encoding(encoding)


@pytest.fixture(scope="module")
def corpus() -> str:
    text = make_corpus()
    assert len(text.encode()) >= CORPUS_BYTES
    return text


@pytest.fixture(scope="module")
def o200k() -> _core.Tokenizer:
    return _core.Tokenizer.builtin("o200k_base")


@pytest.fixture(scope="module")
def corpus_ids(o200k: _core.Tokenizer, corpus: str) -> Any:
    return o200k.encode(corpus)


def _check_corpus_ids(ids: Any) -> None:
    assert len(ids) == CORPUS_TOKENS
    assert _ids_digest(ids) == CORPUS_IDS_XXH64


# ---------------------------------------------------------------- tokens-encode


@pytest.mark.benchmark(group="tokens-encode")
def test_encode_rust(benchmark: Any, o200k: _core.Tokenizer, corpus: str) -> None:
    require_release_build(benchmark)
    ids = benchmark.pedantic(o200k.encode, (corpus,), rounds=5 if timing_enabled(benchmark) else 1)
    _check_corpus_ids(ids)
    assert o200k.count(corpus) == CORPUS_TOKENS
    tiktoken_enc = _cached_tiktoken("o200k_base")
    if tiktoken_enc is not None:
        assert tiktoken_enc.encode_ordinary(corpus) == ids.tolist()
    if timing_enabled(benchmark):
        arms: dict[str, Callable[[], object]] = {"rust": lambda: o200k.encode(corpus)}
        if tiktoken_enc is not None:
            arms["tiktoken"] = lambda: tiktoken_enc.encode_ordinary(corpus)
        medians = interleaved_medians(arms, rounds=7, warmup=1)
        info: dict[str, float] = {
            "tokens": CORPUS_TOKENS,
            "rust_tokens_per_s": CORPUS_TOKENS / medians["rust"],
            "rust_mb_per_s": len(corpus.encode()) / medians["rust"] / 1e6,
        }
        if "tiktoken" in medians:
            info["tiktoken_tokens_per_s"] = CORPUS_TOKENS / medians["tiktoken"]
            info["rust_speedup_vs_tiktoken"] = medians["tiktoken"] / medians["rust"]
        benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="tokens-encode")
def test_encode_tiktoken(benchmark: Any, corpus: str) -> None:
    require_release_build(benchmark)
    enc = _cached_tiktoken("o200k_base")
    if enc is None:
        pytest.skip("tiktoken not installed or its o200k_base rank file not cached")
    ids = benchmark.pedantic(
        enc.encode_ordinary, (corpus,), rounds=5 if timing_enabled(benchmark) else 1
    )
    assert len(ids) == CORPUS_TOKENS
    assert xxhash.xxh64_hexdigest(_core.Tokenizer.builtin("o200k_base").encode(corpus)) == (
        CORPUS_IDS_XXH64
    )


# ---------------------------------------------------------------- tokens-hash


@pytest.mark.benchmark(group="tokens-hash")
def test_block_hashes_rust(benchmark: Any, corpus_ids: Any) -> None:
    require_release_build(benchmark)
    hashes = benchmark.pedantic(
        _core.block_hashes, (corpus_ids,), rounds=20 if timing_enabled(benchmark) else 1
    )
    assert len(hashes) == ref.HASH_BYTES * (CORPUS_TOKENS // 16)
    expected = ref.block_hashes(corpus_ids.tolist())
    assert hashes == expected
    if timing_enabled(benchmark):
        ids = corpus_ids.tolist()
        medians = interleaved_medians(
            {
                "rust": lambda: _core.block_hashes(corpus_ids),
                "reference": lambda: ref.block_hashes(ids),
            },
            rounds=5,
            warmup=1,
        )
        benchmark.extra_info.update(
            rust_tokens_per_s=CORPUS_TOKENS / medians["rust"],
            reference_tokens_per_s=CORPUS_TOKENS / medians["reference"],
            rust_speedup_vs_reference=medians["reference"] / medians["rust"],
        )


@pytest.mark.benchmark(group="tokens-hash")
def test_block_hashes_reference(benchmark: Any, corpus_ids: Any) -> None:
    require_release_build(benchmark)
    ids = corpus_ids.tolist()
    hashes = benchmark.pedantic(
        ref.block_hashes, (ids,), rounds=3 if timing_enabled(benchmark) else 1
    )
    assert hashes == _core.block_hashes(corpus_ids)


# ---------------------------------------------------------------- tokens-incremental


def _item(corpus: str) -> bytes:
    """A ~2 KB user message of code and prose, as canonical JSON."""
    start = corpus.index("def ", 5000)
    text = corpus[start : start + 2000]
    return json.dumps(
        {"content": [{"text": text, "type": "input_text"}], "role": "user", "type": "message"},
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


@pytest.fixture(scope="module")
def contexts(corpus_ids: Any) -> dict[str, _core.BlockHasher]:
    """The block-hash state at the end of an empty and of a 100k-token context.

    The 100k state is offset by 5 tokens so its tail is partly filled, as after a real turn.
    """
    long, _ = _core.BlockHasher().extend(corpus_ids[: CONTEXT_TOKENS + 5])
    return {"empty": _core.BlockHasher(), "100k": long}


@pytest.mark.benchmark(group="tokens-incremental")
@pytest.mark.parametrize("context", ["empty", "100k"])
def test_item_on_context(
    benchmark: Any,
    o200k: _core.Tokenizer,
    corpus: str,
    contexts: dict[str, _core.BlockHasher],
    context: str,
) -> None:
    require_release_build(benchmark)
    item = _item(corpus)
    state = contexts[context]
    new_state, hashes = benchmark.pedantic(
        state.extend_item, (o200k, item), rounds=2000 if timing_enabled(benchmark) else 1
    )
    _check_extension(o200k, item, state, new_state, hashes)


def _check_extension(
    tok: _core.Tokenizer,
    item: bytes,
    state: _core.BlockHasher,
    new_state: _core.BlockHasher,
    hashes: bytes,
) -> None:
    ids = tok.encode_item(item).tolist()
    assert new_state.tokens - state.tokens == len(ids) == tok.count_item(item)
    # The new hashes continue the chain exactly as hashing the whole sequence would.
    tail = state.tail.tolist()
    parent = state.last_hash or ref.ROOT_PARENT
    expected = b""
    for start in range(0, len(tail) + len(ids) - 15, 16):
        parent = ref.hash_block(parent, (tail + ids)[start : start + 16])
        expected += parent
    assert hashes == expected


@pytest.mark.benchmark(group="tokens-incremental-ratio")
def test_item_cost_flat_in_context(
    benchmark: Any, o200k: _core.Tokenizer, corpus: str, contexts: dict[str, _core.BlockHasher]
) -> None:
    require_release_build(benchmark)
    item = _item(corpus)
    empty, long = contexts["empty"], contexts["100k"]
    result = benchmark.pedantic(
        long.extend_item, (o200k, item), rounds=2000 if timing_enabled(benchmark) else 1
    )
    _check_extension(o200k, item, long, *result)
    if timing_enabled(benchmark):
        medians = interleaved_medians(
            {
                "empty": lambda: empty.extend_item(o200k, item),
                "100k": lambda: long.extend_item(o200k, item),
            },
            rounds=3000,
            warmup=200,
        )
        ratio = medians["100k"] / medians["empty"]
        benchmark.extra_info.update(
            empty_us=medians["empty"] * 1e6, context_100k_us=medians["100k"] * 1e6, ratio=ratio
        )
        assert ratio <= 1.2, f"an item on 100k tokens costs {ratio:.2f}x one on none (<= 1.2x)"
