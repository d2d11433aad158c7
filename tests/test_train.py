"""Training of W_a and P: pairs and split, reproducibility, resume after a kill, save/load, CLI."""

from __future__ import annotations

import dataclasses

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
from rag_engine.latent import SoftPromptGenerator  # noqa: E402
from rag_engine.train import FrozenLM, TrainConfig, mean_nll, prepare, train_engine, train_latent  # noqa: E402
from rag_engine.train_data import corpus_pairs, live_passages, split_by_document  # noqa: E402

CFG = TrainConfig(soft_prompts=2, k=2, max_pairs=40, query_tokens=4, target_tokens=4, steps=6, batch_size=4,
                  checkpoint_every=3, heldout_fraction=0.25, lr=1e-2)


@pytest.fixture(scope="module")
def lm(gen_byte_tokenizer):  # noqa: F811
    return FrozenLM(tiny_model("llama", seed=5, vocab=len(gen_byte_tokenizer)), gen_byte_tokenizer)


@pytest.fixture(scope="module")
def engine(encoder, cache_dir):  # noqa: F811
    return make_engine(encoder, None, cache_dir)


@pytest.fixture(scope="module")
def data(engine, lm):
    pairs = corpus_pairs(engine.index, lm.tokenizer, CFG.max_pairs, CFG.query_tokens, CFG.target_tokens, 0)
    return prepare(engine, lm.tokenizer, pairs, CFG)


def test_pairs_split_by_document_and_own_passage_excluded(engine, lm, data):
    pairs = data.pairs
    assert all(len(p.query_ids) == 4 and len(p.target_ids) == 4 for p in pairs)
    train, held = split_by_document(pairs, 0.25, seed=0)
    assert train and held and not {p.doc_id for p in train} & {p.doc_id for p in held}
    spans = {p.passage_id: p for p in live_passages(engine.index)}
    for pair, row in zip(pairs, data.passage_ids):
        src = spans[pair.passage_id]
        for pid in row[row >= 0].tolist():  # never the pair's passage nor an overlapping neighbour
            other = spans[pid]
            assert pid != pair.passage_id
            assert other.doc_id != src.doc_id or other.end <= src.start or src.end <= other.start


def test_nll_matches_transformers_loss(lm, data):
    soft = torch.randn(2, 3, lm.hidden_size) * 0.1
    total, count = lm.nll(soft, data.prompts[:2], data.targets[:2])
    for b in range(2):
        ids = torch.tensor([data.prompts[b] + data.targets[b]])
        x = torch.cat([soft[b : b + 1], lm.embed(ids)], dim=1)
        labels = torch.full((1, x.shape[1]), -100)
        labels[0, -len(data.targets[b]):] = torch.tensor(data.targets[b])
        with torch.no_grad():
            ref = lm.model(inputs_embeds=x, labels=labels).loss * len(data.targets[b])
        torch.testing.assert_close(total[b], ref, atol=1e-4, rtol=1e-5)
    assert count.tolist() == [4.0, 4.0]


