"""rag-engine: retrieval-augmented generation inference with compiled kernels."""

from rag_engine import ops
from rag_engine.corpus import CorpusMatrix
from rag_engine.errors import BackendUnavailableError, IndexFormatError, RagEngineError

__version__ = "0.1.0"

# Generator / engine pieces pull in ONNX Runtime and transformers: import them lazily.
_LAZY = {
    "SamplingParams": "rag_engine.generator",
    "Generator": "rag_engine.generator",
    "GenerationOutput": "rag_engine.generator",
    "Engine": "rag_engine.engine",
    "EngineConfig": "rag_engine.engine",
    "RagOutput": "rag_engine.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rag_engine' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "CorpusMatrix",
    "IndexFormatError",
    "RagEngineError",
    "ops",
    *_LAZY,
]
