"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmasos.inference.engine import RequestOutput
from llmasos.serving.engine_thread import EngineThread

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, worker: EngineThread):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmasos_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("llmasos_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(
            "llmasos_generation_tokens", "Tokens generated (every sample, aborted ones included)", registry=r
        )
        self.unexpected_errors = Counter(
            "llmasos_unexpected_errors",
            "Requests that met an unexpected error (a bug: the log has each one's traceback)",
            registry=r,
        )
        running = Gauge("llmasos_num_sequences_running", "Sequences in the running batch", registry=r)
        running.set_function(lambda: worker.num_running)
        waiting = Gauge("llmasos_num_requests_waiting", "Requests waiting for a free row", registry=r)
        waiting.set_function(lambda: worker.num_waiting)
        self.ttft = Histogram(
            "llmasos_time_to_first_token_seconds",
            "From arrival at the engine to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmasos_request_latency_seconds", "From arrival at the engine to the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        r.register(PrefixCacheCollector(worker))

    def record(self, outputs: list[RequestOutput]) -> None:
        """Count a call's tokens, and its times when it ran to the end."""
        for out in outputs:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.generation_tokens.inc(out.num_generated)
            if out.first_token_at is not None:
                self.ttft.observe(out.first_token_at - out.arrival)
            if out.finished_at is not None and all(c.finish_reason != "abort" for c in out.outputs):
                self.latency.observe(out.finished_at - out.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PrefixCacheCollector:
    """The engine's prefix cache (vLLM's prefix_cache_queries and prefix_cache_hits, in prompt tokens), read from
    the engine thread's snapshot when /metrics is asked."""

    def __init__(self, worker: EngineThread):
        self.worker = worker

    def collect(self):
        stats = self.worker.prefix_cache
        yield CounterMetricFamily(
            "llmasos_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", value=stats.queries
        )
        yield CounterMetricFamily("llmasos_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=stats.hits)
        yield GaugeMetricFamily(
            "llmasos_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since start",
            value=stats.hits / stats.queries if stats.queries else 0.0,
        )
        yield GaugeMetricFamily("llmasos_prefix_cache_tokens", "Tokens the prefix cache holds now", value=stats.tokens)
