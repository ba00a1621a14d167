"""The Weaver's policy loop: when the policies decide, and what becomes of their decisions.

Every ``interval_s`` (and at the next tick after a rank joins, fails, hangs, exits or is
drained) a round runs: each job's position is reviewed first (outliers flagged, a version out
of reach re-planned: :mod:`~torchloom.weaver.planning`), then the policies score and decide
(:mod:`~torchloom.weaver.policies`), and each decision goes through the Weaver's one control
entry point like a person's, and into the history with its reason, features and outcome.
A round that took ``t`` seconds is followed by at least ``REST_FACTOR · t`` without one, so
policies never take more than a tenth of the Weaver's loop, however many ranks it holds.
The live settings of the policies (``policies``/``policy`` requests) are kept here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from torchloom.errors import InvalidRequestError, NotReachableError
from torchloom.protocol import ControlReply, ControlRequest, HistoryEvent, names, to_builtins
from torchloom.transport import KeyValue
from torchloom.weaver import control
from torchloom.weaver.control import ControlSettings
from torchloom.weaver.planning import review
from torchloom.weaver.policies import Decision, PolicyEngine
from torchloom.weaver.state import WeaverState

log = logging.getLogger("torchloom.weaver")

REST_FACTOR = 10
"""A policy round that took t seconds is followed by at least 10·t seconds without one (at
10,000 ranks a round takes ~50 ms: rounds every 0.5 s still; beyond, they space out instead
of starving the intake)."""

DECIDE_NOW = frozenset(
    {"rank_failed", "rank_hung", "rank_exited", "replica_drained", "rank_joined"}
)
"""History events after which the policies decide at the next tick, not at their interval."""

Submit = Callable[[ControlRequest], Awaitable[ControlReply]]
Record = Callable[[list[HistoryEvent]], None]


class PolicyLoop:
    """Runs the policy rounds of one Weaver and answers its policy settings requests.

    Args:
        state: the Weaver's state.
        engine: the policies, their settings and cooldowns.
        settings: the control settings (what counts as far, for the position review).
        submit: the Weaver's control entry point.
        record: records history events.
        clock: wall clock, seconds.
        interval_s: how often a round runs, in seconds.
    """

    def __init__(
        self,
        state: WeaverState,
        engine: PolicyEngine,
        *,
        settings: ControlSettings,
        submit: Submit,
        record: Record,
        clock: Callable[[], float],
        interval_s: float,
    ) -> None:
        self.state = state
        self.engine = engine
        self.settings = settings
        self._submit = submit
        self._record = record
        self.clock = clock
        self.interval_s = interval_s
        self.round_s = 0.0
        """How long the last round took to decide, in seconds."""
        self.config_kv: KeyValue | None = None
        """Where live policy settings are kept (the config bucket), once connected."""
        self._next_mono = 0.0
        self._rest_until = 0.0
        self._deciding: asyncio.Future[None] | None = None

    def soon(self, events: list[HistoryEvent]) -> None:
        """Have the next tick run a round when ``events`` hold a kind in :data:`DECIDE_NOW`."""
        if any(ev.kind in DECIDE_NOW for ev in events):
            self._next_mono = 0.0

    def maybe_decide(self) -> None:
        """Start a round if one is due and none is running (called every tick)."""
        mono = time.monotonic()
        if self._deciding is not None and not self._deciding.done():
            return
        if mono < max(self._next_mono, self._rest_until):
            return
        self._next_mono = mono + self.interval_s
        self._deciding = asyncio.ensure_future(self.decide())

    async def decide(self) -> None:
        """One round: review each job's position, then the policies; each decision goes
        through the control entry point like a person's."""
        now = self.clock()
        t0 = time.monotonic()
        for job in list(self.state.jobs.values()):
            events, pos = review(job, now, reach=self.settings.reach)
            self._record(events)
            replan = control.replan_request(job, pos)
            if replan is not None:
                replanned = await self._submit(replan)
                if not replanned.ok and replanned.error is not None:
                    log.warning("re-planning job %s: %s", job.job_id, replanned.error.message)
        scores = self.engine.scores(now, self.state)
        for job in self.state.jobs.values():
            for key, rank in job.ranks.items():
                rank.straggler, rank.risk = scores.get(key, (None, None))
        decisions = self.engine.decide(now, self.state)
        spent_s = time.monotonic() - t0
        self.round_s = spent_s
        self._rest_until = t0 + spent_s * REST_FACTOR
        for decision, dry_run in decisions:
            self.state.note_acted(decision.key, now)
            req = decision.request()
            reply = None
            if req is not None and not dry_run:
                reply = await self._submit(req)
            self._record([decision_event(decision, now, dry_run=dry_run, reply=reply)])

    def restore(self, raw: bytes) -> None:
        """Take the settings an earlier run stored (a bad document is logged and ignored)."""
        try:
            settings = msgspec.json.decode(raw)
            for name, table in settings.items():
                if name in self.engine.slots:
                    self.engine.update(name, dict(table))
        except (msgspec.DecodeError, InvalidRequestError, AttributeError) as exc:
            log.warning("ignoring the stored policy settings: %s", exc)

    async def handle(self, req: ControlRequest) -> ControlReply:
        """``policies`` (list) and ``policy`` (change one; stored before the reply, so a
        refused or unstored change changes nothing)."""
        if req.op == "policies":
            return ControlReply(ok=True, data=self.engine.describe_all())
        values = dict(req.values)
        name = str(values.pop("policy", ""))
        before = self.engine.settings()
        try:
            changes = dict(values.pop("params", None) or {})
            described = self.engine.update(name, {**values, **changes})
        except InvalidRequestError as exc:
            return ControlReply.refusal(exc)
        except (TypeError, ValueError) as exc:
            return ControlReply.refusal(InvalidRequestError(str(exc)))
        assert self.config_kv is not None
        try:
            await self.config_kv.put(
                names.POLICIES_KEY,
                msgspec.json.encode(self.engine.settings()),
                retry_s=self.settings.write_retry_s,
            )
        except NotReachableError as exc:
            for n, table in before.items():
                self.engine.update(n, table)
            return ControlReply.refusal(exc, prefix="not changed: ")
        who = f" by {req.requested_by}" if req.requested_by else ""
        self._record(
            [
                HistoryEvent(
                    job_id=req.job_id,
                    kind="policy_settings",
                    ts=self.clock(),
                    message=f"policy {name}: {_fmt_changes(req.values)}{who}",
                    data={"policy": name, "changes": to_builtins(req.values), "now": described},
                )
            ]
        )
        return ControlReply(ok=True, data=described)


