"""Engine end to end with the real MiniLM encoder and a tiny random-weight generator."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("bm25s")
from test_generator import tiny_model  # noqa: E402
from test_generator_text import gen_byte_tokenizer  # noqa: E402,F401  (fixture)

from rag_engine import SamplingParams  # noqa: E402
from rag_engine.engine import Engine, EngineConfig  # noqa: E402
from rag_engine.errors import IndexFormatError  # noqa: E402
from rag_engine.generator import Generator  # noqa: E402
from rag_engine.retrieval import persist  # noqa: E402
from rag_engine.retrieval.encoder import Encoder, EncoderConfig  # noqa: E402
from rag_engine.retrieval.index import PassageIndex  # noqa: E402

DOCS = {
    "files": "To read a file, open it with open(path) inside a with statement; the file is closed "
             "automatically when the block ends, even if an exception is raised.",
    "loops": "A for loop iterates over the items of any sequence. Use enumerate() to get the index "
             "and the value of each item at the same time.",
    "dicts": "Dictionaries map keys to values. Looking up a missing key raises KeyError; use the get "
             "method to supply a default value instead.",
    "classes": "A class statement defines a new type. Methods receive the instance as their first "
               "argument, conventionally called self.",
}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(scope="module")
def encoder(cache_dir):
    return Encoder.from_pretrained(EncoderConfig(), cache_dir, progress=False)


@pytest.fixture(scope="module")
def generator(gen_byte_tokenizer, cache_dir):  # noqa: F811
    return Generator.from_hf(tiny_model("llama", seed=3, vocab=len(gen_byte_tokenizer)), gen_byte_tokenizer,
                             cache_dir=cache_dir)


def make_engine(encoder, generator, cache_dir, **overrides) -> Engine:
    config = EngineConfig(passage_tokens=16, overlap_tokens=4, cache_dir=str(cache_dir), system_prompt="Answer.",
                          **overrides)
    eng = Engine(config, encoder, generator, PassageIndex(encoder.name, encoder.dim, config.index_dtype))
    eng.add_documents(list(DOCS.values()), ids=list(DOCS), metadata=[{"topic": k} for k in DOCS], progress=False)
    return eng


@pytest.fixture(scope="module")
def engine(encoder, generator, cache_dir):
    return make_engine(encoder, generator, cache_dir)


def test_encoder_matches_transformers(encoder):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    from rag_engine.retrieval.encoder import packaged_minilm

    texts = ["hello", "How do I close a file automatically?", "x " * 300]
    tok = AutoTokenizer.from_pretrained(packaged_minilm())
    model = AutoModel.from_pretrained(packaged_minilm()).eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=1).numpy()
    np.testing.assert_allclose(encoder.encode(texts), ref, atol=1e-5)


def test_passages_keep_document_ids_and_offsets(engine):
    assert engine.index.num_documents == len(DOCS)
    assert len(engine.index) > len(DOCS)  # 16-token passages: every document is split
    for pid in range(len(engine.index)):
        p = engine.index.passage(pid)
        assert DOCS[p.doc_id][p.start : p.end] == p.text
        assert p.metadata == {"topic": p.doc_id}


@pytest.mark.parametrize("retriever", ["dense", "bm25", "hybrid"])
def test_retrieve_finds_the_right_document(engine, retriever):
    hits = engine.retrieve(["How do I get the index while looping over a list with enumerate?",
                            "What happens when a dictionary key is missing? KeyError"], k=3,
                           retriever=retriever)
    assert hits[0][0].doc_id == "loops" and hits[1][0].doc_id == "dicts"
    for row in hits:
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)


def test_metadata_filter_and_k_beyond_corpus(engine):
    hits = engine.retrieve("enumerate index loop", k=100, where={"topic": "dicts"})[0]
    assert hits and {h.doc_id for h in hits} == {"dicts"}
    # Collapsed by document (default one passage each), or every passage when unlimited.
    assert len(engine.retrieve("loop", k=1000, retriever="dense")[0]) == engine.index.num_documents
    unlimited = Engine(dataclasses.replace(engine.config, max_passages_per_doc=0), engine.encoder,
                       engine.generator, engine.index)
    hits = unlimited.retrieve("loop", k=1000, retriever="dense")[0]
    assert sorted(h.passage_id for h in hits) == list(range(len(engine.index)))


def test_generate_modes(engine):
    for mode in ("concat", "rag_token", "rag_sequence"):
        outs = engine.generate(["How do I loop with an index?", "What is a class?"], GREEDY, k=2, mode=mode)
        assert len(outs) == 2
        for o in outs:
            assert len(o.token_ids) == GREEDY.max_tokens and o.finish_reason == "length"
            assert len(o.documents) == 2 and abs(sum(o.alphas) - 1.0) < 1e-5
            for stage in ("encode_ms", "retrieve_ms", "fuse_ms", "prefill_ms", "decode_ms"):
                assert o.metrics[stage] >= 0
    bare = engine.generate("What is a class?", GREEDY, k=0)[0]
    assert bare.documents == () and len(bare.token_ids) == GREEDY.max_tokens


def test_rag_token_with_one_document_equals_plain_generation(engine):
    """With a single document alpha = 1, so the marginal is that row's own distribution."""
    from rag_engine import prompts

    q = "How do I loop with an index?"
    out = engine.generate(q, GREEDY, k=1, mode="rag_token")[0]
    msgs = prompts.concat_messages(q, [out.documents[0].text], engine.config.system_prompt)
    plain = engine.generator.generate([msgs], GREEDY)[0]
    assert out.token_ids == plain.token_ids
    # The same with a repetition penalty: the rows' seen tokens are the document prompts (the
    # sampler saw the bare question's prompt before).
    penalised = dataclasses.replace(GREEDY, repetition_penalty=3.0)
    out = engine.generate(q, penalised, k=1, mode="rag_token")[0]
    assert out.token_ids == engine.generator.generate([msgs], penalised)[0].token_ids


