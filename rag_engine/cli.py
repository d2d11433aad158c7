"""`rag-engine` command line: build and inspect indexes, ask questions, run benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rag_engine.errors import RagEngineError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}


def pydoc_corpus() -> tuple[list[str], list[str]]:
    """(ids, texts) of the Python reference documentation shipped with Python (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return keys, [topics[k] for k in keys]


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        logging.warning("skipping %s: binary file", path)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        logging.warning("skipping %s: not UTF-8 text", path)
        return None


def iter_sources(sources: list[str]) -> Iterator[tuple[str, str, dict]]:
    """(doc id, text, metadata) from text/markdown files, folders of them, and JSONL files
    (one object per line with "text" and optional "id" / "metadata"). A file's id is its path
    as reached from the source given; a JSONL line without "id" gets "<path>:<line index>"."""
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise FileNotFoundError(f"index build: source {src} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                for n, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        text = obj["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise ValueError(f"{f}:{n + 1}: expected a JSON object with a \"text\" field ({exc})") from exc
                    meta = obj.get("metadata", {})
                    if not isinstance(text, str) or not isinstance(meta, dict):
                        raise ValueError(f"{f}:{n + 1}: \"text\" must be a string and \"metadata\" an object")
                    doc_id = obj.get("id")  # absent or null: the line's place in the file
                    yield str(doc_id) if doc_id is not None else f"{f}:{n}", text, dict(meta, source=str(f))
            elif f.suffix in TEXT_SUFFIXES or path == f:
                text = _read_text(f)
                if text is not None:  # the path as given: files of two folders keep apart
                    yield str(f), text, {"source": str(f)}


def cmd_index_build(args: argparse.Namespace) -> int:
    from rag_engine.engine import Engine

    overrides = {k: v for k, v in (("index_dtype", args.dtype), ("passage_tokens", args.passage_tokens),
                                   ("overlap_tokens", args.overlap_tokens)) if v is not None}
    eng = Engine.from_pretrained("default", load_generator=False, **overrides)
    ids, texts, metas = [], [], []
    if args.pydoc:
        ids, texts = pydoc_corpus()
        metas = [{"source": "pydoc_data.topics"} for _ in ids]
    for doc_id, text, meta in iter_sources(args.sources):
        ids.append(doc_id)
        texts.append(text)
        metas.append(meta)
    seen: dict[str, str] = {}
    for doc_id, meta in zip(ids, metas, strict=True):
        if doc_id in seen:
            print(f"index build: document id {doc_id!r} comes from both {seen[doc_id]} and "
                  f"{meta['source']}; give JSONL lines distinct \"id\"s", file=sys.stderr)
            return 2
        seen[doc_id] = meta["source"]
    if not texts:
        print("index build: no documents found (give files, folders, JSONL or --pydoc)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    eng.add_documents(texts, ids=ids, metadata=metas, progress=not args.quiet)
    if len(eng.index) == 0:
        print(f"index build: none of the {len(texts)} documents has any text to index", file=sys.stderr)
        return 2
    eng.save(args.out)
    print(f"indexed {eng.index.num_documents} documents as {len(eng.index)} passages in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from rag_engine.retrieval.persist import open_version

    _, manifest = open_version(Path(args.dir), verify=True)
    manifest.pop("files", None)
    print(json.dumps(manifest, indent=1, sort_keys=True))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from rag_engine import SamplingParams
    from rag_engine.engine import Engine

    overrides = {"generator_precision": args.precision} if args.precision else {}
    if args.generator:
        overrides["generator"] = args.generator
    eng = Engine.load(args.dir, **overrides)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty)
    if args.k is not None and args.k < 0:  # refused before any question is printed
        raise ValueError(f"--k must be >= 0, got {args.k}")
    for question in args.questions:
        print(f"Q: {question}")
        if args.stream:
            print("A: ", end="", flush=True)
            for delta in eng.stream(question, params, k=args.k, mode=args.mode, retriever=args.retriever):
                print(delta, end="", flush=True)
            print()
            continue
        (out,) = eng.generate([question], params, k=args.k, mode=args.mode, retriever=args.retriever)
        print(f"A: {out.text.strip()}")
        for i, d in enumerate(out.documents):
            print(f"  [{i + 1}] {d.doc_id} (passage {d.passage_id}, score {d.score:.3f}, alpha {d.alpha:.2f}): "
                  f"{' '.join(d.text.split())[:90]}...")
        m = out.metrics
        stages = " | ".join(f"{k.removesuffix('_ms')} {m[k]:.0f} ms" for k in
                            ("encode_ms", "retrieve_ms", "fuse_ms", "prefill_ms", "decode_ms") if k in m)
        print(f"  timings: {stages} | {m.get('decode_tokens_per_s', 0):.1f} tok/s\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rag_engine.engine import Engine
    from rag_engine.serve import ServerConfig, serve

    overrides = {"generator_precision": args.precision} if args.precision else {}
    if args.generator:
        overrides["generator"] = args.generator
    for name in ("mode", "k", "threads", "max_batch_rows", "max_waiting"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.prefix_cache_mb is not None:
        overrides["prefix_cache_bytes"] = args.prefix_cache_mb << 20
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    eng = Engine.load(args.dir, **overrides)
    eng.scheduler  # noqa: B018  (builds the scheduler: bad batching settings fail here, not per request)
    serve(eng, args.host, args.port, ServerConfig(model_name=args.model_name, max_body_bytes=args.max_body_bytes))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"bench_{args.name}.py"
    if not script.is_file():
        print(f"bench: no benchmark {args.name!r} ({script} missing; benchmarks run from a source checkout)",
              file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-engine", description="Retrieval-augmented generation engine")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="build or inspect an index").add_subparsers(dest="index_cmd", required=True)
    b = idx.add_parser("build", help="index text/markdown files, folders, JSONL, or the Python docs")
    b.add_argument("sources", nargs="*", help="files or folders (.txt .md .rst, .jsonl with a text field)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--pydoc", action="store_true", help="add the Python reference docs (pydoc_data.topics)")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"], help="vector storage type")
    b.add_argument("--passage-tokens", type=int, help="tokens per passage")
    b.add_argument("--overlap-tokens", type=int, help="tokens shared by neighbouring passages")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_index_build)
    i = idx.add_parser("info", help="print an index's manifest (checksums verified)")
    i.add_argument("dir")
    i.set_defaults(func=cmd_index_info)
    a = sub.add_parser("ask", help="answer questions over an index")
    a.add_argument("dir", help="index directory")
    a.add_argument("questions", nargs="+")
    a.add_argument("--mode", choices=["concat", "rag_token", "rag_sequence", "latent", "latent_concat"], default=None)
    a.add_argument("--k", type=int, default=None, help="passages to retrieve (0 = no retrieval)")
    a.add_argument("--retriever", choices=["dense", "bm25", "hybrid"], default=None)
    a.add_argument("--max-tokens", type=int, default=96)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--repetition-penalty", type=float, default=1.0)
    a.add_argument("--frequency-penalty", type=float, default=0.5, help="on output tokens only")
    a.add_argument("--precision", choices=["fp32", "int8", "int4"], default=None, help="generator precision")
    a.add_argument("--generator", default=None, help="Hugging Face causal-LM folder (default: SmolLM2-135M)")
    a.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    a.set_defaults(func=cmd_ask)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over an index (needs the 'serve' extra)")
    sv.add_argument("dir", help="index directory")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", default="rag-engine", help="the model id clients send")
    sv.add_argument("--mode", choices=["concat", "rag_token", "rag_sequence"], default=None)
    sv.add_argument("--k", type=int, default=None, help="default passages per request (0 = no retrieval)")
    sv.add_argument("--precision", choices=["fp32", "int8", "int4"], default=None, help="generator precision")
    sv.add_argument("--generator", default=None, help="Hugging Face causal-LM folder (default: SmolLM2-135M)")
    sv.add_argument("--threads", type=int, default=None)
    sv.add_argument("--max-batch-rows", type=int, default=None, help="rows decoded together")
    sv.add_argument("--max-waiting", type=int, default=None, help="queued requests before 429")
    sv.add_argument("--prefix-cache-mb", type=int, default=None, help="document-KV prefix cache bound (0 = off)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    sv.set_defaults(func=cmd_serve)
    from rag_engine.train_cli import add_train_parser

    add_train_parser(sub)
    be = sub.add_parser("bench", help="run benchmarks/bench_<name>.py (source checkout)")
    be.add_argument("name", help="e.g. topk_ip, engine, generate")
    be.add_argument("args", nargs=argparse.REMAINDER)
    be.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # bm25s sets its own logger to DEBUG when imported
        handler.setLevel(level)
    try:
        return args.func(args)
    except (OSError, ValueError, OverflowError, RagEngineError) as exc:  # the user's input, files or machine
        print(f"rag-engine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
