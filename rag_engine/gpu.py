"""Device-side half of the ops: the `cuda`, `triton` and `torch` backends for CUDA tensors.

rag_engine.ops routes here when its inputs are on a GPU. Inputs are torch
tensors, or anything torch takes without copying (CuPy arrays through
__cuda_array_interface__, DLPack capsules); outputs are torch tensors on the
inputs' device. Every check happens here, before a kernel sees a pointer:
device (a CPU tensor for the cuda backend, mixed devices), dtype, shape,
contiguity, non-finite inputs. Errors found inside a kernel (a non-finite
score, a logits row with no finite value) come back through a one-element
`bad` buffer, read after the launch (one small device-to-host copy).
The `triton` and `torch` backends also take CPU tensors when
TRITON_INTERPRET=1 (how CI tests the Triton kernels without a GPU).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from rag_engine import _ext
from rag_engine.corpus import CorpusMatrix
from rag_engine.errors import BackendUnavailableError

DEVICE_BACKENDS = ("cuda", "triton")
_STORAGE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
EMPTY_KEY = -(2**63)


def require_torch():
    torch = _ext.torch_module()
    if torch is None:
        raise BackendUnavailableError("GPU ops need torch (pip install torch with CUDA)")
    return torch


def as_tensor(op: str, name: str, x: Any):
    """Zero-copy torch view of a torch tensor, a CUDA array (CuPy) or a DLPack capsule."""
    torch = require_torch()
    if isinstance(x, torch.Tensor):
        return x.detach()
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x)  # a view on the array's own device (check_devices refuses a mismatch)
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{op}: {name} must be a torch tensor or a CUDA array, got {type(x).__name__}")


def _interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter (fixed when they were imported)."""
    kernels = sys.modules.get("rag_engine.kernels")
    if kernels is not None:
        return bool(kernels.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_devices(op: str, backend: str, **tensors) -> Any:
    """All given tensors (None skipped) on one device that `backend` can read; returns it."""
    named = {k: t for k, t in tensors.items() if t is not None}
    devices = {str(t.device) for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in named.items())
        raise ValueError(f"{op}: inputs must share one device, got {where}")
    name, t = next(iter(named.items()))
    if t.device.type != "cuda" and (backend == "cuda" or (backend == "triton" and not _interpreting())):
        raise ValueError(f"{op}: backend {backend!r} needs CUDA tensors, got {name} on {t.device}")
    return t.device


def check_tensor(op: str, name: str, t: Any, ndim: int, dtypes: tuple[str, ...]) -> None:
    got = str(t.dtype).removeprefix("torch.")
    if got not in dtypes:
        raise TypeError(f"{op}: {name} must be {' or '.join(dtypes)}, got {got}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()}); pass x.contiguous()")


def check_finite(op: str, name: str, t: Any) -> None:
    torch = require_torch()
    if t.numel() and not bool(torch.isfinite(t).all()):
        row = int(torch.nonzero(~torch.isfinite(t))[0][0])
        raise ValueError(f"{op}: {name} contains NaN/Inf (first at row {row})")


def stream_handle(device: Any) -> int:
    """Integer handle of torch's current stream on `device` (what the CUDA kernels launch on)."""
    return int(require_torch().cuda.current_stream(device).cuda_stream)


def require_cuda_ext():
    ext = _ext.cuda_ext()
    if ext is None:
        err = _ext._try_import("rag_engine._C_cuda")[1]
        raise BackendUnavailableError(
            f"the CUDA extension rag_engine._C_cuda is not built: reinstall with RAG_ENGINE_BUILD_CUDA=1 ({err})")
    return ext


def require_kernels():
    try:
        from rag_engine import kernels
    except ImportError as exc:
        raise BackendUnavailableError(f"Triton kernels need triton: pip install '.[triton]' ({exc})") from exc
    return kernels


def new_bad(device: Any, fill: int):
    """One-element int64 error slot; CUDA kernels atomicMin into it as uint64 (fill -1 = UINT64_MAX)."""
    torch = require_torch()
    return torch.full((1,), fill, dtype=torch.int64, device=device)


def storage_name(t: Any) -> str:
    """The kernels' name of a tensor's element type: fp32, bf16, fp16 or int8."""
    return _STORAGE[str(t.dtype).removeprefix("torch.")]


def ptr(t: Any) -> int:
    return 0 if t is None else int(t.data_ptr())


# ---------------------------------------------------------------------------
# Corpus on the device
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCorpus:
    """Corpus rows `[N, D]` on a GPU: the device twin of CorpusMatrix.

    data: torch tensor float32 | bfloat16 | float16 | int8; scales: `[N]`
    float32 per-row scale (int8 only, row value = data * scale), else None.
    """

    data: Any
    scales: Any = None

    def __post_init__(self) -> None:
        op = "DeviceCorpus"
        check_tensor(op, "data", self.data, 2, tuple(_STORAGE))
        if self.dtype == "int8":
            s = self.scales
            if s is None or tuple(s.shape) != (self.n,) or str(s.dtype) != "torch.float32":
                raise ValueError(f"{op}: int8 storage needs float32 scales of shape ({self.n},), "
                                 f"got {None if s is None else (s.dtype, tuple(s.shape))}")
            check_devices(op, "torch", data=self.data, scales=s)
            check_tensor(op, "scales", s, 1, ("float32",))
        elif self.scales is not None:
            raise ValueError(f"{op}: scales are only used with int8 storage, not {self.dtype}")

    @property
    def dtype(self) -> str:
        return storage_name(self.data)

    @property
    def device(self) -> Any:
        return self.data.device

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @classmethod
    def from_corpus(cls, corpus: CorpusMatrix, device: Any = "cuda") -> DeviceCorpus:
        """Copy a CorpusMatrix to `device` (bf16 bits become torch.bfloat16)."""
        torch = require_torch()
        data = torch.from_numpy(corpus.data)
        if corpus.dtype == "bf16":
            data = data.view(torch.bfloat16)
        scales = None if corpus.scales is None else torch.from_numpy(corpus.scales).to(device)
        return cls(data.to(device), scales)

    @classmethod
    def wrap(cls, x: Any, op: str) -> DeviceCorpus:
        if isinstance(x, DeviceCorpus):
            return x
        if isinstance(x, CorpusMatrix):
            raise ValueError(f"{op}: the corpus is a host CorpusMatrix but the queries are on a GPU; "
                             "upload it once with DeviceCorpus.from_corpus(corpus, device)")
        return cls(as_tensor(op, "corpus", x))

    def rows(self, a: int, b: int) -> Any:
        """float32 copy of rows [a, b) with the int8 scale applied."""
        x = self.data[a:b].float()
        return x if self.scales is None else x * self.scales[a:b, None]


# ---------------------------------------------------------------------------
# Top-K keys: (score, id) as one int64, ordered by score desc then id asc
# ---------------------------------------------------------------------------


def pack_keys(scores: Any, ids: Any) -> Any:
    """Signed int64 keys: high word = order-preserving score bits, low word = 2^32-1-id."""
    s = scores.float().contiguous()
    s = s + 0.0  # -0 -> +0: equal scores must give equal high words
    i = s.view(require_torch().int32).to(require_torch().int64)
    o = require_torch().where(i >= 0, i, i ^ 0x7FFFFFFF)
    return (o << 32) | (0xFFFFFFFF - ids)


def select_keys(keys: Any, k: int) -> tuple[Any, Any]:
    """The k best keys per row, decoded to (scores float32, ids int64); empty -> (-inf, -1)."""
    torch = require_torch()
    top = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
    o = top >> 32
    bits = torch.where(o >= 0, o, o ^ 0x7FFFFFFF).to(torch.int32)
    scores = bits.view(torch.float32).clone()
    ids = 0xFFFFFFFF - (top & 0xFFFFFFFF)
    empty = top == EMPTY_KEY
    return scores.masked_fill_(empty, float("-inf")), ids.masked_fill_(empty, -1)


def allow_mask(op: str, ids_filter: Any, n: int, device: Any) -> Any:
    """ids_filter (bool mask [N], packed uint8 bitmap, int ids; host or device) as bool [N] on device."""
    torch = require_torch()
    f = as_tensor(op, "ids_filter", ids_filter)
    if f.dtype == torch.bool:
        if f.dim() != 1 or f.shape[0] != n:
            raise ValueError(f"{op}: a bool ids_filter must be [N={n}], got {tuple(f.shape)}")
        return f.to(device)
    if f.dtype == torch.uint8:
        if f.dim() != 1 or f.shape[0] != (n + 7) // 8:
            raise ValueError(f"{op}: a uint8 ids_filter is a packed bitmap of ceil(N/8)={(n + 7) // 8} "
                             f"bytes, got {tuple(f.shape)}")
        bits = (f.to(device)[:, None] >> torch.arange(8, device=device, dtype=torch.uint8)) & 1
        return bits.reshape(-1)[:n].bool()
    if f.dtype.is_floating_point or f.dtype.is_complex:
        raise TypeError(f"{op}: ids_filter must be a bool mask, a uint8 bitmap or integer ids, got {f.dtype}")
    f = f.to(device=device, dtype=torch.int64).reshape(-1)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= n):
        raise ValueError(f"{op}: ids_filter ids must lie in [0, {n}), got range [{int(f.min())}, {int(f.max())}]")
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[f] = True
    return mask


def pack_bits(mask: Any) -> Any:
    """bool [N] -> uint8 bitmap of ceil(N/8) bytes, bit i LSB-first = row i."""
    torch = require_torch()
    n = mask.shape[0]
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)
