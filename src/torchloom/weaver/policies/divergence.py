"""Divergence guard: NaN/Inf or a loss spike → lower the learning rate; repeated → pause and alert.

Reads the ``loss`` and ``grad_norm`` values the ranks log (``run.log(loss=…)``,
:meth:`Run.guard_gradients`). A non-finite value, or a spike — the median of a
rank's newest ``spike_steps`` losses above the median of its earlier
``window_steps`` losses by ``spike_k`` robust standard deviations (1.4826·MAD), and
(for positive losses) its logarithm above theirs by ``spike_k_log`` robust σ of the log,
all logged since the newest config took effect — makes the guard lower ``lr`` by
``lr_factor`` job-wide and switch
``skip_nonfinite`` on (so the ranks zero any further non-finite gradient on the
device instead of stepping on it; the step that carried the NaN is skipped there
when the knob was already on). After ``max_lowerings`` within ``repeat_window_s``
it pauses the job instead and says so: a person should look.

Why both tests: near convergence a per-batch loss is heavy-tailed, roughly log-normal
(MNIST at step 3,000: a median of 0.007, single batches at 0.2), so five losses in a row at
10-20× the median are ordinary — 8 to 18 robust σ, which the linear test alone took for a
spike twice in every 2-minute demo. On the log scale that spread is what σ measures: the
same healthy demo never went past 2.0 robust σ of the log (``tests/unit/test_healthy_run.py``
replays it), while a loss that climbs to chance level from near zero is 4-5 σ there, and a
jump from a calm 1.0 to 3.0 over 70. Medians and MADs keep both tests robust to a few spiky
steps in the window itself. The same practice
is in PaLM (Chowdhery et al. 2022: restart before a spike, skip batches) and
OPT-175B (Zhang et al. 2022: lower the lr after divergence).
"""

from __future__ import annotations

import math
from collections import deque
from itertools import islice
from typing import Any

import msgspec

from torchloom.protocol import DesiredConfig
from torchloom.protocol.compression import OPTIMIZER_KNOBS
from torchloom.weaver.policies.base import Decision, mad, median
from torchloom.weaver.state import Job, Rank, RankKey, WeaverState


class DivergenceParams(msgspec.Struct, kw_only=True):
    """Parameters of the divergence guard.

    Attributes:
        spike_k: robust standard deviations above the window median that make a spike.
        spike_k_log: the same on the losses' logarithm (positive losses only; both must hold).
        spike_steps: the newest losses whose median is tested (a single noisy batch is not a spike).
        window_steps: earlier losses that make the baseline.
        min_history: losses needed in the baseline before spikes are judged.
        lr_factor: multiply ``lr`` by this on each action, in (0, 1).
        max_lowerings: actions within ``repeat_window_s`` after which the job is paused.
        repeat_window_s: see ``max_lowerings`` (seconds).
        cooldown_s: no second action within this time (seconds).
        mitigation: ``lr`` (lower ``lr``, the default) or ``rollback``: back to the newest
            complete checkpoint taken before the spike, with ``lr × lr_factor`` (where every
            rank runs a Checkpointer and there is one; else the ``lr`` mitigation, said so).
    """

    spike_k: float = 8.0
    spike_k_log: float = 3.0
    spike_steps: int = 5
    window_steps: int = 200
    min_history: int = 30
    lr_factor: float = 0.5
    max_lowerings: int = 3
    repeat_window_s: float = 300.0
    cooldown_s: float = 3.0
    mitigation: str = "lr"


def check(p: DivergenceParams) -> None:
    if not 0.0 < p.lr_factor < 1.0:
        raise ValueError("lr_factor must be in (0, 1)")
    if p.mitigation not in ("lr", "rollback"):
        raise ValueError("mitigation must be lr or rollback")
    if (
        p.spike_k <= 0
        or p.spike_k_log <= 0
        or p.spike_steps < 1
        or p.min_history < 3
        or p.max_lowerings < 1
    ):
        raise ValueError("spike_k > 0, spike_steps >= 1, min_history >= 3, max_lowerings >= 1")


