"""ai.rag_engine::MatMulInt8Block (csrc/ortops) against a float64 reference of its math.

The op computes y = sum over K-blocks of xs * ws * (exact int32 dot of the int8 activations
and weights). The reference quantises x the same way in numpy (absmax / 127 per row and
block, round half to even) and sums the blocks in float64, so the only difference is the
op's float32 accumulation over the blocks: |err| <= blocks * 2^-23 * sum |terms| (we allow
4x that plus an absolute floor). Both paths (AVX-512 VNNI and portable) are run and must
agree bit for bit; the op must also match MatMulNBits (bits=8, accuracy_level 4), which
does the same arithmetic on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rag_engine.generator import ortops  # noqa: E402
from rag_engine.generator.quant import dequantize_blockwise, pack_int8_vnni, quantize_blockwise  # noqa: E402

pytestmark = pytest.mark.skipif(ortops.library_path() is None, reason="rag_engine/_ortops.so is not built")
PATHS = ["avx512"] if ortops.cpu_has_vnni() else []
PATHS.append("scalar")


def session(w: np.ndarray, block: int, *, threads: int = 2, nbits: bool = False, k_attr: int | None = None,
            block_attr: int | None = None, q_override: np.ndarray | None = None):
    k, n = w.shape
    if nbits:
        packed, scales = quantize_blockwise(w, 8, block)
        inits = [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")]
        node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                block_size=block, accuracy_level=4)
    else:
        q, s = pack_int8_vnni(w, block)
        if q_override is not None:
            q = q_override
        inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")]
        node = helper.make_node("MatMulInt8Block", ["x", "q", "s"], ["y"], domain=ortops.DOMAIN,
                                K=k if k_attr is None else k_attr, N=n, block_size=block if block_attr is None else block_attr)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(ortops.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    ortops.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def reference(x: np.ndarray, w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(y float64, error bound) of the op's arithmetic on x [..., K]."""
    k, n = w.shape
    packed, scales = quantize_blockwise(w, 8, block)
    wq = packed.astype(np.int64) - 128  # [N, nb, block]
    nb = wq.shape[1]
    rows = x.reshape(-1, k).astype(np.float32)
    xp = np.zeros((rows.shape[0], nb * block), np.float32)
    xp[:, :k] = rows
    xp = xp.reshape(-1, nb, block)
    amax = np.abs(xp).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.rint(xp * inv[:, :, None]).astype(np.int64)  # float32 product, then round half to even
    xs = (amax / np.float32(127)).astype(np.float32)
    dots = np.einsum("mbk,nbk->mnb", xq, wq).astype(np.float64)  # exact
    terms = dots * (scales[None].astype(np.float32) * xs[:, None, :]).astype(np.float64)  # [M, N, nb]
    y = terms.sum(axis=2)
    bound = 4 * nb * 2.0 ** -23 * np.abs(terms).sum(axis=2) + 1e-6
    lead = x.shape[:-1]
    return y.reshape(*lead, n), bound.reshape(*lead, n)


def run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {"x": x})[0]


@pytest.fixture(params=PATHS)
def isa(request, monkeypatch):
    monkeypatch.setenv("RAG_ENGINE_ISA", request.param)
    return request.param


@pytest.mark.parametrize(("k", "n", "block"), [(576, 960, 64), (64, 16, 64), (37, 23, 32), (100, 50, 16),
                                               (1, 1, 16), (130, 17, 128), (1536, 40, 64), (20, 33, 4)])
def test_matches_reference(isa, k, n, block):
    rng = np.random.default_rng(k * 1000 + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    sess = session(w, block)
    for shape in [(1, k), (2, k), (3, k), (5, k), (8, k), (9, k), (17, k), (2, 7, k)]:
        x = rng.standard_normal(shape).astype(np.float32)
        x[..., :: max(1, k // 3)] *= 30  # blocks with one large value (small steps elsewhere)
        y = run(sess, x)
        ref, bound = reference(x, w, block)
        assert y.shape == (*shape[:-1], n) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= bound), (shape, np.abs(y - ref).max())


def test_paths_agree_bitwise(monkeypatch):
    if len(PATHS) < 2:
        pytest.skip("this CPU has no AVX-512 VNNI: only the portable path runs")
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((300, 70)) * 0.1).astype(np.float32)
    x = rng.standard_normal((11, 300)).astype(np.float32)
    outs = []
    for path in PATHS:
        monkeypatch.setenv("RAG_ENGINE_ISA", path)
        outs.append(run(session(w, 64), x))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((576, 333)) * 0.1).astype(np.float32)
    x = rng.standard_normal((40, 576)).astype(np.float32)
    np.testing.assert_array_equal(run(session(w, 64, threads=threads), x), run(session(w, 64, threads=1), x))


