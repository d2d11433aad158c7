"""Guarded imports of the compiled extensions and optional GPU stacks.

Each `has_*` answers without raising; `require_*` raises
BackendUnavailableError naming what is missing and how to get it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

from rag_engine.errors import BackendUnavailableError

log = logging.getLogger(__name__)


@functools.cache
def _try_import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # any import failure means "not available"
        log.debug("optional module %s unavailable: %s", name, exc)
        return None, f"{type(exc).__name__}: {exc}"


def cpu_ext() -> ModuleType | None:
    """rag_engine._C (C++ CPU kernels), or None if it was not built."""
    return _try_import("rag_engine._C")[0]


def cuda_ext() -> ModuleType | None:
    """rag_engine._C_cuda (CUDA kernels), or None if it was not built."""
    return _try_import("rag_engine._C_cuda")[0]


def torch_module() -> ModuleType | None:
    return _try_import("torch")[0] if importlib.util.find_spec("torch") else None


@functools.cache
def has_cuda_device() -> bool:
    torch = torch_module()
    return bool(torch is not None and torch.cuda.is_available())


def has_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return has_cuda_device()


def require(module: ModuleType | None, name: str, hint: str) -> ModuleType:
    if module is None:
        raise BackendUnavailableError(f"{name} is not available: {hint}")
    return module


def require_cpu_ext() -> ModuleType:
    err = _try_import("rag_engine._C")[1]
    return require(cpu_ext(), "the C++ CPU extension rag_engine._C",
                   f"build it with `pip install -e .` ({err})")


def supported_isas() -> list[str]:
    """ISA paths the CPU kernels can take on this machine, weakest first."""
    ext = cpu_ext()
    return list(ext.supported_isas()) if ext is not None else []
