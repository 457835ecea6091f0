"""Prometheus metrics of the queen (``GET /metrics``), names prefixed ``rbee_``.

Counters and histograms are updated when a job ends (a job hook); gauges (live
jobs, queue depth, hives and workers by state, active streams) are read at
scrape time from the parts that hold them, so they can never drift from them.
The registry belongs to the app (built in the lifespan), not to the process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rbee.jobs.job import Job
from rbee.jobs.registry import JobHooks, JobRegistry
from rbee.queen.scheduler import Scheduler
from rbee.queen.telemetry import Telemetry

__all__ = ["QueenMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Live(Collector):
    def __init__(
        self, registry: JobRegistry, scheduler: Scheduler, telemetry: Telemetry, streams: Callable[[], int]
    ) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.telemetry = telemetry
        self.streams = streams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("rbee_jobs", "Jobs in memory by operation and state", labels=["operation", "state"])
        counts = Counter((j.operation.name, j.status.value) for j in self.registry.list(limit=len(self.registry)))
        for (op, st), n in sorted(counts.items()):
            jobs.add_metric([op, st], n)
        yield jobs
        queue = GaugeMetricFamily("rbee_queue_depth", "Jobs waiting for a worker, per model", labels=["model"])
        for model, depth in sorted(self.scheduler.queue_depths().items()):
            queue.add_metric([model], depth)
        yield queue
        snap = self.telemetry.snapshot()
        hives = GaugeMetricFamily("rbee_hives", "Hives by state", labels=["state"])
        for st, n in sorted(Counter(h["state"] for h in snap["hives"]).items()):
            hives.add_metric([st], n)
        yield hives
        workers = GaugeMetricFamily("rbee_workers", "Workers by state", labels=["state"])
        for st, n in sorted(Counter(w["state"] for w in snap["workers"]).items()):
            workers.add_metric([st], n)
        yield workers
        yield GaugeMetricFamily("rbee_active_streams", "Open job event streams", value=self.streams())


class QueenMetrics(JobHooks):
    """The queen's metrics: ``streams`` says how many job event streams are open."""

    def __init__(
        self, registry: JobRegistry, scheduler: Scheduler, telemetry: Telemetry, streams: Callable[[], int]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.jobs_finished = PCounter(
            "rbee_jobs_finished",
            "Jobs that ended, by operation and status",
            ["operation", "status"],
            registry=self.registry,
        )
        self.narration_dropped = PCounter(
            "rbee_narration_dropped", "Narration events dropped under pressure", registry=self.registry
        )
        self.tokens = PCounter("rbee_tokens_generated", "Tokens relayed to clients", registry=self.registry)
        self.ttft = Histogram(
            "rbee_time_to_first_token_seconds",
            "Time from job creation to the first token (infer)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tps = Histogram(
            "rbee_tokens_per_second",
            "Generation speed reported by the worker (infer)",
            buckets=(1, 5, 10, 20, 40, 60, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.registry.register(_Live(registry, scheduler, telemetry, streams))

    def on_finished(self, job: Job, end: dict[str, Any]) -> None:
        self.jobs_finished.labels(job.operation.name, end["status"]).inc()
        if end.get("narration_dropped"):
            self.narration_dropped.inc(end["narration_dropped"])
        if job.tokens:
            self.tokens.inc(job.tokens)
        if isinstance(end.get("ttft_ms"), (int, float)):
            self.ttft.observe(end["ttft_ms"] / 1000.0)
        if isinstance(end.get("tokens_per_s"), (int, float)) and end["tokens_per_s"] > 0:
            self.tps.observe(end["tokens_per_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
