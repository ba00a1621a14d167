"""Network-aware gradient compression: choose the ``grad_compression`` codec from measured
communication, and give it up when the loss suffers.

The ranks report per step the time they spend in the gradient exchange (``comm``, from
:meth:`Run.mark`), their own work (``data + compute``) and the bytes they hand to it
(``Telemetry.comm_bytes``: ``sent``, and ``dense``, what float32 would send). Over the last
``window_s`` since the codec in force took effect, with the median over the ranks:

- **comm dominates** (``comm / (busy + comm) > high_comm_frac``) and the exchange is
  bandwidth-bound (it moves under ``max_link_mbit``: ``sent / comm``), the policy steps one
  codec up the ``ladder`` (stronger compression);
- **the link has room**: under a codec, the next weaker one would send ``k×`` the bytes; if
  even ``k ×`` the exchange time measured now (every second of it spent on bytes: an upper
  bound) stays under ``high_comm_frac``, it steps one codec down at once (a recovered link);
- **a probe**: under a codec for ``probe_every_s`` with the exchange no longer dominating
  (``< high_comm_frac``), it steps one codec down even without that bound — with small
  messages the exchange time is latency and waiting, which says nothing of the link's
  bandwidth, so a recovered link shows only by sending more; if the exchange dominates again
  the step back up follows within ``cooldown_s`` (on a link that stays limited a probe costs
  about ``cooldown_s`` at the weaker codec every ``probe_every_s``);
- **the loss degrades**: the median loss since the switch above the median before it by more
  than ``loss_tolerance`` (relative) sends the job back to ``none`` and holds it there for
  ``hold_s`` (compression slows convergence per step; Vogels et al. 2019 report parity at
  rank 2-4 for their models, not for every model).

Samples per second are what it maximises: a stronger codec is taken only while the exchange
is what holds the step back. Under LocalSGD/DiLoCo the ``sync_every`` policy trades
communication against compute instead (the outer sync is torchft's own). Each decision says
the numbers in its reason; ``--dry-run`` records without acting, like every policy.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from torchloom.protocol.compression import parse_codec
from torchloom.weaver.policies.base import Decision, median, per_job
from torchloom.weaver.state import Job, WeaverState


class NetworkParams(msgspec.Struct, kw_only=True):
    """Parameters of the network-aware codec policy.

    Attributes:
        ladder: codecs from the weakest (``none``) to the strongest, comma-separated.
        high_comm_frac: step up when the exchange takes more than this share of a step.
        max_link_mbit: step up only when the exchange moves under this rate (megabits per
            second of exchange time, ``8 × sent / comm``): above it the time is latency or
            waiting for peers, which compression does not shorten.
        window_s: the recent past measured (seconds).
        min_samples: flushes with timings needed per rank.
        probe_every_s: how long a codec stays before a probe one step down (seconds).
        loss_tolerance: relative rise of the median loss after a switch that sends it back
            to ``none``.
        hold_s: after a loss-driven return to ``none``, no compression for this long (s).
        cooldown_s: no second change within this time (seconds).
    """

    ladder: str = "none,bf16,powersgd:4,powersgd:1"
    high_comm_frac: float = 0.35
    max_link_mbit: float = 2000.0
    window_s: float = 5.0
    min_samples: int = 3
    probe_every_s: float = 10.0
    loss_tolerance: float = 0.25
    hold_s: float = 120.0
    cooldown_s: float = 8.0


def check(p: NetworkParams) -> None:
    codecs = [c.strip() for c in p.ladder.split(",")]
    for c in codecs:
        parse_codec(c)  # ValueError names the bad one
    if codecs[0] != "none" or len(codecs) < 2 or len(set(codecs)) != len(codecs):
        raise ValueError("ladder: none first, then at least one other codec, none twice")
    if not 0.0 < p.high_comm_frac < 1.0:
        raise ValueError("high_comm_frac in (0, 1)")
    if p.window_s <= 0 or p.min_samples < 1 or p.loss_tolerance <= 0 or p.max_link_mbit <= 0:
        raise ValueError("window_s, loss_tolerance, max_link_mbit > 0; min_samples >= 1")


class Measured(msgspec.Struct, frozen=True):
    """The job's exchange over the window: medians over the ranks of their per-flush medians."""

    busy_s: float
    comm_s: float
    sent_bytes: float
    dense_bytes: float
    ranks: int

    @property
    def comm_frac(self) -> float:
        total = self.busy_s + self.comm_s
        return self.comm_s / total if total > 0 else 0.0

    @property
    def link_mbit(self) -> float:
        return 8e-6 * self.sent_bytes / self.comm_s if self.comm_s > 0 else math.inf


