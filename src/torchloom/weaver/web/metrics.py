"""Prometheus ``/metrics``: the Weaver's view of every rank, and its own intake, read at
scrape time.

Custom collectors (prometheus-client's documented way to export state that
already lives elsewhere): nothing is updated per message, a scrape reads the
state once. Metric names follow Prometheus conventions (base units, ``_total``
for counters). Both collectors describe their names, so a scrape can ask for some
of them only (``/metrics?name[]=torchloom_weaver_ingest_lag_seconds``), which does not
read the per-rank state at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from torchloom.weaver.ingest import LAG_BOUNDS_S, IngestStats
from torchloom.weaver.state import WeaverState
from torchloom.weaver.web.track import JobTrack, finite

RANK_LABELS = ["job", "replica", "rank"]


class WeaverCollector(Collector):
    """Exports per-rank step, step time, loss, throughput, heartbeat age, state and
    config versions; per-job failures and desired config version; dropped messages."""

    def __init__(
        self, state: WeaverState, tracks: dict[str, JobTrack], clock: Callable[[], float]
    ) -> None:
        self.state = state
        self.tracks = tracks
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        return self._families(fill=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(fill=True)

    def _families(self, *, fill: bool) -> Iterator[Metric]:
        """The metric families, filled from the state or (``fill=False``) empty."""
        now = self.clock() if fill else 0.0
        g = {
            "step": GaugeMetricFamily(
                "torchloom_rank_step", "Last step the rank reported", labels=RANK_LABELS
            ),
            "step_time": GaugeMetricFamily(
                "torchloom_rank_step_time_seconds",
                "Mean duration of the rank's recent steps, in seconds",
                labels=RANK_LABELS,
            ),
            "loss": GaugeMetricFamily(
                "torchloom_rank_loss", "Last loss the rank logged", labels=RANK_LABELS
            ),
            "sps": GaugeMetricFamily(
                "torchloom_rank_samples_per_second",
                "Samples per second the rank trained recently",
                labels=RANK_LABELS,
            ),
            "age": GaugeMetricFamily(
                "torchloom_rank_heartbeat_age_seconds",
                "Seconds since the Weaver last heard from the rank",
                labels=RANK_LABELS,
            ),
            "applied": GaugeMetricFamily(
                "torchloom_rank_applied_config_version",
                "Config version the rank runs",
                labels=RANK_LABELS,
            ),
            "state": GaugeMetricFamily(
                "torchloom_rank_state",
                "1 for the rank's current state (joining, training, paused, suspect, hung, "
                "failed, exited)",
                labels=[*RANK_LABELS, "state"],
            ),
        }
        version = GaugeMetricFamily(
            "torchloom_job_config_version", "Latest desired config version", labels=["job"]
        )
        failures = CounterMetricFamily(
            "torchloom_job_failures",
            "Rank failures and hangs in the job's history",
            labels=["job"],
        )
        for job in self.state.jobs.values() if fill else ():
            latest = job.config.latest() if job.config else None
            if latest is not None:
                version.add_metric([job.job_id], latest.version)
            track = self.tracks.get(job.job_id)
            failures.add_metric([job.job_id], track.failures if track else 0)
            for r in job.ranks.values():
                e = r.entry
                labels = [e.job_id, e.replica_id, str(e.rank)]
                g["step"].add_metric(labels, e.last_step)
                g["age"].add_metric(labels, max(0.0, now - e.last_seen_ts))
                g["applied"].add_metric(labels, e.applied_version)
                g["state"].add_metric([*labels, e.state], 1)
                for key, value in (
                    ("step_time", r.step_time_s),
                    ("loss", r.metrics.get("loss")),
                    ("sps", r.samples_per_s),
                ):
                    if (f := finite(value)) is not None:
                        g[key].add_metric(labels, f)
        dropped = CounterMetricFamily(
            "torchloom_dropped_messages",
            "Messages the Weaver could not decode or keep, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(self.state.dropped_messages.items()) if fill else ():
            dropped.add_metric([kind], n)
        yield from g.values()
        yield from (version, failures, dropped)


class IntakeCollector(Collector):
    """Exports the Weaver's intake per message kind: messages, bytes and the lag histogram
    (publish → state updated, see :mod:`torchloom.weaver.ingest`)."""

    def __init__(self, ingest: dict[str, IngestStats]) -> None:
        self.ingest = ingest

    def describe(self) -> Iterator[Metric]:
        return self._families(fill=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(fill=True)

    def _families(self, *, fill: bool) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "torchloom_weaver_messages",
            "Messages from ranks folded into the Weaver's state, by kind",
            labels=["kind"],
        )
        nbytes = CounterMetricFamily(
            "torchloom_weaver_received_bytes",
            "Payload bytes of those messages, by kind",
            labels=["kind"],
        )
        lag = HistogramMetricFamily(
            "torchloom_weaver_ingest_lag_seconds",
            "From a message's timestamp (the sender's clock) to the Weaver's state holding it",
            labels=["kind"],
        )
        for kind, stats in sorted(self.ingest.items()) if fill else ():
            messages.add_metric([kind], stats.messages)
            nbytes.add_metric([kind], stats.bytes)
            cumulative, buckets = 0, []
            for bound, n in zip((*LAG_BOUNDS_S, float("inf")), stats.lag_counts, strict=True):
                cumulative += n
                buckets.append((repr(bound) if bound != float("inf") else "+Inf", cumulative))
            lag.add_metric([kind], buckets, stats.lag_sum_s)
        yield from (messages, nbytes, lag)


def exposition(collectors: list[Collector], names: list[str] | None = None) -> bytes:
    """The text exposition format of one scrape of ``collectors``; only the metric families
    in ``names`` (with or without their ``_total`` / ``_bucket`` suffixes) when given."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    if not names:
        return generate_latest(registry)
    samples = {n + suffix for n in names for suffix in _SAMPLE_SUFFIXES}
    return generate_latest(registry.restricted_registry(samples))


_SAMPLE_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")
"""A family's samples are named after it with these suffixes (counters, histograms)."""
