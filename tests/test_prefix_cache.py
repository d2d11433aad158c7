"""Document-KV prefix cache: outputs with the cache equal outputs without it.

Greedy token ids must be identical and logits within 1e-5 (the suffix runs on copied fp32 KV:
the same math as a cold prefill, so differences are summation-order noise, ~1e-7 here), across
ragged batches, mixed hit/miss rows and evictions.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("bm25s")
from test_engine import DOCS, GREEDY, cache_dir, encoder, generator, make_engine  # noqa: E402,F401
from test_generator import tiny_model  # noqa: E402
from test_generator_text import gen_byte_tokenizer  # noqa: E402,F401  (fixture)

from rag_engine.generator import Generator  # noqa: E402
from rag_engine.generator.kv_cache import KVCache  # noqa: E402
from rag_engine.generator.loop import decode_one_token, prefill  # noqa: E402
from rag_engine.generator.prefix_cache import (  # noqa: E402
    PrefixCache,
    PrefixCacheConfig,
    plan_runs,
    prefill_rows,
    shared_prefix_len,
)

DOC_A = np.arange(10, 47, dtype=np.int64)  # 37 ids: 2 full blocks of 16 + a tail of 5
DOC_B = np.arange(100, 160, dtype=np.int64)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def session(request, tmp_path_factory):
    gen = Generator.from_hf(tiny_model(request.param, seed=1), None, cache_dir=tmp_path_factory.mktemp("pc"))
    return gen.session


def new_cache(session, batch, max_len=128):
    s = session.spec
    return KVCache(s.num_layers, s.num_kv_heads, s.head_dim, batch, max_len)


def greedy_run(session, cache, logits, lengths, steps=6):
    """Greedy ids ``[B, steps]`` and every step's logits, decoding on ``cache``."""
    ids, all_logits = [], [logits.copy()]
    lengths = lengths.copy()
    for _ in range(steps):
        tok = all_logits[-1].argmax(-1)
        ids.append(tok)
        all_logits.append(decode_one_token(session, cache, tok, lengths).copy())
        lengths += 1
    return np.stack(ids, 1), all_logits


def assert_same_generation(session, prompts, pc, cacheable=None):
    lengths = np.array([len(p) for p in prompts], np.int64)
    cold = new_cache(session, len(prompts))
    ref_ids, ref_logits = greedy_run(session, cold, prefill(session, cold, prompts), lengths)
    warm = new_cache(session, len(prompts))
    ids, logits = greedy_run(session, warm, prefill_rows(session, warm, 0, prompts, pc, cacheable), lengths)
    np.testing.assert_array_equal(ids, ref_ids)
    for a, b in zip(logits, ref_logits):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_hits_ragged_and_mixed_rows_match_cold_prefill(session):
    pc = PrefixCache("tiny", PrefixCacheConfig(max_bytes=64 << 20))
    q1, q2 = np.array([7, 8, 9], np.int64), np.array([200, 3], np.int64)
    first = [np.concatenate([DOC_A, q1]), np.concatenate([DOC_B, q2])]
    assert_same_generation(session, first, pc, [len(DOC_A), len(DOC_B)])  # all misses, stored
    assert pc.misses == 2 and pc.hits == 0 and pc.nbytes > 0
    # hits on both documents with other questions, a miss row, and a row longer than any block
    mixed = [np.concatenate([DOC_B, q1, q1]), np.array([5, 6, 250], np.int64), np.concatenate([DOC_A, q2])]
    assert_same_generation(session, mixed, pc, [len(DOC_B), 0, len(DOC_A)])
    assert pc.hits == 2 and pc.misses == 3
    assert pc.hit_tokens == len(DOC_A) + len(DOC_B)  # the tail block made the whole documents hit
    # a prompt that is entirely cached still runs its last id (its logits start the generation)
    assert_same_generation(session, [DOC_A.copy()], pc)


