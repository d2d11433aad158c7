"""Retrieval: sentence encoder (ONNX Runtime), chunking, dense index, BM25 and hybrid fusion."""
