"""Prometheus metrics of a hive (``GET /metrics``), names prefixed ``rbee_hive_``.

Everything is a gauge read from the hive's parts at scrape time (the
supervisor, the catalog, the job registry: handed in, never the app), so it
can never drift from them: the workers this hive spawned by state, the models in
its catalog and their bytes, and the downloads in progress with their bytes
so far (taken from each ``model_download`` job's latest ``progress`` event,
the same figures its stream shows).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rbee import __version__
from rbee.contracts.events import TERMINAL
from rbee.hive.catalog import ModelCatalog
from rbee.hive.supervisor import Supervisor
from rbee.jobs.registry import JobRegistry

__all__ = ["CONTENT_TYPE", "WORKER_STATES", "download_progress", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Every state a worker can be in, so each series exists (at 0) before the first worker does.
WORKER_STATES = ("starting", "ready", "busy", "stopping", "dead")


def download_progress(events: list[tuple[int, str, str]]) -> tuple[float, float | None]:
    """``(bytes done, bytes total)`` from a download job's latest ``progress`` event; (0, None) before one."""
    for _id, kind, raw in reversed(events):
        if kind != "progress":
            continue
        data: Any = json.loads(raw)
        if isinstance(data, dict) and data.get("unit") == "bytes":
            done = data.get("done")
            total = data.get("total")
            return (
                float(done) if isinstance(done, int | float) else 0.0,
                float(total) if isinstance(total, int | float) else None,
            )
    return 0.0, None


class _HiveCollector(Collector):
    def __init__(self, hive_id: str, supervisor: Supervisor, catalog: ModelCatalog, registry: JobRegistry) -> None:
        self.hive_id = hive_id
        self.supervisor = supervisor
        self.catalog = catalog
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily("rbee_hive_info", "This hive", labels=["hive_id", "version"])
        info.add_metric([self.hive_id, __version__], 1)
        yield info

        workers = self.supervisor.all()
        by_state = Counter(w.state for w in workers)
        family = GaugeMetricFamily("rbee_hive_workers", "Workers this hive spawned, by state", labels=["state"])
        for name in sorted({*WORKER_STATES, *by_state}):
            family.add_metric([name], by_state.get(name, 0))
        yield family
        yield GaugeMetricFamily(
            "rbee_hive_worker_slots_busy",
            "Generations running on this hive's workers",
            value=sum(w.busy_slots for w in workers),
        )
        yield GaugeMetricFamily(
            "rbee_hive_worker_queue",
            "Jobs waiting for a slot at this hive's workers",
            value=sum(w.queue for w in workers),
        )

        models = self.catalog.models_now()
        yield GaugeMetricFamily("rbee_hive_models", "Models in this hive's catalog", value=len(models))
        yield GaugeMetricFamily(
            "rbee_hive_model_bytes",
            "Bytes of the model files in this hive's catalog",
            value=sum(m.size_bytes for m in models),
        )

        downloads = [
            job
            for job in self.registry.list(limit=len(self.registry))
            if job.operation.name == "model_download" and job.status not in TERMINAL
        ]
        done = total = 0.0
        for job in downloads:
            got, size = download_progress(job.events)
            done += got
            total += size or 0.0
        yield GaugeMetricFamily("rbee_hive_downloads", "Model downloads in progress", value=len(downloads))
        yield GaugeMetricFamily(
            "rbee_hive_download_bytes", "Bytes received so far by the downloads in progress", value=done
        )
        yield GaugeMetricFamily(
            "rbee_hive_download_bytes_total",
            "Announced size of the downloads in progress (those that announce one)",
            value=total,
        )
        yield GaugeMetricFamily("rbee_hive_jobs_live", "Jobs running or queued on this hive", value=self.registry.live)


def render(*, hive_id: str, supervisor: Supervisor, catalog: ModelCatalog, registry: JobRegistry) -> bytes:
    """The hive's metrics in Prometheus' text format."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_HiveCollector(hive_id, supervisor, catalog, registry))
    return generate_latest(collectors)
