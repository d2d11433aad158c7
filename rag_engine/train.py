"""Train the latent mode's W_a and P with the generator and the encoder frozen (DESIGN.md §1).

    α = softmax(h_inᵀ W_a d_i),  h_aug = Σ α_i d_i,  soft = gate ⊙ P h_aug  [m, hidden]
    L = −Σ_t log P(y_t | y_<t, soft, prompt)     (mean over target tokens)

The generator is the torch model with the same weights as the ONNX export; gradients reach
W_a through the fusion op's analytic backward (``FusionSoftmaxFunction``). AdamW, gradient
clipping, an atomic checkpoint every ``checkpoint_every`` steps (a killed run resumes where the
last checkpoint left it, with the same loss curve), seeded batch order: two runs with one seed
and one thread count give the same losses.

    rag-engine train INDEX_DIR --out TRAINED_DIR --steps 150
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rag_engine import reference
from rag_engine.fusion import BilinearFusion
from rag_engine.latent import PROMPT_FORMATS, LatentWeights, embedding_fingerprint, prompt_ids
from rag_engine.train_data import (
    Pair,
    corpus_pairs,
    jsonl_pairs,
    retrieve_for_pairs,
    split_by_document,
)

log = logging.getLogger(__name__)
CHECKPOINT = "latent_train.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Sizes chosen so that the default models train on a laptop CPU in minutes."""

    soft_prompts: int = 8
    k: int = 4  # documents fused per query
    max_pairs: int = 320  # self-supervised pairs drawn from the index (before the split)
    query_tokens: int = 24
    target_tokens: int = 24
    heldout_fraction: float = 0.2  # of documents
    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3  # P
    # W_a: unit-norm vectors give logits h W d; an Adam step moves every entry by ~lr, i.e. logits
    # by up to ~lr * dim, so W_a needs a far smaller rate than P (measured: 2e-3 hurt held-out NLL).
    lr_w_a: float = 1e-4
    lr_gate: float = 1e-2
    # Training starts the gate at 1: exactly-zero soft prompts give NaN gradients through a Llama
    # decoder, and tiny ones act as attention sinks (measured: higher loss than gate 1 at step 0).
    gate_init: float = 1.0
    weight_decay: float = 0.01  # P only: decaying W_a would pull it away from the identity prior
    clip_norm: float = 1.0
    checkpoint_every: int = 25
    seed: int = 0
    train_w_a: bool = True  # False: W_a stays the identity (the RAG posterior)
    prompt_format: str = "text"  # "text": soft + query + target; "chat": the chat template

    def __post_init__(self) -> None:
        for name in ("soft_prompts", "k", "max_pairs", "query_tokens", "target_tokens", "steps", "batch_size",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"TrainConfig: prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        for name in ("lr", "lr_w_a", "lr_gate", "clip_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number > 0, got {v!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig: weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"TrainConfig: heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")


class FrozenLM:
    """A Hugging Face causal LM with every weight frozen; ``nll`` takes soft-prompt embeddings."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        for p in model.parameters():
            p.requires_grad_(False)
        self.embed = model.get_input_embeddings()
        self.hidden_size = int(self.embed.weight.shape[1])
        self.fingerprint = embedding_fingerprint(self.embed.weight.detach().float().numpy())

    @classmethod
    def from_pretrained(cls, name_or_path="default", cache_dir=None) -> FrozenLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rag_engine.generator import assets

        folder = assets.resolve_model(name_or_path, cache_dir)
        return cls(AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), AutoTokenizer.from_pretrained(folder))

    def nll(self, soft: torch.Tensor | None, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed target NLL [B] and target token counts [B] for rows soft [B, m, hidden] (or None)
        + prompt ids + target ids; logits are computed at target positions only."""
        m = 0 if soft is None else soft.shape[1]
        lens = [len(p) + len(t) for p, t in zip(prompts, targets, strict=True)]
        ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
        rows, cols, tgt = [], [], []
        for b, (p, t) in enumerate(zip(prompts, targets)):
            ids[b, : lens[b]] = torch.tensor(list(p) + list(t), dtype=torch.long)
            for j, tok in enumerate(t):
                if m + len(p) + j >= 1:  # the first token of a bare target has no predictor
                    rows.append(b), cols.append(m + len(p) + j - 1), tgt.append(tok)
        x = self.embed(ids)
        if soft is not None:
            x = torch.cat([soft.to(x.dtype), x], dim=1)
        mask = (torch.arange(x.shape[1])[None, :] < (torch.tensor(lens) + m)[:, None]).long()
        h = self.model.base_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        rows_t = torch.tensor(rows, dtype=torch.long)
        logits = self.model.get_output_embeddings()(h[rows_t, torch.tensor(cols, dtype=torch.long)])
        lp = logits.float().log_softmax(-1).gather(1, torch.tensor(tgt)[:, None])[:, 0]
        total = torch.zeros(len(lens), dtype=lp.dtype).index_add(0, rows_t, -lp)
        return total, torch.bincount(rows_t, minlength=len(lens)).to(lp.dtype)


@dataclass
class TrainData:
    """Tensors of a set of pairs: h_in [N, D], docs [N, K, D], mask [N, K] (False = empty slot)."""

    pairs: list[Pair]
    h_in: torch.Tensor
    docs: torch.Tensor
    mask: torch.Tensor
    passage_ids: np.ndarray  # [N, K], -1 = empty
    prompts: list[list[int]]  # generator ids after the soft prompts
    targets: list[list[int]]

    def key(self) -> str:
        digest = hashlib.sha256(self.h_in.numpy().tobytes() + self.passage_ids.tobytes())
        digest.update(repr((self.prompts, self.targets)).encode())
        return digest.hexdigest()[:24]


def prepare(eng, tokenizer, pairs: Sequence[Pair], cfg: TrainConfig, threads: int | None = None) -> TrainData:
    """Retrieve K documents per pair (own passage excluded) and build the generator prompts."""
    h_in, ids = retrieve_for_pairs(eng.index, eng.encoder, pairs, cfg.k, threads)
    docs = reference.gather_rows(eng.index.vectors(), ids)
    prompts = [prompt_ids(tokenizer, p.query_ids if cfg.prompt_format == "text" else p.query, [], cfg.prompt_format)
               for p in pairs]
    return TrainData(list(pairs), torch.from_numpy(h_in), torch.from_numpy(docs), torch.from_numpy(ids >= 0), ids,
                     prompts, [list(p.target_ids) for p in pairs])


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Row indices of every step: seeded permutations, one per pass over the data."""
    flat, epoch = [], 0
    while len(flat) < steps * batch_size:
        flat += np.random.default_rng([seed, epoch]).permutation(n).tolist()
        epoch += 1
    return [np.array(flat[s * batch_size : (s + 1) * batch_size]) for s in range(steps)]


def new_fusion(lm: FrozenLM, data: TrainData, cfg: TrainConfig) -> BilinearFusion:
    """W_a = I, gate = cfg.gate_init, P ~ N(0, σ²) with σ such that P h_aug has a token embedding's scale."""
    torch.manual_seed(cfg.seed)
    fusion = BilinearFusion(data.h_in.shape[1], cfg.soft_prompts, lm.hidden_size)
    with torch.no_grad():
        _, h_aug = fusion(data.h_in, data.docs, data.mask)
        scale = float(lm.embed.weight.std()) / max(float(h_aug.norm(dim=1).mean()), 1e-3)
        torch.nn.init.normal_(fusion.P.weight, std=scale)
        fusion.gate.fill_(cfg.gate_init)
    fusion.W_a.requires_grad_(cfg.train_w_a)
    return fusion


def _optimizer(fusion: BilinearFusion, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [{"params": [fusion.P.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": [fusion.gate], "lr": cfg.lr_gate, "weight_decay": 0.0}]
    if cfg.train_w_a:
        groups.append({"params": [fusion.W_a], "lr": cfg.lr_w_a, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint


def _run_meta(cfg: TrainConfig, data: TrainData, lm: FrozenLM) -> dict:
    """What a checkpoint must match to be resumed: the run minus its length (a finished run can be
    extended: the batch order is prefix-stable) and minus W_a's rate when W_a is frozen."""
    config = dataclasses.asdict(cfg) | {"steps": None}
    if not cfg.train_w_a:
        config["lr_w_a"] = None
    return {"config": config, "data": data.key(), "generator": lm.fingerprint}


def train_latent(lm: FrozenLM, data: TrainData, cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
                 progress: bool = True) -> tuple[BilinearFusion, list[float]]:
    """Fit W_a (if cfg.train_w_a), P and the gate; returns the fusion module and the loss per step.

    With ``checkpoint_dir`` the state is saved every cfg.checkpoint_every steps and at the end,
    and a run finds and resumes its checkpoint (same config and data, else ValueError); a larger
    cfg.steps extends a finished run."""
    fusion = new_fusion(lm, data, cfg)
    opt = _optimizer(fusion, cfg)
    order = batch_order(len(data.pairs), cfg.steps, cfg.batch_size, cfg.seed)
    meta = _run_meta(cfg, data, lm)
    losses: list[float] = []
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["meta"] != meta:
            raise ValueError(f"{ckpt} was written for another run (config, data or generator differ): expected "
                             f"{meta}, got {state['meta']}; use another checkpoint directory")
        if len(state["losses"]) > cfg.steps:
            raise ValueError(f"{ckpt} already holds {len(state['losses'])} steps, more than the {cfg.steps} asked "
                             "for; ask for at least that many steps or use another checkpoint directory")
        fusion.load_state_dict(state["fusion"])
        opt.load_state_dict(state["optimizer"])
        losses = list(state["losses"])
        log.info("resuming from %s at step %d", ckpt, len(losses))
    trainable = [p for p in fusion.parameters() if p.requires_grad]
    bar = tqdm(range(len(losses), cfg.steps), initial=len(losses), total=cfg.steps, desc="train latent",
               disable=not progress)
    for step in bar:
        b = order[step].tolist()
        _, h_aug = fusion(data.h_in[b], data.docs[b], data.mask[b])
        total, count = lm.nll(fusion.project(h_aug), [data.prompts[i] for i in b], [data.targets[i] for i in b])
        loss = total.sum() / count.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(ckpt, {"meta": meta, "fusion": fusion.state_dict(), "optimizer": opt.state_dict(),
                                    "losses": losses})
    return fusion, losses


def gradcheck_soft_prompts(seed: int = 0) -> bool:
    """torch.autograd.gradcheck, in float64, of soft = gate ⊙ P h_aug through the fused op's analytic
    backward, w.r.t. h_in, docs, W_a, P and the gate (a masked document included)."""
    from rag_engine.fusion import FusionSoftmaxFunction

    g = torch.Generator().manual_seed(seed)
    b, k, d, m, hidden = 3, 4, 8, 2, 6
    args = [torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, k, d, generator=g, dtype=torch.float64),
            torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64),
            torch.randn(d, m * hidden, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)]
    mask = torch.tensor([[True, True, False, True]] * b)

    def soft(h, docs, w, p, gate):
        _, h_aug = FusionSoftmaxFunction.apply(h, docs, w, mask, None)
        return (h_aug @ p).view(b, m, hidden) * gate[:, None]

    return bool(torch.autograd.gradcheck(soft, tuple(x.requires_grad_() for x in args), eps=1e-6, atol=1e-6))


@torch.no_grad()
def mean_nll(lm: FrozenLM, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
             soft: torch.Tensor | None = None, batch_size: int = 8, progress: bool = False, desc: str = "nll"
             ) -> float:
    """Mean NLL per target token (nats) over all rows; soft [N, m, hidden] or None."""
    total = count = 0.0
    for b0 in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        sl = slice(b0, b0 + batch_size)
        s, n = lm.nll(None if soft is None else soft[sl], prompts[sl], targets[sl])
        total, count = total + float(s.sum()), count + float(n.sum())
    return total / max(count, 1.0)


@dataclass(frozen=True)
class TrainResult:
    fusion: BilinearFusion
    losses: list[float]
    train: list[Pair]
    heldout: list[Pair]


def train_engine(eng, cfg: TrainConfig = TrainConfig(), jsonl: str | Path | None = None,
                 checkpoint_dir: str | Path | None = None, lm: FrozenLM | None = None, progress: bool = True,
                 threads: int | None = None) -> TrainResult:
    """Train on the engine's own corpus (+ JSONL pairs) and install the weights in ``eng``
    (``eng.w_a`` when W_a is trained, ``eng.latent``); ``eng.save`` then persists them."""
    if threads is not None:
        if type(threads) is not int or threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        torch.set_num_threads(threads)
    lm = lm or FrozenLM.from_pretrained(eng.config.generator, eng.config.cache_dir)
    pairs = corpus_pairs(eng.index, lm.tokenizer, cfg.max_pairs, cfg.query_tokens, cfg.target_tokens, cfg.seed)
    if jsonl is not None:
        pairs += jsonl_pairs(jsonl, lm.tokenizer, cfg.target_tokens)
    train, heldout = split_by_document(pairs, cfg.heldout_fraction, cfg.seed)
    log.info("%d training pairs, %d held out (by document)", len(train), len(heldout))
    data = prepare(eng, lm.tokenizer, train, cfg, threads)
    fusion, losses = train_latent(lm, data, cfg, checkpoint_dir, progress)
    finite = all(math.isfinite(x) for x in losses) and all(torch.isfinite(p).all() for p in fusion.parameters())
    if not finite:  # nothing is installed: a caller saving the engine keeps its working weights
        raise ValueError("training diverged (a non-finite loss or weight); the engine's weights were left as "
                         "they were — lower the learning rates or the clip norm")
    eng.w_a = fusion.W_a.detach().numpy().copy() if cfg.train_w_a else None  # P was fitted to this W_a
    eng.latent = LatentWeights.from_fusion(fusion, eng.encoder.name, lm.fingerprint, cfg.prompt_format)
    return TrainResult(fusion, losses, train, heldout)
