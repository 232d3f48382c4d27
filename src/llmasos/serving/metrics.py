"""Prometheus metrics of one server, in a registry of its own (two apps in one process never mix).

What belongs to a model carries a `model` label: its tokens, latencies, loads, and, while it is loaded,
its running and waiting sequences and its memory (read from the pool at each scrape, so an unloaded
model's gauges go with it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmasos.inference.engine import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Loaded(Collector):
    """The series of the loaded models. `models()` yields objects with name, worker (num_running,
    num_waiting, prefix_cache, pacing), weights_bytes and kv_bytes. The prefix cache's counters are the engine's, so
    they start again from 0 when a model loads again (as any counter does when its process restarts)."""

    def __init__(self, models: Callable[[], Iterable[Any]]):
        self.models = models

    def collect(self):
        running = GaugeMetricFamily("llmasos_num_sequences_running", "Sequences in the running batch", labels=["model"])
        waiting = GaugeMetricFamily("llmasos_num_requests_waiting", "Requests waiting for a free row", labels=["model"])
        memory = GaugeMetricFamily(
            "llmasos_model_memory_bytes",
            "Memory a loaded model holds: weights, and the KV cache it may grow to",
            labels=["model"],
        )
        kv = GaugeMetricFamily("llmasos_kv_cache_bytes", "KV cache a loaded model may grow to", labels=["model"])
        # The engine's prefix cache (vLLM's prefix_cache_queries and prefix_cache_hits, in prompt tokens).
        queries = CounterMetricFamily(
            "llmasos_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=["model"]
        )
        hits = CounterMetricFamily("llmasos_prefix_cache_hits", "Prompt tokens found in the prefix cache", labels=["model"])
        rate = GaugeMetricFamily(
            "llmasos_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since the model loaded",
            labels=["model"],
        )
        cached = GaugeMetricFamily("llmasos_prefix_cache_tokens", "Tokens the prefix cache holds now", labels=["model"])
        chunk = GaugeMetricFamily(
            "llmasos_prefill_chunk_tokens",
            "Prompt tokens a step may prefill beside the running sequences (max_num_batched_tokens=auto)",
            labels=["model"],
        )
        step = GaugeMetricFamily(
            "llmasos_decode_step_seconds",
            "The running sequences' decode step, smoothed (max_num_batched_tokens=auto)",
            labels=["model"],
        )
        for m in self.models():
            running.add_metric([m.name], m.worker.num_running)
            waiting.add_metric([m.name], m.worker.num_waiting)
            memory.add_metric([m.name], m.weights_bytes + m.kv_bytes)
            kv.add_metric([m.name], m.kv_bytes)
            stats = m.worker.prefix_cache
            queries.add_metric([m.name], stats.queries)
            hits.add_metric([m.name], stats.hits)
            rate.add_metric([m.name], stats.hits / stats.queries if stats.queries else 0.0)
            cached.add_metric([m.name], stats.tokens)
            if m.worker.pacing is not None:
                chunk.add_metric([m.name], m.worker.pacing.chunk_tokens)
                step.add_metric([m.name], m.worker.pacing.decode_step_s)
        yield from (running, waiting, memory, kv, queries, hits, rate, cached, chunk, step)


class Metrics:
    def __init__(self, models: Callable[[], Iterable[Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmasos_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("llmasos_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r)
        self.generation_tokens = Counter(
            "llmasos_generation_tokens", "Tokens generated (every sample, aborted ones included)", ["model"], registry=r
        )
        self.unexpected_errors = Counter(
            "llmasos_unexpected_errors",
            "Requests that met an unexpected error (a bug: the log has each one's traceback)",
            registry=r,
        )
        self.ttft = Histogram(
            "llmasos_time_to_first_token_seconds",
            "From arrival at the engine to the first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmasos_request_latency_seconds",
            "From arrival at the engine to the last token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loads = Counter("llmasos_model_loads", "Models loaded (each load, whoever asked for it)", ["model"], registry=r)
        self.load_failures = Counter("llmasos_model_load_failures", "Loads that failed or were cancelled", ["model"], registry=r)
        self.unloads = Counter("llmasos_model_unloads", "Models unloaded (keep-alive, memory, stop)", ["model"], registry=r)
        self.load_seconds = Histogram(
            "llmasos_model_load_seconds", "How long a load took", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        r.register(_Loaded(models))

    def model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self, name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's view: what its handlers record carries its name."""

    def __init__(self, metrics: Metrics, name: str):
        self.name = name
        self.unexpected_errors = metrics.unexpected_errors
        self.prompt_tokens = metrics.prompt_tokens.labels(name)
        self.generation_tokens = metrics.generation_tokens.labels(name)
        self.ttft = metrics.ttft.labels(name)
        self.latency = metrics.latency.labels(name)

    def record(self, outputs: list[RequestOutput]) -> None:
        """Count a call's tokens, and its times when it ran to the end."""
        for out in outputs:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.generation_tokens.inc(out.num_generated)
            if out.first_token_at is not None:
                self.ttft.observe(out.first_token_at - out.arrival)
            if out.finished_at is not None and all(c.finish_reason != "abort" for c in out.outputs):
                self.latency.observe(out.finished_at - out.arrival)
