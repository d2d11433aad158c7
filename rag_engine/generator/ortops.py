"""rag_engine's own ONNX Runtime ops (``rag_engine/_ortops*.so``, built from csrc/ortops).

``ai.rag_engine::MatMulInt8Block`` / ``MatMulInt4Block``: the block-quantised weight GEMMs of
int8 / int4 exports (the same weights and activation quantisation as MatMulNBits with
accuracy_level 4, computed by AVX-512 VNNI kernels). ``ai.rag_engine::DecoderAttention``:
grouped-query attention over the in-place KV cache, in place of GroupQueryAttention (same
inputs, packed QKV, rotary inside). ``ai.rag_engine::MatMulF32Panels``: the fp32 weight GEMM
of fp32 exports, weights in 32-column panels streamed once per step for up to 8 rows. The
GEMMs take an optional SwiGLU epilogue. Each op has a portable path for other CPUs. Sessions
over a graph that uses them load the library with ``register``.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

DOMAIN = "ai.rag_engine"
# built by CMake next to rag_engine._C, named like an extension module (see setup.py)
LIBRARY = Path(__file__).resolve().parent.parent / f"_ortops{sysconfig.get_config_var('EXT_SUFFIX')}"


def library_path() -> Path | None:
    """The built op library, or None when the package was installed without it."""
    return LIBRARY if LIBRARY.is_file() else None


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU runs the ops' AVX-512 VNNI path (Linux: from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    return False


def available() -> bool:
    """Whether exports should use the ops by default: the library is built and the CPU is fast with it."""
    return library_path() is not None and cpu_has_vnni()


def register(options) -> None:
    """Load the op library into ``onnxruntime.SessionOptions`` ``options``."""
    path = library_path()
    if path is None:
        raise FileNotFoundError(f"the graph uses {DOMAIN} ops but {LIBRARY} is missing: rebuild the package "
                                f"(pip install -e .) or re-export with custom_ops=False")
    options.register_custom_ops_library(str(path))