def test_matches_matmulnbits():
    """Same weights, same activation quantisation as ONNX Runtime's 8-bit MatMulNBits."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((576, 192)) * 0.05).astype(np.float32)
    ours, theirs = session(w, 64), session(w, 64, nbits=True)
    for m in (1, 4, 8):
        x = rng.standard_normal((m, 576)).astype(np.float32)
        a, b = run(ours, x), run(theirs, x)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    # and both stay close to the fp32 product of the dequantised weights
    wd = dequantize_blockwise(*quantize_blockwise(w, 8, 64), 8, 576)
    x = rng.standard_normal((4, 576)).astype(np.float32)
    exact = x.astype(np.float64) @ wd
    assert np.abs(run(ours, x) - exact).max() <= 0.02 * np.abs(exact).max()


def test_edge_inputs(isa):
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((96, 20)) * 0.1).astype(np.float32)
    sess = session(w, 32)
    assert run(sess, np.zeros((0, 96), np.float32)).shape == (0, 20)
    np.testing.assert_array_equal(run(sess, np.zeros((3, 96), np.float32)), np.zeros((3, 20), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.standard_normal((3, 96)).astype(np.float32)
        x[1, 50] = bad
        y = run(sess, x)
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
    x = rng.standard_normal((2, 96)).astype(np.float32) * 1e30  # large but finite: no overflow in the scales
    ref, bound = reference(x, w, 32)
    assert np.all(np.abs(run(sess, x) - ref) <= bound * 1.0001)


def test_bad_inputs_raise_naming_the_op():
    w = np.ones((64, 16), np.float32)
    sess = session(w, 64)
    with pytest.raises(Exception, match=r"MatMulInt8Block: A must be float32 \[\.\.\., K=64\], got \[2, 63\]"):
        run(sess, np.ones((2, 63), np.float32))
    with pytest.raises(Exception, match=r"MatMulInt8Block: A must be float32"):
        run(sess, np.ones((), np.float32))
    q = pack_int8_vnni(w, 64)[0]
    with pytest.raises(Exception, match=r"MatMulInt8Block: q must hold 1024 elements"):
        run(session(w, 64, q_override=q.reshape(-1)[:512].copy()), np.ones((1, 64), np.float32))
    with pytest.raises(Exception, match=r"block_size a positive multiple of 4, got K=64 N=16 block_size=6"):
        session(w, 64, block_attr=6)


def test_pack_layout():
    w = np.arange(40 * 18, dtype=np.float32).reshape(40, 18) - 300
    q, s = pack_int8_vnni(w, 16)
    assert q.shape == (2, 3, 4, 16, 4) and s.shape == (2, 3, 16)
    assert q.dtype == np.uint8 and s.dtype == np.float32
    packed, scales = quantize_blockwise(w, 8, 16)
    # weight (k, n) -> group n // 16, block k // 16, run (k % 16) // 4, column n % 16, byte k % 4
    for k, n in [(0, 0), (5, 3), (39, 17), (17, 16)]:
        assert q[n // 16, k // 16, (k % 16) // 4, n % 16, k % 4] == packed[n, k // 16, k % 16]
        assert s[n // 16, k // 16, n % 16] == scales[n, k // 16]
    assert (q[1, :, :, 2:] == 128).all() and (s[1, :, 2:] == 1).all()  # padded columns: weight 0
    assert (q[:, 2, 2:] == 128).all()  # padded rows (k >= 40) of the last block
    with pytest.raises(ValueError, match="block must be a positive multiple of 4"):
        pack_int8_vnni(w, 6)
