"""Sanity checks for the hand-written QA evaluation set over the pydoc corpus.

Each line of ``tests/data/pydoc_qa.jsonl`` is a JSON object::

    {"question": str, "topic": <key of pydoc_data.topics.topics>,
     "keywords": [1-3 short strings, each found in the topic text]}
"""

import collections
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

QA_PATH = Path(__file__).parent / "data" / "pydoc_qa.jsonl"

MIN_ITEMS = 70
MIN_TOPICS = 45
MAX_PER_TOPIC = 3


def _load():
    items = []
    with QA_PATH.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:  # pragma: no cover - failure path
                pytest.fail(f"line {lineno}: invalid JSON: {e}")
    return items


ITEMS = _load()


def test_enough_items():
    assert len(ITEMS) >= MIN_ITEMS, f"only {len(ITEMS)} items"


def test_schema():
    for lineno, item in ITEMS:
        assert isinstance(item, dict), f"line {lineno}: not an object"
        assert set(item) == {"question", "topic", "keywords"}, (
            f"line {lineno}: unexpected fields {sorted(item)}"
        )
        q, topic, kws = item["question"], item["topic"], item["keywords"]
        assert isinstance(q, str) and q.strip(), f"line {lineno}: empty question"
        assert isinstance(topic, str), f"line {lineno}: topic must be a string"
        assert isinstance(kws, list) and 1 <= len(kws) <= 3, (
            f"line {lineno}: need 1-3 keywords"
        )
        for kw in kws:
            assert isinstance(kw, str) and kw.strip(), f"line {lineno}: bad keyword {kw!r}"


def test_topics_exist():
    for lineno, item in ITEMS:
        assert item["topic"] in topics, f"line {lineno}: unknown topic {item['topic']!r}"


def test_keywords_in_gold_topic():
    for lineno, item in ITEMS:
        text = topics[item["topic"]].lower()
        missing = [kw for kw in item["keywords"] if kw.lower() not in text]
        assert not missing, (
            f"line {lineno}: keywords {missing} not in topic {item['topic']!r}"
        )


def test_no_duplicate_questions():
    seen = {}
    for lineno, item in ITEMS:
        key = " ".join(item["question"].lower().split())
        assert key not in seen, f"line {lineno}: duplicate of line {seen[key]}"
        seen[key] = lineno


def test_topic_coverage_and_balance():
    counts = collections.Counter(item["topic"] for _, item in ITEMS)
    assert len(counts) >= MIN_TOPICS, f"only {len(counts)} distinct topics"
    over = {t: n for t, n in counts.items() if n > MAX_PER_TOPIC}
    assert not over, f"too many questions for topics: {over}"
