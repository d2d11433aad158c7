"""Bad input to the generator raises typed errors that name what was wrong."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from test_generator import tiny_model  # noqa: E402

from rag_engine.errors import RagEngineError  # noqa: E402
from rag_engine.generator import ExportConfig, ExportFormatError, Generator, SamplingParams  # noqa: E402
from rag_engine.generator.export import DATA_FILE, MODEL_FILE, read_manifest  # noqa: E402
from rag_engine.generator.session import DecoderSession  # noqa: E402


@pytest.fixture()
def gen_small(tmp_path):
    return Generator.from_hf(tiny_model("llama", seed=8), cache_dir=tmp_path)


def test_empty_prompt(gen_small):
    with pytest.raises(ValueError, match="empty"):
        gen_small.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="tokenizer"):
        gen_small.generate(["text needs a tokenizer"], SamplingParams(max_tokens=2))


def test_prompt_longer_than_context(gen_small):
    too_long = [1] * gen_small.max_context
    with pytest.raises(ValueError, match="context of 256 tokens"):
        gen_small.generate([too_long], SamplingParams(max_tokens=2))


def test_generation_stops_at_the_context_end(gen_small):
    out = gen_small.generate([[1] * 250], SamplingParams(max_tokens=50, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_bad_token_ids_and_params(gen_small):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
        gen_small.generate([[1, 5000]])
    with pytest.raises(TypeError, match="only ints"):
        gen_small.generate([[1, 2.5]])
    with pytest.raises(ValueError, match="one per prompt"):
        gen_small.generate([[1], [2]], [SamplingParams()] * 3)
    for min_tokens in (0, 2):  # refused up front, not an IndexError once min_tokens applies
        with pytest.raises(ValueError, match=r"stop_token_ids must be < the vocabulary size 320"):
            gen_small.generate([[1, 2]], SamplingParams(stop_token_ids=(10**6,), min_tokens=min_tokens))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"temperature": -1.0}, "temperature must be in"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"min_p": 1.5}, "min_p must be in"),
    ({"top_k": -2}, "top_k must be >= -1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens must be <= max_tokens"),
    ({"stop": ("",)}, "stop must be non-empty"),
    ({"temperature": float("nan")}, "temperature must be in"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids must be token ids >= 0"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_types():
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        SamplingParams(max_tokens=2.0)
    assert SamplingParams(stop="END").stop == ("END",)


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Generator.from_pretrained(tmp_path / "no-such-model", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision must be one of"):
        ExportConfig(precision="fp8")


def test_bad_export_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="int8_method must be one of"):
        Generator.from_pretrained(tmp_path / "no-such-model", precision="int8", int8_method="fp8", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision must be one of"):
        Generator.from_pretrained(tmp_path / "no-such-model", precision="int2", cache_dir=tmp_path)


def test_unsupported_architecture(tmp_path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, is_decoder=True)
    model = transformers.BertLMHeadModel(cfg)
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        Generator.from_hf(model, cache_dir=tmp_path)


def test_corrupted_export_is_rejected_and_cache_rebuilt(tmp_path, caplog):
    model = tiny_model("llama", seed=9)
    gen = Generator.from_hf(model, cache_dir=tmp_path)
    folder = gen.session.folder
    expected = gen.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    data = folder / DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ExportFormatError, match="corrupted: sha256"):
        DecoderSession(folder)
    graph = folder / MODEL_FILE
    graph.write_bytes(b"not an onnx file")
    with pytest.raises(ExportFormatError, match="model.onnx is corrupted: expected .* bytes, got 16"):
        read_manifest(folder)
    graph.write_bytes(b"\xff" * read_manifest_size(folder))
    with pytest.raises(ExportFormatError, match="could not be loaded by ONNX Runtime"):
        DecoderSession(folder, verify=False)
    assert issubclass(ExportFormatError, RagEngineError) and issubclass(ExportFormatError, ValueError)
    with caplog.at_level("WARNING"):
        again = Generator.from_hf(model, cache_dir=tmp_path)
    assert "rebuilding broken export" in caplog.text
    assert again.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids == expected


def read_manifest_size(folder):
    import json

    return json.loads((folder / "manifest.json").read_text())["files"][MODEL_FILE]["bytes"]


def test_half_written_cache_entry_is_not_loaded(tmp_path):
    model = tiny_model("gpt2", seed=10)
    gen = Generator.from_hf(model, cache_dir=tmp_path)
    folder = gen.session.folder
    (folder / "COMPLETE").unlink()  # as if the process died before publishing
    (folder / DATA_FILE).write_bytes(b"")
    again = Generator.from_hf(model, cache_dir=tmp_path)
    assert again.session.folder == folder and (folder / "COMPLETE").is_file()
    assert np.isfinite(again.generate([[4, 5]], SamplingParams(max_tokens=2))[0].token_ids).all()
    with pytest.raises(FileNotFoundError, match="exported model folder"):
        DecoderSession(tmp_path / "missing")


def test_edited_manifest_is_rebuilt_not_trusted(tmp_path, caplog):
    import json

    model = tiny_model("llama", seed=9)
    gen = Generator.from_hf(model, cache_dir=tmp_path)
    folder = gen.session.folder
    expected = gen.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    manifest = json.loads((folder / "manifest.json").read_text())
    edits = [{k: v for k, v in manifest.items() if k != "files"},  # KeyError before
             manifest | {"config": manifest["config"] | {"precision": "fp8"}},  # ValueError before
             manifest | {"spec": manifest["spec"] | {"bogus": 1}},  # TypeError before
             manifest | {"config": manifest["config"] | {"all_logits": True}},  # was loaded as is
             manifest | {"files": {MODEL_FILE: manifest["files"][MODEL_FILE]}}]  # data file unchecked
    for edited in edits:
        (folder / "manifest.json").write_text(json.dumps(edited))
        if "files" in edited and len(edited["files"]) == 2 and edited["config"].get("precision") == "fp32" \
                and "bogus" not in edited["spec"]:
            assert read_manifest(folder)[1].all_logits  # a consistent manifest for another config
        else:
            with pytest.raises(ExportFormatError):
                read_manifest(folder)
        with caplog.at_level("WARNING"):
            again = Generator.from_hf(model, cache_dir=tmp_path)
        assert "rebuilding" in caplog.text
        caplog.clear()
        assert not again.session.config.all_logits
        assert again.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids == expected
    with pytest.raises(ValueError, match="accuracy_level must be an int in"):
        ExportConfig(precision="int4", accuracy_level="4")
    with pytest.raises(ValueError, match="all_logits must be a bool"):
        ExportConfig(all_logits="no")


def test_bfloat16_model_exports(tmp_path):
    import torch

    model = tiny_model("llama", seed=9).to(torch.bfloat16)  # model_key hashed through numpy, which lacks bf16
    gen = Generator.from_hf(model, cache_dir=tmp_path)
    assert len(gen.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3


def test_kv_cache_and_decode_bounds(gen_small):
    from rag_engine.generator.kv_cache import KVCache

    spec = gen_small.session.spec
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 3, 8)
    for rows in ([2, 0], [1, 0, 2], [0, -1], [0, 0, 1]):
        with pytest.raises(ValueError, match="ascending indices"):
            cache.keep(np.array(rows), 4)
    with pytest.raises(ValueError, match=r"decode positions must be in \[0, 8\)"):
        gen_small.session.decode(np.zeros(3, np.int64), np.array([1, 2, 8]), cache)
