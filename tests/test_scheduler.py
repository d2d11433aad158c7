"""Continuous batching: requests joining and leaving a running batch get the outputs they would
get alone (greedy ids), from threads and asyncio; cancelled rows leave at once; bounds hold."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("bm25s")
from test_engine import GREEDY, cache_dir, encoder, generator, make_engine  # noqa: E402,F401
from test_generator_text import gen_byte_tokenizer  # noqa: E402,F401  (fixture)

from rag_engine.generator import SamplingParams  # noqa: E402
from rag_engine.modes import make_row  # noqa: E402
from rag_engine.scheduler import (  # noqa: E402
    QueueFullError,
    Request,
    RequestHandle,
    Scheduler,
    SchedulerConfig,
    single_seq,
)

PROMPTS = ["the quick brown fox", "retrieval augmented generation is", "naïve café", "emoji 🙂 and",
           "the lazy dog jumps over the quick brown fox again and again"]


def request(gen, prompt: str, params: SamplingParams) -> Request:
    row = make_row(gen, gen.encode(prompt), params)
    return Request([single_seq(row)], RequestHandle(), lambda req: req.seqs[0].row)


def test_joining_and_leaving_rows_match_one_at_a_time(generator):  # noqa: F811
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 3, 20, 7, 15)]
    alone = [generator.generate([p], sp)[0] for p, sp in zip(PROMPTS, params)]
    sched = Scheduler(generator.session, SchedulerConfig(max_batch_rows=3, max_prefill_tokens=64))
    try:
        handles = [sched.submit(request(generator, p, sp)) for p, sp in zip(PROMPTS[:2], params[:2])]
        time.sleep(0.05)  # the first two are decoding when the rest arrive
        handles += [sched.submit(request(generator, p, sp)) for p, sp in zip(PROMPTS[2:], params[2:])]
        rows = [h.result(timeout=60) for h in handles]
        assert [tuple(r.tokens) for r in rows] == [a.token_ids for a in alone]
        assert [r.text for r in rows] == [a.text for a in alone]
        stats = sched.stats()
        assert stats["finished"] == 5 and stats["running"] == 0 and stats["batch_rows"] == 0
        assert stats["generated_tokens"] == sum(p.max_tokens for p in params)
    finally:
        sched.close()


def test_cancel_frees_rows_and_bounds_hold(generator):  # noqa: F811
    sched = Scheduler(generator.session, SchedulerConfig(max_batch_rows=2, max_waiting=1, max_batch_tokens=200))
    try:
        long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
        h = sched.submit(request(generator, PROMPTS[0], long))
        deltas = h.deltas(timeout=60)
        next(deltas)
        h.cancel()
        deadline = time.time() + 30  # generous: a loaded CI machine may deschedule the loop thread
        while sched.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert sched.stats()["running"] == 0 and sched.stats()["batch_rows"] == 0
        assert sched.stats()["cancelled"] == 1
        with pytest.raises(ValueError, match="positions"):
            sched.submit(request(generator, PROMPTS[0], SamplingParams(max_tokens=240)))
        with pytest.raises(ValueError, match="context of 256"):
            sched.submit(request(generator, PROMPTS[0], SamplingParams(max_tokens=500)))
        with sched._wake:  # hold the loop so the queue fills
            sched.submit(request(generator, PROMPTS[1], GREEDY))
            with pytest.raises(QueueFullError) as err:
                sched.submit(request(generator, PROMPTS[2], GREEDY))
        assert err.value.retry_after > 0
    finally:
        sched.close()


@pytest.mark.parametrize("mode", ["concat", "rag_token", "rag_sequence"])
def test_engine_submit_matches_generate(encoder, generator, cache_dir, mode):  # noqa: F811
    eng = make_engine(encoder, generator, cache_dir, k=2, mode=mode)
    qs = ["How do I read a file?", "What is a class?", "How do dictionaries handle a missing key?"]
    try:
        ref = eng.generate(qs, GREEDY)
        handles = [eng.submit(q, GREEDY) for q in qs]
        outs = [h.result(timeout=60) for h in handles]
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        assert [o.text for o in outs] == [r.text for r in ref]
        assert [[d.doc_id for d in o.documents] for o in outs] == [[d.doc_id for d in r.documents] for r in ref]
        assert all(o.metrics["ttft_ms"] > 0 for o in outs)
        assert "".join(eng.submit(qs[0], GREEDY).deltas(timeout=60)) == ref[0].text
    finally:
        eng.close()


def test_agenerate_and_astream_from_asyncio(encoder, generator, cache_dir):  # noqa: F811
    eng = make_engine(encoder, generator, cache_dir, k=2, mode="rag_token")
    qs = ["How do I read a file?", "What is a class?", "Explain for loops"]
    ref = eng.generate(qs, GREEDY)

    async def run():
        outs = await asyncio.gather(*(eng.agenerate(q, GREEDY) for q in qs))
        text = "".join([d async for d in eng.astream(qs[1], GREEDY)])
        stream = eng.astream(qs[2], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # leaving early cancels the request
        return outs, text

    try:
        outs, text = asyncio.run(run())
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        assert text == ref[1].text
        deadline = time.time() + 5
        while eng.scheduler.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert eng.scheduler.stats()["running"] == 0
        assert eng.stats()["cancelled"] == 1 and eng.stats()["prefix_cache_hits"] > 0
    finally:
        eng.close()


def test_seq_positions_account_for_every_row(generator):  # noqa: F811
    req = request(generator, PROMPTS[0], SamplingParams(max_tokens=5))
    assert req.positions == len(req.seqs[0].prompts[0]) + 5 and req.width == 1
    assert np.asarray(req.seqs[0].prompts[0]).dtype == np.int64


def test_cache_grows_on_demand_with_rows_in_flight(generator, monkeypatch):  # noqa: F811
    """The KV cache starts short and doubles when a longer request joins; live rows keep their KV."""
    import rag_engine.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "INITIAL_CACHE_LEN", 16)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (30, 6, 90)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    alone = [generator.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    sched = Scheduler(generator.session, SchedulerConfig(max_batch_rows=3))
    try:
        assert sched.stats()["cache_positions"] == 16
        handles = [sched.submit(request(generator, prompts[0], params[0]))]
        deltas = handles[0].deltas(timeout=60)
        next(deltas)  # the first row is decoding when the longer ones arrive
        handles += [sched.submit(request(generator, p, sp)) for p, sp in zip(prompts[1:], params[1:])]
        rows = [h.result(timeout=60) for h in handles]
        assert [tuple(r.tokens) for r in rows] == [a.token_ids for a in alone]
        stats = sched.stats()
        assert stats["cache_grows"] >= 2 and stats["cache_positions"] >= len(generator.encode(prompts[2])) + 90
        assert stats["cache_positions"] <= 256
    finally:
        sched.close()


def test_chunked_prefill_decodes_running_rows_between_pieces(generator):  # noqa: F811
    """A long prompt joining a running batch is prefilled in pieces of max_prefill_tokens ids,
    with a decode step of the running rows after each piece; every output equals its solo run."""
    params = [SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)]
    prompts = [PROMPTS[0], PROMPTS[4] * 2]
    alone = [generator.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    sched = Scheduler(generator.session, SchedulerConfig(max_batch_rows=3, max_prefill_tokens=8))
    try:
        first = sched.submit(request(generator, prompts[0], params[0]))
        deadline = time.time() + 30
        while sched.stats()["generated_tokens"] < 1 and time.time() < deadline:
            time.sleep(0.0005)  # until the first request is decoding (it has 200 tokens to go)
        before = sched.stats()["generated_tokens"]
        second = sched.submit(request(generator, prompts[1], params[1]))
        rows = [first.result(timeout=60), second.result(timeout=60)]
        assert [tuple(r.tokens) for r in rows] == [a.token_ids for a in alone]
        stats = sched.stats()
        assert len(generator.encode(prompts[1])) > 16  # several pieces of 8 ids
        assert stats["prefill_chunk_breaks"] >= 1 and stats["generated_tokens"] > before
    finally:
        sched.close()


def test_failed_step_fails_every_request_it_holds(encoder, generator, cache_dir, monkeypatch):  # noqa: F811
    """A step that raises while prefilling newcomers must fail them too (they hung forever)."""
    eng = make_engine(encoder, generator, cache_dir, k=0, mode="concat")
    try:
        sched = eng.scheduler
        real = sched._prefill

        def broken(fresh):
            raise RuntimeError("prefill exploded")

        monkeypatch.setattr(sched, "_prefill", broken)
        handles = [eng.submit(q, GREEDY) for q in ("What is a class?", "How do I loop?")]
        for h in handles:
            with pytest.raises(RuntimeError, match="prefill exploded"):
                h.result(timeout=30)
        monkeypatch.setattr(sched, "_prefill", real)
        assert eng.submit("What is a class?", GREEDY).result(timeout=60).token_ids
        with pytest.raises(ValueError, match="queries\\[0\\] is empty"):
            eng.submit("   ", GREEDY)
        with pytest.raises(ValueError, match="stop_token_ids must be < the vocabulary size"):
            eng.submit("What is a class?", SamplingParams(stop_token_ids=(10**6,), min_tokens=1))
    finally:
        eng.close()


def test_rag_requests_use_one_row_per_retrieved_passage(encoder, generator, cache_dir):  # noqa: F811
    eng = make_engine(encoder, generator, cache_dir, mode="rag_token")
    try:
        q = "How do I read a file?"
        ref = eng.generate([q], GREEDY, k=12)[0]  # 4 documents: 4 rows
        out = eng.submit(q, GREEDY, k=12).result(timeout=60)
        assert out.token_ids == ref.token_ids
        assert out.metrics["prompt_tokens"] == ref.metrics["prompt_tokens"]  # rows for 12 slots before
        from rag_engine.engine import DEFAULT_PARAMS
        from rag_engine.engine_serve import _checked

        assert _checked(eng, q, None, None, None)[0] is DEFAULT_PARAMS  # as generate (no frequency penalty before)
    finally:
        eng.close()


def test_cancelled_asubmit_cancels_the_request_it_queues(encoder, generator, cache_dir):  # noqa: F811
    import threading

    from rag_engine.engine_serve import asubmit

    eng = make_engine(encoder, generator, cache_dir, k=0, mode="concat")
    release = threading.Event()
    real = eng.scheduler.submit

    def slow_submit(request):  # the worker thread is still busy when the caller gives up
        release.wait(10)
        return real(request)

    eng.scheduler.submit = slow_submit
    try:
        async def main():
            long_run = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)  # still running when cancelled
            task = asyncio.ensure_future(asubmit(eng, "What is a class?", long_run, 0, None, None, None))
            await asyncio.sleep(0.05)
            task.cancel()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)  # the worker queues its request, which is then cancelled

        before = eng.stats().get("cancelled", 0)
        asyncio.run(main())
        deadline = time.time() + 10
        while eng.stats()["cancelled"] == before and time.time() < deadline:
            time.sleep(0.02)
        assert eng.stats()["cancelled"] == before + 1
    finally:
        eng.close()
