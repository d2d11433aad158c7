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
from rag_engine.generator.quant import (  # noqa: E402
    dequantize_blockwise,
    pack_int4_vnni,
    pack_int8_vnni,
    quantize_blockwise,
)


def test_library_is_built():
    """The package build (CMake through setup.py) always produces the op library next to _C."""
    assert ortops.library_path() is not None, f"{ortops.LIBRARY} is missing: rebuild with pip install -e ."


PATHS = ["avx512"] if ortops.cpu_has_vnni() else []
PATHS.append("scalar")


def session(w: np.ndarray, block: int, *, threads: int = 2, nbits: bool = False, k_attr: int | None = None,
            block_attr: int | None = None, q_override: np.ndarray | None = None, bits: int = 8):
    k, n = w.shape
    if nbits:
        packed, scales = quantize_blockwise(w, bits, block)
        inits = [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")]
        node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=4)
    else:
        q, s = (pack_int8_vnni if bits == 8 else pack_int4_vnni)(w, block)
        if q_override is not None:
            q = q_override
        inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")]
        node = helper.make_node(f"MatMulInt{bits}Block", ["x", "q", "s"], ["y"], domain=ortops.DOMAIN,
                                K=k if k_attr is None else k_attr, N=n, block_size=block if block_attr is None else block_attr)
    return one_node_session(node, {"x": TensorProto.FLOAT}, ["y"], inits, threads)


