"""A simulated synchronous training job: many ranks, injected faults, no GPU and no torch.

Each step, every replica group computes its share of the global batch
(``batch_weights`` as the real ranks split it, :func:`torchloom.protocol.batching.split`)
in ``sample_s × share × slowdown × noise`` seconds; the step ends when the
slowest group is done plus ``allreduce_s``, so the others wait (their ``comm``
phase). Ranks flush telemetry every ``interval_s`` like a Threadlet: step time,
phases, samples/s, a loss that decays with noise (NaN where injected), and device
health once a second (65 °C ± 1.5, 250 W ± 10; a degradation trace where injected, and a
failure — the group goes silent — ``fail_after_s`` into it unless drained first).
The job follows the desired config it is given (:meth:`SimJob.apply`) at the
effective steps, leaves when drained, and is replaced when the drain asks for it.

Pure and deterministic for a seed: the drivers (:mod:`torchloom.sim.virtual`, real
NATS in :mod:`torchloom.sim.live`) supply the time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from torchloom.protocol import (
    ControlRequest,
    DesiredConfig,
    HistoryEvent,
    JoinInfo,
    MetricPoint,
    RankEvent,
    Telemetry,
    resolve_values,
    select_snapshot,
)
from torchloom.protocol.batching import parse_weights, split
from torchloom.threadlet.device import degradation


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault.

    Attributes:
        kind: ``slow`` (compute × ``value`` from ``at_s``), ``nan`` (the loss is NaN at the
            first flush after ``at_s``), ``degrade`` (device telemetry degrades from ``at_s``,
            ``value`` is the rate; the group fails ``fail_after_s`` later).
        replica_id: the replica group it hits.
        at_s: when, in seconds from the start.
        value: the slowdown factor or the degradation rate.
    """

    kind: str
    replica_id: str
    at_s: float
    value: float = 1.0

    @classmethod
    def parse(cls, kind: str, text: str) -> Fault:
        """``REPLICA:AT_S[:VALUE]`` (``--slow 1:30:1.5``, ``--nan 0:60``, ``--degrade 2:20``).

        Raises:
            ValueError: not in that form.
        """
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"--{kind} wants REPLICA:AT_S[:VALUE], got {text!r}")
        return cls(kind, parts[0], float(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0)


@dataclass(slots=True)
class SimSpec:
    """The simulated job.

    Attributes:
        job_id: its id.
        groups: replica groups at the start; ranks_per_group: ranks in each.
        global_batch: samples per step over all groups (the ``global_batch_size`` knob).
        sample_s: compute seconds per sample on a healthy device.
        allreduce_s: the gradient allreduce per step, in seconds.
        noise: σ of the lognormal noise on each group's compute time per step.
        drift: σ of a slowly varying factor on each group's compute time (log-AR(1) with a
            ~100-step memory: a noisy neighbour, thermal drift), 0 for none.
        interval_s: telemetry flush period of every rank, in seconds.
        fail_after_s: a degrading device fails this long after its degradation starts.
        replace_after_s: a replacement group joins this long after a drain with replacement.
        seed: of every random draw.
    """

    job_id: str = "sim"
    groups: int = 4
    ranks_per_group: int = 1
    global_batch: int = 256
    sample_s: float = 0.0003
    allreduce_s: float = 0.005
    noise: float = 0.05
    drift: float = 0.0
    interval_s: float = 0.2
    fail_after_s: float = 30.0
    replace_after_s: float = 5.0
    seed: int = 0
    faults: list[Fault] = field(default_factory=list)


@dataclass(slots=True)
class Group:
    replica_id: str
    joined_s: float
    alive: bool = True
    slow: float = 1.0
    degrade_at_s: float | None = None
    degrade_rate: float = 1.0
    busy_sum: float = 0.0
    comm_sum: float = 0.0
    steps: int = 0
    next_sample_s: float = 0.0
    drift_log: float = 0.0


class SimJob:
    """The job's state over simulated time; see the module doc."""

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.groups: dict[str, Group] = {str(i): Group(str(i), 0.0) for i in range(spec.groups)}
        self.step = 0
        self.t = 0.0
        self.config: dict[str, Any] = {"lr": 0.1, "global_batch_size": spec.global_batch}
        self.version = 0
        self.doc: DesiredConfig | None = None
        self.seq = 0
        self.next_flush = spec.interval_s
        self.nan_pending: set[str] = set()
        self.fired: set[Fault] = set()
        self.replacements: list[float] = []
        self.replace_ids: set[str] = set()
        self.failed: list[tuple[str, float]] = []
        self.samples = 0
        self.throughput: list[tuple[float, float]] = []  # (t, samples per s) per flush
        self._flush_samples = 0
        self._flush_t = 0.0
        self._next_id = spec.groups

    # ---- config -----------------------------------------------------------------------

    def apply(self, doc: DesiredConfig) -> None:
        """Take a desired config (as a Threadlet would from the KV bucket) if it is newer."""
        new, old = doc.latest(), self.doc.latest() if self.doc else None
        if new is not None and (old is None or new.version > old.version):
            self.doc = doc

    def on_history(self, ev: HistoryEvent) -> None:
        """Follow the job's history as ``torchloom run`` does: a drain that asks for a
        replacement makes a fresh group join ``replace_after_s`` after the drained one left."""
        if ev.kind == "config_set" and ev.data.get("op") == "drain" and ev.data.get("replace"):
            self.replace_ids.update(str(r) for r in ev.data.get("drain", []))

    def _boundary(self) -> list[RankEvent]:
        snap = select_snapshot(self.doc.snapshots, self.step) if self.doc else None
        events: list[RankEvent] = []
        if snap is None or snap.version <= self.version:
            return events
        self.version = snap.version
        self.config.update(resolve_values(snap, "0"))
        for rid in snap.drained:
            g = self.groups.pop(rid, None)
            if g is not None:
                events += [self.event(rid, r, "exited", reason="drained") for r in self.ranks()]
                if rid in self.replace_ids:
                    self.replacements.append(self.t + self.spec.replace_after_s)
        for rid in self.groups:
            events += [self.event(rid, r, "config_applied") for r in self.ranks()]
        return events

    # ---- time ---------------------------------------------------------------------------

    def ranks(self) -> range:
        return range(self.spec.ranks_per_group)

    def join_requests(self, rid: str, *, resuming: bool) -> list[ControlRequest]:
        """The ``join`` control requests of every rank of replica group ``rid``."""
        return [
            ControlRequest(
                op="join",
                job_id=self.spec.job_id,
                requested_by=f"sim {rid}/{rank}",
                join=JoinInfo(
                    replica_id=rid,
                    rank=rank,
                    group_world_size=self.spec.ranks_per_group,
                    host="sim",
                    device=f"sim-{rid}-{rank}",
                    initial_values=dict(self.config),
                    resuming=resuming,
                ),
            )
            for rank in self.ranks()
        ]

    def event(self, rid: str, rank: int, kind: str, reason: str = "") -> RankEvent:
        return RankEvent(
            kind=kind,  # type: ignore[arg-type]
            job_id=self.spec.job_id,
            replica_id=rid,
            rank=rank,
            ts=self.t,
            step=self.step,
            version=self.version,
            reason=reason,
        )

    def _faults(self) -> None:
        for f in self.spec.faults:
            if f in self.fired or self.t < f.at_s:
                continue
            self.fired.add(f)
            g = self.groups.get(f.replica_id)
            if g is None:
                continue
            if f.kind == "slow":
                g.slow = f.value
            elif f.kind == "nan":
                self.nan_pending.add(f.replica_id)
            elif f.kind == "degrade":
                g.degrade_at_s, g.degrade_rate = f.at_s, f.value

    def advance(self, until_s: float) -> tuple[list[Telemetry], list[RankEvent], list[str]]:
        """Run steps until ``until_s``; return the telemetry flushed, the rank events, and the
        replica groups that joined (replacements) meanwhile."""
        tel: list[Telemetry] = []
        events: list[RankEvent] = []
        joined: list[str] = []
        while self.t < until_s:
            self._faults()
            events += self._boundary()
            for due in [r for r in self.replacements if r <= self.t]:
                self.replacements.remove(due)
                rid = str(self._next_id)
                self._next_id += 1
                self.groups[rid] = Group(rid, self.t)
                joined.append(rid)
            live = [g for g in self.groups.values() if g.alive]
            for g in live:
                if g.degrade_at_s is not None and self.t >= g.degrade_at_s + self.spec.fail_after_s:
                    g.alive = False
                    self.failed.append((g.replica_id, self.t))
            live = [g for g in self.groups.values() if g.alive]
            if not live:
                self.t = until_s
                break
            weights = parse_weights(self.config.get("batch_weights"))
            shares = split(
                int(self.config["global_batch_size"]),
                [weights.get(g.replica_id, 1.0) for g in live],
            )
            if self.spec.drift:
                for g in live:  # AR(1), ρ = 0.99, stationary σ = drift
                    g.drift_log = 0.99 * g.drift_log + self.rng.gauss(0, self.spec.drift * 0.141)
            busy = [
                self.spec.sample_s
                * share
                * g.slow
                * math.exp(g.drift_log)
                * self.rng.lognormvariate(0, self.spec.noise)
                for g, share in zip(live, shares, strict=True)
            ]
            step_s = max(busy) + self.spec.allreduce_s
            for g, b in zip(live, busy, strict=True):
                g.busy_sum += b
                g.comm_sum += step_s - b
                g.steps += 1
            self.t += step_s
            self.step += 1
            self.samples += sum(shares)
            self._flush_samples += sum(shares)
            if self.t >= self.next_flush:
                tel += self._flush()
                self.next_flush = self.t + self.spec.interval_s
        return tel, events, joined

    def _flush(self) -> list[Telemetry]:
        out = []
        dt = max(self.t - self._flush_t, 1e-9)
        self.throughput.append((self.t, self._flush_samples / dt))
        self._flush_t, self._flush_samples = self.t, 0
        loss = 0.1 + 2.0 * math.exp(-self.step / 300.0)
        for g in self.groups.values():
            if not g.alive or not g.steps:
                continue
            busy, comm = g.busy_sum / g.steps, g.comm_sum / g.steps
            device: dict[str, float] | None = None
            if self.t >= g.next_sample_s:  # 1 Hz, like the Threadlet's sampler
                g.next_sample_s = self.t + 1.0
                device = {
                    "temp_c": 65.0 + self.rng.gauss(0, 1.5),
                    "power_w": 250.0 + self.rng.gauss(0, 10),
                    "ecc_corrected": 0.0,
                }
                if g.degrade_at_s is not None:
                    device.update(
                        degradation(self.t - g.degrade_at_s, rate=g.degrade_rate, base_temp_c=65.0)
                    )
            value: float | None = loss * self.rng.lognormvariate(0, 0.05)
            if g.replica_id in self.nan_pending:
                self.nan_pending.discard(g.replica_id)
                value = None
            for r in self.ranks():
                self.seq += 1
                out.append(
                    Telemetry(
                        job_id=self.spec.job_id,
                        replica_id=g.replica_id,
                        rank=r,
                        group_world_size=self.spec.ranks_per_group,
                        seq=self.seq,
                        ts=self.t,
                        step=self.step,
                        applied_version=self.version,
                        step_time_s=(busy + comm),
                        samples_per_s=self.throughput[-1][1] / max(1, len(self.groups)),
                        points=[MetricPoint(step=self.step, ts=self.t, values={"loss": value})],
                        phases_s={"data": 0.0, "compute": busy, "comm": comm},
                        device_stats=device,
                        host="sim",
                        pid=1000 + int(g.replica_id) * 16 + r if g.replica_id.isdigit() else 1,
                        device=f"sim-{g.replica_id}-{r}",
                    )
                )
            g.busy_sum = g.comm_sum = 0.0
            g.steps = 0
        return out

    def mean_throughput(self, t0: float, t1: float) -> float | None:
        """Samples per second of the job between two times (s), or None without data."""
        xs = [v for t, v in self.throughput if t0 <= t < t1]
        return sum(xs) / len(xs) if xs else None