def test_same_seed_same_loss_curve_and_resume_after_kill(lm, data, tmp_path, monkeypatch):
    _, losses = train_latent(lm, data, CFG, progress=False)
    fusion2, again = train_latent(lm, data, CFG, progress=False)
    assert losses == again and len(losses) == CFG.steps
    calls = {"n": 0}
    real = lm.nll

    def dies_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint
        return real(*args)

    monkeypatch.setattr(lm, "nll", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_latent(lm, data, CFG, tmp_path, progress=False)
    monkeypatch.setattr(lm, "nll", real)
    resumed, resumed_losses = train_latent(lm, data, CFG, tmp_path, progress=False)
    assert resumed_losses == losses
    for a, b in zip(resumed.parameters(), fusion2.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="written for another run"):
        train_latent(lm, data, dataclasses.replace(CFG, seed=1), tmp_path, progress=False)
    # A finished shorter run is extended, on the same curve (the batch order is prefix-stable).
    train_latent(lm, data, dataclasses.replace(CFG, steps=2), tmp_path / "ext", progress=False)
    assert train_latent(lm, data, CFG, tmp_path / "ext", progress=False)[1] == losses


def test_training_lowers_the_loss_and_identity_w_a_stays(lm, data):
    cfg = dataclasses.replace(CFG, steps=30, lr=3e-2, lr_gate=0.1)
    before = mean_nll(lm, data.prompts, data.targets)
    fusion, losses = train_latent(lm, data, cfg, progress=False)
    _, h_aug = fusion(data.h_in, data.docs, data.mask)
    after = mean_nll(lm, data.prompts, data.targets, fusion.project(h_aug).detach())
    assert after < before - 0.1 and np.mean(losses[-5:]) < np.mean(losses[:5])  # a random tiny LM
    fixed, _ = train_latent(lm, data, dataclasses.replace(cfg, steps=3, train_w_a=False), progress=False)
    assert torch.equal(fixed.W_a, torch.eye(fixed.W_a.shape[0]))


def test_train_engine_save_load_generate(encoder, lm, cache_dir, tmp_path):  # noqa: F811
    eng = make_engine(encoder, None, cache_dir)
    result = train_engine(eng, dataclasses.replace(CFG, steps=2), lm=lm, progress=False)
    assert len(result.losses) == 2 and result.heldout
    eng.save(tmp_path / "trained")
    back = Engine.load(tmp_path / "trained", load_generator=False, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(back.w_a, result.fusion.W_a.detach().numpy())
    np.testing.assert_allclose(back.latent.project(np.ones((1, encoder.dim), np.float32)),
                               result.fusion.project(torch.ones(1, encoder.dim)).detach().numpy(), atol=1e-5)
    back.latent_generator = SoftPromptGenerator.from_hf(lm.model, lm.tokenizer, cache_dir=cache_dir)
    out = back.generate(["How do I read a file?"], SamplingParams(max_tokens=3, temperature=0.0), k=2,
                        mode="latent")[0]
    assert out.metrics["soft_prompts"] == 2 and out.metrics["prompt_tokens"] > 2 and out.token_ids


def test_cli_train(encoder, lm, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    from rag_engine import cli, train

    folder = tmp_path / "lm"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    eng = make_engine(encoder, None, cache_dir)
    eng.config = dataclasses.replace(eng.config, generator=str(folder))
    eng.save(tmp_path / "idx")
    monkeypatch.setattr(train.FrozenLM, "from_pretrained", classmethod(lambda cls, *a, **k: lm))
    argv = ["train", str(tmp_path / "idx"), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
            "--soft-prompts", "2", "--k", "2", "--query-tokens", "4", "--target-tokens", "4", "--identity-w-a",
            "--quiet"]
    assert cli.main(argv) == 0
    back = Engine.load(tmp_path / "out", load_generator=False, cache_dir=str(cache_dir))
    assert back.latent.soft_prompts == 2 and back.w_a is None


def test_bad_settings_and_a_diverged_run_change_nothing(encoder, lm, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    for field, value in (("lr", -1.0), ("lr", float("nan")), ("clip_norm", -1.0), ("lr_w_a", 0.0),
                         ("heldout_fraction", 1.0)):
        with pytest.raises(ValueError, match=f"TrainConfig: {field} must be"):
            dataclasses.replace(CFG, **{field: value})
    eng = make_engine(encoder, None, cache_dir)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        train_engine(eng, CFG, lm=lm, progress=False, threads=0)
    from rag_engine import train as train_mod

    real = train_mod.train_latent

    def diverged(*args, **kwargs):
        fusion, losses = real(*args, **kwargs)
        with torch.no_grad():
            fusion.P.weight.fill_(float("nan"))
        return fusion, losses[:-1] + [float("nan")]

    monkeypatch.setattr(train_mod, "train_latent", diverged)
    before = (eng.w_a, eng.latent)
    with pytest.raises(ValueError, match="training diverged"):
        train_engine(eng, dataclasses.replace(CFG, steps=2), lm=lm, progress=False)
    assert (eng.w_a, eng.latent) == before  # nothing installed, so a save keeps the working weights