def one_node_session(node, inputs: dict, outputs: list[str], inits=(), threads: int = 2):
    """A session over one node (inputs: name -> element type; fp32 outputs) with our ops loaded."""
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(ortops.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    ortops.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def weight_values(w: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' signed integer weights [N, nb, block] and scales [N, nb]."""
    packed, scales = quantize_blockwise(w, bits, block)
    if bits == 4:
        values = np.empty(packed.shape[:2] + (block,), np.int64)
        values[:, :, 0::2], values[:, :, 1::2] = packed & 0x0F, packed >> 4
        return values - 8, scales
    return packed.astype(np.int64) - 128, scales


def reference(x: np.ndarray, w: np.ndarray, block: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(y float64, error bound) of the op's arithmetic on x [..., K]."""
    k, n = w.shape
    wq, scales = weight_values(w, block, bits)  # [N, nb, block]
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


@pytest.mark.parametrize(("bits", "block"), [(8, 64), (4, 32)])
def test_paths_and_threads_agree_bitwise_and_match_matmulnbits(monkeypatch, bits, block):
    rng = np.random.default_rng(5 + bits)
    w = (rng.standard_normal((320, 70)) * 0.1).astype(np.float32)
    x = rng.standard_normal((11, 320)).astype(np.float32)
    outs = []
    for path in PATHS:
        monkeypatch.setenv("RAG_ENGINE_ISA", path)
        outs += [run(session(w, block, bits=bits, threads=t), x) for t in (1, 3)]
    for other in outs[1:]:
        np.testing.assert_array_equal(other, outs[0])
    theirs = run(session(w, block, bits=bits, nbits=True), x)  # same weights and activation quantisation
    np.testing.assert_allclose(outs[0], theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


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


# ---- DecoderAttention --------------------------------------------------------------------


def attention_session(heads: int, kv_heads: int, rotary: bool, *, op: str = "DecoderAttention", scale: float = 0.0,
                      threads: int = 2):
    names = ["qkv", "past_key", "past_value", "seqlens_k", "total"] + (["cos", "sin"] if rotary else [])
    if op == "GroupQueryAttention":
        node = helper.make_node(op, [names[0], "", "", *names[1:]], ["out", "present_key", "present_value"],
                                domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, scale=scale,
                                do_rotary=int(rotary), rotary_interleaved=0, local_window_size=-1)
    else:
        node = helper.make_node(op, names, ["out", "present_key", "present_value"], domain=ortops.DOMAIN,
                                num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=int(rotary))
    types = {"seqlens_k": TensorProto.INT32, "total": TensorProto.INT32}
    return one_node_session(node, {n: types.get(n, TensorProto.FLOAT) for n in names},
                            ["out", "present_key", "present_value"], threads=threads)


def rotary_tables(positions: int, rot_half: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(rot_half) / rot_half))
    angles = np.arange(positions)[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def attention_reference(qkv, past_k, past_v, seqlens, total, heads, kv_heads, scale=0.0, cos=None, sin=None):
    """float64: (out, present_key, present_value) with the op's semantics (attention.h)."""
    qkv, past_k, past_v = (np.asarray(a, np.float64) for a in (qkv, past_k, past_v))
    batch, seq, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    group = heads // kv_heads
    cache_len = max(past_k.shape[2], int(total))
    key = np.zeros((batch, kv_heads, cache_len, d))
    value = np.zeros_like(key)
    key[:, :, :past_k.shape[2]] = past_k
    value[:, :, :past_v.shape[2]] = past_v
    scale = scale or 1.0 / np.sqrt(d)
    out = np.zeros((batch, seq, heads * d))

    def rotate(x, pos):  # x [..., d]
        if cos is None:
            return x
        half = cos.shape[1]
        c, s = cos[pos].astype(np.float64), sin[pos].astype(np.float64)
        y = x.copy()
        y[..., :half] = x[..., :half] * c - x[..., half:2 * half] * s
        y[..., half:2 * half] = x[..., half:2 * half] * c + x[..., :half] * s
        return y

    for b in range(batch):
        length = int(seqlens[b]) + 1
        start = max(0, length - seq)
        valid = min(seq, length - start)
        q = qkv[b, :, :heads * d].reshape(seq, heads, d)
        k = qkv[b, :, heads * d:(heads + kv_heads) * d].reshape(seq, kv_heads, d)
        v = qkv[b, :, (heads + kv_heads) * d:].reshape(seq, kv_heads, d)
        for s in range(valid):
            key[b, :, start + s] = rotate(k[s], start + s)
            value[b, :, start + s] = v[s]
        for s in range(valid):
            pos = start + s
            for h in range(heads):
                qh = rotate(q[s, h], pos) * scale
                scores = key[b, h // group, :pos + 1] @ qh
                p = np.exp(scores - scores.max())
                out[b, s, h * d:(h + 1) * d] = (p / p.sum()) @ value[b, h // group, :pos + 1]
    return out, key, value


def attention_feeds(rng, batch, seq, heads, kv_heads, d, past, lengths, rot_half):
    feeds = {"qkv": rng.standard_normal((batch, seq, (heads + 2 * kv_heads) * d)).astype(np.float32),
             "past_key": rng.standard_normal((batch, kv_heads, past, d)).astype(np.float32),
             "past_value": rng.standard_normal((batch, kv_heads, past, d)).astype(np.float32),
             "seqlens_k": (np.asarray(lengths) - 1).astype(np.int32),
             "total": np.array(max(past, max(lengths)), np.int32)}
    if rot_half:
        feeds["cos"], feeds["sin"] = rotary_tables(max(past, max(lengths)) + 4, rot_half)
    return feeds


def check_attention(sess, feeds, heads, kv_heads, scale=0.0):
    out, pk, pv = sess.run(None, feeds)
    ref_out, ref_k, ref_v = attention_reference(feeds["qkv"], feeds["past_key"], feeds["past_value"],
                                                feeds["seqlens_k"], feeds["total"], heads, kv_heads, scale,
                                                feeds.get("cos"), feeds.get("sin"))
    seq = feeds["qkv"].shape[1]
    for b, length in enumerate(feeds["seqlens_k"] + 1):
        start = max(0, length - seq)
        valid = min(seq, length - start)
        # fp32 dot products over head_dim and sums over <= 200 keys of values ~N(0, 1)
        np.testing.assert_allclose(out[b, :valid], ref_out[b, :valid], rtol=1e-4, atol=2e-5)
        assert (out[b, valid:] == 0).all()  # right padding of a first prompt
        np.testing.assert_allclose(pk[b, :, :length], ref_k[b, :, :length], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(pv[b, :, :length], ref_v[b, :, :length].astype(np.float32))
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "d", "rot_half"),
                         [(9, 3, 64, 32), (4, 4, 16, 8), (8, 2, 128, 64), (6, 3, 24, 12), (4, 1, 32, 8),
                          (2, 2, 64, 0), (16, 2, 64, 32)])
def test_attention_matches_reference(isa, heads, kv_heads, d, rot_half):
    rng = np.random.default_rng(heads * 100 + d)
    sess = attention_session(heads, kv_heads, rot_half > 0)
    # a first prompt, right-padded (rows of 7, 4 and 1 tokens); decode steps; a chunked prefill
    # of 40 tokens after 25 cached ones (more than one task's worth of tokens)
    check_attention(sess, attention_feeds(rng, 3, 7, heads, kv_heads, d, 12, [7, 4, 1], rot_half), heads, kv_heads)
    check_attention(sess, attention_feeds(rng, 3, 1, heads, kv_heads, d, 12, [8, 5, 12], rot_half), heads, kv_heads)
    check_attention(sess, attention_feeds(rng, 1, 40, heads, kv_heads, d, 80, [65], rot_half), heads, kv_heads)
    check_attention(sess, attention_feeds(rng, 2, 33, heads, kv_heads, d, 33, [33, 20], rot_half), heads, kv_heads)


def test_attention_explicit_scale_and_growing_present():
    """scale != 0 is used as given; with a past shorter than total_sequence_length the present is
    longer (a copy of the past plus the new positions)."""
    rng = np.random.default_rng(3)
    sess = attention_session(4, 2, True, scale=0.3)
    feeds = attention_feeds(rng, 2, 3, 4, 2, 32, 5, [8, 6], 16)
    out, pk, _ = sess.run(None, feeds)
    assert pk.shape == (2, 2, 8, 32)
    for b, start in enumerate((5, 3)):  # rows of 8 and 6 tokens: the 3 new ones start there
        np.testing.assert_array_equal(pk[b, :, :start], feeds["past_key"][b, :, :start])
    check_attention(sess, feeds, 4, 2, scale=0.3)


def test_attention_matches_group_query_attention_in_place():
    """Against ONNX Runtime's GroupQueryAttention through the generator's binding: past and present
    bound to one buffer, a ragged prefill then decode steps."""
    rng = np.random.default_rng(4)
    heads, kv_heads, d, cache = 9, 3, 64, 48
    cos, sin = rotary_tables(cache, d // 2)
    sessions = {op: attention_session(heads, kv_heads, True, op=op) for op in ("DecoderAttention", "GroupQueryAttention")}
    caches = {op: [np.zeros((3, kv_heads, cache, d), np.float32) for _ in range(2)] for op in sessions}
    lengths = np.array([7, 4, 1])
    for step in range(6):
        seq = 7 if step == 0 else 1
        lengths = lengths + (step > 0)
        feeds = {"qkv": rng.standard_normal((3, seq, (heads + 2 * kv_heads) * d)).astype(np.float32),
                 "seqlens_k": (lengths - 1).astype(np.int32), "cos": cos, "sin": sin,
                 # as the generator feeds it: the mask's width (the prompt at prefill, the cache after)
                 "total": np.array(seq if step == 0 else cache, np.int32)}
        outs = {}
        for op, sess in sessions.items():
            io = sess.io_binding()
            for name, present, buf in (("past_key", "present_key", caches[op][0]), ("past_value", "present_value", caches[op][1])):
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(present, value)
            for name, array in feeds.items():
                io.bind_cpu_input(name, array)
            io.bind_output("out")
            sess.run_with_iobinding(io)
            outs[op] = io.copy_outputs_to_cpu()[-1]  # "out" was bound last
        rows = [np.arange(seq) < (lengths[b] if step == 0 else 1) for b in range(3)]
        for b in range(3):
            np.testing.assert_allclose(outs["DecoderAttention"][b, rows[b]], outs["GroupQueryAttention"][b, rows[b]],
                                       rtol=1e-5, atol=2e-6)
            np.testing.assert_allclose(caches["DecoderAttention"][0][b, :, :lengths[b]],
                                       caches["GroupQueryAttention"][0][b, :, :lengths[b]], rtol=1e-6, atol=1e-6)


def test_attention_paths_and_threads_agree(monkeypatch):
    rng = np.random.default_rng(5)
    feeds = attention_feeds(rng, 3, 20, 9, 3, 64, 30, [25, 20, 9], 32)
    outs = []
    for path in PATHS:
        monkeypatch.setenv("RAG_ENGINE_ISA", path)
        for threads in (1, 3):
            outs.append(attention_session(9, 3, True, threads=threads).run(None, feeds)[0])
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=1e-5, atol=1e-6)


def test_attention_bad_inputs():
    rng = np.random.default_rng(6)
    sess = attention_session(4, 2, True)
    good = attention_feeds(rng, 2, 1, 4, 2, 16, 10, [5, 6], 8)
    cases = [
        (dict(qkv=good["qkv"][0]), r"qkv must be float32 \[batch, seq, \(num_heads \+ 2 kv_num_heads\) \* head_dim\], got \[1, 128\]"),
        (dict(qkv=good["qkv"][..., :-1].copy()), r"qkv's last dimension must be \(num_heads \+ 2 kv_num_heads\) \* head_dim = 8"),
        (dict(past_key=good["past_key"][:, :1].copy()), r"past_key/past_value must be float32 \[batch=2, kv_num_heads=2, past, head_dim=16\]"),
        (dict(seqlens_k=np.array([5, 10], np.int32)), r"seqlens_k\[1\] = 10 is outside \[0, 10\)"),
        (dict(seqlens_k=np.array([-1, 2], np.int32)), r"seqlens_k\[0\] = -1 is outside"),
        (dict(seqlens_k=np.array([1], np.int32)), r"seqlens_k must be int32 \[batch=2\], got \[1\]"),
        (dict(cos=good["cos"][:3].copy(), sin=good["sin"][:3].copy()), r"position 4 is past the rotary cache.s 3 positions"),
        (dict(cos=good["cos"][:, :3].copy()), r"cos_cache and sin_cache must be float32"),
    ]
    for change, message in cases:
        with pytest.raises(Exception, match="DecoderAttention: " + message):
            sess.run(None, {**good, **change})
    with pytest.raises(Exception, match="DecoderAttention: do_rotary=1 needs cos_cache and sin_cache"):
        _rotary_without_tables()
    with pytest.raises(Exception, match="num_heads >= 1 a multiple of kv_num_heads"):
        attention_session(5, 2, True)


def _rotary_without_tables():
    """A do_rotary=1 node whose optional cos/sin inputs are left out."""
    node = helper.make_node("DecoderAttention", ["qkv", "pk", "pv", "sl", "t"], ["o", "k", "v"], domain=ortops.DOMAIN,
                            num_heads=2, kv_num_heads=1, scale=0.0, do_rotary=1)
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    sess = one_node_session(node, {"qkv": f, "pk": f, "pv": f, "sl": i32, "t": i32}, ["o", "k", "v"])
    sess.run(None, {"qkv": np.ones((1, 1, 64), np.float32), "pk": np.zeros((1, 1, 4, 16), np.float32),
                    "pv": np.zeros((1, 1, 4, 16), np.float32), "sl": np.array([0], np.int32), "t": np.array(4, np.int32)})


# ---- MatMulF32Panels ---------------------------------------------------------------------


def f32_session(w: np.ndarray, threads: int = 2, w_override: np.ndarray | None = None):
    from rag_engine.generator.quant import pack_f32_panels

    k, n = w.shape
    packed = pack_f32_panels(w) if w_override is None else w_override
    node = helper.make_node("MatMulF32Panels", ["x", "w"], ["y"], domain=ortops.DOMAIN, K=k, N=n)
    return one_node_session(node, {"x": TensorProto.FLOAT}, ["y"], [numpy_helper.from_array(packed, "w")], threads)


@pytest.mark.parametrize(("k", "n"), [(576, 960), (37, 23), (64, 33), (1536, 576), (5, 100), (1, 1)])
def test_f32_panels_match_reference(isa, k, n):
    """fp32 accumulation over K in order: |err| <= K * 2^-24 * sum |x_k w_k| (x4 slack)."""
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    sess = f32_session(w)
    for shape in [(1, k), (3, k), (8, k), (9, k), (2, 5, k), (17, k)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = run(sess, x)
        ref = x.astype(np.float64) @ w
        bound = 4 * k * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w)) + 1e-6
        assert y.shape == (*shape[:-1], n) and np.all(np.abs(y - ref) <= bound), (shape, np.abs(y - ref).max())


def test_f32_panels_paths_and_threads_agree_bitwise(monkeypatch):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((300, 70)).astype(np.float32)
    x = rng.standard_normal((11, 300)).astype(np.float32)
    outs = []
    for path in PATHS:
        monkeypatch.setenv("RAG_ENGINE_ISA", path)
        outs += [run(f32_session(w, threads), x) for threads in (1, 3)]
    for other in outs[1:]:
        np.testing.assert_array_equal(other, outs[0])


def test_f32_panels_bad_inputs():
    w = np.ones((64, 40), np.float32)
    with pytest.raises(Exception, match=r"MatMulF32Panels: A must be float32 \[\.\.\., K=64\], got \[2, 63\]"):
        run(f32_session(w), np.ones((2, 63), np.float32))
    with pytest.raises(Exception, match=r"MatMulF32Panels: W must hold 4096 floats"):
        run(f32_session(w, w_override=np.ones((64, 40), np.float32)), np.ones((1, 64), np.float32))


# ---- MatMulInt4Block ---------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "block"), [(576, 960, 32), (64, 16, 32), (37, 23, 32), (100, 50, 16), (8, 1, 8),
                                               (130, 17, 64), (1536, 40, 32)])
def test_int4_matches_reference(isa, k, n, block):
    rng = np.random.default_rng(k * 7 + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    sess = session(w, block, bits=4)
    for shape in [(1, k), (2, k), (3, k), (8, k), (9, k), (17, k), (2, 7, k)]:
        x = rng.standard_normal(shape).astype(np.float32)
        x[..., :: max(1, k // 3)] *= 30
        y = run(sess, x)
        ref, bound = reference(x, w, block, bits=4)
        assert y.shape == (*shape[:-1], n) and np.all(np.abs(y - ref) <= bound), (shape, np.abs(y - ref).max())


def test_int4_pack_layout_and_errors():
    w = np.random.default_rng(12).standard_normal((40, 18)).astype(np.float32)
    q, s = pack_int4_vnni(w, 16)
    assert q.shape == (2, 3, 2, 16, 4) and s.shape == (2, 3, 16) and q.dtype == np.uint8
    values, scales = weight_values(w, 16, 4)
    for k, n in [(0, 0), (5, 3), (39, 17), (17, 16), (12, 9)]:
        byte = q[n // 16, k // 16, (k % 16) // 8, n % 16, k % 4]
        nibble = byte & 0x0F if k % 8 < 4 else byte >> 4
        assert int(nibble) - 8 == values[n, k // 16, k % 16]
        assert s[n // 16, k // 16, n % 16] == scales[n, k // 16]
    assert (q[1, :, :, 2:] == 0x88).all()  # padded columns: weight 0
    with pytest.raises(ValueError, match="block must be a positive multiple of 8"):
        pack_int4_vnni(w, 12)
    with pytest.raises(Exception, match=r"MatMulInt4Block: attributes must be .* a positive multiple of 8"):
        session(np.ones((64, 16), np.float32), 32, bits=4, block_attr=4)
    with pytest.raises(Exception, match=r"MatMulInt4Block: q must hold 512 elements"):
        run(session(np.ones((64, 16), np.float32), 32, bits=4, q_override=np.zeros(1024, np.uint8)),
            np.ones((1, 64), np.float32))


def test_tiny_activation_blocks_are_zero_blocks():
    """A block whose absmax is below 1e-36 (127 / absmax would overflow) contributes zero, on both
    paths alike; the other blocks of the row are unaffected."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((128, 32)).astype(np.float32)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[0, :64] = rng.standard_normal(64).astype(np.float32) * 1e-38  # first block tiny (subnormal/normal)
    x[1] = 1e-37
    outs = {}
    for path in PATHS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAG_ENGINE_ISA", path)
            for bits, block in ((8, 64), (4, 32)):
                outs[path, bits] = run(session(w, block, bits=bits), x)
    for (_path, bits), y in outs.items():
        np.testing.assert_array_equal(y, outs["scalar", bits])
        assert (y[1] == 0).all() and np.isfinite(y).all()
        x_rest = x[0].copy()
        x_rest[:64] = 0
        np.testing.assert_array_equal(y[0], run(session(w, 64 if bits == 8 else 32, bits=bits), x_rest[None])[0])


def test_attention_rejects_a_gap_after_an_unbound_past():
    """With a present that is not the past buffer, new tokens must follow the past directly."""
    rng = np.random.default_rng(14)
    sess = attention_session(4, 2, False)
    feeds = attention_feeds(rng, 1, 1, 4, 2, 16, 4, [64], 0)  # past of 4 positions, token at 63
    with pytest.raises(Exception, match=r"DecoderAttention: row 0's 1 new tokens start at position 63, past the 4 "
                                        r"positions of past_key"):
        sess.run(None, feeds)


def test_missing_attributes():
    """DecoderAttention's scale and do_rotary default as GroupQueryAttention's (0); a missing
    required attribute is an error naming the op and the attribute."""
    node = helper.make_node("DecoderAttention", ["qkv", "pk", "pv", "sl", "t"], ["o", "k", "v"], domain=ortops.DOMAIN,
                            num_heads=4, kv_num_heads=2)
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    sess = one_node_session(node, {"qkv": f, "pk": f, "pv": f, "sl": i32, "t": i32}, ["o", "k", "v"])
    feeds = attention_feeds(np.random.default_rng(15), 2, 3, 4, 2, 16, 3, [3, 2], 0)
    out = sess.run(None, dict(zip(["qkv", "pk", "pv", "sl", "t"], [feeds[n] for n in
                                                                  ("qkv", "past_key", "past_value", "seqlens_k", "total")])))[0]
    ref = attention_reference(feeds["qkv"], feeds["past_key"], feeds["past_value"], feeds["seqlens_k"], feeds["total"], 4, 2)[0]
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=2e-5)
    bad = helper.make_node("MatMulInt8Block", ["x", "q", "s"], ["y"], domain=ortops.DOMAIN, N=16, block_size=64)
    with pytest.raises(Exception, match="MatMulInt8Block: the node needs the int attribute 'K'"):
        one_node_session(bad, {"x": f, "q": TensorProto.UINT8, "s": f}, ["y"])


# ---- swiglu epilogue (MatMulInt{8,4}Block, MatMulF32Panels) -------------------------------


def swiglu_session(op: str, w: np.ndarray, swiglu: int):
    from rag_engine.generator.quant import pack_f32_panels

    k, n = w.shape
    if op == "MatMulF32Panels":
        inits = [numpy_helper.from_array(pack_f32_panels(w), "w")]
        node = helper.make_node(op, ["x", "w"], ["y"], domain=ortops.DOMAIN, K=k, N=n, swiglu=swiglu)
    else:
        bits, block = (8, 64) if op == "MatMulInt8Block" else (4, 32)
        q, s = (pack_int8_vnni if bits == 8 else pack_int4_vnni)(w, block)
        inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")]
        node = helper.make_node(op, ["x", "q", "s"], ["y"], domain=ortops.DOMAIN, K=k, N=n, block_size=block,
                                swiglu=swiglu)
    return one_node_session(node, {"x": TensorProto.FLOAT}, ["y"], inits)


@pytest.mark.parametrize("op", ["MatMulInt8Block", "MatMulInt4Block", "MatMulF32Panels"])
def test_swiglu_epilogue(isa, op):
    """swiglu=1: the N columns are (gate, up) pairs of 16; Y = silu(gate) * up of the plain products."""
    rng = np.random.default_rng(16)
    w = (rng.standard_normal((96, 96)) * 0.2).astype(np.float32)
    fused, plain = swiglu_session(op, w, 1), swiglu_session(op, w, 0)
    for shape in [(1, 96), (3, 96), (9, 96), (2, 5, 96)]:
        x = rng.standard_normal(shape).astype(np.float32)
        z = run(plain, x).astype(np.float64).reshape(*shape[:-1], 3, 2, 16)
        gate, up = z[..., 0, :], z[..., 1, :]
        ref = (gate / (1 + np.exp(-gate)) * up).reshape(*shape[:-1], 48)
        y = run(fused, x)
        assert y.shape == (*shape[:-1], 48)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(Exception, match=f"{op}: swiglu=1 needs N .* a multiple of 32, got N=48"):
        swiglu_session(op, w[:, :48].copy(), 1)
