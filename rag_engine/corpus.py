"""CorpusMatrix: corpus vectors in a storage dtype, plus per-row scales for int8."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

STORAGE_DTYPES = ("fp32", "bf16", "fp16", "int8")
_NUMPY_STORAGE = {"fp32": np.float32, "bf16": np.uint16, "fp16": np.float16, "int8": np.int8}


def as_numpy(x: Any, name: str, op: str) -> np.ndarray:
    """Zero-copy numpy view of a numpy array or a CPU torch tensor.

    torch bfloat16 becomes an ml_dtypes.bfloat16 view of the same bits. A CUDA tensor is
    refused here: the CPU backends cannot read it.
    """
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        if x.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on device {x.device}, the CPU backend needs a CPU tensor")
        t = x.detach()
        import torch

        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if hasattr(x, "__array_interface__") or hasattr(x, "__array__") or hasattr(x, "__dlpack__"):
        return np.asarray(x)
    raise TypeError(f"{op}: {name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{what} contains NaN/Inf (first at row {row}); non-finite values are refused")


@dataclass(frozen=True)
class CorpusMatrix:
    """Corpus vectors `[N, D]` in a storage dtype.

    data:   fp32 -> float32, bf16 -> uint16 (bfloat16 bits), fp16 -> float16, int8 -> int8
    scales: `[N]` float32 per-row scale for int8 (row value = data * scale), else None.
    Queries against any storage dtype stay float32; rows are widened exactly.
    """

    data: np.ndarray
    dtype: str = "fp32"
    scales: np.ndarray | None = None

    def __post_init__(self) -> None:
        op = "CorpusMatrix"
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{op}: dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        want = _NUMPY_STORAGE[self.dtype]
        if not isinstance(self.data, np.ndarray) or self.data.dtype != want:
            got = getattr(self.data, "dtype", type(self.data).__name__)
            raise TypeError(f"{op}: {self.dtype} storage needs a numpy {np.dtype(want).name} array, got {got}")
        if self.data.ndim != 2:
            raise ValueError(f"{op}: data must be 2-D [N, D], got shape {self.data.shape}")
        if self.dtype == "int8":
            s = self.scales
            if s is None or not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.shape != (self.n,):
                got = None if s is None else (getattr(s, "dtype", None), getattr(s, "shape", None))
                raise ValueError(f"{op}: int8 storage needs float32 scales of shape ({self.n},), got {got}")
        elif self.scales is not None:
            raise ValueError(f"{op}: scales are only used with int8 storage, not {self.dtype}")

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (0 if self.scales is None else self.scales.nbytes))

    @classmethod
    def wrap(cls, x: Any, op: str = "CorpusMatrix.wrap") -> CorpusMatrix:
        """A CorpusMatrix over an existing array without copying (dtype taken from the array)."""
        if isinstance(x, CorpusMatrix):
            return x
        arr = as_numpy(x, "corpus", op)
        if arr.dtype == ml_dtypes.bfloat16:
            return cls(arr.view(np.uint16), "bf16")
        kinds = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}
        if arr.dtype not in kinds:
            raise TypeError(
                f"{op}: corpus must be float32, float16 or bfloat16 (or a CorpusMatrix for int8), "
                f"got {arr.dtype}"
            )
        return cls(arr, kinds[arr.dtype])

    @classmethod
    def from_float(cls, x: Any, dtype: str = "fp32") -> CorpusMatrix:
        """Quantise float vectors `[N, D]` to a storage dtype.

        bf16/fp16 round to nearest even; int8 is symmetric per row
        (scale = max|row| / 127, an all-zero row gets scale 1).
        """
        op = "CorpusMatrix.from_float"
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"{op}: dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
        arr = np.asarray(as_numpy(x, "x", op))
        if arr.ndim != 2:
            raise ValueError(f"{op}: x must be 2-D [N, D], got shape {arr.shape}")
        if arr.dtype.kind != "f" and arr.dtype != ml_dtypes.bfloat16:
            raise TypeError(f"{op}: x must be a float array, got {arr.dtype}")
        _check_finite(arr.astype(np.float32, copy=False), f"{op}: x")
        if dtype == "fp32":
            return cls(np.ascontiguousarray(arr, dtype=np.float32), "fp32")
        if dtype == "fp16":
            with np.errstate(over="ignore"):
                half = np.ascontiguousarray(arr, dtype=np.float16)
            _check_finite(half, f"{op}: x overflows fp16 (|x| > 65504):")
            return cls(half, "fp16")
        if dtype == "bf16":
            bf = np.ascontiguousarray(arr.astype(ml_dtypes.bfloat16))
            _check_finite(bf.astype(np.float32), f"{op}: x overflows bf16:")
            return cls(bf.view(np.uint16), "bf16")
        f = arr.astype(np.float32, copy=False)
        amax = np.abs(f).max(axis=1) if f.shape[1] else np.zeros(f.shape[0], np.float32)
        scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(f / scales[:, None]), -127, 127).astype(np.int8)
        return cls(np.ascontiguousarray(q), "int8", scales)

    def to_float(self, dtype: Any = np.float32) -> np.ndarray:
        """Dequantised copy `[N, D]` (the exact values the kernels multiply)."""
        if self.dtype == "bf16":
            out = self.data.view(ml_dtypes.bfloat16).astype(dtype)
        else:
            out = self.data.astype(dtype)
        if self.scales is not None:
            out *= self.scales[:, None].astype(dtype)
        return out
