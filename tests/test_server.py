"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("bm25s")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from test_engine import GREEDY, cache_dir, encoder, generator, make_engine  # noqa: E402,F401
from test_generator_text import gen_byte_tokenizer  # noqa: E402,F401  (fixture)

from rag_engine.serve import ServerConfig, create_app  # noqa: E402

GREEDY_BODY = {"temperature": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(encoder, generator, cache_dir):  # noqa: F811
    eng = make_engine(encoder, generator, cache_dir, k=2, mode="rag_token", max_waiting=4)
    app = create_app(eng, ServerConfig(model_name="tiny", max_body_bytes=4096, max_in_flight=12,
                                       default_max_tokens=8))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, engine=eng, client=openai.OpenAI(base_url=url + "/v1", api_key="x"))
    srv.should_exit = True
    thread.join(timeout=10)
    eng.close()


def wait_idle(eng, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while eng.scheduler.stats()["running"] and time.time() < deadline:
        time.sleep(0.01)


def test_completions_and_chat_match_the_engine(server):
    eng, client = server.engine, server.client
    q = "How do I read a file?"
    (ref,) = eng.generate([q], GREEDY)
    out = client.completions.create(model="tiny", prompt=q, max_tokens=8, temperature=0.0,
                                    extra_body={"k": 2, "mode": "rag_token"})
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert [d["doc_id"] for d in out.documents] == [d.doc_id for d in ref.documents]
    assert out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                 max_tokens=8, temperature=0.0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason and chunks[0].documents
    bare = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0.0, extra_body={"k": 0},
                                          messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": q}])
    assert bare.documents == [] and bare.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=q, max_tokens=8, temperature=0.0, stream=True, extra_body={"mode": "concat"}))
    assert streamed == eng.generate([q], GREEDY, mode="concat")[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b'{"prompt": "hi", ', 400, "malformed JSON"),
    (json.dumps({"prompt": "hi", "bogus": 1}).encode(), 400, "bogus"),
    (json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": "hi", "max_tokens": 100000}).encode(), 400, "context"),
    (json.dumps({"prompt": "hi", "k": -1}).encode(), 400, "k"),
    (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x" * 5000}).encode(), 413, "exceeds the limit"),
    (json.dumps({"prompt": "hi", "max_tokens": "3"}).encode(), 400, "max_tokens"),  # "3" is not 3
    (json.dumps({"prompt": "hi", "k": True}).encode(), 400, "k"),
    (json.dumps({"prompt": ["  "]}).encode(), 400, "empty"),
])
def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, body, status, needle):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    ok = server.client.completions.create(model="tiny", prompt="What is a class?", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_frees_the_row(server, monkeypatch):
    eng = server.engine
    session = eng.generator.session
    decode = session.decode

    def slow_decode(*args):  # the tiny model would finish before the client leaves
        time.sleep(0.02)
        return decode(*args)

    monkeypatch.setattr(session, "decode", slow_decode)
    before = eng.stats().get("cancelled", 0)
    body = {"prompt": "Explain for loops", "max_tokens": 120, "stream": True, "temperature": 0.0, "k": 0,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    deadline = time.time() + 5  # the request may still be queued when the client leaves
    while eng.stats()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.01)
    wait_idle(eng)
    stats = eng.stats()
    assert stats["running"] == 0 and stats["batch_rows"] == 0 and stats["cancelled"] == before + 1
    # A non-streaming client that gives up is cancelled too (it generated to the end before).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body | {"stream": False}, timeout=0.5)
    deadline = time.time() + 5
    while eng.stats()["cancelled"] == before + 1 and time.time() < deadline:
        time.sleep(0.01)
    wait_idle(eng)
    stats = eng.stats()
    assert stats["running"] == 0 and stats["cancelled"] == before + 2


def test_too_many_requests_is_429_with_retry_after(server):
    body = {"prompt": "Explain for loops", "max_tokens": 60, "temperature": 0.0}
    codes = []

    def post() -> None:
        codes.append(httpx.post(server.url + "/v1/completions", json=body, timeout=60))

    threads = [threading.Thread(target=post) for _ in range(8)]
    with server.engine.generator_lock:  # no step runs: requests pile up in the bounded queue (4)
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while sum(r.status_code == 429 for r in codes) < 4 and time.time() < deadline:
            time.sleep(0.02)
    for t in threads:
        t.join(60)
    limited = [r for r in codes if r.status_code == 429]
    assert len(limited) == 4 and all(r.headers["retry-after"] == "1" for r in limited)
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    assert sorted(r.status_code for r in codes) == [200] * 4 + [429] * 4


def test_metrics_are_prometheus_text(server):
    server.client.completions.create(model="tiny", prompt="What is a class?", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("rag_engine_requests_total{", "rag_engine_time_to_first_token_seconds_bucket",
                 "rag_engine_time_per_output_token_seconds_count", "rag_engine_prefix_cache_hits",
                 "rag_engine_generation_tokens_total", 'status="400"'):
        assert name in text, name


def test_load_of_a_few_hundred_requests(server):
    import psutil

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=5)
    questions = ["How do I read a file?", "What is a class?", "Explain for loops", "dict missing key"]
    errors, rss = [], []

    def worker(i: int) -> None:
        for j in range(25):
            try:
                client.completions.create(model="tiny", prompt=questions[(i + j) % 4], max_tokens=2,
                                          extra_body={"k": 1})
            except Exception as exc:  # noqa: BLE001  (counted, reported below)
                errors.append(exc)
            if j % 5 == 0:
                rss.append(psutil.Process().memory_info().rss)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert max(rss[len(rss) // 2:]) - min(rss[len(rss) // 2:]) < 64 << 20  # stable in the second half
    wait_idle(server.engine)
    assert server.engine.stats()["running"] == 0


def test_chunked_body_limit_default_max_tokens_and_failures(server, monkeypatch):
    # A body without content-length is counted as it arrives.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    # Without max_tokens the default shrinks to the context left instead of refusing the prompt.
    from rag_engine.engine_generate import _concat_messages

    eng = server.engine
    ctx = eng.scheduler.max_len
    n = next(n for n in range(1, ctx) if len(eng.generator.encode(_concat_messages(eng, "a" * n, []))) >= ctx - 3)
    prompt = "a" * n  # 3 positions left: fewer than the default max_tokens of 8
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "k": 0, "temperature": 0.0},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 3
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "k": 0, "max_tokens": ctx}, timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    # A request that fails inside the engine gets an OpenAI error body, streamed or not.
    from rag_engine.generator import sampling

    def broken(self, logits):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(sampling.Sampler, "sample", broken)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "What is a class?", "max_tokens": 2}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "sampler exploded" in r.json()["error"]["message"]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "What is a class?", "max_tokens": 2, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert json.loads(lines[-1][6:])["error"]["type"] == "server_error"
    monkeypatch.undo()
    ok = server.client.completions.create(model="tiny", prompt="What is a class?", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_stream_include_usage(server):
    chunks = list(server.client.completions.create(model="tiny", prompt="What is a class?", max_tokens=4,
                                                   temperature=0.0, stream=True,
                                                   stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    plain = list(server.client.completions.create(model="tiny", prompt="What is a class?", max_tokens=4,
                                                  temperature=0.0, stream=True))
    assert all(c.usage is None for c in plain)
