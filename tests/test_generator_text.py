"""Text-level behaviour: streaming deltas, multi-byte characters, stop strings, chat prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from test_generator import tiny_model  # noqa: E402

from rag_engine.generator import Generator, SamplingParams  # noqa: E402
from rag_engine.generator.detokenize import IncrementalDetokenizer  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog", "retrieval augmented generation",
          "naïve café crème brûlée", "日本語のテキスト", "emoji 🙂 and more 🚀 text"] * 20
MULTILINGUAL = "héllo wörld, 日本語 🙂🚀 naïve café — ok"
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def gen_byte_tokenizer():
    """A tiny byte-level BPE: multi-byte characters span several tokens, as in GPT-2/SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = CHAT
    return fast


@pytest.fixture(scope="module")
def gen_text(gen_byte_tokenizer, tmp_path_factory):
    model = tiny_model("llama", seed=12, vocab=len(gen_byte_tokenizer))
    return Generator.from_hf(model, gen_byte_tokenizer, cache_dir=tmp_path_factory.mktemp("gen_text"))


def check_incremental(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    return ids, deltas


def test_incremental_detokenizer_holds_partial_characters(gen_byte_tokenizer):
    ids, deltas = check_incremental(gen_byte_tokenizer, MULTILINGUAL)
    assert len(ids) > len(MULTILINGUAL.encode()) // 4  # characters really span several tokens
    assert deltas.count("") > 0  # some pushes had to wait for the rest of a character


def test_stream_equals_generate(gen_text):
    params = SamplingParams(max_tokens=40, temperature=0)
    full = gen_text.generate(["the quick brown"], params)[0]
    streamed = list(gen_text.stream("the quick brown", params))
    assert "".join(streamed) == full.text
    assert full.text == gen_text.tokenizer.decode(full.token_ids, skip_special_tokens=True)


def test_stop_strings_truncate_and_stream_holds_back(gen_text):
    free = gen_text.generate(["lazy"], SamplingParams(max_tokens=40, temperature=0))[0]
    text = free.text
    assert len(text) > 12, "the tiny model should produce some text"
    stop = text[6:9]
    params = SamplingParams(max_tokens=40, temperature=0, stop=(stop, "never-there"))
    out = gen_text.generate(["lazy"], params)[0]
    assert out.text == text[: text.find(stop)] and out.finish_reason == "stop"
    assert "".join(gen_text.stream("lazy", params)) == out.text


def test_stop_string_ending_before_min_tokens_is_not_a_stop(gen_text):
    """Stop strings are checked from min_tokens on; an occurrence that ended before that was
    already streamed, so it must not cut the text (stream and generate then disagreed)."""
    free = gen_text.generate(["the quick"], SamplingParams(max_tokens=20, temperature=0))[0]
    detok = IncrementalDetokenizer(gen_text.tokenizer)
    ends = []  # text length after each token
    for t in free.token_ids:
        ends.append((ends[-1] if ends else 0) + len(detok.push(t)))
    checked = 0
    for k in range(2, 12):
        before = free.text[: ends[k - 2]]
        if len(before) < 3 or ends[k - 1] == ends[k - 2]:
            continue
        stop = before[-2:]  # ends exactly where token k-1 ends
        params = SamplingParams(max_tokens=20, temperature=0, stop=(stop,), min_tokens=k)
        out = gen_text.generate(["the quick"], params)[0]
        assert "".join(gen_text.stream("the quick", params)) == out.text
        assert out.text.startswith(before)  # the early occurrence did not cut it
        checked += 1
    assert checked > 0


def test_tiny_temperature_is_greedy(gen_text):
    greedy = gen_text.generate(["lazy"], SamplingParams(max_tokens=8, temperature=0))[0]
    for t in (1e-6, 1e-40, 1e-300):  # logits / t overflowed float32 (NaN probabilities)
        out = gen_text.generate(["lazy"], SamplingParams(max_tokens=8, temperature=t, seed=1))[0]
        assert out.token_ids == greedy.token_ids


def test_chat_prompt_uses_the_template(gen_text):
    messages = [{"role": "user", "content": "fox?"}]
    out = gen_text.generate([messages], SamplingParams(max_tokens=4, temperature=0))[0]
    expected = gen_text.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert list(out.prompt_token_ids) == list(expected)
    single = gen_text.generate(messages, SamplingParams(max_tokens=4, temperature=0))  # one chat, unwrapped
    assert single[0].token_ids == out.token_ids


def test_prompt_kinds_agree(gen_text):
    ids = gen_text.tokenizer.encode("brown fox")
    params = SamplingParams(max_tokens=6, temperature=0)
    by_text, by_ids = gen_text.generate(["brown fox", ids], params)
    assert by_text.token_ids == by_ids.token_ids
    assert gen_text.generate("brown fox", params)[0].token_ids == by_text.token_ids


def test_from_pretrained_on_a_user_folder(gen_byte_tokenizer, tmp_path):
    """Any HF causal-LM folder works: saved model + tokenizer, exported on first use, cached after."""
    model = tiny_model("gpt2", seed=14, vocab=len(gen_byte_tokenizer))
    model.generation_config.eos_token_id = gen_byte_tokenizer.eos_token_id
    folder = tmp_path / "my-gpt2"
    model.save_pretrained(folder)
    gen_byte_tokenizer.save_pretrained(folder)
    cache = tmp_path / "cache"
    gen = Generator.from_pretrained(folder, precision="int8", cache_dir=cache, progress=False)
    out = gen.generate(["the lazy dog"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert 0 < len(out.token_ids) <= 8 and out.metrics.prompt_tokens == len(gen_byte_tokenizer.encode("the lazy dog"))
    again = Generator.from_pretrained(folder, precision="int8", cache_dir=cache, progress=False)
    assert again.session.folder == gen.session.folder
    assert again.generate(["the lazy dog"], SamplingParams(max_tokens=8, temperature=0))[0].token_ids == out.token_ids
