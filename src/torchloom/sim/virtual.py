"""The simulator in virtual time: the Weaver's own state transitions, control entry point and
policy engine, driven by :class:`~torchloom.sim.model.SimJob` with no I/O and no sleeping.

Ten simulated minutes of a 16-rank job take about a second, so the benchmark runs many
seeds; ``torchloom sim`` runs the same model in real time against a real Weaver on NATS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchloom.protocol import HistoryEvent
from torchloom.sim.model import SimJob, SimSpec
from torchloom.weaver import control
from torchloom.weaver.control import ControlSettings
from torchloom.weaver.policies import Decision, PolicyEngine
from torchloom.weaver.state import WeaverState, check_liveness, on_rank_event, on_telemetry


@dataclass(slots=True)
class VirtualRun:
    """What happened: the job, the Weaver's state, every history event and decision."""

    job: SimJob
    state: WeaverState
    events: list[HistoryEvent] = field(default_factory=list)
    decisions: list[tuple[float, Decision, bool]] = field(default_factory=list)
    """``(t, decision, carried out)``."""


def _join(
    state: WeaverState, job: SimJob, rid: str, now: float, settings: ControlSettings
) -> list[HistoryEvent]:
    events = []
    for req in job.join_requests(rid, resuming=bool(state.jobs.get(job.spec.job_id))):
        events += control.commit(state, req, control.handle(state, req, now, settings), now)
    return events


def run_virtual(
    spec: SimSpec,
    *,
    duration_s: float,
    engine: PolicyEngine | None = None,
    policy_interval_s: float = 0.5,
    settings: ControlSettings | None = None,
) -> VirtualRun:
    """Simulate ``duration_s`` seconds of ``spec``'s job under ``engine``'s policies.

    Every decision goes through :func:`torchloom.weaver.control.handle` and
    :func:`~torchloom.weaver.control.commit`, as in the Weaver; the job follows the
    resulting desired config at its effective steps.
    """
    engine = engine if engine is not None else PolicyEngine()
    settings = settings or ControlSettings()
    job = SimJob(spec)
    state = WeaverState()
    run = VirtualRun(job, state)
    for rid in list(job.groups):
        run.events += _join(state, job, rid, 0.0, settings)
    t = 0.0
    while t < duration_s:
        t = min(duration_s, t + policy_interval_s)
        doc = state.jobs[spec.job_id].config
        if doc is not None:
            job.apply(doc)
        tel, rank_events, joined = job.advance(t)
        for msg in tel:
            run.events += on_telemetry(state, msg, msg.ts)
        for ev in rank_events:
            run.events += on_rank_event(state, ev, ev.ts)
        for rid in joined:
            run.events += _join(state, job, rid, t, settings)
        run.events += check_liveness(state, t)
        for decision, dry_run in engine.decide(t, state):
            state.note_acted(decision.key, t)
            req = decision.request()
            done = False
            if req is not None and not dry_run:
                outcome = control.handle(state, req, t, settings)
                if outcome.reply.ok:
                    new = control.commit(state, req, outcome, t)
                    run.events += new
                    for hev in new:
                        job.on_history(hev)
                    done = True
            run.decisions.append((t, decision, done or req is None))
    return run