def test_rag_modes_report_their_own_documents_and_limits(encoder, generator, cache_dir):
    from rag_engine import prompts

    eng = make_engine(encoder, generator, cache_dir, context_tokens=120)
    eng.w_a = -np.eye(encoder.dim, dtype=np.float32)  # alpha order no longer follows retrieval order
    for q in ("How do I read a file?", "What is a class?", "dictionary default value"):
        out = eng.generate(q, GREEDY, k=3, mode="rag_sequence")[0]
        chosen = out.documents[out.metrics["rag_sequence_choice"]]  # an index into out.documents
        msgs = prompts.concat_messages(q, [chosen.text], eng.config.system_prompt)
        assert eng.generator.generate([msgs], GREEDY)[0].token_ids == out.token_ids
    # rag_token: a query with fewer passages than the batch's k answers as it does alone (its
    # padded slots set its context limit and prompt_tokens before)
    eng.w_a = None
    long_run = SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True)
    qs = ["classes methods self", "enumerate"]
    assert sorted(len(d) for d in eng._context(qs, 2, "bm25", None, {})) == [1, 2]
    batch = eng.generate(qs, long_run, k=2, mode="rag_token", retriever="bm25")
    for q, b in zip(qs, batch):
        one = eng.generate(q, long_run, k=2, mode="rag_token", retriever="bm25")[0]
        assert b.token_ids == one.token_ids and b.metrics["prompt_tokens"] == one.metrics["prompt_tokens"]


def test_stream_equals_generate(engine):
    text = "".join(engine.stream("What is a class?", GREEDY, k=2))
    assert text == engine.generate("What is a class?", GREEDY, k=2)[0].text


