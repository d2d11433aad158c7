"""Export a Hugging Face causal LM to an ONNX decoder with an explicit, in-place KV cache.

``export_model`` reads the model (``spec.read_spec``), emits the fused graph
(``graph.build_graph``), quantises it when asked and writes ``model.onnx`` + ``model.onnx.data``
and a ``manifest.json`` (spec, options, file sizes and sha256). ``cached_export`` keys exports
by model content + options under the cache directory; an entry is published by an atomic
rename after its manifest is written, and one whose files do not match their manifest is
rebuilt, never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from rag_engine import cache
from rag_engine.errors import ExportFormatError
from rag_engine.generator import ortops
from rag_engine.generator.spec import DecoderSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MODEL_FILE, DATA_FILE, MANIFEST = "model.onnx", "model.onnx.data", "manifest.json"
PRECISIONS = ("fp32", "int8", "int4")
INT8_METHODS = ("nbits", "dynamic")


@dataclass(frozen=True)
class ExportConfig:
    """What to export.

    precision: "fp32"; "int8" (8-bit weights: MatMulNBits block-wise by default, or
    ``int8_method="dynamic"`` for ``quantize_dynamic`` per-channel DynamicQuantizeMatMul on
    SmoothQuant-scaled weights for Llama-family models, see ``smooth.py``);
    "int4" (MatMulNBits). block_size: weights per quantisation block (None: 64 for int8 and 32
    for int4 -- int8's 255 levels lose little over 64 weights, and ONNX Runtime's 8-bit kernel
    spends its time per block: SmolLM2 teacher-forced top-1 agreement with fp32 97.1% at 64 vs
    97.7% at 32, batch-8 decode +21%). Quantised graphs also quantise the embedding table
    (shared with lm_head when tied). all_logits: logits for every position instead of each
    row's last one. inputs_embeds: take ``inputs_embeds [B, S, hidden]`` instead of input_ids.
    explicit_rotary: Llama-family graphs honour arbitrary ``position_ids`` through RotaryEmbedding
    nodes; by default the rotary embedding is fused into GroupQueryAttention, which places each
    token at its cache slot (what the runtime always feeds) and ignores ``position_ids``.
    custom_ops: use rag_engine's own ONNX Runtime ops (``ortops.py``, csrc/ortops) where they
    apply: DecoderAttention instead of GroupQueryAttention (packed QKV: not with explicit_rotary
    or a sliding window); for ``int8`` (``int8_method="nbits"``) and ``int4``, MatMulInt8Block /
    MatMulInt4Block instead of MatMulNBits (the same weights; at accuracy_level 4, whose int8
    activations they share); for ``fp32``, MatMulF32Panels instead of the layers' MatMuls.
    None: when the op library is built and the CPU has AVX-512 VNNI; True: the library must be
    built; False: only ONNX Runtime's own ops (a portable export). Resolved on construction.
    """

    precision: str = "fp32"
    all_logits: bool = False
    inputs_embeds: bool = False
    block_size: int | None = None
    accuracy_level: int = 4
    int8_method: str = "nbits"
    explicit_rotary: bool = False
    custom_ops: bool | None = None

    def __post_init__(self) -> None:
        for name in ("all_logits", "inputs_embeds", "explicit_rotary"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if type(self.accuracy_level) is not int or not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"accuracy_level must be an int in [0, 4] (ONNX Runtime's MatMulNBits), "
                             f"got {self.accuracy_level!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.int8_method not in INT8_METHODS:
            raise ValueError(f"int8_method must be one of {INT8_METHODS}, got {self.int8_method!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16 or None, got {self.block_size!r}")
        if self.custom_ops is not None and type(self.custom_ops) is not bool:
            raise ValueError(f"custom_ops must be a bool or None, got {self.custom_ops!r}")
        resolved = ortops.available() if self.custom_ops is None else self.custom_ops
        object.__setattr__(self, "custom_ops", resolved)

    @property
    def block(self) -> int:
        """The quantisation block: block_size, else 64 for int8 and 32 for int4."""
        if self.block_size is not None:
            return self.block_size
        return 64 if self.precision == "int8" else 32

    @property
    def bits(self) -> int | None:
        if self.precision == "int4":
            return 4
        if self.precision == "int8" and self.int8_method == "nbits":
            return 8
        return None


def export_model(model, out_dir: str | os.PathLike, config: ExportConfig | None = None,
                 progress: bool = True) -> Path:
    """Write the ONNX export of ``model`` (a transformers ``*ForCausalLM``) into ``out_dir``
    (``config`` None: ``ExportConfig()`` as resolved now)."""
    config = ExportConfig() if config is None else config
    import onnx

    from rag_engine.generator.graph import build_graph
    from rag_engine.generator.spec import read_spec

    if config.custom_ops and ortops.library_path() is None:
        raise FileNotFoundError(f"custom_ops=True needs the op library {ortops.LIBRARY}, which is not built "
                                f"(pip install -e .); export with custom_ops=None or False")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = ["read weights", "build graph", "save"] + (["quantize"] if config.precision == "int8" and config.bits is None else [])
    bar = tqdm(total=len(steps), desc="export", disable=not progress)
    bar.set_postfix_str(steps[0])
    spec, weights = read_spec(model)
    if config.precision == "int8" and config.int8_method == "dynamic" and spec.family != "gpt2":
        from rag_engine.generator import smooth

        ids = smooth.calibration_ids(model, spec.vocab_size)
        smooth.smooth_weights(spec, weights, smooth.activation_absmax(model, ids))
    bar.update()
    bar.set_postfix_str(steps[1])
    proto = build_graph(spec, weights, all_logits=config.all_logits, inputs_embeds=config.inputs_embeds,
                        bits=config.bits, block=config.block, accuracy_level=config.accuracy_level,
                        explicit_rotary=config.explicit_rotary, custom_ops=config.custom_ops,
                        f32_op=config.precision == "fp32")  # (quantize_dynamic rewrites fp32 MatMuls)
    del weights
    bar.update()
    bar.set_postfix_str(steps[2])
    for name in (MODEL_FILE, DATA_FILE):
        (out / name).unlink(missing_ok=True)
    onnx.save_model(proto, out / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    del proto
    bar.update()
    if len(steps) == 4:
        bar.set_postfix_str(steps[3])
        _quantize_dynamic(out)
        bar.update()
    bar.close()
    write_manifest(out, spec, config)
    return out


def _quantize_dynamic(folder: Path) -> None:
    """int8 per-channel dynamic quantisation of the MatMul/Gemm weights (DynamicQuantizeMatMul)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = folder / "fp32"
    src.mkdir()
    for name in (MODEL_FILE, DATA_FILE):
        os.replace(folder / name, src / name)
    quantize_dynamic(src / MODEL_FILE, folder / MODEL_FILE, op_types_to_quantize=["MatMul", "Gemm"],
                     per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    shutil.rmtree(src)
    produced = [p.name for p in folder.iterdir() if p.name not in (MODEL_FILE,)]
    if DATA_FILE not in produced:  # the quantiser names its data file after the model
        data = [p for p in folder.iterdir() if p.suffix == ".data"]
        if len(data) != 1:
            raise RuntimeError(f"expected one external data file after quantize_dynamic, got {produced}")
        proto = onnx.load(folder / MODEL_FILE)
        data[0].unlink()
        onnx.save_model(proto, folder / MODEL_FILE, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)


def write_manifest(folder: Path, spec: DecoderSpec, config: ExportConfig) -> None:
    files = cache.file_records(folder, (MODEL_FILE, DATA_FILE))
    manifest = {"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec),
                "config": dataclasses.asdict(config), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> tuple[DecoderSpec, ExportConfig]:
    """Load and check an export folder's manifest; raises ExportFormatError naming the bad part."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected an exported model folder, {folder} does not exist")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportFormatError(f"{folder} has no {MANIFEST}: not a complete export") from None
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else manifest
        raise ExportFormatError(f"{path}: expected format_version {FORMAT_VERSION}, got {got!r}")
    try:
        files = manifest["files"]
        if set(files) != {MODEL_FILE, DATA_FILE}:
            raise ExportFormatError(f"{path}: expected entries for {MODEL_FILE} and {DATA_FILE}, got {sorted(files)}")
        if (problem := cache.file_problem(folder, files, verify)) is not None:
            raise ExportFormatError(problem)
        config = {"custom_ops": False} | manifest["config"]  # exports that predate the field
        return DecoderSpec(**manifest["spec"]), ExportConfig(**config)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ExportFormatError(f"{path} is malformed ({type(err).__name__}: {err})") from err


def model_key(model) -> str:
    """Content hash of an in-memory model: its config and every parameter's bytes."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        try:
            digest.update(t.numpy().tobytes())
        except TypeError:  # bfloat16 (and other dtypes numpy lacks): the raw bytes, with the dtype
            import torch

            digest.update(str(t.dtype).encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_key(folder: Path) -> str:
    """Content hash of a Hugging Face model folder (weights + config)."""
    return cache.hash_files(folder, ("*.safetensors", "*.bin", "config.json"))


def builder_fingerprint() -> str:
    """Hash of the code that shapes an export, so that a changed builder never serves old graphs."""
    digest = hashlib.sha256()
    for name in ("graph.py", "spec.py", "quant.py", "smooth.py", "export.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def _graph_options(config: ExportConfig) -> dict:
    """The options that shape the exported graph (an fp32 graph ignores the quantisation ones)."""
    opts = dataclasses.asdict(config)
    if config.precision == "fp32":
        for name in ("block_size", "accuracy_level", "int8_method"):
            opts.pop(name)
    return opts


def cached_export(model_key_: str, load_model, config: ExportConfig,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the export folder for ``model_key_`` + ``config``, building it when absent or broken.

    ``load_model`` is called only on a miss (so a cache hit never imports torch).
    """
    opts = json.dumps(_graph_options(config), sort_keys=True)
    key = f"{FORMAT_VERSION}|{builder_fingerprint()}|{model_key_}|{opts}"
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    root = cache.cache_root(cache_dir) / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{config.precision}-{key}"
    def usable(folder: Path) -> bool:
        if not cache.is_complete(folder):
            return False
        try:
            saved = read_manifest(folder)[1]
        except ExportFormatError as err:
            logger.warning("rebuilding broken export cache entry: %s", err)
            return False
        if _graph_options(saved) != _graph_options(config):
            logger.warning("rebuilding export cache entry %s: its manifest describes %s", folder, saved)
            return False
        return True

    if usable(final):
        return final
    tmp = cache.staging_dir(root, final.name)
    try:
        export_model(load_model(), tmp, config, progress=progress)
        return cache.publish(tmp, final, usable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
