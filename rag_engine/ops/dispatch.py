"""Backend choice, thread count and input checks shared by every op."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from rag_engine import _ext
from rag_engine.corpus import as_numpy
from rag_engine.errors import BackendUnavailableError

BACKENDS = ("cuda", "triton", "cpu", "torch")
BACKEND_ENV = "RAG_ENGINE_BACKEND"
THREADS_ENV = "RAG_ENGINE_NUM_THREADS"

_AVAILABLE: dict[str, Callable[[], bool]] = {
    "cuda": lambda: _ext.cuda_ext() is not None and _ext.has_cuda_device(),
    "triton": _ext.has_triton,
    "cpu": lambda: _ext.cpu_ext() is not None,
    "torch": lambda: _ext.torch_module() is not None,
}


def is_cuda(x: Any) -> bool:
    """True for a torch CUDA tensor (or anything exposing __cuda_array_interface__)."""
    if type(x) is np.ndarray:
        return False
    dev = getattr(x, "device", None)
    if dev is not None and getattr(dev, "type", None) == "cuda":
        return True
    return hasattr(x, "__cuda_array_interface__")


def _env_reader(name: str) -> Callable[[], str | None]:
    """A reader of one environment variable that sees os.environ changes made at
    run time (monkeypatch.setenv, os.environ[...] = ...) at a fraction of the
    cost of os.environ.get, which re-encodes the key on every call: this runs on
    every op call, where a few hundred nanoseconds are a visible share."""
    data = getattr(os.environ, "_data", None)
    encodekey, decodevalue = getattr(os.environ, "encodekey", None), getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: os.environ.get(name)
    key = encodekey(name)

    def read() -> str | None:
        v = data.get(key)
        return None if v is None else decodevalue(v)

    return read


backend_env = _env_reader(BACKEND_ENV)
_threads_env = _env_reader(THREADS_ENV)
# The default backend per (implemented backends, CUDA inputs): availability is
# fixed for the life of the process (extension import, torch import, device).
_DEFAULT_BACKEND: dict[tuple[tuple[str, ...], bool], str] = {}


def resolve_backend(op: str, backend: str | None, implemented: Sequence[str], on_cuda: bool,
                    auto: Callable[[str], str] | None = None) -> str:
    """Name of the backend that runs `op` (see the package docstring for the rule).

    auto: an op's own preference, applied only when nothing was asked for: it gets
    the default backend's name and returns the one to use (an available one).
    """
    requested = backend if backend is not None else (backend_env() or None)
    if requested is None:
        key = (tuple(implemented), on_cuda)
        name = _DEFAULT_BACKEND.get(key)
        if name is None:
            order = ("cuda", "triton", "torch") if on_cuda else ("cpu", "torch")
            name = next((b for b in order if b in implemented and _AVAILABLE[b]()), None)
            if name is None:
                raise BackendUnavailableError(
                    f"{op}: no backend available for {'CUDA' if on_cuda else 'CPU'} inputs")
            _DEFAULT_BACKEND[key] = name
        return name if auto is None else auto(name)
    source = "backend=" if backend is not None else f"{BACKEND_ENV}="
    if requested not in BACKENDS:
        raise ValueError(f"{op}: {source}{requested!r} is not a backend; expected one of {BACKENDS}")
    if requested not in implemented:
        raise BackendUnavailableError(
            f"{op}: {source}{requested!r} does not implement this op (implemented: {tuple(implemented)})"
        )
    if not _AVAILABLE[requested]():
        raise BackendUnavailableError(f"{op}: {source}{requested!r} is not available on this machine")
    if on_cuda != (requested in ("cuda", "triton")) and requested != "torch":
        where = "CUDA" if on_cuda else "CPU"
        raise ValueError(f"{op}: {source}{requested!r} cannot take {where} inputs")
    return requested


def backend_available(name: str) -> bool:
    return _AVAILABLE[name]()


def available_backends(op_impls: Sequence[str] = BACKENDS) -> list[str]:
    return [b for b in op_impls if _AVAILABLE[b]()]


def resolve_threads(op: str, threads: int | None) -> int:
    """0 means the OpenMP default (OMP_NUM_THREADS, else all cores)."""
    if type(threads) is int and threads >= 1:  # the common case, checked cheaply
        return threads
    if threads is None:
        env = _threads_env()
        if not env:
            return 0
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"{op}: {THREADS_ENV} must be an integer, got {env!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"{op}: threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def check_k(op: str, k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"{op}: k must be > 0, got {k}")
    return int(k)


def float32_matrix(op: str, name: str, x: Any, allow_1d: bool = False) -> np.ndarray:
    """Zero-copy float32, C-contiguous, finite `[rows, D]` view (a 1-D vector is one row)."""
    a = as_numpy(x, name, op)
    if a.dtype != np.float32:
        raise TypeError(f"{op}: {name} must be float32, got {a.dtype}")
    if a.ndim == 1 and allow_1d:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{op}: {name} must be 2-D [rows, D], got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (got strides {a.strides}); "
                         "pass np.ascontiguousarray(x) / x.contiguous()")
    if not np.isfinite(a).all():
        row = int(np.argwhere(~np.isfinite(a))[0][0])
        raise ValueError(f"{op}: {name} contains NaN/Inf (first at row {row})")
    return a


def checked_array(op: str, name: str, x: Any, ndim: int, dtypes: tuple = (np.float32,)) -> np.ndarray:
    """Zero-copy C-contiguous view of rank `ndim` in one of `dtypes`.

    No finiteness scan here (it would cost more than the kernel): the kernels
    detect non-finite values where they matter and raise naming the position.
    bfloat16 (ml_dtypes or torch) comes back as its uint16 bits.
    """
    a = x if type(x) is np.ndarray else as_numpy(x, name, op)
    kind = a.dtype.type  # identity tests on the scalar type: the cheap check on this hot path
    if kind is ml_dtypes.bfloat16:
        a, kind = a.view(np.uint16), np.uint16
    if kind not in dtypes:
        want = " or ".join("bfloat16 (uint16 bits)" if t == np.uint16 else np.dtype(t).name for t in dtypes)
        raise TypeError(f"{op}: {name} must be {want}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (got strides {a.strides}); "
                         "pass np.ascontiguousarray(x) / x.contiguous()")
    return a


def checked_number(op: str, name: str, x: Any, low: float, high: float, low_open: bool = False) -> float:
    # Plain float/int first (math.isfinite: np.isfinite on a Python scalar costs ~1 us per call).
    real = type(x) is float or type(x) is int or (not isinstance(x, bool) and isinstance(x, numbers.Real))
    if not real or not math.isfinite(x) or x < low or x > high or (low_open and x == low):
        raise ValueError(f"{op}: {name} must be in {'(' if low_open else '['}{low}, {high}], got {x!r}")
    return float(x)
