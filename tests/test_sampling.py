"""Logits processing and sampling against Hugging Face's processors and a plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from rag_engine.generator.sampling import (
    Sampler,
    SamplingParams,
    apply_count_penalties,
    apply_repetition_penalty,
    log_softmax,
    min_p_filter,
    top_k_filter,
    top_logprobs,
    top_p_filter,
)

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

V = 64


@pytest.fixture()
def gen_logits():
    return np.random.default_rng(0).standard_normal((4, V)).astype(np.float32) * 3


def hf(processor, logits, ids=None):
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if ids is None else torch.as_tensor(ids)
    return processor(ids, torch.from_numpy(logits.copy())).numpy()


def rowwise(fn, logits, *args):
    out = logits.copy()
    for row in out:
        fn(row, *args)
    return out


@pytest.mark.parametrize("k", [1, 5, V - 1, V])
def test_top_k_matches_hf(gen_logits, k):
    np.testing.assert_array_equal(rowwise(top_k_filter, gen_logits, k), hf(lp.TopKLogitsWarper(k), gen_logits))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(gen_logits, p):
    np.testing.assert_array_equal(np.isinf(rowwise(top_p_filter, gen_logits, p)),
                                  np.isinf(hf(lp.TopPLogitsWarper(p), gen_logits)))


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5])
def test_min_p_matches_hf(gen_logits, m):
    np.testing.assert_array_equal(np.isinf(rowwise(min_p_filter, gen_logits, m)),
                                  np.isinf(hf(lp.MinPLogitsWarper(m), gen_logits)))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_hf(gen_logits, penalty):
    ids = np.array([[1, 5, 5, 9], [0, 2, 3, 4], [63, 62, 1, 1], [7, 7, 7, 7]])
    ours = gen_logits.copy()
    for row, seen_ids in zip(ours, ids, strict=True):
        seen = np.zeros(V, bool)
        seen[seen_ids] = True
        apply_repetition_penalty(row, seen, penalty)
    np.testing.assert_allclose(ours, hf(lp.RepetitionPenaltyLogitsProcessor(penalty), gen_logits, ids), rtol=1e-6)


def test_presence_frequency_penalties_match_openai_formula(gen_logits):
    counts = np.zeros(V, np.int32)
    counts[[3, 3, 3, 10]] = [3, 3, 3, 1]
    counts[3] = 3
    row = gen_logits[0].copy()
    apply_count_penalties(row, counts, presence=0.5, frequency=0.25)
    ref = gen_logits[0].copy()
    for tok in range(V):  # logit - count * frequency - (count > 0) * presence
        ref[tok] -= counts[tok] * 0.25 + (counts[tok] > 0) * 0.5
    np.testing.assert_allclose(row, ref, rtol=1e-6)


def test_warper_chain_matches_hf_order(gen_logits):
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05)
    ours = gen_logits.copy() / params.temperature
    for row in ours:
        top_k_filter(row, params.top_k)
        top_p_filter(row, params.top_p)
        min_p_filter(row, params.min_p)
    ref = gen_logits
    for proc in (lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.8),
                 lp.MinPLogitsWarper(0.05)):
        ref = hf(proc, ref)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampler_draws_follow_the_filtered_distribution(gen_logits):
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.95, seed=3, max_tokens=1)
    expected = gen_logits[0] / 0.8
    top_k_filter(expected, 8)
    top_p_filter(expected, 0.95)
    probs = np.exp(expected - expected.max())
    probs /= probs.sum()
    sampler = Sampler([params], [[0]], V, [frozenset()])
    draws = np.array([sampler.sample(gen_logits[:1])[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=V) / draws.size
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
    assert 0.5 * np.abs(freq - probs).sum() < 0.04  # total variation; ~0.01 expected at n=4000


def test_greedy_with_penalties_and_min_tokens(gen_logits):
    logits = gen_logits[:2].copy()
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0, min_tokens=1), SamplingParams(temperature=0, frequency_penalty=2.0)]
    sampler = Sampler(params, [[0], [0]], V, [frozenset({int(top[0])}), frozenset()])
    first = sampler.sample(logits)
    assert first[0] != top[0]  # the stop token is masked before min_tokens
    assert first[1] == top[1]
    second = sampler.sample(logits)
    assert second[0] == top[0]  # min_tokens reached: the stop token may come now
    expected = logits[1].copy()
    expected[top[1]] -= 2.0
    assert second[1] == expected.argmax()


def test_seeded_rows_are_independent_of_batch_order(gen_logits):
    a = SamplingParams(temperature=1.0, seed=11)
    b = SamplingParams(temperature=1.0, seed=12)
    both = Sampler([a, b], [[0], [0]], V, [frozenset()] * 2)
    alone = Sampler([b], [[0]], V, [frozenset()])
    seq_both = [both.sample(gen_logits[:2])[1] for _ in range(20)]
    seq_alone = [alone.sample(gen_logits[1:2])[0] for _ in range(20)]
    assert seq_both == seq_alone


def test_top_logprobs(gen_logits):
    tokens = np.array([3, 4, 5, 6])
    entries = top_logprobs(gen_logits, tokens, 2)
    ref = log_softmax(gen_logits)
    for row, entry in enumerate(entries):
        assert tokens[row] in entry
        best = np.argsort(-ref[row])[:2]
        assert set(best.tolist()) <= set(entry)
        for tok, value in entry.items():
            assert value == pytest.approx(ref[row, tok])