def test_bad_queries(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate(["  "], GREEDY)
    with pytest.raises(ValueError, match="at least one query"):
        engine.retrieve([])
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        engine.retrieve("x", k=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        engine.generate("x", GREEDY, mode="nope")
    with pytest.raises(TypeError, match="must be str"):
        engine.retrieve([3])
    with pytest.raises(ValueError, match="latent.*needs trained latent weights"):
        engine.generate("x", GREEDY, mode="latent")


def test_empty_index(encoder, generator, cache_dir):
    eng = Engine(EngineConfig(cache_dir=str(cache_dir)), encoder, generator, PassageIndex(encoder.name, encoder.dim))
    assert eng.retrieve(["anything"], k=3) == [[]]
    out = eng.generate("anything", GREEDY, k=3)[0]
    assert out.documents == () and len(out.token_ids) == GREEDY.max_tokens


def test_delete_update_and_save_load(engine, encoder, generator, cache_dir, tmp_path):
    eng = make_engine(encoder, generator, cache_dir, index_dtype="int8")
    eng.delete_documents(["loops"])
    assert all(h.doc_id != "loops" for h in eng.retrieve("enumerate loop index", k=50)[0])
    eng.add_documents(["Generators produce values lazily with yield."], ids=["dicts"])  # update by id
    assert eng.index.num_documents == 3
    eng.save(tmp_path / "idx")
    loaded = Engine.load(tmp_path / "idx", load_generator=False, cache_dir=str(cache_dir))
    assert loaded.config.index_dtype == "int8" and len(loaded.index) == len(eng.index)
    a = eng.retrieve(["lazy values", "close a file"], k=3)
    b = loaded.retrieve(["lazy values", "close a file"], k=3)
    assert [[h.passage_id for h in r] for r in a] == [[h.passage_id for h in r] for r in b]
    loaded.add_documents(["Sets hold unique elements."], ids=["sets"])  # incremental add after load
    assert loaded.retrieve("unique elements set", k=1)[0][0].doc_id == "sets"


def test_index_format_errors(engine, tmp_path, cache_dir):
    root = tmp_path / "idx"
    engine.save(root)
    version, manifest = persist.open_version(root)
    with pytest.raises(IndexFormatError, match="encoder 'all-minilm-l6-v2'.*'other-encoder'"):
        PassageIndex.load(root, encoder_name="other-encoder")
    manifest["format_version"] = 99
    (version / persist.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format version 99.*version 1"):
        Engine.load(root, load_generator=False)
    engine.save(root)
    version, _ = persist.open_version(root)
    with open(version / "vectors.npy", "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(IndexFormatError, match="checksum mismatch for vectors.npy"):
        Engine.load(root, load_generator=False)
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        Engine.load(tmp_path / "nothing", load_generator=False)


def test_failed_save_keeps_previous_index(engine, encoder, generator, cache_dir, tmp_path, monkeypatch):
    root = tmp_path / "idx"
    engine.save(root)
    before = engine.retrieve("enumerate", k=2)
    eng = make_engine(encoder, generator, cache_dir)
    eng.add_documents(["A brand new document about sets."], ids=["sets"])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "commit_version", disk_full)
    with pytest.raises(OSError, match="No space left"):
        eng.save(root)
    monkeypatch.undo()
    loaded = Engine.load(root, load_generator=False)  # the old version, intact and verified
    assert loaded.index.num_documents == len(DOCS)
    assert [h.passage_id for h in loaded.retrieve("enumerate", k=2)[0]] == [h.passage_id for h in before[0]]
    eng.save(root)  # a later save succeeds and replaces the leftovers
    assert Engine.load(root, load_generator=False).index.num_documents == len(DOCS) + 1
    assert len(list(root.glob("v*"))) == 1


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_hnsw", "faiss_ivf"])
def test_faiss_dense_backends(engine, backend):
    pytest.importorskip("faiss")
    exact = Engine(dataclasses.replace(engine.config, max_passages_per_doc=0), engine.encoder,
                   engine.generator, engine.index)
    approx = Engine(dataclasses.replace(engine.config, max_passages_per_doc=0, dense_backend=backend),
                    engine.encoder, engine.generator, engine.index)
    qs = ["How do I get the index while looping?", "missing dictionary key"]
    a = exact.retrieve(qs, k=3, retriever="dense")
    b = approx.retrieve(qs, k=3, retriever="dense")
    assert [h.passage_id for h in b[0]][:1] == [h.passage_id for h in a[0]][:1]
    if backend == "faiss_flat":  # exact: same ids and scores
        assert [[h.passage_id for h in r] for r in a] == [[h.passage_id for h in r] for r in b]
        np.testing.assert_allclose([h.score for h in a[0]], [h.score for h in b[0]], rtol=1e-5)
    filtered = approx.retrieve(qs[0], k=10, retriever="dense", where={"topic": "dicts"})[0]
    assert filtered and {h.doc_id for h in filtered} == {"dicts"}
    engine.index.set_dense_backend("topk_ip")


def test_allow_masks_are_cached_and_follow_changes(tmp_path):
    """Filter masks are built per document, cached, and rebuilt after add/delete/save."""
    from rag_engine.retrieval.index import PassageIndex

    rng = np.random.default_rng(0)
    idx = PassageIndex("test-encoder", 8)
    for d in range(6):
        idx.add(f"d{d}", [(0, 5), (5, 11)], ["apple", "banana"], rng.standard_normal((2, 8), dtype=np.float32),
                {"lang": "en" if d % 2 else "fr", "n": [d]})
    assert idx.allow_mask() is None and len(idx) == 12
    fr = idx.allow_mask({"lang": "fr"})
    assert fr.tolist() == [True, True, False, False] * 3 and not fr.flags.writeable
    assert idx.allow_mask({"lang": "fr"}) is fr  # cached
    assert idx.allow_mask({"n": [3]}).nonzero()[0].tolist() == [6, 7]  # unhashable values work
    idx.delete(["d0"])
    assert len(idx) == 10
    assert idx.allow_mask({"lang": "fr"}).nonzero()[0].tolist() == [4, 5, 8, 9]
    assert idx.allow_mask().tolist() == [False, False] + [True] * 10
    idx.add("d9", [(0, 6)], ["cherry"], rng.standard_normal((1, 8), dtype=np.float32), {"lang": "fr"})
    assert idx.allow_mask({"lang": "fr"}).nonzero()[0].tolist() == [4, 5, 8, 9, 12]
    q = rng.standard_normal((1, 8), dtype=np.float32)
    s, ids = idx.search_dense(q, 20, where={"lang": "fr"})
    assert sorted(i for i in ids[0].tolist() if i >= 0) == [4, 5, 8, 9, 12]
    idx.save(tmp_path / "ix")
    assert len(idx) == 11 and idx.allow_mask() is None
    assert idx.allow_mask({"lang": "fr"}).nonzero()[0].tolist() == [2, 3, 6, 7, 10]


def bare_engine(encoder, cache_dir) -> Engine:
    config = EngineConfig(passage_tokens=16, overlap_tokens=4, cache_dir=str(cache_dir))
    return Engine(config, encoder, None, PassageIndex(encoder.name, encoder.dim, config.index_dtype))


def test_document_ids_and_updates_never_lose_documents(encoder, cache_dir):
    eng = bare_engine(encoder, cache_dir)
    assert eng.add_documents(["apples are red", "bananas are yellow", "cherries are small"], progress=False) \
        == ["0", "1", "2"]
    eng.delete_documents(["0"])
    # Generated ids never reuse a live one (they were len(doc_ids) + j: "2" again here).
    assert eng.add_documents(["durian smells strong"], progress=False) == ["3"]
    assert sorted(eng.index.doc_ids()) == ["1", "2", "3"]
    # A refused replacement leaves the stored document as it was.
    bad = np.full((1, encoder.dim), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        eng.index.add("1", [(0, 3)], ["new"], bad)
    assert [h.text for h in eng.retrieve("bananas", k=1)[0]] == ["bananas are yellow"]
    # A new version with nothing to index removes the document and is not reported as indexed.
    assert eng.add_documents(["   "], ids=["2"], progress=False) == []
    assert "2" not in eng.index
    with pytest.raises(ValueError, match="id 'd' appears more than once"):
        eng.add_documents(["a cat", "a dog"], ids=["d", "d"], progress=False)
    assert "d" not in eng.index


def test_metadata_is_json_and_hits_hold_copies(encoder, cache_dir, tmp_path):
    eng = bare_engine(encoder, cache_dir)
    eng.add_documents(["apples are red", "bananas are yellow"], ids=["a", "b"],
                      metadata=[{"lang": "en", "tags": ("fruit", "red")}, {"lang": "en"}], progress=False)
    hit = eng.retrieve("apples", k=1, where={"lang": "en"})[0][0]
    hit.metadata["lang"] = "fr"  # the caller's copy
    assert {h.doc_id for h in eng.retrieve("fruit", k=2, where={"lang": "en"})[0]} == {"a", "b"}
    assert eng.retrieve("fruit", k=2, where={"lang": "fr"})[0] == []
    # Tuples are stored as JSON lists; a tuple filter matches before and after a save/load.
    assert [h.doc_id for h in eng.retrieve("fruit", k=2, where={"tags": ("fruit", "red")})[0]] == ["a"]
    eng.save(tmp_path / "idx")
    loaded = Engine.load(tmp_path / "idx", load_generator=False)
    assert [h.doc_id for h in loaded.retrieve("fruit", k=2, where={"tags": ("fruit", "red")})[0]] == ["a"]
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        eng.add_documents(["x"], ids=["x"], metadata=[{"when": object()}], progress=False)
    assert "x" not in eng.index


def test_save_keeps_foreign_folders_and_load_checks_consistency(encoder, cache_dir, tmp_path):
    eng = bare_engine(encoder, cache_dir)
    eng.add_documents(["apples are red", "bananas are yellow", "cherries are small"], ids=list("abc"),
                      progress=False)
    root = tmp_path / "idx"
    (root / "v2_backup").mkdir(parents=True)
    (root / "v1-notes.txt").write_text("mine")
    eng.save(root)
    eng.save(root)
    assert sorted(p.name for p in root.iterdir()) == ["CURRENT", "v000002", "v1-notes.txt", "v2_backup"]
    # A passages table that lost a row no longer loads shifted (unverified load).
    import sqlite3

    version = root / (root / "CURRENT").read_text().strip()
    with sqlite3.connect(version / "passages.sqlite") as db:
        db.execute("DELETE FROM passages WHERE passage_id = 1")
    db.close()
    with pytest.raises(IndexFormatError, match="expected ids 0..2"):
        PassageIndex.load(root, verify=False)
    man = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({k: v for k, v in man.items() if k != "dim"}))
    with pytest.raises(IndexFormatError, match=r"malformed fields \['dim'\]"):
        PassageIndex.load(root, verify=False)
    (version / "manifest.json").write_text(json.dumps(man))
    (version / "engine.json").write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match="engine.json must hold a JSON object"):
        Engine.load(root, load_generator=False, verify=False)


def test_retrieved_counts_follow_index_changes(engine, encoder, generator, cache_dir, tmp_path):
    eng = make_engine(encoder, generator, cache_dir)
    eng.generate(["How do I read a file?", "Dictionary default value?"], GREEDY, k=2)
    assert eng.retrieved
    eng.delete_documents(["files"])
    assert not eng.retrieved  # its passage ids are gone
    eng.generate("Dictionary default value?", GREEDY, k=2)
    assert eng.retrieved
    eng.save(tmp_path / "idx")
    assert not eng.retrieved  # saving renumbers passages
    assert eng.warm_prefix_cache(top=4) == 0


def test_chunking_bounds_windows_and_keeps_words(encoder):
    from rag_engine.retrieval.chunking import WORD_SLACK, ChunkConfig, chunk_spans

    tok = encoder.tokenizer
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    no_breaks = {"cjk": "自然语言处理是人工智能的一个分支" * 40, "csv": "col_a,col_b,col_c,value_x;" * 60}
    for name, text in no_breaks.items():  # one passage per document before: words never ended
        spans = chunk_spans(text, tok, ChunkConfig(16, 4))
        assert len(spans) > 10, name
        assert max(count(text[a:b]) for a, b in spans) <= 16 + WORD_SLACK, name
        assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip()), name
    words = ("The photographer used lithography internationally; notwithstanding misunderstandings, "
             "antidisestablishmentarianism flourished. ") * 20
    spans = chunk_spans(words, tok, ChunkConfig(16, 4))
    for a, b in spans:  # whole words at both ends
        assert a == 0 or not (words[a - 1].isalnum() and words[a].isalnum()), words[a - 5 : a + 5]
        assert b == len(words) or not (words[b - 1].isalnum() and words[b].isalnum()), words[b - 5 : b + 5]
    assert max(count(words[a:b]) for a, b in chunk_spans(words, tok, ChunkConfig(256, 32), max_tokens=254)) <= 254


def test_default_passages_fit_the_encoder(encoder, cache_dir):
    eng = Engine(EngineConfig(cache_dir=str(cache_dir)), encoder, None,
                 PassageIndex(encoder.name, encoder.dim))
    text = " ".join(["the cat sat on a mat and looked at birds in trees"] * 45) + " password swordfish"
    eng.add_documents([text], ids=["doc"], progress=False)
    limit = encoder.config.max_length
    for pid in range(len(eng.index)):
        assert len(encoder.tokenizer(eng.index.passage(pid).text)["input_ids"]) <= limit
    assert eng.retrieve("swordfish password", k=1)[0][0].doc_id == "doc"


def test_one_long_document_does_not_crowd_out_the_rest(encoder, cache_dir):
    eng = bare_engine(encoder, cache_dir)  # max_passages_per_doc = 1: one hit per document
    big = " ".join(f"Python lists hold items; entry {i} of the list tutorial explains indexing." for i in range(60))
    eng.add_documents([big, "Tuples are immutable sequences.", "Sets hold unique items.",
                       "Dictionaries map keys to values."], ids=["big", "t", "s", "d"], progress=False)
    assert len(eng.index) > 40 * 1  # the long document alone fills the first candidate list
    for retriever in ("dense", "hybrid"):
        hits = eng.retrieve("python list items", k=4, retriever=retriever)[0]
        assert sorted(h.doc_id for h in hits) == ["big", "d", "s", "t"], retriever


def test_cli_sources_keep_ids_apart(tmp_path):
    from rag_engine.cli import iter_sources

    for team in ("teamA", "teamB"):
        (tmp_path / team).mkdir()
        (tmp_path / team / "README.md").write_text(f"{team} notes")
        (tmp_path / team / "faq.jsonl").write_text(json.dumps({"text": f"{team} faq"}) + "\n")
    docs = list(iter_sources([str(tmp_path / "teamA"), str(tmp_path / "teamB")]))
    ids = [d[0] for d in docs]
    assert len(ids) == 4 and len(set(ids)) == 4, ids  # README.md and faq:0 twice before
    (tmp_path / "null.jsonl").write_text(json.dumps({"text": "x", "id": None}) + "\n")
    assert [d[0] for d in iter_sources([str(tmp_path / "null.jsonl")])] == [f"{tmp_path / 'null.jsonl'}:0"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "metadata": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: \"text\" must be a string and \"metadata\" an object"):
        list(iter_sources([str(tmp_path / "bad.jsonl")]))


def test_rag_token_prompt_tokens_per_query(engine):
    from rag_engine.engine_generate import rag_doc_prompts

    qs = ["How do I loop?", "What does a class statement define for a new type of object?"]
    outs = engine.generate(qs, GREEDY, k=2, mode="rag_token")
    for q, o in zip(qs, outs):
        ids, _ = rag_doc_prompts(engine, q, o.documents, 2)
        assert o.metrics["prompt_tokens"] == sum(len(x) for x in ids)  # was the first query's count
    assert outs[0].metrics["prompt_tokens"] != outs[1].metrics["prompt_tokens"]


def test_where_filters_use_json_equality(encoder, cache_dir):
    eng = bare_engine(encoder, cache_dir)
    eng.add_documents(["apples are red", "bananas are yellow", "cherries are small"], ids=list("abc"),
                      metadata=[{"n": 1}, {"n": True}, {}], progress=False)
    docs = lambda where: sorted(h.doc_id for h in eng.retrieve("fruit", k=3, where=where)[0])  # noqa: E731
    assert docs({"n": 1}) == ["a"]  # True == 1 in Python, not in JSON
    assert docs({"n": True}) == ["b"]
    assert docs({"n": None}) == []  # a missing key is not a null value


def test_encoder_settings_checked_and_broken_cache_rebuilt(encoder, cache_dir, tmp_path, caplog):
    import shutil

    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        EncoderConfig(batch_size=-4)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        EncoderConfig(max_length=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 or None"):
        encoder.encode(["a", "b"], batch_size=-1)  # gave all-zero vectors
    with pytest.raises(ValueError, match="max_length 1000 exceeds the 512 positions"):
        Encoder.from_pretrained(EncoderConfig(max_length=1000), cache_dir, progress=False)
    # A damaged export in the cache is rebuilt (a truncated encoder.onnx failed on every call).
    src = next(p for p in (cache_dir / "encoders").iterdir() if p.name.startswith(encoder.name + "-fp32-"))
    shutil.copytree(src, tmp_path / "encoders" / src.name)
    onnx_file = tmp_path / "encoders" / src.name / "encoder.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        again = Encoder.from_pretrained(EncoderConfig(), tmp_path, progress=False)
    assert "rebuilding broken encoder cache entry" in caplog.text
    np.testing.assert_allclose(again.encode(["a file"]), encoder.encode(["a file"]), atol=1e-6)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from rag_engine.cli import main

    root = tmp_path / "idx"
    (root / "v000001").mkdir(parents=True)
    (root / "CURRENT").write_text("v000001\n")
    (root / "v000001" / "manifest.json").write_text("[1, 2]")
    assert main(["index", "info", str(root)]) == 2  # AttributeError traceback before
    assert "manifest.json must hold a JSON object" in capsys.readouterr().err
    assert main(["serve", str(root), "--port", "70000"]) == 2  # OverflowError traceback before
    assert "--port must be in [0, 65535]" in capsys.readouterr().err


def test_concurrent_adds_and_searches(encoder, cache_dir):
    import threading

    eng = bare_engine(encoder, cache_dir)
    eng.add_documents(["apples are red"], progress=False)
    errors, added = [], []

    def adder(j):
        try:
            added.extend(eng.add_documents([f"document {j} about fruit number {n}" for n in range(5)],
                                           progress=False))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def searcher():
        try:
            for _ in range(5):
                for hits in eng.retrieve(["fruit"], k=3):
                    assert all(h.text for h in hits)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(j,)) for j in range(3)] + [threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(added) == 15 and len(set(added)) == 15  # generated ids never collide across threads
    assert eng.index.num_documents == 16


def test_generator_custom_ops_setting(monkeypatch):
    """EngineConfig.generator_custom_ops reaches Generator.from_pretrained (validated up front)."""
    from rag_engine.generator import Generator

    seen = {}
    monkeypatch.setattr(Generator, "from_pretrained", classmethod(lambda cls, *a, **kw: seen.update(kw) or "gen"))
    for value in (None, True, False):
        assert Engine._load_generator(EngineConfig(generator_custom_ops=value)) == "gen"
        assert seen["custom_ops"] is value
    with pytest.raises(ValueError, match="generator_custom_ops must be a bool or None, got 'yes'"):
        EngineConfig(generator_custom_ops="yes")