def _nonfinite(rank: Rank, since_step: int) -> str | None:
    found = rank.window.nonfinite
    if found is None or found[0] < since_step:
        return None
    step, name = found
    return f"{name} is NaN/Inf at step {step} on rank {rank.entry.replica_id}/{rank.entry.rank}"


Baseline = tuple[float, float, float | None, float | None]
"""``(median, σ, median of the log, σ of the log)`` of a rank's baseline window of losses;
the log pair is None when a loss is not positive."""


def _robust(values: list[float], floor: float) -> tuple[float, float]:
    m = median(values)
    return m, max(1.4826 * mad(values, m), floor)


def baseline(values: list[float], p: DivergenceParams) -> Baseline | None:
    """:data:`Baseline` of the ``window_steps`` finite losses before the newest
    ``spike_steps`` of ``values`` (oldest first), σ = 1.4826·MAD floored (at 0.1 % of the
    median, and at 0.01 on the log scale); None with too short a history."""
    if len(values) < p.min_history + p.spike_steps:
        return None
    base = values[-p.spike_steps - p.window_steps : -p.spike_steps]
    m, sigma = _robust(base, 1e-8)
    sigma = max(sigma, 1e-3 * abs(m))
    if min(base) <= 0.0:
        return m, sigma, None, None
    log_m, log_sigma = _robust([math.log(v) for v in base], 0.01)
    return m, sigma, log_m, log_sigma


def judge(level: float, base: Baseline, p: DivergenceParams) -> dict[str, float] | None:
    """The spike test of ``level`` (the median of the newest losses) against ``base``: at
    least ``spike_k`` σ above its median, and ``spike_k_log`` σ above it on the log scale."""
    m, sigma, log_m, log_sigma = base
    z = (level - m) / sigma
    if z < p.spike_k:
        return None
    found = {"loss": level, "baseline": m, "sigma": sigma, "z": z}
    if log_m is not None and log_sigma is not None:
        if level <= 0.0:
            return None
        z_log = (math.log(level) - log_m) / log_sigma
        if z_log < p.spike_k_log:
            return None
        found["z_log"] = z_log
    return found


def spike(losses: list[tuple[int, float]], p: DivergenceParams) -> dict[str, float] | None:
    """The spike test on one rank's ``(step, loss)`` list (oldest first); None when calm."""
    values = [v for _, v in losses if math.isfinite(v)]
    base = baseline(values, p)
    return None if base is None else judge(median(values[-p.spike_steps :]), base, p)


def _newest(losses: deque[tuple[int, float]], since: int, n: int) -> list[float]:
    """Up to ``n`` newest finite losses logged at or after step ``since``, newest first."""
    tail = list(islice(reversed(losses), n))  # in C; the common case: n finite, recent ones
    if len(tail) == n and tail[-1][0] >= since and all(v == v for _, v in tail):
        return [v for _, v in tail]
    out = []
    for step, v in reversed(losses):
        if step < since:
            break
        if v == v:  # not NaN (the window stores every non-finite value as NaN)
            out.append(v)
            if len(out) == n:
                break
    return out


BASELINES_PER_ROUND = 256
"""Baselines worked out at most per round (≈40 µs each): after a config change every rank's
baseline starts again, and 10,000 of them at once would stall the Weaver's loop for
~0.4 s. The others wait for a later round (about 20 s for all of 10,000 ranks at two rounds
a second); until then a rank's spikes are judged against its previous baseline for the
same config, or not at all. NaN/Inf is judged every round, for every rank."""


