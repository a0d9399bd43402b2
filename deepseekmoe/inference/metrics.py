"""Serving metrics in the Prometheus text format (version 0.0.4): counters, gauges and histograms, no dependency.

Written by the engine thread, read by /metrics; every value is a Python number updated under the GIL, so a scrape
sees each value whole (not necessarily all of them from the same instant).
"""

from __future__ import annotations

import bisect
import time
from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip([*self.buckets, float("inf")], self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class EngineMetrics:
    def __init__(self) -> None:
        self.requests_received = 0
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.max_batch = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.time_to_first_token = Histogram(LATENCY_BUCKETS)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)
        self.max_batch = max(self.max_batch, size)

    def observe_finish(self, request: Any) -> None:
        reason = request.finish_reason or "error"
        self.finished[reason] = self.finished.get(reason, 0) + 1
        now = time.perf_counter()
        self.latency.observe(now - request.arrival)
        if request.first_token_at is not None:
            self.time_to_first_token.observe(request.first_token_at - request.arrival)

    def render(self, running: int, waiting: int, prefix: str = "deepseekmoe") -> str:
        lines = []

        def metric(name: str, kind: str, doc: str, values: list[str]) -> None:
            lines.extend([f"# HELP {prefix}_{name} {doc}", f"# TYPE {prefix}_{name} {kind}"])
            lines.extend(f"{prefix}_{v}" for v in values)

        metric("requests_received_total", "counter", "Requests accepted into the queue.",
               [f"requests_received_total {self.requests_received}"])
        metric("requests_finished_total", "counter", "Requests finished, by finish reason.",
               [f'requests_finished_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [f"prompt_tokens_total {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Tokens generated.",
               [f"generation_tokens_total {self.generation_tokens}"])
        metric("num_requests_running", "gauge", "Sequences in the running batch.", [f"num_requests_running {running}"])
        metric("num_requests_waiting", "gauge", "Requests in the queue.", [f"num_requests_waiting {waiting}"])
        metric("batch_size", "histogram", "Sequences per decode step.", self.batch_size.lines("batch_size"))
        metric("request_latency_seconds", "histogram", "Arrival to finish.",
               self.latency.lines("request_latency_seconds"))
        metric("time_to_first_token_seconds", "histogram", "Arrival to the first generated token.",
               self.time_to_first_token.lines("time_to_first_token_seconds"))
        return "\n".join(lines) + "\n"
