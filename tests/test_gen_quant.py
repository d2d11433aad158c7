"""Quantised exports (int8 MatMulInt8Block / MatMulNBits, int8 quantize_dynamic, int4 MatMulNBits) vs fp32 HF logits.

Documented tolerance: int8 (block 64 by default, and 32) max |logit error| <= 0.15 x the std of
the fp32 logits and top-1 agreement >= 95% on random prompts; int4 (block 32) max error <= 1.5 x
std, top-1 >= 60%.
Measured on these tiny models: int8 0.06-0.09 x std with 96-100% agreement, int4 ~0.9 x std.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from test_generator import VOCAB, tiny_model  # noqa: E402

from rag_engine.generator import ExportConfig, Generator, export_model, ortops  # noqa: E402
from rag_engine.generator.kv_cache import KVCache  # noqa: E402
from rag_engine.generator.loop import prefill  # noqa: E402
from rag_engine.generator.quant import dequantize_blockwise, quantize_blockwise  # noqa: E402

CASES = [("int8", "nbits", None, 0.15, 0.95, False), ("int8", "nbits", 32, 0.15, 0.95, False),
         ("int8", "nbits", None, 0.15, 0.95, True), ("int8", "nbits", 32, 0.15, 0.95, True),
         ("int8", "dynamic", None, 0.15, 0.95, None), ("int4", "nbits", None, 1.5, 0.60, False),
         ("int4", "nbits", None, 1.5, 0.60, True)]


@pytest.fixture(scope="module")
def gen_quant_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gen_quant_cache")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(("precision", "method", "block", "err_bound", "top1_bound", "custom_ops"), CASES)
def test_quantised_logits_within_tolerance(family, precision, method, block, err_bound, top1_bound, custom_ops,
                                           gen_quant_cache):
    model = tiny_model(family, seed=7)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, 24) for _ in range(16)]
    with torch.no_grad():
        ref = np.stack([model(torch.tensor(p[None])).logits[0].numpy() for p in prompts])
    config = ExportConfig(precision=precision, int8_method=method, block_size=block, all_logits=True,
                          custom_ops=custom_ops)
    gen = Generator.from_hf(model, cache_dir=gen_quant_cache, export_config=config)
    ops = {node.op_type for node in onnx.load(gen.session.folder / "model.onnx", load_external_data=False).graph.node}
    block_op = bool(gen.session.config.custom_ops) and method == "nbits"
    assert (f"MatMulInt{config.bits}Block" in ops) == block_op
    assert ("MatMulNBits" in ops) == (method == "nbits" and not block_op)
    assert ("DecoderAttention" in ops) == gen.session.config.custom_ops != ("GroupQueryAttention" in ops)
    spec = gen.session.spec
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(prompts), 24)
    logits = prefill(gen.session, cache, prompts)
    assert np.abs(logits - ref).max() <= err_bound * ref.std()
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= top1_bound


def test_block_size_defaults_and_validation():
    assert ExportConfig(precision="int8").block == 64 and ExportConfig(precision="int4").block == 32
    assert ExportConfig(precision="int8", block_size=32).block == 32
    for bad in (8, 48, 0, True, 32.0):
        with pytest.raises(ValueError, match="block_size must be a power of two >= 16 or None"):
            ExportConfig(precision="int8", block_size=bad)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [32, 70])
def test_blockwise_roundtrip_error_is_half_a_step(bits, k):
    w = np.random.default_rng(bits).standard_normal((k, 48)).astype(np.float32)
    packed, scales = quantize_blockwise(w, bits, 32)
    assert packed.shape == (48, -(-k // 32), 32 * bits // 8)
    back = dequantize_blockwise(packed, scales, bits, k)
    step = np.abs(np.repeat(scales.T, 32, axis=0)[:k])
    top = 2 ** (bits - 1)
    # the block's extreme is exact (-top steps); weights beyond +(top - 1/2) steps on the other
    # side clip to +(top - 1): within one step; everything else within half a step
    clipped = np.abs(w) > (top - 0.5) * step
    assert np.all(np.abs(back - w)[~clipped] <= 0.5 * step[~clipped] + 1e-6)
    assert np.all(np.abs(back - w) <= step + 1e-6)
    extremes = np.abs(w).reshape(-1, 48) == np.abs(w).max(axis=0, keepdims=True) if k == 32 else None
    if extremes is not None:
        np.testing.assert_allclose(back[extremes], w[extremes], rtol=1e-6)


def test_quantize_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_blockwise(np.ones((32, 4), np.float32), 3)


def test_smoothing_is_exact_in_fp32(tmp_path):
    """The SmoothQuant factors are folded into norms and weights without changing the fp32
    function: the smoothed fp32 graph's logits equal the original's."""
    import onnx

    from rag_engine.generator import smooth
    from rag_engine.generator.export import DATA_FILE, MODEL_FILE, write_manifest
    from rag_engine.generator.graph import build_graph
    from rag_engine.generator.session import DecoderSession
    from rag_engine.generator.spec import read_spec

    model = tiny_model("llama", seed=3)
    spec, w = read_spec(model)
    ids = smooth.calibration_ids(model, spec.vocab_size, rows=2, length=32)
    amax = smooth.activation_absmax(model, ids)
    assert set(amax) >= {"0.qkv", "1.down", "lm_head"} and all((v >= 0).all() for v in amax.values())
    smoothed = {k: v.copy() for k, v in w.items()}
    smooth.smooth_weights(spec, smoothed, amax)
    assert not np.allclose(smoothed["layers.0.qkv"], w["layers.0.qkv"])
    outs = []
    for name, weights in (("plain", w), ("smooth", smoothed)):
        folder = tmp_path / name
        folder.mkdir()
        onnx.save_model(build_graph(spec, weights, all_logits=True), folder / MODEL_FILE, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        write_manifest(folder, spec, ExportConfig(all_logits=True))
        session = DecoderSession(folder, threads=1)
        prompts = [np.random.default_rng(1).integers(0, VOCAB, 20)]
        outs.append(prefill(session, KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 1, 20), prompts).copy())
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-4 * np.abs(outs[0]).max())


def test_custom_ops_config_resolution(monkeypatch, tmp_path):
    for kwargs in (dict(), dict(precision="int8"), dict(precision="int8", int8_method="dynamic"), dict(precision="int4")):
        assert ExportConfig(**kwargs).custom_ops is ortops.available()
        assert ExportConfig(custom_ops=True, **kwargs).custom_ops is True
        assert ExportConfig(custom_ops=False, **kwargs).custom_ops is False
    for bad in ("yes", 1, 0.0):
        with pytest.raises(ValueError, match="custom_ops must be a bool or None"):
            ExportConfig(precision="int8", custom_ops=bad)
    monkeypatch.setattr(ortops, "LIBRARY", tmp_path / "missing.so")
    assert ExportConfig(precision="int8").custom_ops is False  # not built: MatMulNBits
    with pytest.raises(FileNotFoundError, match="custom_ops=True needs the op library"):
        export_model(tiny_model("llama", seed=7), tmp_path / "out", ExportConfig(precision="int8", custom_ops=True),
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_custom_ops_export_needs_the_library_to_load(monkeypatch, gen_quant_cache):
    """An export that uses MatMulInt8Block names the missing library instead of an unknown-op error;
    manifests written before the field existed read as custom_ops=False."""
    import json

    from rag_engine.generator.export import MANIFEST, read_manifest
    from rag_engine.generator.session import DecoderSession

    gen = Generator.from_hf(tiny_model("llama", seed=7), cache_dir=gen_quant_cache,
                            export_config=ExportConfig(precision="int8", custom_ops=True))
    folder = gen.session.folder
    monkeypatch.setattr(ortops, "LIBRARY", folder / "missing.so")
    with pytest.raises(FileNotFoundError, match="uses ai.rag_engine ops but .*missing.so is missing"):
        DecoderSession(folder)
    monkeypatch.undo()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["config"]["custom_ops"] is True
    del manifest["config"]["custom_ops"]
    old = folder.parent / "old-manifest"
    old.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (old / name).symlink_to(folder / name)
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(old)[1].custom_ops is False


def test_block_ops_only_at_accuracy_level_4(gen_quant_cache):
    """MatMulInt{4,8}Block quantise activations to int8 as MatMulNBits does at accuracy_level 4;
    other levels keep MatMulNBits (the attention op still applies)."""
    model = tiny_model("llama", seed=7)
    for level, block_op in ((4, True), (0, False)):
        gen = Generator.from_hf(model, cache_dir=gen_quant_cache,
                                export_config=ExportConfig(precision="int8", accuracy_level=level, custom_ops=True))
        ops = {n.op_type for n in onnx.load(gen.session.folder / "model.onnx", load_external_data=False).graph.node}
        assert ("MatMulInt8Block" in ops) == block_op and ("MatMulNBits" in ops) != block_op
        assert "DecoderAttention" in ops
