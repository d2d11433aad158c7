"""rag_token_marg / rag_token_sample against the float64 reference on every ISA
path: the marginal's error must stay within 2x torch-float32's error plus a
floor of a few fp32 ulps; sampling must pick the reference sampler's tokens."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from rag_engine import _ext, ops, reference
from rag_engine.errors import BackendUnavailableError
from rag_engine.generator.sampling import Sampler, SamplingParams

ISAS = _ext.supported_isas()
BS = [1, 3, 32]
KS = [1, 2, 5, 16, 100]
VS = [7, 1000, 32000, 49152, 50257]
TEMPS = [1.0, 0.7, 2.0]
EPS32 = float(np.finfo(np.float32).eps)
MAX_ELEMS = 6_000_000  # keeps the float64 reference cheap: the largest cases use a smaller B


def make_inputs(b: int, k: int, v: int, seed: int = 0, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    log_alpha = np.log(rng.dirichlet(np.ones(k), b)).astype(np.float32)
    logits = (rng.standard_normal((b, k, v), dtype=np.float32) * np.float32(scale))
    logits[:, :, ::97] -= 20.0  # a long low tail, as real vocabularies have
    if v > 1:
        logits[0, :, v // 2] = -np.inf  # a banned token in every document
        logits[-1, 0, 1] = -np.inf  # banned in one document only
    if k > 1:
        log_alpha[-1, -1] = -np.inf  # a document with weight 0
    return log_alpha, logits


def check_marg(out, log_alpha, logits, temperature):
    ref = reference.rag_token_marg(log_alpha, logits, temperature)
    tv = reference.rag_token_marg_torch(torch.from_numpy(log_alpha), torch.from_numpy(logits), temperature)
    assert out.dtype == np.float32 and out.shape == ref.shape
    finite = np.isfinite(ref)
    assert (np.isfinite(out) == finite).all() and (out[~finite] == ref[~finite]).all()
    err = np.abs(out[finite] - ref[finite]).max(initial=0.0)
    err_torch = np.abs(tv.numpy()[finite] - ref[finite]).max(initial=0.0)
    floor = 8 * EPS32 * float(np.abs(ref[finite]).max(initial=1.0))
    assert err <= 2 * err_torch + floor, f"error {err:.3g} > 2 x torch {err_torch:.3g} + {floor:.3g}"


def case_params():
    """Every K x V pair with B cycling (capped by MAX_ELEMS), threads and temperature cycling."""
    out = []
    for i, (k, v) in enumerate((k, v) for k in KS for v in VS):
        b = next(b for b in (BS[i % 3], 3, 1) if b * k * v <= MAX_ELEMS)
        marks = [pytest.mark.slow] if b * k * v > 2_000_000 else []
        out.append(pytest.param(b, k, v, 1 + i % 2, TEMPS[i % 3], marks=marks))
    return out


@functools.lru_cache(maxsize=2)
def cached_inputs(b, k, v):
    return make_inputs(b, k, v, seed=b * 7 + k + v)


@pytest.mark.parametrize("b,k,v,threads,temperature", case_params())
def test_matches_reference(b, k, v, threads, temperature):
    log_alpha, logits = cached_inputs(b, k, v)
    first = None
    for isa in ISAS:
        out = ops.rag_token_marg(log_alpha, logits, temperature=temperature, threads=threads,
                                 backend="cpu", isa=isa)
        check_marg(out, log_alpha, logits, temperature)
        if isa == ISAS[-1]:
            first = out
    other = 3 - threads  # chunk partials merge in a fixed order: same bits on 1 or 2 threads
    np.testing.assert_array_equal(first, ops.rag_token_marg(log_alpha, logits, temperature=temperature,
                                                            threads=other, backend="cpu"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [30.0, 1e3, 1e4])
def test_extreme_logits(scale, isa):
    log_alpha, logits = make_inputs(3, 5, 1000, seed=1, scale=scale)
    log_alpha[1] = [-1e4, 0, -np.inf, -50, -3]
    out = ops.rag_token_marg(log_alpha, logits, backend="cpu", isa=isa)
    check_marg(out, log_alpha, logits, 1.0)
    assert np.isneginf(out[0, 500])  # banned everywhere


@pytest.mark.parametrize("isa", ISAS)
def test_chunk_max_far_above_its_head(isa):
    """Pass 1 shifts each chunk by its first vector's max and redoes the chunk with the
    true max when that lies more than 64 above it; heads of -inf take the max pass."""
    log_alpha, logits = make_inputs(2, 3, 9000, seed=3)
    logits[0, 0, :16] = -200.0
    logits[0, 0, 5000] = 150.0  # second chunk: its head is ordinary, this is 150 above it
    logits[0, 1, 100] = 90.0  # 90 above its chunk's head: redone
    logits[1, 2, :40] = -np.inf
    logits[1, 0, 4096:4112] = -np.inf  # a whole first vector of the second chunk
    out = ops.rag_token_marg(log_alpha, logits, backend="cpu", isa=isa, threads=2)
    check_marg(out, log_alpha, logits, 1.0)
    np.testing.assert_array_equal(out, ops.rag_token_marg(log_alpha, logits, backend="cpu", isa=isa, threads=1))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bad_input(backend):
    log_alpha, logits = make_inputs(2, 3, 50)
    call = functools.partial(ops.rag_token_marg, backend=backend)
    for value, where, t in ((np.nan, "b=1, k=2", 7), (np.inf, "b=1, k=2", 7), (np.nan, "b=0, k=1", 40),
                            (np.inf, "b=0, k=1", 40)):  # in the first vector of a chunk, and after it
        bad = logits.copy()
        bad[int(where[2]), int(where[7]), t] = value
        with pytest.raises(ValueError, match=rf"rag_token_marg: logits row \({where}\) contains NaN or \+Inf"):
            call(log_alpha, bad)
    bad = logits.copy()
    bad[0, 1] = -np.inf
    with pytest.raises(ValueError, match=r"logits row \(b=0, k=1\) .* no finite value"):
        call(log_alpha, bad)
    with pytest.raises(ValueError, match="rag_token_marg: temperature must be in"):
        call(log_alpha, logits, temperature=-1.0)
    with pytest.raises(ValueError, match="rag_token_marg: temperature must be in"):
        call(log_alpha, logits, temperature=0.0)
    with pytest.raises(TypeError, match="rag_token_marg: logits must be float32, got float64"):
        call(log_alpha, logits.astype(np.float64))
    with pytest.raises(ValueError, match=r"rag_token_marg: log_alpha must be \[B, K\] = \[2, 3\]"):
        call(log_alpha[:, :2].copy(), logits)
    with pytest.raises(ValueError, match=r"rag_token_marg: logits must be \[B, K, V\] with K > 0"):
        call(log_alpha[:, :0].copy(), logits[:, :0].copy())
    la = log_alpha.copy()
    la[1] = -np.inf
    with pytest.raises(ValueError, match="rag_token_marg: log_alpha must be finite or -inf with a finite entry"):
        call(la, logits)
    la[1, 0] = np.nan
    with pytest.raises(ValueError, match="rag_token_marg: log_alpha must be finite"):
        call(la, logits)
    la = log_alpha.copy()
    la[0, 2] = np.inf
    with pytest.raises(ValueError, match="rag_token_marg: log_alpha must be finite or -inf with a finite entry"):
        call(la, logits, threads=1)


def test_torch_backend_and_selection():
    log_alpha, logits = make_inputs(3, 5, 1000)
    check_marg(ops.rag_token_marg(torch.from_numpy(log_alpha), torch.from_numpy(logits), backend="torch"),
               log_alpha, logits, 1.0)
    with pytest.raises(BackendUnavailableError, match="rag_token_marg: backend='triton'"):
        ops.rag_token_marg(log_alpha, logits, backend="triton")
    assert ops.rag_token_marg(log_alpha[:0], logits[:0], backend="cpu").shape == (0, 1000)


# ---------------------------------------------------------------------------
# rag_token_sample
# ---------------------------------------------------------------------------

SETTINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=40),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=200, top_p=0.95, min_p=0.01),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("v", [7, 1000, 50257])
@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sample_matches_reference(params, v, isa):
    log_alpha, logits = make_inputs(8, 5, v, seed=v)
    marg = ops.rag_token_marg(log_alpha, logits, backend="cpu", isa=isa)
    for seed in range(3):
        tokens, logprobs = ops.rag_token_sample(log_alpha, logits, params, generator=np.random.default_rng(seed),
                                                threads=2, backend="cpu", isa=isa)
        u = np.random.default_rng(seed).random(8)
        want = reference.sample_log_probs(marg, u, params.temperature, params.top_k, params.top_p, params.min_p)
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_array_equal(logprobs, marg[np.arange(8), tokens])
    if params.temperature == 0.0 or params.top_k == 1 or params.top_p < 1e-3:
        np.testing.assert_array_equal(tokens, marg.argmax(1))


@pytest.mark.parametrize("params", SETTINGS[1:6], ids=str)
def test_sample_backends_agree_and_match_generator_sampler(params):
    """torch backend, cpu backend and the generator's own Sampler (K = 1) pick the same tokens."""
    log_alpha, logits = make_inputs(4, 3, 1000, seed=11)
    seeded = SamplingParams(**{**params.__dict__, "seed": 5})
    cpu = ops.rag_token_sample(log_alpha, logits, seeded, backend="cpu")
    ref = ops.rag_token_sample(log_alpha, logits, seeded, backend="torch")
    np.testing.assert_array_equal(cpu[0], ref[0])
    np.testing.assert_allclose(cpu[1], ref[1], atol=1e-5)
    one = logits[:1, :1].copy()
    tok, _ = ops.rag_token_sample(np.zeros((1, 1), np.float32), one, seeded, backend="cpu")
    sampler = Sampler([seeded], [[0]], one.shape[-1], [frozenset()])
    assert tok[0] == sampler.sample(reference.rag_token_marg(np.zeros((1, 1)), one).astype(np.float32))[0]


