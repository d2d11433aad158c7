"""Prometheus text exposition for the server: counters, TTFT/TPOT histograms, engine gauges."""

from __future__ import annotations

import threading
from collections import defaultdict

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class ServerMetrics:
    """Thread-safe counters of one server process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, metrics: dict) -> None:
        with self._lock:
            self.prompt_tokens += int(metrics.get("prompt_tokens", 0))
            self.generation_tokens += int(metrics.get("completion_tokens", 0))
            if "ttft_ms" in metrics:
                self.ttft.observe(metrics["ttft_ms"] / 1e3)
            if metrics.get("completion_tokens", 0) > 1:
                self.tpot.observe(metrics["tpot_ms"] / 1e3)

    def render(self, engine_stats: dict) -> str:
        with self._lock:
            lines = ["# TYPE rag_engine_requests_total counter"]
            lines += [f'rag_engine_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# TYPE rag_engine_prompt_tokens_total counter",
                      f"rag_engine_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE rag_engine_generation_tokens_total counter",
                      f"rag_engine_generation_tokens_total {self.generation_tokens}"]
            lines += self.ttft.lines("rag_engine_time_to_first_token_seconds")
            lines += self.tpot.lines("rag_engine_time_per_output_token_seconds")
        for key, value in sorted(engine_stats.items()):
            lines += [f"# TYPE rag_engine_{key} gauge", f"rag_engine_{key} {value}"]
        return "\n".join(lines) + "\n"