class DivergencePolicy:
    """NaN/Inf or a loss spike → lower lr (and skip non-finite steps); repeated → pause."""

    name = "divergence"
    doc = "NaN/Inf or a loss spike: lr × lr_factor and skip_nonfinite on; repeated: pause and alert"
    Params = DivergenceParams

    def __init__(self, params: DivergenceParams) -> None:
        check(params)
        self.params = params
        self._baselines: dict[RankKey, tuple[int, int, Baseline | None]] = {}
        """Per rank: (since step, newest step, baseline) of its last baseline; worked out
        again when the config changed or ``spike_steps`` × 5 newer steps came, at most
        ``BASELINES_PER_ROUND`` per round (O(window) each, O(spike_steps) per rank and round
        otherwise — what keeps a round cheap at 10,000 ranks)."""
        self._budget = BASELINES_PER_ROUND

    def _baseline(self, rank: Rank, since: int) -> Baseline | None:
        losses = rank.window.losses
        newest = losses[-1][0] if losses else -1
        cached = self._baselines.get(rank.key)
        if (
            cached is None
            or cached[0] != since
            or newest - cached[1] >= 5 * self.params.spike_steps
        ) and self._budget > 0:
            self._budget -= 1
            need = self.params.window_steps + self.params.spike_steps
            values = [
                v
                for s, v in islice(losses, max(0, len(losses) - need), None)
                if s >= since and v == v
            ]
            cached = (since, newest, baseline(values, self.params))
            self._baselines[rank.key] = cached
        return cached[2] if cached is not None and cached[0] == since else None

    def decide(self, now: float, state: WeaverState) -> list[Decision]:
        out: list[Decision] = []
        self._budget = BASELINES_PER_ROUND
        live = {k for job in state.jobs.values() for k in job.ranks}
        for key in [k for k in self._baselines if k not in live]:
            del self._baselines[key]
        for job in state.jobs.values():
            d = self._job(now, state, job)
            if d is not None:
                out.append(d)
        return out

    def _finding(self, rank: Rank, since: int) -> tuple[str, dict[str, Any]] | None:
        """What is wrong with ``rank``'s losses since step ``since``: (why, features) or None."""
        what = _nonfinite(rank, since)
        rid = f"{rank.entry.replica_id}/{rank.entry.rank}"
        if what is not None:
            return what, {"trigger": "nonfinite", "rank": rid}
        # the baseline too: a change of data, batch size or lr may move the loss legitimately
        base = self._baseline(rank, since)
        if base is None:
            return None
        newest = _newest(rank.window.losses, since, self.params.spike_steps)
        found = judge(median(newest), base, self.params) if newest else None
        if found is None:
            return None
        what = (
            f"loss spike on rank {rid}: {found['loss']:.4g} "
            f"against a median of {found['baseline']:.4g} ({found['z']:.1f} robust σ)"
        )
        features: dict[str, Any] = {"trigger": "spike", "rank": rid}
        features.update({k: round(v, 6) for k, v in found.items()})
        return what, features

    def _job(self, now: float, state: WeaverState, job: Job) -> Decision | None:
        p = self.params
        latest = job.config.latest() if job.config else None
        if latest is None or latest.run_state != "running":
            return None
        key = f"{self.name}/{job.job_id}"
        # only what ranks logged since the newest config took effect: the guard's own change
        # starts afresh, and a person's change (more noise, a larger batch) is not a spike —
        # but a switch of optimizer or codec is judged against the losses before it
        since = baseline_since(job.config, latest.effective_step)
        first: tuple[RankKey, tuple[str, dict[str, Any]]] | None = None  # the lowest rank's
        for rank in job.ranks.values():
            if not rank.live:
                continue
            found = self._finding(rank, since)
            if found is not None and (first is None or rank.key < first[0]):
                first = (rank.key, found)
        if first is None:
            return None
        what, features = first[1]
        recent = [t for t in state.acted.get(key, ()) if now - t <= p.repeat_window_s]
        lr = latest.values.get("lr")
        features.update({"lr": lr, "lowerings_recent": len(recent), "step": since})
        if len(recent) >= p.max_lowerings or lr is None:
            return Decision(
                policy=self.name,
                job_id=job.job_id,
                action="pause",
                reason=f"{what}; lr already lowered {len(recent)}× in {p.repeat_window_s:g} s: "
                "pausing the job for a person to look",
                key=key,
                features=features,
            )
        values: dict[str, Any] = {"lr": lr * p.lr_factor}
        if p.mitigation == "rollback":
            spike_step = _spike_step(job.ranks[first[0]], features, p, since)
            back, why_not = rollback_point(job, spike_step, now=now)
            if why_not == WAIT:
                return None  # the checkpoint before the spike is still being written
            features.update({"spike_step": spike_step, "rollback_to": back})
            if back is not None:
                # the checkpoint's config comes back with it (a switched optimizer, its lr)
                lr_back = job.checkpoints[back].values.get("lr", lr)
                return Decision(
                    policy=self.name,
                    job_id=job.job_id,
                    action="rollback",
                    values={"to": back, "lr": lr_back * p.lr_factor},
                    reason=f"{what}: roll back to checkpoint {back} from before step "
                    f"{spike_step}, lr {lr_back:g} → {lr_back * p.lr_factor:g}",
                    key=key,
                    features=features,
                )
            what += f" (no rollback: {why_not})"
        if not latest.values.get("skip_nonfinite"):
            values["skip_nonfinite"] = True
        return Decision(
            policy=self.name,
            job_id=job.job_id,
            action="set",
            values=values,
            reason=f"{what}: lr {lr:g} → {lr * p.lr_factor:g}"
            + (", skip_nonfinite on" if "skip_nonfinite" in values else ""),
            key=key,
            features=features,
        )


