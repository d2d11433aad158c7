"""The KV cache: one preallocated fp32 buffer that ONNX Runtime updates in place.

Layout ``[layers, 2 (key/value), batch, kv_heads, max_len, head_dim]``: for a batch of ``n``
live rows, ``buffer[l, j, :n]`` is a contiguous ``[n, kv_heads, max_len, head_dim]`` block that
is bound as both ``past_key_values.{l}.*`` and ``present.{l}.*`` — GroupQueryAttention writes the
new position of each row at index ``len_b`` and reads ``[0, len_b]``, so decode steps neither
allocate nor copy the cache. Finished rows are dropped by moving the live rows to the front.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Preallocated key/value buffers for ``batch`` rows of up to ``max_len`` positions."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, batch: int, max_len: int) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
        # np.zeros maps pages lazily: memory is committed only for positions actually written.
        self.buffer = np.zeros((num_layers, 2, batch, num_kv_heads, max_len, head_dim), np.float32)
        self.batch = batch
        self.max_len = max_len
        self.num_layers = num_layers

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key, value) ``[batch, kv_heads, max_len, head_dim]`` views of the live rows."""
        n = self.batch
        return [(self.buffer[layer, 0, :n], self.buffer[layer, 1, :n]) for layer in range(self.num_layers)]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows ``[start, stop)`` of this buffer (a view: runs on it write here)."""
        if not 0 <= start < stop <= self.buffer.shape[2]:
            raise ValueError(f"rows must satisfy 0 <= start < stop <= {self.buffer.shape[2]}, got [{start}, {stop})")
        view = object.__new__(KVCache)
        view.buffer, view.batch, view.max_len, view.num_layers = (
            self.buffer[:, :, start:stop], stop - start, self.max_len, self.num_layers)
        return view

    def keep(self, rows: np.ndarray, used: int) -> None:
        """Keep only ``rows`` (ascending live-row indices), moved to the front; copies ``[:used]`` positions."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or (rows.size and (rows[0] < 0 or rows[-1] >= self.batch or (np.diff(rows) <= 0).any())):
            raise ValueError(f"rows must be ascending indices below {self.batch}, got {rows}")
        if rows.size == self.batch:
            return
        for dest, src in enumerate(rows.tolist()):
            if dest != src:  # dest < src: moving rows forward never overwrites a row still to move
                self.buffer[:, :, dest, :, :used] = self.buffer[:, :, src, :, :used]
        self.batch = int(rows.size)
