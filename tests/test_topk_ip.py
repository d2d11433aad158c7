"""topk_ip against the float64 reference: every ISA path, storage dtype and
awkward shape; tie-aware (equal scores may come back in either order)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_engine import CorpusMatrix, _ext, ops, reference
from rag_engine.errors import BackendUnavailableError

ISAS = _ext.supported_isas()
DTYPES = ["fp32", "bf16", "fp16", "int8"]
NS = [1, 7, 1000, 4097, 65537]
DS = [8, 96, 100, 384, 768, 769]
KS = [1, 10, 100, 10**6]  # the last is K > N
QS = [1, 3, 8, 33]
EPS32 = float(np.finfo(np.float32).eps) / 2


@functools.lru_cache(maxsize=8)
def corpus_f32(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n * 1000 + d).standard_normal((n, d), dtype=np.float32)


@functools.lru_cache(maxsize=16)
def corpus_matrix(n: int, d: int, dtype: str) -> CorpusMatrix:
    return CorpusMatrix.from_float(corpus_f32(n, d), dtype)


def queries(q: int, d: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((q, d), dtype=np.float32)


def check_topk(scores, ids, q, corpus: CorpusMatrix, k, allow=None):
    """Tie-aware check against exact float64 scores with a rigorous fp32 bound.

    Every returned id must carry its own true score (within the fp32 dot-product
    error bound gamma_D * sum|q_i c_i|), scores must be sorted with equal scores
    ordered by id, and the sorted score list must match the exact top-k.
    """
    c64 = corpus.to_float(np.float64)
    n, d = c64.shape
    kk = min(k, n)
    assert scores.shape == ids.shape == (q.shape[0], kk)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    ref_s, ref_i = reference.topk_ip(q, corpus, k, allow=allow)
    gamma = d * EPS32 / (1 - d * EPS32)
    for row in range(q.shape[0]):
        valid = ids[row] >= 0
        assert (ids[row][~valid] == -1).all() and np.isneginf(scores[row][~valid]).all()
        assert (valid == (ref_i[row] >= 0)).all(), "filled-slot count differs from the reference"
        got_i, got_s = ids[row][valid], scores[row][valid].astype(np.float64)
        assert len(set(got_i.tolist())) == len(got_i), "duplicate ids"
        assert ((got_i >= 0) & (got_i < n)).all()
        if allow is not None:
            assert allow[got_i].all(), "returned an id outside the filter"
        true = c64[got_i] @ q[row].astype(np.float64)
        bound = gamma * (np.abs(c64[got_i]) @ np.abs(q[row].astype(np.float64)))
        bound += 2 * EPS32 * np.abs(true) + 1e-30  # int8 scale multiply and final rounding
        np.testing.assert_array_less(np.abs(got_s - true), bound + 1e-12)
        assert (np.diff(got_s) <= 0).all(), "scores not sorted descending"
        ties = got_s[:-1] == got_s[1:]
        assert (got_i[:-1][ties] < got_i[1:][ties]).all(), "equal scores not ordered by id"
        np.testing.assert_allclose(got_s, ref_s[row][valid], rtol=0, atol=2 * bound.max() + 1e-12)


def case_params():
    """Every N x D pair, cycling K, Q and threads so each value meets every N and D."""
    out = []
    for a, n in enumerate(NS):
        for b, d in enumerate(DS):
            i = a * len(DS) + b
            out.append((n, d, KS[i % len(KS)], QS[(i // len(KS) + b) % len(QS)], 1 + i % 2))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,k,nq,threads", case_params())
def test_matches_reference(isa, dtype, n, d, k, nq, threads):
    c = corpus_matrix(n, d, dtype)
    q = queries(nq, d)
    s, i = ops.topk_ip(q, c, k, threads=threads, isa=isa)
    check_topk(s, i, q, c, k)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nq", QS)
@pytest.mark.parametrize("k", [1, 10, 100])
def test_every_q_and_k(isa, nq, k):
    c = corpus_matrix(4097, 100, "fp32")
    q = queries(nq, 100, seed=nq)
    check_topk(*ops.topk_ip(q, c, k, isa=isa), q, c, k)


@pytest.mark.parametrize("isa", ISAS)
def test_ties_broken_by_lower_id(isa):
    # Duplicate rows everywhere: equal scores across tiles and threads.
    base = np.random.default_rng(3).standard_normal((50, 16), dtype=np.float32)
    c = np.ascontiguousarray(np.tile(base, (200, 1)))  # row j == row j % 50
    q = queries(4, 16)
    for threads in (1, 2):
        s, i = ops.topk_ip(q, c, 25, threads=threads, isa=isa)
        ref_s, ref_i = reference.topk_ip(q, c, 25)
        np.testing.assert_array_equal(i, ref_i)  # ties fully determined by the id rule


def test_all_equal_scores():
    c = np.ones((3000, 8), np.float32)
    s, i = ops.topk_ip(np.ones((2, 8), np.float32), c, 7, threads=2)
    np.testing.assert_array_equal(i, np.tile(np.arange(7), (2, 1)))
    np.testing.assert_array_equal(s, np.full((2, 7), 8.0, np.float32))


def test_threads_do_not_change_results():
    c = corpus_matrix(65537, 96, "bf16")
    q = queries(5, 96)
    s1, i1 = ops.topk_ip(q, c, 50, threads=1)
    s2, i2 = ops.topk_ip(q, c, 50, threads=2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("dtype,min_recall", [("bf16", 0.99), ("fp16", 0.99), ("int8", 0.99)])
def test_quantised_recall(dtype, min_recall):
    n, d = 65537, 384
    q = queries(33, d, seed=7)
    exact = reference.topk_ip(q, corpus_f32(n, d), 10)[1]
    got = ops.topk_ip(q, corpus_matrix(n, d, dtype), 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall >= min_recall, f"{dtype} recall@10 {recall:.3f}"


@pytest.mark.parametrize("form", ["bool", "bitmap", "ids"])
def test_ids_filter(form):
    n, d = 4097, 96
    c = corpus_matrix(n, d, "fp32")
    q = queries(3, d)
    allow = np.random.default_rng(5).random(n) < 0.01  # ~40 rows: fewer than k=100
    f = {"bool": allow, "bitmap": np.packbits(allow, bitorder="little"),
         "ids": np.flatnonzero(allow)[::-1].copy()}[form]
    for isa in ISAS:
        s, i = ops.topk_ip(q, c, 100, ids_filter=f, isa=isa)
        check_topk(s, i, q, c, 100, allow=allow)
        assert (i[:, allow.sum():] == -1).all()


def test_merge_topk_equals_unsharded():
    n, d = 10000, 64
    c = corpus_f32(n, d)
    q = queries(6, d)
    cuts = [0, 1234, 5000, 5001, n]
    parts = [ops.topk_ip(q, np.ascontiguousarray(c[a:b]), 20) for a, b in zip(cuts, cuts[1:])]
    s, i = ops.merge_topk(parts, 20, offsets=cuts[:-1])
    fs, fi = ops.topk_ip(q, c, 20)
    np.testing.assert_array_equal(i, fi)
    np.testing.assert_array_equal(s, fs)


def test_torch_tensors_zero_copy():
    torch = pytest.importorskip("torch")
    c = corpus_f32(1000, 96)
    q = queries(3, 96)
    s, i = ops.topk_ip(torch.from_numpy(q), torch.from_numpy(c), 10)
    np.testing.assert_array_equal(i, ops.topk_ip(q, c, 10)[1])
    cb = torch.from_numpy(c).to(torch.bfloat16)
    s2, i2 = ops.topk_ip(torch.from_numpy(q), cb, 10)
    check_topk(s2, i2, q, CorpusMatrix.wrap(cb), 10)


def test_one_dimensional_query():
    c = corpus_f32(1000, 96)
    q = queries(1, 96)[0]
    s, i = ops.topk_ip(q, c, 5)
    assert s.shape == (5,) and i.shape == (5,)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backends_agree(backend, monkeypatch):
    c = corpus_matrix(4097, 100, "int8")
    q = queries(3, 100)
    check_topk(*ops.topk_ip(q, c, 10, backend=backend), q, c, 10)
    monkeypatch.setenv("RAG_ENGINE_BACKEND", backend)
    check_topk(*ops.topk_ip(q, c, 10), q, c, 10)


def test_unavailable_backend_raises(monkeypatch):
    c, q = corpus_f32(7, 8), queries(1, 8)
    with pytest.raises(BackendUnavailableError, match="topk_ip"):
        ops.topk_ip(q, c, 1, backend="cuda")
    with pytest.raises(ValueError, match="not a backend"):
        ops.topk_ip(q, c, 1, backend="gpu")
    monkeypatch.setenv("RAG_ENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="RAG_ENGINE_BACKEND"):
        ops.topk_ip(q, c, 1)


def test_unknown_isa_raises():
    with pytest.raises(ValueError, match="topk_ip: unknown ISA path"):
        ops.topk_ip(queries(1, 8), corpus_f32(7, 8), 1, isa="sse9")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda q, c: (np.ascontiguousarray(q[:, :7]), c, 1), ValueError, "queries have D=7 but the corpus has D=8"),
        (lambda q, c: (q, c, 0), ValueError, "k must be > 0, got 0"),
        (lambda q, c: (q, c, -3), ValueError, "k must be > 0"),
        (lambda q, c: (q, c, 2.5), TypeError, "k must be an int"),
        (lambda q, c: (q.astype(np.float64), c, 1), TypeError, "queries must be float32, got float64"),
        (lambda q, c: (q, c.astype(np.float64), 1), TypeError, "corpus must be float32"),
        (lambda q, c: (q, c.astype(np.int32), 1), TypeError, "corpus must be float32"),
        (lambda q, c: (np.asfortranarray(np.tile(q, (3, 1))), c, 1), ValueError, "C-contiguous"),
        (lambda q, c: (q, c[:, ::2], 1), ValueError, "C-contiguous"),
        (lambda q, c: (q, c[:0], 1), ValueError, "corpus is empty"),
        (lambda q, c: (q[None], c, 1), ValueError, "queries must be 2-D"),
        (lambda q, c: ("abc", c, 1), TypeError, "queries must be a numpy array"),
    ],
)
def test_bad_input(make, exc, match):
    q = queries(2, 8)
    c = corpus_f32(7, 8)
    args = make(q, c)
    with pytest.raises(exc, match=match) as info:
        ops.topk_ip(*args)
    assert str(info.value).startswith("topk_ip") or "CorpusMatrix" in str(info.value)


def test_nan_and_inf_policy():
    c = corpus_f32(1000, 8).copy()
    q = queries(2, 8)
    bad_q = q.copy()
    bad_q[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"topk_ip: queries contains NaN/Inf \(first at row 1\)"):
        ops.topk_ip(bad_q, c, 3)
    bad_q[1, 3] = np.inf
    with pytest.raises(ValueError, match="queries contains NaN/Inf"):
        ops.topk_ip(bad_q, c, 3)
    for isa in ISAS:
        for val in (np.nan, np.inf):
            c2 = c.copy()
            c2[517, 2] = val
            with pytest.raises(ValueError, match="topk_ip: corpus row 517 gives a non-finite score"):
                ops.topk_ip(q, c2, 3, isa=isa)
    with pytest.raises(ValueError, match="CorpusMatrix.from_float: x contains NaN/Inf"):
        CorpusMatrix.from_float(c2, "bf16")


def test_bad_filter_and_threads():
    c, q = corpus_f32(1000, 8), queries(1, 8)
    with pytest.raises(ValueError, match="ids_filter ids must lie in"):
        ops.topk_ip(q, c, 3, ids_filter=np.array([5, 1000]))
    with pytest.raises(ValueError, match="bool ids_filter must have N=1000"):
        ops.topk_ip(q, c, 3, ids_filter=np.ones(999, bool))
    with pytest.raises(ValueError, match="packed bitmap of ceil"):
        ops.topk_ip(q, c, 3, ids_filter=np.ones(10, np.uint8))
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ops.topk_ip(q, c, 3, threads=0)


def test_corpus_matrix_validation():
    with pytest.raises(ValueError, match="int8 storage needs float32 scales"):
        CorpusMatrix(np.zeros((3, 4), np.int8), "int8")
    with pytest.raises(TypeError, match="bf16 storage needs a numpy uint16"):
        CorpusMatrix(np.zeros((3, 4), np.float32), "bf16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        CorpusMatrix.from_float(np.zeros((3, 4), np.float32), "int4")


# --------------------------------------------------------------------------- property test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3000),
    d=st.integers(1, 200),
    nq=st.integers(1, 12),
    k=st.integers(1, 120),
    dtype=st.sampled_from(DTYPES),
    isa=st.sampled_from(ISAS),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
    quantised_values=st.booleans(),
)
def test_property_random_shapes(n, d, nq, k, dtype, isa, threads, seed, quantised_values):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    if quantised_values:  # few distinct values: many exact ties
        x = np.round(x).astype(np.float32)
    c = CorpusMatrix.from_float(x, dtype)
    q = rng.standard_normal((nq, d), dtype=np.float32)
    if quantised_values:
        q = np.round(q).astype(np.float32)
    check_topk(*ops.topk_ip(q, c, k, threads=threads, isa=isa), q, c, k)


def test_dispatch_sees_environment_changes_at_run_time(monkeypatch):
    """The backend/threads variables are read on every call (a cheap reader, no caching of values)."""
    import os

    c, q = corpus_matrix(64, 16, "fp32"), queries(2, 16)
    monkeypatch.setenv("RAG_ENGINE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="RAG_ENGINE_BACKEND='cuda'"):
        ops.topk_ip(q, c, 3)
    os.environ["RAG_ENGINE_BACKEND"] = "torch"  # a direct assignment is seen too
    check_topk(*ops.topk_ip(q, c, 3), q, c, 3)
    monkeypatch.delenv("RAG_ENGINE_BACKEND")
    assert ops.resolve_backend("topk_ip", None, ("cpu", "torch"), False) == "cpu"
    monkeypatch.setenv("RAG_ENGINE_NUM_THREADS", "3")
    assert ops.resolve_threads("topk_ip", None) == 3
    monkeypatch.setenv("RAG_ENGINE_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="RAG_ENGINE_NUM_THREADS must be an integer"):
        ops.topk_ip(q, c, 3)
    monkeypatch.delenv("RAG_ENGINE_NUM_THREADS")
    assert ops.resolve_threads("topk_ip", None) == 0 and ops.resolve_threads("topk_ip", 2) == 2
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        ops.resolve_threads("topk_ip", 0)


def test_dispatch_auto_preference_only_when_nothing_was_asked(monkeypatch):
    """An op's own preference (topk_ip: many CUDA queries -> triton) applies to the
    default choice only: an explicit backend= or RAG_ENGINE_BACKEND wins."""
    seen = []

    def prefer_torch(name):
        seen.append(name)
        return "torch"

    monkeypatch.delenv("RAG_ENGINE_BACKEND", raising=False)
    assert ops.resolve_backend("topk_ip", None, ("cpu", "torch"), False, auto=prefer_torch) == "torch"
    assert seen == ["cpu"]  # it is handed the default
    assert ops.resolve_backend("topk_ip", "cpu", ("cpu", "torch"), False, auto=prefer_torch) == "cpu"
    monkeypatch.setenv("RAG_ENGINE_BACKEND", "cpu")
    assert ops.resolve_backend("topk_ip", None, ("cpu", "torch"), False, auto=prefer_torch) == "cpu"
    assert seen == ["cpu"]


def test_fewer_openmp_threads_than_asked():
    """With OMP_THREAD_LIMIT=1 a region asked for 2 threads runs on 1: every CPU op must
    still cover all rows (and topk_ip's merge must not read heaps of threads that never ran)."""
    import subprocess
    import sys

    child = """
import numpy as np
from rag_engine import ops, reference
rng = np.random.default_rng(0)
q = rng.standard_normal((3, 64), dtype=np.float32)
c = rng.standard_normal((5000, 64), dtype=np.float32)
s, i = ops.topk_ip(q, c, 7, threads=2)
rs, ri = reference.topk_ip(q, c, 7)
assert np.array_equal(i, ri), (i, ri)
h = rng.standard_normal((4, 64), dtype=np.float32)
d = rng.standard_normal((4, 16, 64), dtype=np.float32)
a, hh = ops.fusion_softmax(h, d, threads=2)
ra, rh, _ = reference.fusion_softmax(h.astype(np.float64), d.astype(np.float64))
assert np.abs(a - ra).max() < 1e-5 and np.abs(hh - rh).max() < 1e-5
la = np.log(np.full((4, 3), 1 / 3, np.float32))
lg = rng.standard_normal((4, 3, 70000), dtype=np.float32)
out = ops.rag_token_marg(la, lg, threads=2)
ref = reference.rag_token_marg(la.astype(np.float64), lg.astype(np.float64))
assert np.abs(out - ref).max() < 1e-4
print("ok")
"""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    res = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_torch_backend_matches_the_kernel_on_int8_ties_and_refuses_overflow():
    rng = np.random.default_rng(3)
    c = rng.integers(-3, 4, (243, 55)).astype(np.float32)  # many exactly tied scores
    q = rng.integers(-2, 3, (1, 55)).astype(np.float32)
    cm = CorpusMatrix.from_float(c, "int8")
    ref = reference.topk_ip(q, cm, 243)[1]
    assert np.array_equal(ops.topk_ip(q, cm, 243, backend="torch")[1], ref)  # rows were scaled first
    assert np.array_equal(ops.topk_ip(q, cm, 243, backend="cpu")[1], ref)
    big = np.ones((3, 4), np.float32)
    big[1] = 1e30
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match="topk_ip: corpus row 1 gives a non-finite score"):
            ops.topk_ip(np.full((1, 4), 1e30, np.float32), big, 2, backend=backend)
    with pytest.raises(ValueError, match="overflows fp16"):
        CorpusMatrix.from_float(np.array([[1e5, 1.0]]), "fp16")  # stored inf before


def test_merge_topk_orders_by_the_exact_scores():
    s, i = ops.merge_topk([(np.array([[1.0]]), np.array([[2]])), (np.array([[1.0000000001]]), np.array([[5]]))], 2)
    assert i.tolist() == [[5, 2]] and s.dtype == np.float32  # float32 first made them a tie