def measure(job: Job, now: float, since_step: int, p: NetworkParams) -> Measured | None:
    """:class:`Measured` from every live training rank's flushes in the window at or after
    ``since_step``, or None while a rank has fewer than ``min_samples`` of them."""
    per: list[tuple[float, float, float, float]] = []
    for rank in job.live_ranks():
        if rank.state != "training":
            continue
        w = [
            t
            for t in rank.window.timing
            if now - t.ts <= p.window_s
            and t.step >= since_step
            and t.busy_s is not None
            and t.comm_s is not None
            and t.sent_bytes is not None
            and t.dense_bytes
        ]
        if len(w) < p.min_samples:
            return None
        per.append(
            (
                median([t.busy_s for t in w if t.busy_s is not None]),
                median([t.comm_s for t in w if t.comm_s is not None]),
                median([t.sent_bytes for t in w if t.sent_bytes is not None]),
                median([t.dense_bytes for t in w if t.dense_bytes is not None]),
            )
        )
    if not per:
        return None
    busy, comm, sent, dense = (median(list(c)) for c in zip(*per, strict=True))
    return Measured(busy, comm, sent, dense, len(per))


def loss_rise(job: Job, switch_step: int) -> float | None:
    """The median loss since ``switch_step`` over the median of as many losses before it,
    minus 1, over the ranks (median); None without 10 losses on each side on every rank."""
    rises = []
    for rank in job.live_ranks():
        losses = [(s, v) for s, v in rank.window.losses if v == v]
        after = [v for s, v in losses if s >= switch_step]
        before = [v for s, v in losses if s < switch_step][-max(len(after), 10) :]
        if len(after) < 10 or len(before) < 10:
            return None
        base = median(before)
        if base <= 0:
            return None
        rises.append(median(after) / base - 1.0)
    return median(rises) if rises else None


