"""Prometheus metrics of the operator: jobs by phase, queue length, submissions, failures.

Phase counts and the queue length are read from kopf's index of all jobs at
scrape time, so they are never stale; submissions and failures are counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from krunch.operator.lifecycle import Phase
from krunch.operator.scheduling import Entry

REGISTRY = CollectorRegistry()
SUBMISSIONS = Counter("krunch_submissions", "Jobs submitted to Ray (each attempt)", ["executor"], registry=REGISTRY)
FAILURES = Counter("krunch_failures", "Jobs that ended Failed, by reason", ["reason"], registry=REGISTRY)
SUBMISSION_ERRORS = Counter("krunch_submission_errors", "Submission attempts that Ray did not accept", registry=REGISTRY)


class JobsCollector(Collector):
    def __init__(self, entries: Callable[[], Iterable[Entry]]) -> None:
        self.entries = entries

    def collect(self) -> Iterator[GaugeMetricFamily]:
        entries = list(self.entries())
        by_phase = GaugeMetricFamily("krunch_jobs", "CompressionJobs by phase", labels=["phase"])
        for phase in Phase:
            by_phase.add_metric([phase.value], sum(1 for e in entries if e.phase is phase))
        yield by_phase
        yield GaugeMetricFamily("krunch_queue_length", "Jobs waiting in Queued", value=sum(1 for e in entries if e.phase is Phase.QUEUED))


def serve(port: int, host: str, entries: Callable[[], Iterable[Entry]]) -> None:
    REGISTRY.register(JobsCollector(entries))
    start_http_server(port, addr=host, registry=REGISTRY)