def decision_event(
    d: Decision, now: float, *, dry_run: bool, reply: ControlReply | None
) -> HistoryEvent:
    """The history entry of a policy decision: its reason, the features it saw, what came of it.

    These entries are the trajectory dataset (``torchloom policy export``)."""
    if dry_run:
        outcome: dict[str, Any] = {"done": False, "why": "dry run"}
        prefix = "[dry run] "
    elif reply is None:
        outcome, prefix = {"done": True}, ""
    elif reply.ok:
        outcome = {"done": True, "version": reply.version, "effective_step": reply.effective_step}
        prefix = ""
    else:
        err = reply.error
        outcome = {"done": False, "error": err.message if err else "refused"}
        prefix = "[refused] "
    return HistoryEvent(
        job_id=d.job_id,
        kind=f"policy_{d.policy}",
        ts=now,
        message=f"{prefix}policy {d.policy}: {d.reason}",
        replica_id=d.replica_id,
        version=reply.version if reply is not None and reply.ok else None,
        data={
            "policy": d.policy,
            "action": d.action,
            "dry_run": dry_run,
            "values": to_builtins(d.values),
            "replica_id": d.replica_id,
            "device": d.device,
            "replace": d.replace,
            "features": to_builtins(d.features),
            "outcome": outcome,
        },
    )


def _fmt_changes(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items()) if k != "policy") or "no change"