SWITCHES = frozenset({"optimizer", "grad_compression"})
"""Knobs whose change should not move the loss: a spike after one is the switch's fault."""
CARRIED = SWITCHES | set(OPTIMIZER_KNOBS)
"""Knobs a switch may change with it (a new optimizer comes with its own lr)."""


def baseline_since(config: DesiredConfig | None, in_force: int) -> int:
    """The step from which losses make the baseline: ``in_force`` (the newest version's
    effective step), or, when the versions in force since some earlier one only switched the
    optimizer or the gradient codec (with the optimizer's knobs, :data:`CARRIED`), that earlier
    version's step — so that a switch followed at once by divergence is caught (the loss
    before it is the baseline) and can be rolled back to the checkpoint taken before it."""
    switched = False
    for ev in reversed(config.journal if config is not None else []):
        if ev.step is not None and ev.step > in_force:
            continue  # a pending version
        values = set(ev.data.get("values") or {})
        only_switches = values & SWITCHES and values <= CARRIED
        if ev.kind == "config_set" and ev.data.get("op") == "set" and only_switches:
            switched = True
            continue
        if not switched:
            return in_force
        return min(ev.step or 0, in_force)  # job_started: from the start
    return 0 if switched else in_force


def _spike_step(rank: Rank, features: dict[str, Any], p: DivergenceParams, since: int) -> int:
    """The first step whose loss is out of line (NaN/Inf, or ``spike_k`` σ above the
    baseline) among the rank's newest ``spike_steps``: the weights before it were still good,
    so a checkpoint taken before that step is one to go back to."""
    if features.get("trigger") == "nonfinite" and rank.window.nonfinite is not None:
        return rank.window.nonfinite[0]
    recent = list(islice(reversed(rank.window.losses), p.spike_steps))[::-1]
    limit = features.get("baseline", math.inf) + p.spike_k * features.get("sigma", 0.0)
    for step, value in recent:
        if value != value or value >= limit:
            return step
    return recent[0][0] if recent else since


WAIT = "wait"
""":func:`rollback_point`'s answer while a checkpoint from before the spike is being written."""

PENDING_WAIT_S = 60.0
"""How long the guard waits for a pending checkpoint from before the spike (seconds since it
was ordered): an async save ends within seconds; one still pending after this is not waited
for (the guard rolls back to an older complete one, or lowers lr), so a writer whose report
never comes cannot hold the guard back while the loss diverges."""


def rollback_point(job: Job, spike_step: int, *, now: float) -> tuple[str | None, str]:
    """The newest complete checkpoint before ``spike_step``, or None and why not (:data:`WAIT`
    while one from before it is still pending, for at most :data:`PENDING_WAIT_S` after it was
    ordered; ``now`` in wall-clock seconds)."""
    if not all(r.checkpointing for r in job.live_ranks()):
        return None, "not every rank runs a Checkpointer"
    if any(
        c.state == "pending" and c.step < spike_step and now - c.requested_ts < PENDING_WAIT_S
        for c in job.checkpoints.values()
    ):
        return None, WAIT  # e.g. the one a switch ordered just before the spike
    before = [c for c in job.checkpoints.values() if c.state == "complete" and c.step < spike_step]
    if not before:
        return None, f"no complete checkpoint before step {spike_step}"
    return max(before, key=lambda c: (c.step, c.version)).id, ""
