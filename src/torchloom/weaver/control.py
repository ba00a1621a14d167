"""The one control entry point, as a pure function: request in, outcome out.

:func:`handle` validates a :class:`~torchloom.protocol.ControlRequest` against the
job's knob registry and state and returns an :class:`Outcome`: the reply, and for
a change the new :class:`~torchloom.protocol.DesiredConfig`. It never mutates
the state; the service writes the new config to the KV bucket and only then
calls :func:`commit`, so a rejected request or a failed write changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgspec

from torchloom.errors import (
    DecodeError,
    DuplicateRankError,
    InvalidKnobError,
    InvalidRequestError,
    TorchloomError,
    UnknownJobError,
    UnknownReplicaError,
)
from torchloom.protocol import (
    BUILTIN_KNOBS,
    CheckpointOrder,
    CheckpointRecord,
    ConfigSnapshot,
    ControlReply,
    ControlRequest,
    DesiredConfig,
    HistoryEvent,
    RollbackOrder,
    coerce_all,
    decode,
    encode,
    select_snapshot,
    to_builtins,
)
from torchloom.protocol.batching import scale_lr
from torchloom.protocol.knobs import check_spec
from torchloom.protocol.messages import JOURNAL_LENGTH
from torchloom.protocol.names import ALL_JOBS, check_id
from torchloom.weaver import checkpoints, views
from torchloom.weaver.planning import (
    Position,
    Reach,
    flag_outliers,
    floor_snapshots,
    floor_step,
    plan_effective_step,
    position,
)
from torchloom.weaver.state import (
    ApplyTracking,
    Job,
    RankKey,
    WeaverState,
    forget_ranks,
    holds,
    upsert_rank,
)


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """How far ahead changes are scheduled.

    Attributes:
        lead_time_s: time budget for every rank to hear of a change, in seconds,
            on top of the slowest config delivery the ranks reported.
        min_lead_steps: the effective step is at least this many steps ahead.
        max_pending_versions: versions kept in the KV document at once.
        reach: how far ahead of the job a rank is an outlier and a pending version is out
            of reach (:mod:`~torchloom.weaver.planning`).
        write_retry_s: how long a config write that JetStream did not acknowledge is tried
            again before the change is refused, in seconds (a cluster elects a new leader
            for the bucket 4-9 s after a server loss, by nats-server's Raft timeouts, and
            later on a loaded machine); the caller's request id makes its own retry safe
            after that.
    """

    lead_time_s: float = 0.5
    min_lead_steps: int = 2
    max_pending_versions: int = 64
    reach: Reach = field(default_factory=Reach)
    write_retry_s: float = 20.0


MAX_VERSION = 2**53
"""Config versions stay below this (exact in every JSON reader, the dashboard's included)."""

JOURNAL_KINDS = frozenset({"config_set", "job_started"})
"""History entries made by a new config version (kept in the config's journal)."""


@dataclass(slots=True)
class Outcome:
    reply: ControlReply
    new_config: DesiredConfig | None = None
    events: list[HistoryEvent] = field(default_factory=list)
    tracking: ApplyTracking | None = None
    reset: bool = False
    superseded: list[int] = field(default_factory=list)
    """Pending versions the new one replaces (out of reach, or due at the same step)."""
    position: Position | None = None
    """The job's position the new version was planned from (its outliers get flagged)."""
    forget: list[RankKey] = field(default_factory=list)
    """Gone ranks an operator asked to take out of the DR map."""
    checkpoint: CheckpointRecord | None = None
    """The pending record of the checkpoint a ``checkpoint`` version orders, or the record a
    pin or delete changed."""
    edited: list[CheckpointRecord] = field(default_factory=list)
    """Other records a pin changed (the one pinned before, unpinned)."""
    duplicate: tuple[RankKey, str, int] | None = None
    """A refused join of a second process with a live rank's identity: ``(key, host, pid)``
    (see :func:`~torchloom.weaver.state.duplicate_claim`)."""


def handle(
    state: WeaverState, req: ControlRequest, now: float, settings: ControlSettings
) -> Outcome:
    """Answer one control request. Never raises: errors become error replies."""
    try:
        check_id("job id", req.job_id)
        if req.op == "join":
            return _join(state, req, now)
        if req.op == "status":
            return Outcome(ControlReply(ok=True, data=_status(state, req, now)))
        if req.op == "forget":
            return _forget(state, req)
        job = _existing_job(state, req.job_id)
        if req.op == "knobs":
            return Outcome(ControlReply(ok=True, data=views.knobs(job)))
        if req.op == "checkpoints":
            return Outcome(ControlReply(ok=True, data=checkpoints.listing(job, req.replica_id)))
        if req.op in ("checkpoint_pin", "checkpoint_delete", "checkpoint_score"):
            return _edit_checkpoint(job, req, now)
        if req.op == "checkpoint_import":
            rec, events = checkpoints.imported(job, dict(req.values), now, by=req.requested_by)
            return Outcome(ControlReply(ok=True, data=to_builtins(rec)), checkpoint=rec,
                           events=events)  # fmt: skip
        if len(req.request_id) > 64:
            raise InvalidRequestError("request_id is longer than 64 characters")
        done = _already_done(job, req.request_id)
        return done if done is not None else _change(job, req, now, settings)
    except TorchloomError as exc:
        duplicate = None
        if isinstance(exc, DuplicateRankError) and req.join is not None:
            key = (req.job_id, req.join.replica_id, req.join.rank)
            duplicate = (key, req.join.host, req.join.pid)
        return Outcome(ControlReply.refusal(exc), duplicate=duplicate)


STATUS_BUDGET_BYTES = 192 * 1024
"""A status reply stays under this many bytes (the codec takes 256 KiB): its page shrinks."""


def _status(state: WeaverState, req: ControlRequest, now: float) -> dict[str, Any]:
    """The status view the request asks for (:class:`~torchloom.weaver.views.StatusQuery` in
    its ``values``), its page halved until the reply fits :data:`STATUS_BUDGET_BYTES`.

    Raises:
        InvalidRequestError: a bad query, or a reply too large even without ranks (too many
            jobs at once: ask for one with its job id).
    """
    job_id = None if req.job_id == ALL_JOBS else req.job_id
    query = views.StatusQuery.from_values(dict(req.values), req.replica_id)
    while True:
        data = views.status(state, job_id, now, query)
        if len(encode(data)) <= STATUS_BUDGET_BYTES:
            return data
        if query.limit == 0:
            raise InvalidRequestError("the status of every job is too large: ask for one job")
        query = dataclasses.replace(query, limit=query.limit // 2)


def _edit_checkpoint(job: Job, req: ControlRequest, now: float) -> Outcome:
    """Pin, unpin or delete a checkpoint in the registry (no config version: the ranks are
    not told; a deleted checkpoint's files are removed by the next checkpoint's writer)."""
    rec, others, events = checkpoints.edit(job, req.op, dict(req.values), now, by=req.requested_by)
    return Outcome(
        ControlReply(ok=True, data=to_builtins(rec)),
        checkpoint=rec,
        edited=others,
        events=events,
    )


def _forget(state: WeaverState, req: ControlRequest) -> Outcome:
    """Which gone ranks (``failed``, ``exited``) an operator's ``forget`` takes out of the DR
    map: all of the job's, or of one replica group (``replica_id``), or one rank (``values``
    ``{"rank": k}`` with it).

    Raises:
        UnknownJobError: no such job.
        InvalidRequestError: the rank named is live (only gone ranks are forgotten).
    """
    job = state.jobs.get(req.job_id)
    if job is None:
        raise UnknownJobError(req.job_id)
    try:
        raw = req.values.get("rank")
        rank_no = None if raw is None else int(raw)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"rank must be an integer, not {raw!r}") from None
    if rank_no is not None and req.replica_id is None:
        raise InvalidRequestError("forget of one rank needs its replica group")
    keys = [
        r.key
        for r in job.ranks.values()
        if (req.replica_id is None or r.entry.replica_id == req.replica_id)
        and (rank_no is None or r.entry.rank == rank_no)
    ]
    live = [k for k in keys if job.ranks[k].live]
    if live and rank_no is not None:
        st = job.ranks[live[0]].state
        raise InvalidRequestError(
            f"rank {req.replica_id}/{rank_no} is live ({st}); only failed or exited ranks are forgotten"
        )
    gone = sorted(k for k in keys if k not in live)
    ids = [views.rank_id(k) for k in gone]
    return Outcome(
        ControlReply(ok=True, data={"forgotten": len(gone), "ranks": ids[:100]}), forget=gone
    )


def _existing_job(state: WeaverState, job_id: str) -> Job:
    job = state.jobs.get(job_id)
    if job is None or job.config is None:
        raise UnknownJobError(job_id)
    return job


def _already_done(job: Job, request_id: str) -> Outcome | None:
    """The answer a change with this ``request_id`` got the first time (it is in the config's
    journal), so that a retry makes no second version; None when it is new."""
    if not request_id or job.config is None:
        return None
    for event in reversed(job.config.journal):
        if event.data.get("request_id") == request_id:
            return Outcome(ControlReply(ok=True, version=event.version, effective_step=event.step))
    return None


def journaled(config: DesiredConfig, events: list[HistoryEvent]) -> DesiredConfig:
    """``config`` with ``events``' config entries added to its journal (the newest
    :data:`~torchloom.protocol.messages.JOURNAL_LENGTH` kept); see :class:`DesiredConfig`."""
    new = [ev for ev in events if ev.kind in JOURNAL_KINDS]
    if not new:
        return config
    return msgspec.structs.replace(config, journal=[*config.journal, *new][-JOURNAL_LENGTH:])


def _change(job: Job, req: ControlRequest, now: float, settings: ControlSettings) -> Outcome:
    assert job.config is not None
    latest = job.config.latest()
    assert latest is not None
    values = dict(latest.values)
    overrides = {k: dict(v) for k, v in latest.overrides.items()}
    run_state = latest.run_state
    drained = list(latest.drained)
    writers: list[str] = []
    record_values = values  # what a checkpoint ordered by this version records as its config
    if latest.run_state == "stopped" and req.op != "replan":
        raise InvalidRequestError(
            f"job {job.job_id!r} is stopping at step {latest.effective_step}; nothing more can change"
        )
    if req.op == "set":
        if not req.values:
            raise InvalidRequestError("set needs at least one knob=value")
        changes = coerce_all(job.config.knobs, req.values)
        if req.replica_id is not None:
            if req.replica_id not in job.replica_ids():
                raise UnknownReplicaError(job.job_id, req.replica_id)
            for name in changes:
                if job.config.knobs[name].scope == "job":
                    raise InvalidKnobError(
                        name, "is job-wide; it cannot be set for one replica group"
                    )
            overrides.setdefault(req.replica_id, {}).update(changes)
        else:
            changes = _with_scaled_lr(values, changes)
            values.update(changes)
            for ov in overrides.values():  # a job-wide set wins over older per-group values
                for name in changes:
                    ov.pop(name, None)
            overrides = {k: v for k, v in overrides.items() if v}
        what = ", ".join(f"{k}={v if v is not None else 'off'}" for k, v in changes.items())
        what += f" on replica group {req.replica_id}" if req.replica_id else ""
        writers, why = _checkpoint_before_switch(job, latest.values, changes)
        if writers:
            record_values = dict(latest.values)  # the state saved is the one before the switch
            what += f", after a checkpoint of the state before it ({why})"
    elif req.op == "pause":
        if run_state == "paused":
            raise InvalidRequestError(f"job {job.job_id!r} is already paused")
        run_state, what = "paused", "pause"
    elif req.op == "resume":
        if run_state != "paused":
            raise InvalidRequestError(f"job {job.job_id!r} is not paused")
        run_state, what = "running", "resume"
    elif req.op == "stop":
        run_state, what = "stopped", "stop"
    elif req.op == "drain":
        targets = _drain_targets(job, req, already=set(drained))
        drained = sorted(set(drained) | targets)
        what = f"drain replica group(s) {', '.join(sorted(targets))}" + (
            " with replacement" if req.replace else ""
        )
    elif req.op == "checkpoint":
        if run_state == "paused":
            raise InvalidRequestError(
                f"job {job.job_id!r} is paused: a checkpoint is taken at a step the ranks reach"
            )
        pending = [c.id for c in job.checkpoints.values() if c.state == "pending"]
        if pending:
            raise InvalidRequestError(
                f"checkpoint {pending[0]} of job {job.job_id!r} is still being written; "
                "ask again when it is complete or failed"
            )
        writers, why = checkpoints.choose_writers(job)
        if not writers:
            raise InvalidRequestError(f"job {job.job_id!r} has no live rank to write a checkpoint")
        what = f"checkpoint ({why})"
    elif req.op == "rollback":
        if run_state == "paused":
            raise InvalidRequestError(
                f"job {job.job_id!r} is paused: a rollback happens at a step the ranks reach"
            )
        target = checkpoints.rollback_target(job, req.values)
        values = {**values, **target.values}  # the desired config goes back with it
        changes = coerce_all(
            job.config.knobs, {k: v for k, v in req.values.items() if k not in ("to", "step")}
        )
        values.update(changes)  # and knobs changed with it (the divergence guard's lr)
        what = f"roll back to checkpoint {target.id} (step {target.step})" + "".join(
            f", {k}={v}" for k, v in changes.items()
        )
    elif req.op == "replan":
        what = f"v{latest.version} re-planned"
    else:
        raise InvalidRequestError(f"unknown op {req.op!r}")
    pos = position(job, reach=settings.reach)
    holding = floor_snapshots(job)
    floor = floor_step(holding, pos)
    if req.op == "replan" and floor >= latest.effective_step:
        raise InvalidRequestError(f"every pending version of job {job.job_id!r} is in reach")
    consistent = req.op != "set" or any(job.config.knobs[name].consistent for name in req.values)
    if req.op == "resume" and floor == latest.effective_step:
        eff = floor  # ranks wait at the pause step; go on from there
    elif not consistent:
        # only knobs that need no common step: each rank takes it at its next step boundary
        live_steps = [r.entry.last_step for r in (pos.members if pos else job.live_ranks())]
        eff = max(floor, min(live_steps) + 1 if live_steps else 0)
    else:
        eff = _plan(job, now, settings, pos=pos)
    version = latest.version + 1
    order = None
    if writers:
        cid, backup = checkpoints.checkpoint_id(version), checkpoints.backs_up(job)
        order = CheckpointOrder(
            id=cid,
            writers=writers,
            remove=checkpoints.to_remove(job),
            backup=backup,
            backup_drop=checkpoints.backup_drop(job, cid) if backup else [],
        )
    snap = ConfigSnapshot(
        version=version,
        effective_step=eff,
        values=values,
        overrides=overrides,
        run_state=run_state,
        drained=drained,
        checkpoint=order,
        rollback=(
            RollbackOrder(id=target.id, step=target.step, files=target.files)
            if req.op == "rollback"
            else None
        ),
        issued_ts=now,
        reason=req.reason or what,
    )
    # versions planned beyond this one are out of reach (else they would be the floor)
    superseded = [s.version for s in job.config.snapshots if s.effective_step > eff]
    passed = {s.version for s in job.config.snapshots} - {s.version for s in holding}
    if set(superseded) - passed:
        out_of_reach = [v for v in superseded if v not in passed]
        what += f" (supersedes v{', v'.join(map(str, out_of_reach))}: out of reach)"
    snapshots = _prune([*job.config.snapshots, snap], job, settings.max_pending_versions)
    new = msgspec.structs.replace(job.config, snapshots=snapshots)
    expected = {r.key for r in job.live_ranks()}
    who = f" by {req.requested_by}" if req.requested_by else ""
    event = HistoryEvent(
        job_id=job.job_id,
        kind="config_set",
        ts=now,
        step=eff,
        version=version,
        replica_id=req.replica_id,
        message=f"v{version}: {what}{who}, effective at step {eff}",
        data={
            "op": req.op,
            "values": to_builtins(req.values),
            "reason": req.reason,
            "requested_by": req.requested_by,
            "request_id": req.request_id,
            "run_state": run_state,
            **(
                {"drain": sorted(set(drained) - set(latest.drained)), "replace": req.replace}
                if req.op == "drain"
                else {}
            ),
            **({"superseded": superseded} if superseded else {}),
            **(
                {"rollback": {"id": target.id, "step": target.step}} if req.op == "rollback" else {}
            ),
        },
    )
    record = None
    events = [event]
    if writers:
        record = checkpoints.new_record(
            job,
            version=version,
            step=eff,
            values=record_values,
            writers=writers,
            requested_by=req.requested_by,
            reason=req.reason,
            now=now,
        )
        events.append(
            HistoryEvent(
                job_id=job.job_id,
                kind="checkpoint_requested",
                ts=now,
                step=eff,
                version=version,
                message=f"checkpoint {record.id} ordered at step {eff}: {why}{who}",
                data={"id": record.id, "writers": record.writers, "groups": writers},
            )
        )
    return Outcome(
        ControlReply(
            ok=True,
            version=version,
            effective_step=eff,
            data={"checkpoint": record.id} if record else None,
        ),
        new_config=new,
        checkpoint=record,
        events=events,
        tracking=ApplyTracking(
            version=version, effective_step=eff, issued_ts=now, expected=expected, strict=consistent
        ),
        superseded=superseded,
        position=pos,
    )


SWITCH_KNOBS = frozenset({"optimizer"})
"""Knobs whose change rebuilds training state (:mod:`torchloom.optim` maps the optimizer's state
to the new kind, which loses something): a version that changes one also orders a checkpoint
of the state before it, when the job can take one."""


def _checkpoint_before_switch(
    job: Job, before: dict[str, Any], changes: dict[str, Any]
) -> tuple[list[str], str]:
    """The writers of a checkpoint to take before a switch this change makes, and why; none
    when it switches nothing, when not every live rank runs a Checkpointer, or while another
    checkpoint is being written (the switch goes ahead; the history says which)."""
    if not any(k in SWITCH_KNOBS and before.get(k) != v for k, v in changes.items()):
        return [], ""
    live = job.live_ranks()
    if not live or not all(r.checkpointing for r in live):
        return [], ""
    if any(c.state == "pending" for c in job.checkpoints.values()):
        return [], ""
    return checkpoints.choose_writers(job)


def _plan(job: Job, now: float, settings: ControlSettings, *, pos: Position | None = None) -> int:
    return plan_effective_step(
        job,
        now,
        lead_time_s=settings.lead_time_s,
        min_lead_steps=settings.min_lead_steps,
        reach=settings.reach,
        pos=pos,
    )


def replan_request(job: Job, pos: Position | None) -> ControlRequest | None:
    """The Weaver's own request to re-plan ``job``'s newest version when no live rank that
    counts (``pos``, from :func:`~torchloom.weaver.planning.review`) can reach its effective
    step — say it was planned while a rank reported a bogus step, and that rank has since
    failed — else None."""
    latest = job.config.latest() if job.config is not None else None
    if latest is None or pos is None or pos.reachable(latest.effective_step):
        return None
    return ControlRequest(
        op="replan",
        job_id=job.job_id,
        requested_by="weaver",
        reason=f"v{latest.version}'s effective step {latest.effective_step} is out of reach: "
        f"the job is at step {pos.top_step}",
    )


def _with_scaled_lr(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A new ``global_batch_size`` brings a scaled ``lr`` along when ``lr_scaling`` asks for it
    (and the request does not set ``lr`` itself); see :func:`torchloom.protocol.batching.scale_lr`."""
    rule = changes.get("lr_scaling", values.get("lr_scaling")) or "none"
    old, new = values.get("global_batch_size"), changes.get("global_batch_size")
    if (
        rule == "none"
        or "lr" in changes
        or old is None
        or new is None
        or values.get("lr") is None
        or old == new
    ):
        return changes
    return {**changes, "lr": scale_lr(values["lr"], old_global=old, new_global=new, rule=rule)}


def _drain_targets(job: Job, req: ControlRequest, *, already: set[str]) -> set[str]:
    """The replica groups a drain request names (by id, or by a device one of their ranks uses).

    Raises:
        InvalidRequestError: neither or both of replica and device given, a device with no live
            rank, groups already draining, or no replica group would be left.
        UnknownReplicaError: the replica group is not in the job's DR map.
    """
    if (req.replica_id is None) == (req.device is None):
        raise InvalidRequestError("drain needs exactly one of --replica ID or --device DEVICE")
    if req.replica_id is not None:
        if req.replica_id not in job.replica_ids():
            raise UnknownReplicaError(job.job_id, req.replica_id)
        targets = {req.replica_id}
    else:
        targets = {r.entry.replica_id for r in job.live_ranks() if r.entry.device == req.device}
        if not targets:
            raise InvalidRequestError(
                f"no live rank of job {job.job_id!r} is on device {req.device!r}"
            )
    if targets <= already:
        raise InvalidRequestError(
            f"replica group(s) {', '.join(sorted(targets))} are already draining"
        )
    remaining = {r.entry.replica_id for r in job.live_ranks()} - already - targets
    if not remaining:
        raise InvalidRequestError(
            f"draining {', '.join(sorted(targets))} would leave job {job.job_id!r} with no replica group; "
            "use `torchloom stop` to end the job"
        )
    return targets


def _prune(snapshots: list[ConfigSnapshot], job: Job, max_versions: int) -> list[ConfigSnapshot]:
    """Drop snapshots no live rank can still need.

    * A pending snapshot with the same effective step as the new one (the last)
      is superseded: snapshots are full configs, and the new one was scheduled
      at that step only because every rank can still hear of it in time. Rapid
      changes therefore coalesce instead of piling up.
    * Before the slowest live rank's step, only the snapshot in force there is kept.
    """
    new = snapshots[-1]
    snapshots = [s for s in snapshots[:-1] if s.effective_step < new.effective_step] + [new]
    live = job.live_ranks()
    if live:
        slowest = min(max(r.entry.last_step, 0) for r in live)
        base = select_snapshot(snapshots, slowest)
        if base is not None:
            snapshots = [s for s in snapshots if s.version >= base.version]
    if len(snapshots) > max_versions:
        raise InvalidRequestError(
            f"{len(snapshots) - 1} changes are still pending; wait until the ranks reach their effective steps"
        )
    return snapshots


def _join(state: WeaverState, req: ControlRequest, now: float) -> Outcome:
    info = req.join
    if info is None:
        raise InvalidRequestError("join needs its join info")
    check_id("replica id", info.replica_id)
    if req.job_id == ALL_JOBS:
        raise InvalidRequestError(f"job id {ALL_JOBS!r} is reserved")
    job = state.jobs.get(req.job_id)
    holder = job.ranks.get((req.job_id, info.replica_id, info.rank)) if job else None
    if holder is not None and not holds(
        holder,
        host=info.host,
        pid=info.pid,
        now=now,
        failure_timeout_s=state.liveness.failure_timeout_s,
    ):
        raise DuplicateRankError(
            req.job_id,
            info.replica_id,
            info.rank,
            holder_host=holder.entry.host,
            holder_pid=holder.entry.pid,
        )
    knobs = dict(BUILTIN_KNOBS)
    for spec in info.custom_knobs:
        knobs[spec.name] = check_spec(spec)
    initial = coerce_all(knobs, info.initial_values)
    outcome = Outcome(ControlReply(ok=True))
    if job is None or job.config is None or (job.ended and not info.resuming):
        epoch = job.config.epoch + 1 if job is not None and job.config is not None else 1
        last = job.config.latest() if job is not None and job.config is not None else None
        version = (last.version if last else 0) + 1
        snap = ConfigSnapshot(
            version=version,
            effective_step=0,
            values=initial,
            issued_ts=now,
            reason=f"initial knobs from rank {info.replica_id}/{info.rank}",
        )
        outcome.new_config = DesiredConfig(
            job_id=req.job_id, epoch=epoch, knobs=knobs, snapshots=[snap]
        )
        outcome.reset = True
        outcome.events.append(
            HistoryEvent(
                job_id=req.job_id,
                kind="job_started",
                ts=now,
                version=version,
                message=f"job {req.job_id} started (epoch {epoch}) with {_fmt_values(initial)}",
                data={"epoch": epoch, "values": to_builtins(initial)},
            )
        )
    elif any(name not in job.config.knobs for name in knobs):
        merged = {**knobs, **job.config.knobs}
        outcome.new_config = msgspec.structs.replace(job.config, knobs=merged)
    return outcome


def commit(
    state: WeaverState, req: ControlRequest, outcome: Outcome, now: float
) -> list[HistoryEvent]:
    """Make an accepted outcome part of the state (after its KV write succeeded)."""
    events = commit_config(state, req.job_id, outcome, now)
    if req.op == "join" and req.join is not None:
        events += _commit_join(state, req, outcome, now)
    if outcome.forget:
        who = f"torchloom forget by {req.requested_by or '?'}"
        events += forget_ranks(state, state.job(req.job_id), outcome.forget, now, why=who)
    return events


def commit_config(
    state: WeaverState, job_id: str, outcome: Outcome, now: float
) -> list[HistoryEvent]:
    """The config part of :func:`commit`: the new document, its apply tracking, outliers."""
    events = list(outcome.events)
    job = state.job(job_id)
    if outcome.reset:  # the previous epoch's ranks leave the DR map; live ones are about to join
        for key, old in list(job.ranks.items()):
            if not old.live:
                state.removed.add(key)
                del job.ranks[key]
        job.applies.clear()
    if outcome.new_config is not None:
        job.config = outcome.new_config
    for rec in [outcome.checkpoint, *outcome.edited] if outcome.checkpoint else []:
        job.checkpoints[rec.id] = rec
        job.dirty_checkpoints.add(rec.id)
    if outcome.tracking is not None:
        job.applies[outcome.tracking.version] = outcome.tracking
    for version in outcome.superseded:  # replaced before anyone could apply them
        job.applies.pop(version, None)
    if outcome.position is not None:
        events += flag_outliers(job, outcome.position, now)
    return events


def _commit_join(
    state: WeaverState, req: ControlRequest, outcome: Outcome, now: float
) -> list[HistoryEvent]:
    assert req.join is not None
    j = req.join
    job = state.job(req.job_id)
    # a new process may take the place of a drained one
    job.departed.pop((req.job_id, j.replica_id, j.rank), None)
    rank, events = upsert_rank(
        state,
        job_id=req.job_id,
        replica_id=j.replica_id,
        rank_no=j.rank,
        now=now,
        group_world_size=j.group_world_size,
        host=j.host,
        pid=j.pid,
        device=j.device,
    )
    if rank is None:  # another process took this identity while the join was written
        holder = job.ranks[(req.job_id, j.replica_id, j.rank)].entry
        exc = DuplicateRankError(
            req.job_id, j.replica_id, j.rank, holder_host=holder.host, holder_pid=holder.pid
        )
        outcome.reply = ControlReply.refusal(exc)
        return events
    if job.config is not None and rank.entry.epoch != job.config.epoch:
        rank.entry.epoch = job.config.epoch
        state.dirty.add(rank.key)
    if outcome.reply.ok and job.config is not None:
        outcome.reply.data = to_builtins(job.config)
    return events


def restore(job: Job, foreign: bytes | None, now: float, settings: ControlSettings) -> Outcome:
    """What to write over ``job``'s config document after something other than this Weaver
    wrote it (``foreign``: what it wrote; None: it deleted the key).

    The Weaver's own document goes back. When the foreign document is one the ranks may have
    taken (it decodes, names this job, and announces a version at or above the Weaver's), the
    Weaver's newest values come back as a new version above it, at a planned effective step,
    so those ranks return to them at one step; otherwise the ranks ignored it and the same
    document is written again. Either way a ``config_restored`` event says what was found.
    """
    assert job.config is not None
    latest = job.config.latest()
    assert latest is not None
    seen = 0
    if foreign is None:
        found = "deleted it"
    else:
        try:
            doc = decode(foreign, DesiredConfig, kind="desired config")
            top = doc.latest()
            seen = top.version if top is not None and doc.job_id == job.job_id else 0
            found = f"wrote a config document at v{seen}"
        except DecodeError as exc:
            found = f"wrote {len(foreign)} bytes that are not a config document ({exc.reason[:80]})"
    events = [
        HistoryEvent(
            job_id=job.job_id,
            kind="config_restored",
            ts=now,
            version=latest.version,
            message=f"something other than this Weaver {found} in job {job.job_id}'s config "
            f"key; restored v{latest.version} from the Weaver's state",
            data={"found_version": seen or None, "restored_version": latest.version},
        )
    ]
    if seen < latest.version or seen + 1 > MAX_VERSION:
        return Outcome(ControlReply(ok=True), new_config=job.config, events=events)
    version = seen + 1
    eff = _plan(job, now, settings)
    snap = msgspec.structs.replace(
        latest,
        version=version,
        effective_step=eff,
        issued_ts=now,
        reason=f"v{latest.version} restored over a foreign v{seen}",
    )
    snapshots = _prune([*job.config.snapshots, snap], job, settings.max_pending_versions)
    events.append(
        HistoryEvent(
            job_id=job.job_id,
            kind="config_set",
            ts=now,
            step=eff,
            version=version,
            message=f"v{version}: the values of v{latest.version} again, above the foreign "
            f"v{seen}, effective at step {eff}",
            data={"op": "restore", "values": {}, "requested_by": "weaver", "request_id": ""},
        )
    )
    expected = {r.key for r in job.live_ranks()}
    return Outcome(
        ControlReply(ok=True, version=version, effective_step=eff),
        new_config=msgspec.structs.replace(job.config, snapshots=snapshots),
        events=events,
        tracking=ApplyTracking(
            version=version, effective_step=eff, issued_ts=now, expected=expected
        ),
    )


def _fmt_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "no knobs"
