"""Generator parity with Hugging Face transformers on tiny random-weight GPT-2 and Llama models.

Tolerances: fp32 graphs run the same math as torch in fp32 with a different summation order, so
logits agree to ~1e-6 on these models; 1e-4 is the bound the generator promises.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from rag_engine.generator import ExportConfig, Generator, SamplingParams  # noqa: E402
from rag_engine.generator.kv_cache import KVCache  # noqa: E402
from rag_engine.generator.loop import decode_one_token, prefill  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 320
FAMILIES = ("llama", "gpt2", "qwen2")


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB):
    """A 2-layer random-weight causal LM of the given family (seconds to export)."""
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if family == "qwen2":
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs, tie_word_embeddings=True))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs, rope_theta=500.0))
    return model.eval()


@pytest.fixture(scope="module")
def gen_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gen_cache")


RAGGED = [[5, 17, 3, 99, 42], list(range(30, 41)), [7, 8, 9], [300, 1, 250, 12, 12, 12, 60]]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# rag_engine's own ops (DecoderAttention) and ONNX Runtime's (GroupQueryAttention)
CUSTOM_OPS = [pytest.param(True, id="custom-ops"), pytest.param(False, id="ort-ops")]


@pytest.mark.parametrize("custom_ops", CUSTOM_OPS)
@pytest.mark.parametrize(("family", "explicit"), [(f, False) for f in FAMILIES] + [("llama", True)])
def test_prefill_and_cached_decode_logits_match_hf(family, explicit, custom_ops, gen_cache):
    model = tiny_model(family)
    config = ExportConfig(all_logits=True, explicit_rotary=explicit, custom_ops=custom_ops)
    gen = Generator.from_hf(model, cache_dir=gen_cache, export_config=config)
    spec = gen.session.spec
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(RAGGED), 32)
    prompts = [np.array(p, np.int64) for p in RAGGED]
    logits = prefill(gen.session, cache, prompts).copy()
    for row, ids in enumerate(RAGGED):
        ref = hf_logits(model, ids)
        np.testing.assert_allclose(logits[row, : len(ids)], ref, atol=1e-4, rtol=0)
    lengths = np.array([len(p) for p in RAGGED], np.int64)
    rng = np.random.default_rng(0)
    history = [list(p) for p in RAGGED]
    for _ in range(4):
        tokens = rng.integers(0, VOCAB, len(RAGGED))
        step = decode_one_token(gen.session, cache, tokens, lengths)
        for row in range(len(RAGGED)):
            history[row].append(int(tokens[row]))
            np.testing.assert_allclose(step[row], hf_logits(model, history[row])[-1], atol=1e-4, rtol=0)
        lengths += 1


@pytest.mark.parametrize("piece", [None, 16])
def test_batch_prefill_in_runs_keeps_rows_and_outputs(gen_cache, piece, monkeypatch):
    """Rows are prefilled longest first in runs of similar lengths (here two calls), or, past
    loop.PREFILL_PIECE ids, one row at a time in pieces; outputs come back in the caller's
    order and equal each prompt generated alone."""
    from rag_engine.generator import loop
    from rag_engine.generator.prefix_cache import plan_runs

    if piece is not None:  # the default (256) exceeds these models' context
        monkeypatch.setattr(loop, "PREFILL_PIECE", piece)

    prompts = [list(range(200, 203)), list(range(100, 160)), list(range(50, 70)), list(range(250, 291))]
    assert len(plan_runs(sorted(map(len, prompts), reverse=True), [0] * 4)) == 2
    gen = Generator.from_hf(tiny_model("llama", seed=4), cache_dir=gen_cache)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = gen.generate(prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        alone = gen.generate([prompt], params)[0]
        assert list(out.token_ids) == list(alone.token_ids)
        assert out.metrics.prompt_tokens == len(prompt)


@pytest.mark.parametrize("custom_ops", CUSTOM_OPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_match_hf_generate_on_ragged_batch(family, custom_ops, gen_cache):
    model = tiny_model(family, seed=1)
    gen = Generator.from_hf(model, cache_dir=gen_cache, export_config=ExportConfig(custom_ops=custom_ops))
    new = 16
    outs = gen.generate(RAGGED, SamplingParams(max_tokens=new, temperature=0))
    width = max(map(len, RAGGED))
    ids = torch.zeros(len(RAGGED), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(RAGGED):  # HF pads on the left
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    for row, out in enumerate(outs):
        assert list(out.token_ids) == ref[row, width:].tolist()
        assert out.finish_reason == "length"
        assert out.metrics.completion_tokens == new and out.metrics.prompt_tokens == len(RAGGED[row])


def test_rows_finish_independently_and_batch_compacts(gen_cache):
    """Per-row max_tokens / stop ids: each row equals the same prompt generated alone."""
    model = tiny_model("llama", seed=2)
    gen = Generator.from_hf(model, cache_dir=gen_cache)
    alone = [gen.generate([p], SamplingParams(max_tokens=12, temperature=0))[0] for p in RAGGED]
    stop_tok = alone[1].token_ids[4]
    params = [SamplingParams(max_tokens=3, temperature=0),
              SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_tok,)),
              SamplingParams(max_tokens=1, temperature=0),
              SamplingParams(max_tokens=12, temperature=0)]
    outs = gen.generate(RAGGED, params)
    assert outs[0].token_ids == alone[0].token_ids[:3] and outs[0].finish_reason == "length"
    cut = alone[1].token_ids.index(stop_tok) + 1
    assert outs[1].token_ids == alone[1].token_ids[:cut] and outs[1].finish_reason == "stop"
    assert outs[2].token_ids == alone[2].token_ids[:1]
    assert outs[3].token_ids == alone[3].token_ids


def test_eos_stops_unless_ignored_and_min_tokens(gen_cache):
    model = tiny_model("llama", seed=3)
    free = Generator.from_hf(model, cache_dir=gen_cache).generate([RAGGED[0]], SamplingParams(max_tokens=10, temperature=0))[0]
    eos = free.token_ids[3]
    model.generation_config.eos_token_id = eos
    gen = Generator.from_hf(model, cache_dir=gen_cache)
    first = free.token_ids.index(eos)
    out = gen.generate([RAGGED[0]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    out = gen.generate([RAGGED[0]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == free.token_ids and out.finish_reason == "length"
    out = gen.generate([RAGGED[0]], SamplingParams(max_tokens=10, temperature=0, min_tokens=first + 2))[0]
    assert eos not in out.token_ids[: first + 2]


def test_inputs_embeds_export_matches_hf(gen_cache):
    model = tiny_model("llama", seed=4)
    gen = Generator.from_hf(model, cache_dir=gen_cache,
                            export_config=ExportConfig(all_logits=True, inputs_embeds=True))
    spec = gen.session.spec
    embeds = np.random.default_rng(0).standard_normal((2, 6, spec.hidden_size)).astype(np.float32) * 0.1
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 2, 8)
    mask = np.ones((2, 6), np.int64)
    pos = np.tile(np.arange(6, dtype=np.int64), (2, 1))
    logits = gen.session.run(embeds, mask, pos, cache)
    with torch.no_grad():
        ref = model(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_explicit_rotary_honours_arbitrary_position_ids(gen_cache):
    model = tiny_model("llama", seed=13)
    gen = Generator.from_hf(model, cache_dir=gen_cache,
                            export_config=ExportConfig(all_logits=True, explicit_rotary=True))
    spec = gen.session.spec
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 1, 8)
    ids, pos = np.array([[3, 4, 5, 6]]), np.array([[0, 2, 5, 9]])
    logits = gen.session.run(ids, np.ones((1, 4), np.int64), pos, cache)
    with torch.no_grad():
        ref = model(torch.tensor(ids), position_ids=torch.tensor(pos)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible(gen_cache):
    gen = Generator.from_hf(tiny_model("gpt2", seed=5), cache_dir=gen_cache)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    a = gen.generate(RAGGED, params)
    b = gen.generate(RAGGED, params)
    c = gen.generate(RAGGED, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=99))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # a row's draws depend on its own seed only, not on the batch it runs in
    alone = gen.generate([RAGGED[2]], params)[0]
    assert alone.token_ids == a[2].token_ids


def test_logprobs_are_raw_log_softmax(gen_cache):
    model = tiny_model("llama", seed=6)
    gen = Generator.from_hf(model, cache_dir=gen_cache)
    out = gen.generate([RAGGED[1]], SamplingParams(max_tokens=3, temperature=0, logprobs=4))[0]
    assert len(out.logprobs) == 3
    ref = hf_logits(model, RAGGED[1])[-1]
    ref = ref - np.log(np.exp(ref - ref.max()).sum()) - ref.max()
    first = out.logprobs[0]
    assert len(first) == 4 and out.token_ids[0] in first
    top4 = np.argsort(-ref)[:4]
    assert set(first) == set(top4.tolist())
    for tok, lp in first.items():
        assert lp == pytest.approx(ref[tok], abs=1e-4)


def test_sliding_window_model_keeps_group_query_attention(gen_cache):
    """DecoderAttention has no local window: a Mistral-style sliding-window model keeps ONNX
    Runtime's GroupQueryAttention even with custom ops (the GEMMs are still ours) and matches HF."""
    import onnx

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=8, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.MistralForCausalLM(cfg).eval()
    gen = Generator.from_hf(model, cache_dir=gen_cache, export_config=ExportConfig(custom_ops=True))
    ops = {n.op_type for n in onnx.load(gen.session.folder / "model.onnx", load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "DecoderAttention" not in ops and "MatMulF32Panels" in ops
    ids = list(range(5, 25))  # longer than the window
    out = gen.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert list(out) == ref.tolist()
