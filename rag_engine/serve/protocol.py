"""OpenAI request bodies (the fields this server honours) plus the RAG extras.

Unknown fields are rejected (HTTP 400), as are wrong types; ``n`` > 1 and ``best_of`` are not
served. vLLM extras: ``ignore_eos``, ``min_tokens``, ``repetition_penalty``, ``top_k``, ``min_p``.
RAG extras: ``k`` (0 turns retrieval off), ``mode``, ``retriever``.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from rag_engine.generator import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, true is not 1

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: StrictBool = False
    stream_options: dict | None = None
    n: Literal[1] = 1
    user: str | None = None
    ignore_eos: StrictBool = False  # vLLM extras
    min_tokens: int = Field(default=0, ge=0)
    # RAG extras
    k: int | None = Field(default=None, ge=0, le=64)
    mode: Literal["concat", "rag_token", "rag_sequence"] | None = None
    retriever: Literal["dense", "bm25", "hybrid"] | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, stop=stop, seed=self.seed,
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens)


class CompletionRequest(_Body):
    prompt: str | list[str] = Field(min_length=1)

    def question(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError(f"prompt: expected one prompt, got a list of {len(self.prompt)}")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, true is not 1

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def question(self) -> str:
        """The last user message: what retrieval searches for and the RAG template asks."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        raise ValueError("messages: expected at least one message with role 'user'")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def documents_json(docs) -> list[dict]:
    return [{"doc_id": d.doc_id, "passage_id": d.passage_id, "text": d.text, "score": d.score, "alpha": d.alpha,
             "metadata": d.metadata} for d in docs]


def error_json(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
