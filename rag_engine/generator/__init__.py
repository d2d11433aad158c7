"""The generator: ONNX export with an in-place KV cache, and an ONNX Runtime decode loop.

Public API: ``Generator``, ``GenerationOutput``, ``GenerationMetrics``, ``SamplingParams``,
``ExportConfig``, ``export_model``.
"""

from rag_engine.generator.export import ExportConfig, ExportFormatError, export_model
from rag_engine.generator.generator import GenerationMetrics, GenerationOutput, Generator
from rag_engine.generator.sampling import SamplingParams

__all__ = [
    "ExportConfig",
    "ExportFormatError",
    "GenerationMetrics",
    "GenerationOutput",
    "Generator",
    "SamplingParams",
    "export_model",
]
