"""Typed errors raised at the engine's boundaries."""


class RagEngineError(Exception):
    """Base class for rag-engine specific errors."""


class BackendUnavailableError(RagEngineError, RuntimeError):
    """An explicitly requested backend (argument or RAG_ENGINE_BACKEND) is not available."""


class IndexFormatError(RagEngineError, ValueError):
    """An index on disk has the wrong format version, encoder, dims or a bad checksum."""


class ExportFormatError(RagEngineError, ValueError):
    """An exported model folder is missing files, or its files do not match their manifest."""
