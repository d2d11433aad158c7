"""OpenAI-compatible HTTP serving of an Engine: ``create_app``, ``serve``, ``ServerConfig``."""

from rag_engine.serve.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