def test_sample_distribution():
    """Frequencies over many rows follow the marginal (within 5 sigma), and top_k truncates it."""
    rng = np.random.default_rng(0)
    b, v = 20000, 7
    log_alpha = np.log(np.tile([[0.3, 0.7]], (b, 1))).astype(np.float32)
    logits = np.tile(rng.standard_normal((1, 2, v), dtype=np.float32), (b, 1, 1))
    p = np.exp(reference.rag_token_marg(log_alpha[:1], logits[:1])[0])
    tokens, _ = ops.rag_token_sample(log_alpha, logits, SamplingParams(seed=1), backend="cpu")
    freq = np.bincount(tokens, minlength=v) / b
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / b) + 1e-12).all()
    tokens, _ = ops.rag_token_sample(log_alpha, logits, SamplingParams(seed=1, top_k=2), backend="cpu")
    assert set(np.unique(tokens)) <= set(np.argsort(-p)[:2].tolist())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sample_bad_params(backend):
    log_alpha, logits = make_inputs(2, 3, 50)

    class Params:
        temperature, top_k, top_p, min_p, seed = 1.0, 0, 1.0, 0.0, None

    for field, value in (("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
                         ("top_k", -2), ("temperature", float("nan"))):
        bad = Params()
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=f"rag_token_sample: {field} must be"):
            ops.rag_token_sample(log_alpha, logits, bad, backend=backend)
    nan = logits.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"rag_token_sample: logits row \(b=0, k=0\)"):
        ops.rag_token_sample(log_alpha, nan, backend=backend)
    for row in (np.array([0.0, np.nan, -1.0]), np.full(3, -np.inf)):
        la = log_alpha.copy()
        la[1] = row
        with pytest.raises(ValueError, match="rag_token_sample: log_alpha must be finite or -inf with a finite entry"):
            ops.rag_token_sample(la, logits, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sample_tiny_temperature_is_greedy(backend):
    log_alpha, logits = make_inputs(3, 4, 1000)

    class Params:
        top_k, top_p, min_p, seed = 0, 1.0, 0.0, 5

    greedy, tiny = Params(), Params()
    greedy.temperature, tiny.temperature = 0.0, 1e-30  # 1e-30: lp / T overflows float32
    want, _ = ops.rag_token_sample(log_alpha, logits, greedy, backend=backend)
    got, lp = ops.rag_token_sample(log_alpha, logits, tiny, backend=backend)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(lp).all()


@pytest.mark.parametrize("isa", ISAS)
def test_marg_precision_with_large_logits_and_far_apart_documents(isa):
    """The row offsets are kept apart from the row max, so logits near 1e4 (or a low
    temperature) do not cancel against a float32 offset of their size; a document whose
    weight is subnormal in the factored form is combined exactly where it matters."""
    base = np.array([[[0.3, -1.2, 0.7], [1.1, 0.2, -0.4]]], np.float32)
    la = np.log(np.array([[0.6, 0.4]], np.float32))
    for shift in (0.0, 1000.0, 10000.0):
        x = base + np.float32(shift)
        out = ops.rag_token_marg(la, x, backend="cpu", isa=isa, threads=1)
        ref = reference.rag_token_marg(la.astype(np.float64), x.astype(np.float64))
        assert np.abs(out - ref).max() < 1e-6, (shift, out, ref)  # 1.2e-4 at 1e4 before
    x = np.zeros((1, 2, 32), np.float32)
    x[0, 0, 20], x[0, 1, 20] = -200.0, 60.0
    la = np.array([[0.0, -47.4]], np.float32)
    out = ops.rag_token_marg(la, x, backend="cpu", isa=isa, threads=1)
    ref = reference.rag_token_marg(la.astype(np.float64), x.astype(np.float64))
    assert np.abs(out - ref).max() < 1e-5  # token 20 was off by 0.69


def test_sample_temperature_just_below_the_greedy_bound():
    log_alpha = np.zeros((1, 1), np.float32)
    logits = np.zeros((1, 1, 2), np.float32)  # a tie: greedy takes token 0, sampling u=0.9 takes 1

    class Params:
        temperature, top_k, top_p, min_p, seed = 9.9999999e-6, 0, 1.0, 0.0, None

    class Draw:
        def random(self, n):
            return np.full(n, 0.9)

    for backend in ("cpu", "torch"):
        tokens, _ = ops.rag_token_sample(log_alpha, logits, Params(), generator=Draw(), backend=backend)
        assert tokens.tolist() == [0], backend