def test_plan_runs_pads_uncached_rows_together_within_the_waste_bound():
    assert plan_runs([], []) == []
    assert plan_runs([10, 12, 9], [0, 0, 0]) == [(0, 3)]  # little padding: one call
    # 300 + 350 padded to 2 x 350 is within 10%; a third row of 280 would not be
    assert plan_runs([300, 350, 280, 330, 100, 120], [0] * 6) == [(0, 2), (2, 4), (4, 6)]
    # a row on a cached prefix runs alone; uncached neighbours still group
    assert plan_runs([40, 40, 300, 40, 40], [0, 0, 250, 0, 0]) == [(0, 2), (2, 3), (3, 5)]
    assert plan_runs([5, 400, 6, 7, 380, 390], [0] * 6) == [(0, 1), (1, 2), (2, 4), (4, 6)]
    # the bound on rows x longest prompt (attention scratch of long caches) splits equal rows
    assert plan_runs([330] * 6, [0] * 6) == [(0, 6)]
    assert plan_runs([330] * 6, [0] * 6, max_padded=1000) == [(0, 3), (3, 6)]


def test_split_prefill_matches_one_padded_call(session):
    """Uncached rows of very different lengths go through several calls: same outputs."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 300, n) for n in (3, 60, 5, 7, 58, 61)]
    assert len(plan_runs([len(p) for p in prompts], [0] * len(prompts))) > 1
    assert_same_generation(session, prompts, None)
    pc = PrefixCache("tiny", PrefixCacheConfig(max_bytes=64 << 20))
    assert_same_generation(session, prompts, pc, [len(p) - 1 for p in prompts])  # stores them
    assert_same_generation(session, prompts + [DOC_A.copy()], pc)  # all hit but the last


def test_chunked_prefill_matches_one_call(session):
    """Rows prefilled in pieces of a few ids (with a callback between pieces) give the same outputs,
    on cold rows and on rows continuing a cached prefix."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 300, n) for n in (3, 40, 17)]
    calls = []
    lengths = np.array([len(p) for p in prompts], np.int64)
    cold = new_cache(session, 3)
    ref_ids, ref_logits = greedy_run(session, cold, prefill(session, cold, prompts), lengths)
    for pc in (None, PrefixCache("tiny", PrefixCacheConfig(max_bytes=64 << 20))):
        for _ in range(2):  # with a prefix cache: first stores, then hits
            warm = new_cache(session, 3)
            logits = prefill_rows(session, warm, 0, prompts, pc, [len(p) - 2 for p in prompts],
                                  chunk_tokens=7, between=lambda: calls.append(1))
            ids, all_logits = greedy_run(session, warm, logits, lengths)
            np.testing.assert_array_equal(ids, ref_ids)
            for a, b in zip(all_logits, ref_logits):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert len(calls) >= 6
    with pytest.raises(ValueError, match="chunk_tokens"):
        prefill_rows(session, new_cache(session, 1), 0, prompts[:1], chunk_tokens=0)


def test_evictions_keep_outputs_and_the_byte_bound(session):
    spec = session.spec
    per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    bound = 40 * per_token  # room for about one document
    pc = PrefixCache("tiny", PrefixCacheConfig(max_bytes=bound, block_tokens=8))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, int(n)) for n in rng.integers(20, 60, 6)]
    for step in range(12):
        picks = [docs[i] for i in rng.choice(len(docs), 3)]
        prompts = [np.concatenate([d, rng.integers(0, 300, int(rng.integers(1, 6)))]) for d in picks]
        assert_same_generation(session, prompts, pc, [len(d) for d in picks])
        assert pc.nbytes <= bound, (step, pc.nbytes)
        assert pc.nbytes == sum(b.kv.nbytes for b in pc._blocks.values())
    assert pc.evictions > 0 and pc.hits > 0