class NetworkPolicy:
    """Pick the gradient codec that maximises samples per second (module doc)."""

    name = "network"
    doc = "step grad_compression up the ladder while the exchange dominates a step; down when the link recovers or the loss suffers"
    Params = NetworkParams

    def __init__(self, params: NetworkParams) -> None:
        check(params)
        self.params = params
        self.ladder = [c.strip() for c in params.ladder.split(",")]
        self._hold_until: dict[str, float] = {}

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        return per_job(state, lambda job: self._job(now, state, job))

    def _decision(
        self, job: Job, codec: str, new: str, why: str, features: dict[str, Any]
    ) -> Decision:
        return Decision(
            policy=self.name,
            job_id=job.job_id,
            action="set",
            values={"grad_compression": new},
            reason=f"{why}: grad_compression {codec} → {new}",
            key=f"{self.name}/{job.job_id}",
            features={"codec": codec, "proposed": new, **features},
        )

    def _job(self, now: float, state: WeaverState, job: Job) -> Decision | None:
        p = self.params
        latest = job.config.latest() if job.config else None
        if latest is None or latest.run_state != "running" or job.config is None:
            return None
        codec = latest.values.get("grad_compression")
        if not isinstance(codec, str) or "grad_compression" not in job.config.knobs:
            return None
        since, since_ts = _codec_since(job, latest.effective_step, latest.issued_ts)
        m = measure(job, now, latest.effective_step, p)
        if m is None:
            return None
        features: dict[str, Any] = {
            "busy_s": round(m.busy_s, 6),
            "comm_s": round(m.comm_s, 6),
            "comm_frac": round(m.comm_frac, 4),
            "sent_bytes": round(m.sent_bytes),
            "dense_bytes": round(m.dense_bytes),
            "link_mbit": round(m.link_mbit, 2) if math.isfinite(m.link_mbit) else None,
            "ranks": m.ranks,
        }
        measured = (
            f"the exchange takes {m.comm_frac:.0%} of a step ({m.comm_s * 1000:.1f} ms against "
            f"{m.busy_s * 1000:.1f} ms of work; {m.sent_bytes / 1e6:.2f} MB per step at "
            f"{m.link_mbit:.0f} Mbit/s)"
        )
        if codec != "none":
            rise = loss_rise(job, since)
            if rise is not None and rise > p.loss_tolerance:
                self._hold_until[job.job_id] = now + p.hold_s
                features["loss_rise"] = round(rise, 4)
                return self._decision(
                    job,
                    codec,
                    "none",
                    f"the median loss is {rise:.0%} above its level before {codec} "
                    f"(tolerance {p.loss_tolerance:.0%}); no compression for {p.hold_s:g} s",
                    features,
                )
        rung = self.ladder.index(codec) if codec in self.ladder else None
        if (
            m.comm_frac > p.high_comm_frac
            and m.link_mbit < p.max_link_mbit
            and now >= self._hold_until.get(job.job_id, 0.0)
            and (rung is None or rung + 1 < len(self.ladder))
        ):
            new = self.ladder[1 if rung is None else rung + 1]
            return self._decision(job, codec, new, measured, features)
        if codec != "none" and rung is not None and m.dense_bytes > 0:
            weaker = self.ladder[rung - 1]
            ratio = weaker_ratio(codec, weaker, m.sent_bytes / m.dense_bytes)
            if ratio is not None and m.sent_bytes > 0:
                comm = m.comm_s * ratio * m.dense_bytes / m.sent_bytes  # as if all bandwidth
                frac = comm / (m.busy_s + comm)
                if frac < p.high_comm_frac:
                    features["predicted_comm_frac"] = round(frac, 4)
                    return self._decision(
                        job,
                        codec,
                        weaker,
                        f"{measured}; {weaker} would take at most {frac:.0%} "
                        f"(under {p.high_comm_frac:.0%}): the link has room",
                        features,
                    )
        in_force_s = now - since_ts
        if (
            codec != "none"
            and m.comm_frac < p.high_comm_frac
            and in_force_s >= p.probe_every_s
            and rung is not None
        ):
            new = self.ladder[rung - 1]
            return self._decision(
                job,
                codec,
                new,
                f"{measured}, under {codec} for {in_force_s:.0f} s: probing a weaker codec "
                "(the link may have recovered)",
                features,
            )
        return None


def weaker_ratio(codec: str, weaker: str, measured: float) -> float | None:
    """An upper bound of the bytes ``weaker`` sends over the dense bytes, from ``measured``
    (what ``codec`` sends over them), or None where there is no safe bound (then the policy
    probes): ``none`` 1, ``bf16``/``fp16`` ½, ``topk:F`` 2F, ``powersgd:R`` from
    ``powersgd:R'`` ``measured × R / R'`` (the matrices scale with the rank, vectors do not)."""
    w, c = parse_codec(weaker), parse_codec(codec)
    if w.kind == "none":
        return 1.0
    if w.kind in ("bf16", "fp16"):
        return 0.5
    if w.kind == "topk":
        return min(1.0, 2.0 * w.fraction)
    if w.kind == "powersgd" and c.kind == "powersgd" and c.rank > 0:
        return min(1.0, measured * w.rank / c.rank)
    return None


def _codec_since(job: Job, in_force: int, issued_ts: float) -> tuple[int, float]:
    """``(effective step, time issued)`` of the version that put the codec in force (the
    newest ``grad_compression`` change in the config's journal), else of the newest version."""
    assert job.config is not None
    for ev in reversed(job.config.journal):
        if ev.kind == "config_set" and "grad_compression" in (ev.data.get("values") or {}):
            return (ev.step if ev.step is not None else in_force), ev.ts
    return in_force, issued_ts
