"""A process killed (SIGKILL) in the middle of PassageIndex.save never damages the saved index."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("bm25s")
from rag_engine.retrieval.index import PassageIndex  # noqa: E402

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from rag_engine.retrieval import persist
    from rag_engine.retrieval.index import PassageIndex

    root, mode, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    idx = PassageIndex.load(root)
    rng = np.random.default_rng(1)
    n = 50
    idx.add("new", [(0, 1)] * n, ["new passage"] * n, rng.standard_normal((n, 64)).astype(np.float32))
    if mode == "before_flip":  # every file written, CURRENT not yet switched
        real = persist.commit_version
        def slow_commit(*a, **k):
            open(marker, "w").close()
            time.sleep(60)
            return real(*a, **k)
        persist.commit_version = slow_commit
    else:  # "mid_write": killed after the vectors are written, before the passages table
        real_save = np.save
        def slow_save(path, arr, *a, **k):
            real_save(path, arr, *a, **k)
            open(marker, "w").close()
            time.sleep(60)
        np.save = slow_save
    idx.save(root)
""")


def build(root) -> PassageIndex:
    rng = np.random.default_rng(0)
    idx = PassageIndex("enc", 64)
    for d in range(20):
        idx.add(f"d{d}", [(0, 1)] * 5, [f"doc {d} text {j}" for j in range(5)],
                rng.standard_normal((5, 64)).astype(np.float32))
    idx.save(root)
    return idx


@pytest.mark.parametrize("mode", ["before_flip", "mid_write"])
def test_sigkill_during_save(tmp_path, mode):
    root = tmp_path / "idx"
    original = build(root)
    q = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    expected = original.search_dense(q, 5)[1]
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), mode, str(marker)])
    deadline = time.time() + 120
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the child never reached the point to kill it at"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    loaded = PassageIndex.load(root)  # verifies every checksum
    assert loaded.num_documents == 20 and "new" not in loaded.doc_ids()
    np.testing.assert_array_equal(loaded.search_dense(q, 5)[1], expected)
    loaded.add("later", [(0, 1)], ["later"], np.ones((1, 64), np.float32))
    loaded.save(root)  # the next save works and clears the half-written version
    assert PassageIndex.load(root).num_documents == 21
    assert len(list(root.glob("v*"))) == 1