def test_keys_cover_positions_and_longest_prefix():
    pc = PrefixCache("m", PrefixCacheConfig(block_tokens=4))
    kv = np.random.default_rng(0).standard_normal((2, 2, 1, 12, 8)).astype(np.float32)
    ids = np.arange(12, dtype=np.int64)
    pc.insert(ids, kv, 10)  # blocks [0,4) [4,8) and a tail [8,10)
    blocks = pc.match(np.concatenate([ids[:10], [99]]))
    np.testing.assert_array_equal(np.concatenate(blocks, axis=3), kv[:, :, :, :10])
    assert sum(b.shape[3] for b in pc.match(np.concatenate([ids[:6], [99, 98]]))) == 4  # block granularity
    assert pc.match(ids[4:]) == []  # the same ids at other positions are another key
    assert pc.match(ids, limit=9)[-1].shape[3] == 4  # the tail no longer fits under the limit
    assert shared_prefix_len(ids, np.array([0, 1, 5])) == 2
    with pytest.raises(ValueError, match="length 13 exceeds"):
        pc.insert(ids, kv, 13)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCacheConfig(max_bytes=-1)
    with pytest.raises(ValueError, match="block_tokens"):
        PrefixCacheConfig(block_tokens=0)


def test_evicting_a_block_evicts_its_descendants():
    pc = PrefixCache("m", PrefixCacheConfig(block_tokens=2, max_bytes=1 << 20))
    kv = np.zeros((1, 2, 1, 8, 4), np.float32)
    pc.insert(np.arange(8), kv, 8)
    pc.insert(np.arange(100, 108), kv, 8)
    pc._drop(next(iter(pc._blocks)))  # the LRU block is the first chain's leaf ... its root goes last
    assert len(pc) == 7
    root = next(k for k, b in pc._blocks.items() if b.parent == 0 and k[1] == np.arange(2).tobytes())
    pc._drop(root)
    assert len(pc) == 4 and pc.match(np.arange(8)) == [] and len(pc.match(np.arange(100, 108))) == 4


def test_engine_rag_token_cache_on_equals_off(encoder, generator, cache_dir):  # noqa: F811
    off = make_engine(encoder, generator, cache_dir, prefix_cache_bytes=0, k=3, mode="rag_token")
    on = make_engine(encoder, generator, cache_dir, k=3, mode="rag_token")
    qs = ["How do I read a file?", "How do dictionaries handle a missing key?", "What is a class?"]
    ref = off.generate(qs, GREEDY)
    assert off.prefix_cache is None and off.stats() == {}
    for _ in range(2):  # cold, then every document prefix hits
        outs = on.generate(qs, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    stats = on.stats()
    assert stats["prefix_cache_hits"] >= 9 and stats["prefix_cache_bytes"] <= on.config.prefix_cache_bytes
    streamed = "".join(on.stream(qs[0], GREEDY))
    assert streamed == ref[0].text


def test_warm_prefix_cache_makes_first_queries_hit(encoder, generator, cache_dir):  # noqa: F811
    eng = make_engine(encoder, generator, cache_dir, k=2, mode="rag_token")
    assert eng.warm_prefix_cache(queries=["read a file", "dictionary key"], top=4) == 4
    before = eng.stats()["prefix_cache_hits"]
    eng.generate(["How do I read a file?"], GREEDY)
    assert eng.stats()["prefix_cache_hits"] > before
    assert len(DOCS) == 4


def test_cached_blocks_are_copies_and_keys_ignore_the_id_dtype():
    # A one-row cache exactly one block long: its slice is contiguous, and ascontiguousarray
    # returned the slice itself, so the row's next prompt rewrote the cached block.
    kv = KVCache(2, 1, 4, 1, 16)
    kv.buffer[...] = 1.0
    pc = PrefixCache("tiny", PrefixCacheConfig(max_bytes=1 << 20, block_tokens=16))
    ids = np.arange(16, dtype=np.int64)
    pc.insert(ids, kv.buffer[:, :, 0], 16)
    kv.buffer[...] = 2.0
    (block,) = pc.match(ids)
    assert (block == 1.0).all() and not np.shares_memory(block, kv.buffer)
    # Keys are the ids' bytes: int32 [5, 0, 7, 0] read as int64 [5, 7] before.
    pc.insert(np.array([5, 7], np.int64), np.ones((2, 2, 1, 2, 4), np.float32), 2)
    assert pc.match(np.array([5, 0, 7, 0], np.int32)) == []
    assert len(pc.match(np.array([5, 7], np.int32))) == 1
