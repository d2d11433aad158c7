"""The `latent` mode at inference: h_aug projected to m soft-prompt embeddings (DESIGN.md §1).

    soft = gate ⊙ reshape(h_aug P, [m, hidden])      h_aug = Σ_i α_i d_i

The soft prompts take positions 0..m-1 of the generator's input, before the prompt's token
embeddings, through an ONNX export that takes ``inputs_embeds``. ``LatentWeights`` holds P and
the gate (W_a stays ``Engine.w_a``), saved with the index and checked against the encoder on
load and against the generator's embedding table before first use. ``rag_engine.train`` fits them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag_engine import prompts, reference
from rag_engine.errors import IndexFormatError
from rag_engine.generator import ExportConfig, GenerationOutput, Generator, SamplingParams
from rag_engine.generator.export import cached_export, model_key
from rag_engine.generator.session import DecoderSession

log = logging.getLogger(__name__)

LATENT_META, LATENT_P, LATENT_GATE = "latent.json", "latent_p.npy", "latent_gate.npy"
PROMPT_FORMATS = ("text", "chat")
# A soft-prompt position in a row's prompt holds the id vocab_size + i * m + j: soft prompt i,
# vector j. The id travels with its row wherever the generator reorders or splits prompts
# (rows sorted by length, long prompts prefilled in pieces), and is never a real token.


@dataclass(frozen=True)
class _SoftIds:
    """A prompt whose ids already hold soft-prompt positions (passed through encode as is)."""

    ids: np.ndarray


class LatentWeightsError(IndexFormatError):
    """Saved latent weights do not fit this engine (encoder, dim, generator or hidden size)."""


def embedding_fingerprint(table: np.ndarray) -> str:
    """Identity of a generator: sha256 of its float32 token-embedding table ``[V, hidden]``."""
    digest = hashlib.sha256(str(table.shape).encode())
    digest.update(np.ascontiguousarray(table, np.float32).tobytes())
    return digest.hexdigest()[:24]


@dataclass(frozen=True, eq=False)
class LatentWeights:
    """P ``[dim, m * hidden]`` and gate ``[m]`` (float32) with what they were trained against."""

    p: np.ndarray
    gate: np.ndarray
    hidden_size: int
    encoder: str
    generator: str  # embedding_fingerprint of the generator
    prompt_format: str = "text"

    def __post_init__(self) -> None:
        m = self.gate.shape[0] if self.gate.ndim == 1 else -1
        if m < 1 or self.p.ndim != 2 or self.p.shape[1] != m * self.hidden_size:
            raise LatentWeightsError(f"latent weights: expected P [dim, {m} * {self.hidden_size}] and gate [m], "
                                     f"got P {self.p.shape} and gate {self.gate.shape}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise LatentWeightsError(f"latent weights: prompt_format must be one of {PROMPT_FORMATS}, "
                                     f"got {self.prompt_format!r}")

    @property
    def soft_prompts(self) -> int:
        return int(self.gate.shape[0])

    @property
    def dim(self) -> int:
        return int(self.p.shape[0])

    def project(self, h_aug: np.ndarray) -> np.ndarray:
        """h_aug ``[B, dim]`` -> soft prompts ``[B, m, hidden]`` float32 (same as BilinearFusion.project)."""
        h = np.asarray(h_aug, np.float32)
        if h.ndim != 2 or h.shape[1] != self.dim:
            raise ValueError(f"LatentWeights.project: expected h_aug [B, {self.dim}], got {h.shape}")
        soft = (h @ self.p).reshape(h.shape[0], self.soft_prompts, self.hidden_size)
        return soft * self.gate[None, :, None]

    @classmethod
    def from_fusion(cls, fusion, encoder: str, generator: str, prompt_format: str = "text") -> LatentWeights:
        """Take P and the gate of a trained ``BilinearFusion``."""
        return cls(fusion.P.weight.detach().float().numpy().T.copy(), fusion.gate.detach().float().numpy().copy(),
                   fusion.hidden_size, encoder, generator, prompt_format)

    def files(self) -> dict[str, bytes | np.ndarray]:
        """The files Engine.save writes into the index version."""
        meta = {"hidden_size": self.hidden_size, "soft_prompts": self.soft_prompts, "dim": self.dim,
                "encoder": self.encoder, "generator": self.generator, "prompt_format": self.prompt_format}
        return {LATENT_META: json.dumps(meta, indent=1).encode(), LATENT_P: self.p, LATENT_GATE: self.gate}

    @classmethod
    def load(cls, version: Path, encoder: str, dim: int) -> LatentWeights | None:
        """Read from an index version (None when absent); a mismatch is a LatentWeightsError."""
        if not (version / LATENT_META).exists():
            return None
        try:
            meta = json.loads((version / LATENT_META).read_text())
            p, gate = np.load(version / LATENT_P), np.load(version / LATENT_GATE)
        except (OSError, ValueError) as exc:
            raise LatentWeightsError(f"{version}: unreadable latent weights ({exc})") from exc
        fields = {"hidden_size": int, "soft_prompts": int, "encoder": str, "generator": str}
        if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)
                                             for k, t in fields.items()):
            raise LatentWeightsError(f"{version}: {LATENT_META} must be an object with "
                                     f"{', '.join(f'{k}: {t.__name__}' for k, t in fields.items())}")
        if p.ndim != 2 or gate.ndim != 1:
            raise LatentWeightsError(f"{version}: latent P must be 2-D and the gate 1-D, got {p.shape} and {gate.shape}")
        if p.dtype.kind != "f" or gate.dtype.kind != "f" or not (np.isfinite(p).all() and np.isfinite(gate).all()):
            raise LatentWeightsError(f"{version}: latent P and gate must be finite floats, got {p.dtype} / {gate.dtype}")
        if meta.get("encoder") != encoder:
            raise LatentWeightsError(f"{version}: latent weights trained with encoder {meta.get('encoder')!r}, "
                                     f"this engine uses {encoder!r}")
        if p.shape[0] != dim or gate.shape != (meta.get("soft_prompts"),):
            raise LatentWeightsError(f"{version}: latent P has shape {p.shape} and gate {gate.shape}, expected "
                                     f"({dim}, m * hidden) and ({meta.get('soft_prompts')},)")
        return cls(p.astype(np.float32), gate.astype(np.float32), int(meta["hidden_size"]), encoder,
                   meta["generator"], meta.get("prompt_format", "text"))

    def check_generator(self, fingerprint: str, hidden_size: int) -> None:
        if hidden_size != self.hidden_size or fingerprint != self.generator:
            raise LatentWeightsError(
                f"latent weights were trained for generator {self.generator} (hidden {self.hidden_size}), "
                f"this engine's generator is {fingerprint} (hidden {hidden_size}): retrain with rag-engine train")


def prompt_ids(tokenizer, query: str | Sequence[int], passages: Sequence[str], prompt_format: str,
               system_prompt: str = prompts.SYSTEM_PROMPT) -> list[int]:
    """Token ids of the text after the soft prompts: "text" = passages + query ids (a
    continuation), "chat" = the chat template of prompts.concat_messages."""
    if prompt_format == "chat":
        text = query if isinstance(query, str) else tokenizer.decode(list(query))
        ids = tokenizer.apply_chat_template(prompts.concat_messages(text, passages, system_prompt),
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    if prompt_format != "text":
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    q = tokenizer.encode(query, add_special_tokens=False) if isinstance(query, str) else list(query)
    if not passages:
        return list(q)
    context = "\n\n".join(p.strip() for p in passages) + "\n\n"
    return list(tokenizer.encode(context, add_special_tokens=False)) + list(q)


class _EmbeddingSession:
    """Drives an inputs_embeds export with token ids: looks tokens up in the embedding table and
    soft-prompt ids (>= vocab_size, see _SoftIds) up in the queued soft prompts."""

    def __init__(self, session: DecoderSession, embed: np.ndarray) -> None:
        self.session, self.embed, self.spec = session, embed, session.spec
        self._soft: np.ndarray | None = None  # [N * m, hidden]: vector j of soft prompt i at i * m + j

    def queue(self, soft: np.ndarray | None) -> None:
        self._soft = None if soft is None else soft.reshape(-1, soft.shape[-1])

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache) -> np.ndarray:
        vocab = self.spec.vocab_size
        soft = ids >= vocab
        if not soft.any():
            return self.session.run(self.embed[ids], mask, positions, cache)
        if self._soft is None or ids.max() - vocab >= self._soft.shape[0]:
            raise ValueError("prompt has soft-prompt positions but no soft prompts were given for them")
        embeds = self.embed[np.where(soft, 0, ids)]
        embeds[soft] = self._soft[ids[soft] - vocab]
        return self.session.run(embeds, mask, positions, cache)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, cache) -> np.ndarray:
        embeds = self.embed[tokens][:, None, :]
        mask = (np.arange(cache.max_len)[None, :] <= lengths[:, None]).astype(np.int64)
        return self.session.run(embeds, mask, lengths[:, None].astype(np.int64), cache)


class SoftPromptGenerator(Generator):
    """A Generator over an ``inputs_embeds`` export; ``generate_soft`` prepends soft prompts."""

    def __init__(self, session: DecoderSession, embed: np.ndarray, tokenizer, eos_token_ids=None,
                 max_batch_size: int = 16) -> None:
        if not session.config.inputs_embeds or session.config.all_logits:
            raise ValueError("SoftPromptGenerator needs an export with inputs_embeds=True and all_logits=False, "
                             f"got inputs_embeds={session.config.inputs_embeds} all_logits={session.config.all_logits}")
        if embed.shape != (session.spec.vocab_size, session.spec.hidden_size):
            raise ValueError(f"SoftPromptGenerator: expected an embedding table [{session.spec.vocab_size}, "
                             f"{session.spec.hidden_size}], got {embed.shape}")
        super().__init__(_EmbeddingSession(session, embed), tokenizer, eos_token_ids, max_batch_size)
        self.embed = embed
        self.fingerprint = embedding_fingerprint(embed)

    @classmethod
    def from_hf(cls, model, tokenizer=None, precision: str = "fp32", threads: int | None = None,
                cache_dir=None, progress: bool = False, int8_method: str = "nbits", custom_ops: bool | None = None,
                **kwargs) -> SoftPromptGenerator:
        """Export an in-memory transformers causal LM with inputs_embeds (cached by content hash)."""
        config = ExportConfig(precision=precision, inputs_embeds=True, int8_method=int8_method, custom_ops=custom_ops)
        export = cached_export(model_key(model), lambda: model, config, cache_dir, progress)
        embed = model.get_input_embeddings().weight.detach().float().numpy().copy()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        return cls(DecoderSession(export, threads), embed, tokenizer, eos, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path="default", precision: str = "fp32", threads: int | None = None,
                        cache_dir=None, progress: bool = True, **kwargs) -> SoftPromptGenerator:
        """The same model folders as Generator.from_pretrained ("default" = SmolLM2-135M-Instruct)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rag_engine.generator import assets

        folder = assets.resolve_model(name_or_path, cache_dir)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        return cls.from_hf(model, AutoTokenizer.from_pretrained(folder), precision, threads, cache_dir,
                           progress, **kwargs)

    def _with_placeholders(self, prompt_list: Sequence, soft: np.ndarray | None) -> list[np.ndarray]:
        m = 0 if soft is None else soft.shape[1]
        if soft is not None and (soft.ndim != 3 or soft.shape[0] != len(prompt_list)
                                 or soft.shape[2] != self.spec_hidden):
            raise ValueError(f"soft prompts must be [{len(prompt_list)}, m, {self.spec_hidden}], got {soft.shape}")
        base = self.session.spec.vocab_size
        return [_SoftIds(np.concatenate([base + i * m + np.arange(m, dtype=np.int64), self.encode(p)]))
                for i, p in enumerate(prompt_list)]

    def encode(self, prompt) -> np.ndarray:
        if isinstance(prompt, _SoftIds):  # built by _with_placeholders from checked prompts
            if prompt.ids.size >= self.max_context:
                raise ValueError(f"prompt has {prompt.ids.size} positions with its soft prompts: expected "
                                 f"fewer than the model's context of {self.max_context}")
            return prompt.ids
        return super().encode(prompt)

    @property
    def spec_hidden(self) -> int:
        return self.session.spec.hidden_size

    def generate_soft(self, prompt_list: Sequence, soft: np.ndarray | None,
                      params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """Generate for each prompt (ids, text or chat messages) after its soft prompts ``soft[i]``
        ``[m, hidden]`` (``soft`` ``[N, m, hidden]``; None = no soft prompts). Prompt token counts
        include the m soft positions."""
        rows = self._with_placeholders(prompt_list, soft)
        self.session.queue(None if soft is None else np.ascontiguousarray(soft, np.float32))
        try:
            return self.generate(rows, params)
        finally:
            self.session.queue(None)

    def stream_soft(self, prompt, soft: np.ndarray | None, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt after its soft prompts ``soft`` ``[m, hidden]`` (or None)."""
        (row,) = self._with_placeholders([prompt], None if soft is None else soft[None])
        self.session.queue(None if soft is None else np.ascontiguousarray(soft[None], np.float32))
        try:
            yield from self.stream(row, params)
        finally:
            self.session.queue(None)


# ---------------------------------------------------------------------------- Engine glue
def load_latent(eng, version: Path) -> LatentWeights | None:
    """Latent weights of an index version, checked against the engine's encoder and dim, and
    against its generator's hidden size when that is loaded (the full identity check runs
    before the first latent generation)."""
    weights = LatentWeights.load(version, eng.encoder.name, eng.encoder.dim)
    if weights is not None and eng._generator is not None:
        hidden = eng._generator.session.spec.hidden_size
        if hidden != weights.hidden_size:
            raise LatentWeightsError(f"{version}: latent weights have hidden size {weights.hidden_size}, "
                                     f"the generator {hidden}")
    return weights


def latent_generator(eng) -> SoftPromptGenerator:
    """The engine's soft-prompt generator (built on first use), checked against its latent weights."""
    weights = eng.latent
    if weights is None:
        raise ValueError("mode='latent' needs trained latent weights (P): run `rag-engine train` on this index "
                         "and load the index it writes")
    if eng.latent_generator is None:
        c = eng.config
        eng.latent_generator = SoftPromptGenerator.from_pretrained(
            c.generator, c.generator_precision, c.threads, c.cache_dir,
            int8_method=c.generator_int8_method, custom_ops=c.generator_custom_ops)
    gen = eng.latent_generator
    weights.check_generator(gen.fingerprint, gen.spec_hidden)
    return gen


def soft_prompts_for(eng, docs: Sequence[Sequence]) -> np.ndarray:
    """Soft prompts ``[Q, m, hidden]`` from each query's documents: h_aug = Σ α_i d_i over the
    index vectors of the retrieved passages (α from the engine's fusion with W_a)."""
    k = max((len(d) for d in docs), default=0)
    dim = eng.latent.dim
    h_aug = np.zeros((len(docs), dim), np.float32)
    if k:
        ids = np.full((len(docs), k), -1, np.int64)
        alpha = np.zeros((len(docs), k), np.float32)
        for q, d in enumerate(docs):
            ids[q, : len(d)] = [x.passage_id for x in d]
            alpha[q, : len(d)] = [x.alpha for x in d]
        vecs = reference.gather_rows(eng.index.vectors(), ids)
        h_aug = np.einsum("qk,qkd->qd", alpha, vecs).astype(np.float32)
    return eng.latent.project(h_aug)


def _latent_prompts(eng, gen, qs: Sequence[str], docs: Sequence[Sequence], with_passages: bool
                    ) -> tuple[list[list[int]], list[tuple]]:
    """(prompt ids, documents by alpha) per query; with passages, the concat budget
    (``context_tokens``) picks them in both prompt formats and marks ``in_prompt``."""
    from rag_engine.engine_generate import _ordered, budgeted

    fmt = eng.latent.prompt_format
    ids, marked = [], []
    for q, d in zip(qs, docs):
        passages, m = budgeted(eng, d, gen.tokenizer) if with_passages else ([], _ordered(d))
        marked.append(m)
        if with_passages and fmt == "chat":
            ids.append(list(gen.encode(prompts.concat_messages(q, passages, eng.config.system_prompt))))
        else:
            ids.append(prompt_ids(gen.tokenizer, q, passages, fmt, eng.config.system_prompt))
    return ids, marked


def run_latent(eng, mode: str, qs: list[str], docs: list, params: SamplingParams, metrics: dict) -> list:
    """Engine.generate for mode "latent" (soft prompts + question) or "latent_concat" (+ passages)."""
    from rag_engine.engine import output_of

    gen = latent_generator(eng)
    soft = soft_prompts_for(eng, docs)
    ids, marked = _latent_prompts(eng, gen, qs, docs, mode == "latent_concat")
    outs = gen.generate_soft(ids, soft, params)
    return [output_of(o, m, metrics | {"soft_prompts": soft.shape[1]}) for o, m in zip(outs, marked)]


def stream_latent(eng, mode: str, question: str, docs, params: SamplingParams) -> Iterator[str]:
    gen = latent_generator(eng)
    soft = soft_prompts_for(eng, [docs])[0]
    (ids,), _ = _latent_prompts(eng, gen, [question], [docs], mode == "latent_concat")
    yield from gen.stream_soft(ids, soft, params)
