"""Latent mode: soft prompts through the inputs_embeds export, weights saved/checked, Engine modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("bm25s")
from test_engine import cache_dir, encoder, make_engine  # noqa: E402,F401  (fixtures)
from test_generator import tiny_model  # noqa: E402
from test_generator_text import gen_byte_tokenizer  # noqa: E402,F401  (fixture)

from rag_engine import SamplingParams  # noqa: E402
from rag_engine.engine import Engine  # noqa: E402
from rag_engine.fusion import BilinearFusion  # noqa: E402
from rag_engine.generator import Generator  # noqa: E402
from rag_engine.latent import (  # noqa: E402
    LatentWeights,
    LatentWeightsError,
    SoftPromptGenerator,
    embedding_fingerprint,
    prompt_ids,
)
from rag_engine.train import gradcheck_soft_prompts  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(gen_byte_tokenizer):  # noqa: F811
    return tiny_model("llama", seed=3, vocab=len(gen_byte_tokenizer))


@pytest.fixture(scope="module")
def soft_gen(model, gen_byte_tokenizer, cache_dir):  # noqa: F811
    return SoftPromptGenerator.from_hf(model, gen_byte_tokenizer, cache_dir=cache_dir)


def random_weights(dim, m, hidden, fingerprint, encoder_name, seed=0, fmt="text") -> LatentWeights:
    rng = np.random.default_rng(seed)
    return LatentWeights((rng.standard_normal((dim, m * hidden)) * 0.5).astype(np.float32),
                         np.ones(m, np.float32), hidden, encoder_name, fingerprint, fmt)


@pytest.fixture()
def latent_engine(encoder, model, gen_byte_tokenizer, soft_gen, cache_dir):  # noqa: F811
    gen = Generator.from_hf(model, gen_byte_tokenizer, cache_dir=cache_dir)
    eng = make_engine(encoder, gen, cache_dir)
    eng.latent = random_weights(encoder.dim, 3, soft_gen.spec_hidden, soft_gen.fingerprint, encoder.name)
    eng.latent_generator = soft_gen
    return eng


def torch_greedy(model, soft: np.ndarray, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of the torch model fed [soft, embed(ids + generated)] in full every step."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = model.get_input_embeddings()(torch.tensor([ids + out]))
            x = torch.cat([torch.from_numpy(soft)[None], x], dim=1)
            out.append(int(model(inputs_embeds=x).logits[0, -1].argmax()))
    return out


def test_soft_prompts_match_torch_ragged_batch(model, soft_gen):
    rng = np.random.default_rng(1)
    soft = (rng.standard_normal((2, 4, soft_gen.spec_hidden)) * 0.5).astype(np.float32)
    prompts = [[5, 17, 3, 99, 42, 7, 8], [30, 31]]
    outs = soft_gen.generate_soft(prompts, soft, GREEDY)
    for o, s, p in zip(outs, soft, prompts):
        assert list(o.token_ids) == torch_greedy(model, s, p, GREEDY.max_tokens)
        assert o.metrics.prompt_tokens == len(p) + 4  # the soft positions count as prompt positions
    plain = soft_gen.generate_soft(prompts, None, GREEDY)  # no soft prompts: ordinary ids generation
    assert [list(o.token_ids) for o in plain] == [torch_greedy(model, s[:0], p, 6) for s, p in zip(soft, prompts)]
    assert "".join(soft_gen.stream_soft(prompts[0], soft[0], GREEDY)) == outs[0].text
    with pytest.raises(ValueError, match=r"soft prompts must be \[2, m, 64\]"):
        soft_gen.generate_soft(prompts, soft[:1], GREEDY)


def test_soft_prompts_follow_their_rows(model, soft_gen, monkeypatch):
    """The generator reorders rows (longest prompt first) and prefills long prompts in pieces:
    each row must still get its own soft prompt (they were handed out in call order)."""
    from rag_engine.generator import loop

    rng = np.random.default_rng(2)
    soft = (rng.standard_normal((3, 4, soft_gen.spec_hidden)) * 0.5).astype(np.float32)
    prompts = [[30, 31], [5, 17, 3, 99, 42, 7, 8], [int(t) for t in rng.integers(1, 300, 20)]]
    monkeypatch.setattr(loop, "PREFILL_PIECE", 8)  # the 24-position row goes in three pieces
    outs = soft_gen.generate_soft(prompts, soft, GREEDY)
    for o, s, p in zip(outs, soft, prompts):
        assert list(o.token_ids) == torch_greedy(model, s, p, GREEDY.max_tokens)
    penalised = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    assert len(soft_gen.generate_soft(prompts, soft, penalised)) == 3  # soft positions are not tokens


def test_rag_token_rows_finish_by_their_own_prompts(soft_gen):
    """A query's context limit comes from its own document prompts, not a later query's."""
    from rag_engine.generator.loop import Row
    from rag_engine.modes import rag_token_generate

    ctx = soft_gen.max_context
    params = SamplingParams(max_tokens=ctx, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(0)
    short = [rng.integers(1, 300, 10) for _ in range(2)]
    long_ = [rng.integers(1, 300, ctx - 16) for _ in range(2)]
    la = np.log(np.full((1, 2), 0.5, np.float32))

    def run(doc_prompts):
        rows = [Row(np.array([1]), params, frozenset(), None) for _ in doc_prompts]
        for _ in rag_token_generate(soft_gen, doc_prompts, np.concatenate([la] * len(doc_prompts)),
                                    [params] * len(doc_prompts), rows):
            pass
        return rows

    alone, both = run([short])[0], run([short, long_])
    assert both[0].tokens == alone.tokens  # it stopped after 15 tokens when batched with the long query
    assert len(both[1].tokens) < len(alone.tokens)


def test_zero_gate_gives_zero_soft_prompts_and_project_matches_module():
    fusion = BilinearFusion(16, soft_prompts=3, hidden_size=8)
    h = torch.randn(2, 16)
    assert torch.equal(fusion.project(h), torch.zeros(2, 3, 8))  # untrained: gate 0
    with torch.no_grad():
        fusion.gate.copy_(torch.tensor([1.0, -0.5, 2.0]))
    w = LatentWeights.from_fusion(fusion, "enc", "gen")
    np.testing.assert_allclose(w.project(h.numpy()), fusion.project(h).detach().numpy(), atol=1e-6)


def test_gradcheck_fusion_and_projection_float64():
    """d soft / d (h_in, docs, W_a, P, gate) through the fused op and the projection."""
    assert gradcheck_soft_prompts()


def test_prompt_formats(gen_byte_tokenizer):  # noqa: F811
    tok = gen_byte_tokenizer
    q = tok.encode("what is a dict", add_special_tokens=False)
    assert prompt_ids(tok, q, [], "text") == q
    with_ctx = prompt_ids(tok, "what is a dict", ["dicts map keys"], "text")
    assert with_ctx[-len(q):] == q and len(with_ctx) > len(q)
    chat = prompt_ids(tok, "what is a dict", ["dicts map keys"], "chat")
    assert tok.decode(chat).count("dicts map keys") == 1
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        prompt_ids(tok, q, [], "xml")


def test_engine_latent_modes_cost_and_stream(latent_engine):
    eng = latent_engine
    qs = ["How do I read a file?", "What does enumerate do?"]
    lat = eng.generate(qs, GREEDY, k=2, mode="latent")
    both = eng.generate(qs, GREEDY, k=2, mode="latent_concat")
    concat = eng.generate(qs, GREEDY, k=2, mode="concat")
    for a, b, c in zip(lat, both, concat):
        assert len(a.token_ids) == GREEDY.max_tokens and a.metrics["soft_prompts"] == 3
        assert a.metrics["prompt_tokens"] < c.metrics["prompt_tokens"]  # passages replaced by 3 vectors
        assert b.metrics["prompt_tokens"] > a.metrics["prompt_tokens"]
        assert len(a.documents) == 2 and a.documents[0].alpha >= a.documents[1].alpha
    assert "".join(eng.stream(qs[0], GREEDY, k=2, mode="latent")) == lat[0].text
    # The soft prompts carry the documents: other documents, other soft prompts, other logits.
    from rag_engine.latent import soft_prompts_for

    docs = eng._context(qs, 2, None, None, {})
    soft = soft_prompts_for(eng, docs)
    assert soft.shape == (2, 3, 64) and not np.allclose(soft[0], soft[1])


def test_latent_weights_save_load_and_checks(latent_engine, encoder, cache_dir, tmp_path):  # noqa: F811
    eng = latent_engine
    eng.w_a = np.eye(encoder.dim, dtype=np.float32) * 1.5
    eng.save(tmp_path / "idx")
    back = Engine.load(tmp_path / "idx", load_generator=False, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(back.latent.p, eng.latent.p)
    np.testing.assert_array_equal(back.latent.gate, eng.latent.gate)
    np.testing.assert_array_equal(back.w_a, eng.w_a)
    assert (back.latent.encoder, back.latent.generator) == (encoder.name, eng.latent.generator)
    back.latent_generator = eng.latent_generator
    out = back.generate(["How do I read a file?"], GREEDY, k=2, mode="latent")[0]
    want = eng.generate(["How do I read a file?"], GREEDY, k=2, mode="latent")[0]
    assert out.token_ids == want.token_ids
    # A generator other than the one the weights were trained for is refused before generating.
    back.latent = LatentWeights(back.latent.p, back.latent.gate, back.latent.hidden_size, encoder.name,
                                embedding_fingerprint(np.zeros((2, 2), np.float32)))
    with pytest.raises(LatentWeightsError, match="trained for generator"):
        back.generate(["How do I read a file?"], GREEDY, k=2, mode="latent")
    # Weights whose P does not fit the encoder's dim, or another encoder, fail at load.
    bad = eng.latent
    for latent, match in ((LatentWeights(bad.p[:10], bad.gate, bad.hidden_size, encoder.name, bad.generator),
                           "latent P has shape"),
                          (LatentWeights(bad.p, bad.gate, bad.hidden_size, "other-encoder", bad.generator),
                           "trained with encoder 'other-encoder'")):
        eng.latent = latent
        eng.save(tmp_path / "bad")
        with pytest.raises(LatentWeightsError, match=match):
            Engine.load(tmp_path / "bad", load_generator=False, cache_dir=str(cache_dir))
    with pytest.raises(LatentWeightsError, match="expected P"):
        LatentWeights(bad.p, bad.gate[:2], bad.hidden_size, encoder.name, bad.generator)
    # A malformed latent.json or array is a LatentWeightsError, not a KeyError/IndexError.
    import json

    eng.latent = latent_engine.latent
    eng.save(tmp_path / "meta")
    version = tmp_path / "meta" / (tmp_path / "meta" / "CURRENT").read_text().strip()
    meta = json.loads((version / "latent.json").read_text())
    for broken in ([1, 2], {k: v for k, v in meta.items() if k != "hidden_size"}, meta | {"hidden_size": "four"}):
        (version / "latent.json").write_text(json.dumps(broken))
        with pytest.raises(LatentWeightsError, match="latent.json must be an object"):
            LatentWeights.load(version, encoder.name, encoder.dim)
    (version / "latent.json").write_text(json.dumps(meta))
    np.save(version / "latent_p.npy", np.float32(1.0))
    with pytest.raises(LatentWeightsError, match="must be 2-D"):
        LatentWeights.load(version, encoder.name, encoder.dim)


def test_latent_concat_keeps_the_passage_budget(latent_engine):
    import dataclasses

    from rag_engine.latent import _latent_prompts

    eng = latent_engine
    eng.config = dataclasses.replace(eng.config, context_tokens=40)
    q = "How do I read a file?"
    docs = eng._context([q], 3, None, None, {})[0]
    (ids,), (marked,) = _latent_prompts(eng, eng.latent_generator, [q], [docs], True)
    text = eng.latent_generator.tokenizer.decode(ids)
    for d in marked:  # in_prompt says which passages are in the prompt text, in both formats
        assert (d.text.strip()[:40] in text) == d.in_prompt
    assert sum(d.in_prompt for d in marked) < len(marked)
    out = eng.generate(q, SamplingParams(max_tokens=2, temperature=0.0), k=3, mode="latent_concat")[0]
    assert [d.in_prompt for d in out.documents] == [d.in_prompt for d in marked]


def test_latent_without_weights_is_a_clear_error(latent_engine):
    latent_engine.latent = None
    with pytest.raises(ValueError, match="needs trained latent weights"):
        latent_engine.generate(["How do I read a file?"], GREEDY, k=2, mode="latent")


def test_latent_generator_follows_the_engine_generator_settings(monkeypatch):
    """mode='latent' builds its soft-prompt generator with the engine's int8 method and custom ops."""
    from types import SimpleNamespace

    from rag_engine import latent
    from rag_engine.engine import EngineConfig

    seen = {}

    def fake(cls, *args, **kwargs):
        seen.update(kwargs, args=args)
        return SimpleNamespace(fingerprint="f", spec_hidden=4)

    monkeypatch.setattr(latent.SoftPromptGenerator, "from_pretrained", classmethod(fake))
    eng = SimpleNamespace(latent=SimpleNamespace(check_generator=lambda f, h: None), latent_generator=None,
                          config=EngineConfig(generator_precision="int8", generator_int8_method="dynamic",
                                              generator_custom_ops=False))
    latent.latent_generator(eng)
    assert seen["custom_ops"] is False and seen["int8_method"] == "dynamic" and seen["args"][1] == "int8"
