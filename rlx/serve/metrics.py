"""Prometheus metrics under vLLM's names (prefix `rlx:`), and the per-request access log.

Dashboards built for vLLM read rlx unchanged after a prefix swap: the same gauges (requests
running / waiting, KV-cache usage), counters (prompt / generation tokens, prefix-cache queries /
hits, finished requests by reason) and histograms (time to first token, inter-token latency,
end-to-end latency, queue time), with vLLM's buckets. The engine's own state is read when
`/metrics` is scraped (a collector over `stats()`), never copied on every step. Each registry is
its own, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "rlx:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)

# engine stats() key -> (metric, kind, help); a key the engine does not report is left out
_ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "num_requests_running": ("num_requests_running", "gauge", "Requests in the running batch."),
    "num_requests_waiting": ("num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gauge", "KV-cache usage: 1 means every page is in use."),
    "prefix_cache_queries": ("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, float]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # registering must not call stats(): the engine may not exist yet

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, (name, kind, doc) in _ENGINE_METRICS.items():
            if key in stats:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(PREFIX + name, doc, value=float(stats[key]))


class Metrics:
    """One server's registry."""

    def __init__(self, stats: Callable[[], Mapping[str, float]]) -> None:
        disable_created_metrics()  # no `_created` series, as vLLM
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(stats))
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to the first step that runs it.",
                               buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RequestClock:
    """One sequence's timeline, observed into the histograms as tokens arrive."""

    metrics: Metrics
    arrival: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def token(self, queued_s: float | None = None) -> None:
        """A generated token arrived; the first carries the engine's queue time."""
        if queued_s is not None:
            self.metrics.queue.observe(queued_s)
        now = time.perf_counter()
        if self.last is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.tokens += 1
        self.metrics.generation_tokens.inc()

    def finish(self, reason: str) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.request_success.labels(finished_reason=reason).inc()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.arrival


ACCESS_LOG = logging.getLogger("rlx.serve.access")


def access_log(**fields: object) -> None:
    """One JSON line per request (method, path, status, duration, request id, tokens, finish)."""
    ACCESS_LOG.info(json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":")))
