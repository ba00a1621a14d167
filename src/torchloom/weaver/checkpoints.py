"""Checkpoints the Weaver orders and keeps: who writes one, and when it is complete or failed.

Pure: the control entry point (:mod:`~torchloom.weaver.control`) turns ``checkpoint`` into a
config version whose snapshot carries a :class:`~torchloom.protocol.CheckpointOrder`; every
writing rank saves at that version's effective step and reports ``checkpoint_saved`` or
``checkpoint_failed``; this module folds those reports (and writers that fail or leave) into
the job's registry of :class:`~torchloom.protocol.CheckpointRecord` and says what to record.

Under torchft the replica groups hold identical state, so one group writes — the healthiest:
no straggler flag, the lowest device risk, every rank training, then the lowest id — and the
others train on (the idea of torchft's and Gemini's per-group checkpoints). Without torchft
every rank writes its part.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from torchloom.errors import InvalidRequestError
from torchloom.protocol import CheckpointRecord, HistoryEvent, RankEvent
from torchloom.weaver.state import Job, Rank

STATES_TRAINING = ("training", "joining")


def checkpoint_id(version: int) -> str:
    """The id of the checkpoint config version ``version`` orders."""
    return f"ckpt-v{version}"


def choose_writers(job: Job) -> tuple[list[str], str]:
    """The replica groups that write the next checkpoint, and why (for the history).

    One group under torchft (its ranks report a quorum): replica groups hold the same state;
    every group otherwise.
    """
    groups: dict[str, list[Rank]] = {}
    for rank in job.live_ranks():
        groups.setdefault(rank.key[1], []).append(rank)
    if not groups:
        return [], "no live rank"
    if len(groups) == 1 or not any(r.quorum for ranks in groups.values() for r in ranks):
        return sorted(groups), "every replica group writes its part"

    def health(gid: str) -> tuple[bool, float, int, str]:
        ranks = groups[gid]
        return (
            any(bool(r.straggler) for r in ranks),
            max((r.risk or 0.0) for r in ranks),
            sum(r.state not in STATES_TRAINING for r in ranks),
            gid,
        )

    best = min(groups, key=health)
    others = sorted(set(groups) - {best})
    return [best], (
        f"replica group {best} writes (the healthiest of {len(groups)}; "
        f"{', '.join(others)} train on)"
    )


def new_record(
    job: Job,
    *,
    version: int,
    step: int,
    values: dict[str, Any],
    writers: list[str],
    requested_by: str,
    reason: str,
    now: float,
) -> CheckpointRecord:
    """The pending record of the checkpoint version ``version`` orders at ``step``."""
    ranks = sorted(f"{r.key[1]}/{r.key[2]}" for r in job.live_ranks() if r.key[1] in set(writers))
    return CheckpointRecord(
        id=checkpoint_id(version),
        job_id=job.job_id,
        step=step,
        version=version,
        values=values,
        writers=ranks,
        requested_by=requested_by,
        requested_ts=now,
        reason=reason,
    )


def on_report(job: Job, msg: RankEvent, now: float) -> list[HistoryEvent]:
    """Fold a writer's ``checkpoint_saved`` / ``checkpoint_failed`` in; the events to record
    when that completes or fails the checkpoint. Reports on an ended checkpoint, or from a
    rank that is not one of its writers, change nothing."""
    rec = job.checkpoints.get(str(msg.data.get("id", "")))
    who = f"{msg.replica_id}/{msg.rank}"
    if rec is None or rec.state != "pending" or who not in rec.writers:
        return []
    if msg.kind == "checkpoint_failed":
        return _end(job, rec, "failed", now, f"rank {who}: {msg.reason or 'failed'}")
    saved = {**rec.saved, who: int(msg.data.get("bytes", 0) or 0)}
    files = msg.data.get("files")
    rec = msgspec.structs.replace(
        rec,
        saved=saved,
        files={**rec.files, **(files if isinstance(files, dict) else {})},
        storage=rec.storage or str(msg.data.get("storage", "")),
        metadata_sha256=rec.metadata_sha256 or str(msg.data.get("metadata_sha256", "")),
        stall_s=max(rec.stall_s, float(msg.data.get("stall_s", 0.0) or 0.0)),
    )
    job.checkpoints[rec.id] = rec
    job.dirty_checkpoints.add(rec.id)
    if set(saved) >= set(rec.writers):
        if not rec.metadata_sha256:
            return _end(job, rec, "failed", now, "no rank reported DCP's metadata written")
        return _end(job, rec, "complete", now, "")
    return []


def on_removed(job: Job, msg: RankEvent) -> None:
    """Note the old checkpoints whose files a writer removed (``data["removed"]`` of its
    ``checkpoint_saved``): they are not ordered removed again."""
    removed = msg.data.get("removed")
    for cid in removed if isinstance(removed, list) else []:
        rec = job.checkpoints.get(str(cid))
        if rec is not None and rec.state in ("failed", "deleted") and not rec.files_removed:
            job.checkpoints[rec.id] = msgspec.structs.replace(rec, files_removed=True)
            job.dirty_checkpoints.add(rec.id)


MAX_REMOVE_PER_ORDER = 16
"""Old checkpoints one checkpoint order asks its writer to remove the files of, at most."""


def to_remove(job: Job) -> list[str]:
    """The failed and deleted checkpoints whose files are still in the storage, oldest first
    (at most :data:`MAX_REMOVE_PER_ORDER`): the next order's writer removes them."""
    old = [
        c
        for c in job.checkpoints.values()
        if c.state in ("failed", "deleted") and not c.files_removed
    ]
    return [c.id for c in sorted(old, key=lambda c: c.version)[:MAX_REMOVE_PER_ORDER]]


def backs_up(job: Job) -> bool:
    """Whether the next checkpoint is copied to the backup: the job's Checkpointers have one
    and it will be the ``every``-th complete checkpoint (counting the complete ones so far)."""
    keep = job.backup_keep
    if keep is None:
        return False
    every = max(1, int(keep.get("every", 1) or 1))
    done = sum(c.state == "complete" for c in job.checkpoints.values())
    return (done + 1) % every == 0


def backup_drop(job: Job, new_id: str) -> list[str]:
    """The checkpoints whose backup copies go once ``new_id`` is copied to the backup (when
    :func:`backs_up` says it is), by the
    retention the job's Checkpointers said (``job.backup_keep``): of the complete checkpoints
    in the backup plus the new one, keep the newest ``keep_last``, every ``keep_every``-th (by
    version order; 0: none), the lowest-loss one if ``keep_best``, and the pinned one; the rest
    go. No backup said: nothing."""
    keep = job.backup_keep
    if keep is None:
        return []
    last = max(0, int(keep.get("keep_last", 0) or 0))
    every = max(0, int(keep.get("keep_every", 0) or 0))
    backed = sorted(
        (c for c in job.checkpoints.values() if c.backup and c.id != new_id),
        key=lambda c: c.version,
    )
    order = sorted(
        (c for c in job.checkpoints.values() if c.state == "complete" or c.id == new_id),
        key=lambda c: c.version,
    )
    nth = {c.id: i for i, c in enumerate(order, start=1)}
    ids = [c.id for c in backed] + [new_id]
    kept = set(ids[-last:]) if last else set()
    kept |= {i for i in ids if every and nth.get(i, 0) % every == 0}
    kept |= {c.id for c in backed if c.pinned}
    scored = [c for c in backed if c.loss is not None and math.isfinite(c.loss)]
    if keep.get("keep_best") and scored:
        kept.add(min(scored, key=lambda c: c.loss or 0.0).id)
    return [c.id for c in backed if c.id not in kept]


def on_backed_up(job: Job, msg: RankEvent) -> None:
    """A writer copied a checkpoint to the backup (``data``: ``id``, ``backup`` URL, and
    ``dropped``: the ids it removed from the backup)."""
    changed = []
    rec = job.checkpoints.get(str(msg.data.get("id", "")))
    if rec is not None and msg.data.get("backup"):
        changed.append(msgspec.structs.replace(rec, backup=str(msg.data["backup"])))
    dropped = msg.data.get("dropped")
    for cid in dropped if isinstance(dropped, list) else []:
        old = job.checkpoints.get(str(cid))
        if old is not None and old.backup:
            changed.append(msgspec.structs.replace(old, backup=""))
    for c in changed:
        job.checkpoints[c.id] = c
        job.dirty_checkpoints.add(c.id)


def on_corrupt(job: Job, msg: RankEvent, now: float) -> list[HistoryEvent]:
    """A rank found a complete checkpoint's files changed or truncated at a load: it is failed
    from now on (never offered again; its files are removed by a later writer)."""
    rec = job.checkpoints.get(str(msg.data.get("id", "")))
    if rec is None or rec.state != "complete":
        return []
    who = f"{msg.replica_id}/{msg.rank}"
    return _end(
        job,
        rec,
        "failed",
        now,
        f"failed its checksums at a load on rank {who}: {msg.reason or 'files changed'}",
    )


def edit(
    job: Job, op: str, values: dict[str, Any], now: float, *, by: str = ""
) -> tuple[CheckpointRecord, list[CheckpointRecord], list[HistoryEvent]]:
    """A person's ``checkpoint_pin`` (``values``: ``id``, ``pinned``: bool, default true) or
    ``checkpoint_delete`` (``id``), or an evaluator's ``checkpoint_score`` (``id``, ``scores``:
    see :func:`checked_scores`): the edited record, the other records it changes (a pin
    unpins the one pinned before), and the history events.

    Raises:
        InvalidRequestError: no such checkpoint; pinning or scoring one that is not complete;
            deleting a pinned or a pending one; bad scores.
    """
    cid = str(values.get("id", ""))
    rec = job.checkpoints.get(cid)
    if rec is None or rec.state == "deleted":
        raise InvalidRequestError(f"job {job.job_id!r} has no checkpoint {cid!r}")
    who = f" by {by}" if by else ""
    if op == "checkpoint_score":
        if rec.state != "complete":
            raise InvalidRequestError(
                f"checkpoint {cid} is {rec.state}: only a complete checkpoint is scored"
            )
        scores = checked_scores(values.get("scores"))
        done = msgspec.structs.replace(rec, scores={**rec.scores, **scores}, scored_by=by)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in scores.items())
        train = f" (training loss there {rec.loss:.4g})" if rec.loss is not None else ""
        event = HistoryEvent(
            job_id=job.job_id,
            kind="checkpoint_evaluated",
            ts=now,
            step=rec.step,
            version=rec.version,
            message=f"checkpoint {cid} (step {rec.step}) evaluated{who}: {shown}{train}",
            data={"id": cid, "by": by, "scores": scores, "loss": rec.loss},
        )
        return done, [], [event]
    if op == "checkpoint_delete":
        if rec.pinned:
            raise InvalidRequestError(f"checkpoint {cid} is pinned: unpin it first")
        if rec.state == "pending":
            raise InvalidRequestError(f"checkpoint {cid} is still being written")
        done = msgspec.structs.replace(rec, state="deleted", ended_ts=rec.ended_ts or now)
        kind, message, others = "checkpoint_deleted", f"checkpoint {cid} deleted{who}", []
    else:
        pinned = bool(values.get("pinned", True))
        if pinned and rec.state != "complete":
            raise InvalidRequestError(
                f"checkpoint {cid} is {rec.state}: only a complete checkpoint can be pinned"
            )
        done = msgspec.structs.replace(rec, pinned=pinned)
        others = [
            msgspec.structs.replace(c, pinned=False)
            for c in job.checkpoints.values()
            if pinned and c.pinned and c.id != cid
        ]
        kind = "checkpoint_pinned" if pinned else "checkpoint_unpinned"
        message = (
            f"checkpoint {cid} (step {rec.step}) pinned{who}: a starting job resumes from it"
            + (f" (unpins {', '.join(c.id for c in others)})" if others else "")
            if pinned
            else f"checkpoint {cid} unpinned{who}: a starting job resumes from the newest"
        )
    event = HistoryEvent(
        job_id=job.job_id,
        kind=kind,
        ts=now,
        step=rec.step,
        version=rec.version,
        message=message,
        data={"id": cid, "by": by},
    )
    return done, others, [event]


def imported(
    job: Job, values: dict[str, Any], now: float, *, by: str = ""
) -> tuple[CheckpointRecord, list[HistoryEvent]]:
    """The ``imported`` record of weights the dashboard stored (``values``: ``storage``, its
    path; ``files``, name → SHA-256; ``bytes``; ``source``, the uploaded file's name; ``step``,
    if known), id ``import-<n>``, and its ``checkpoint_imported`` event.

    Raises:
        InvalidRequestError: no storage or files given.
    """
    storage, files = values.get("storage"), values.get("files")
    if not isinstance(storage, str) or not storage or not isinstance(files, dict) or not files:
        raise InvalidRequestError("an import needs the stored file's storage and files")
    n = 1 + sum(c.id.startswith("import-") for c in job.checkpoints.values())
    step = values.get("step")
    source = str(values.get("source") or "a file")[:200]
    rec = CheckpointRecord(
        id=f"import-{n}",
        job_id=job.job_id,
        step=step if isinstance(step, int) and step >= 0 else 0,
        version=0,
        state="imported",
        storage=storage,
        files={str(k): str(v) for k, v in files.items()},
        bytes=int(values.get("bytes") or 0),
        requested_by=by,
        requested_ts=now,
        ended_ts=now,
        reason=f"imported from {source}",
    )
    who = f" by {by}" if by else ""
    event = HistoryEvent(
        job_id=job.job_id,
        kind="checkpoint_imported",
        ts=now,
        step=rec.step,
        message=f"checkpoint {rec.id} imported{who} from {source} ({rec.bytes / 1e6:.2f} MB): "
        "weights only, for sampling and export",
        data={"id": rec.id, "by": by, "source": source},
    )
    return rec, [event]


MAX_SCORES = 16
"""Scores one report may carry."""


def checked_scores(raw: Any) -> dict[str, float]:
    """An evaluator's ``scores``: 1 to :data:`MAX_SCORES` names (letters, digits, ``_``, up to
    32 characters) → finite numbers.

    Raises:
        InvalidRequestError: anything else, said plainly.
    """
    if not isinstance(raw, dict) or not 1 <= len(raw) <= MAX_SCORES:
        raise InvalidRequestError(f"scores must be a mapping of 1 to {MAX_SCORES} name → number")
    out: dict[str, float] = {}
    for name, value in raw.items():
        if not (isinstance(name, str) and name.replace("_", "a").isalnum() and len(name) <= 32):
            raise InvalidRequestError(f"score name {name!r}: letters, digits and _, ≤ 32")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidRequestError(f"score {name}={value!r} is not a finite number")
        out[name] = float(value)
    return out


def check_writers(job: Job, now: float) -> list[HistoryEvent]:
    """Fail every pending checkpoint one of whose writers failed or left before its part was
    durable (its files are incomplete: it is never offered for loading)."""
    events: list[HistoryEvent] = []
    for rec in list(job.checkpoints.values()):
        if rec.state != "pending":
            continue
        for who in rec.writers:
            if who in rec.saved:
                continue
            replica, _, rank = who.partition("/")
            r = job.ranks.get((job.job_id, replica, int(rank)))
            if r is None or not r.live:
                state = r.state if r is not None else "gone"
                events += _end(job, rec, "failed", now, f"rank {who} is {state} before saving")
                break
    return events


def _end(
    job: Job, rec: CheckpointRecord, state: str, now: float, reason: str
) -> list[HistoryEvent]:
    loss = _loss_near(job, rec)
    done = msgspec.structs.replace(
        rec,
        state=state,
        ended_ts=now,
        reason=reason or rec.reason,
        bytes=sum(rec.saved.values()),
        loss=loss,
    )
    job.checkpoints[rec.id] = done
    job.dirty_checkpoints.add(rec.id)
    if state == "complete":
        size = f"{done.bytes / 1e6:.2f} MB" if done.bytes else "size unknown"
        message = (
            f"checkpoint {rec.id} complete: step {rec.step}, {len(rec.writers)} writer(s), "
            f"{size}, stall ≤ {done.stall_s * 1e3:.0f} ms"
        )
    else:
        message = f"checkpoint {rec.id} at step {rec.step} failed: {reason}"
    return [
        HistoryEvent(
            job_id=job.job_id,
            kind="checkpoint_completed" if state == "complete" else "checkpoint_failed",
            ts=now,
            step=rec.step,
            version=rec.version,
            message=message,
            data={"id": rec.id, "bytes": done.bytes, "storage": done.storage, "reason": reason},
        )
    ]


def _loss_near(job: Job, rec: CheckpointRecord) -> float | None:
    """Mean over the writers of the newest finite loss each logged at or before the step."""
    found = []
    for who in rec.writers:
        replica, _, rank = who.partition("/")
        r = job.ranks.get((job.job_id, replica, int(rank)))
        if r is None:
            continue
        near = [v for s, v in r.window.losses if s <= rec.step and math.isfinite(v)]
        if near:
            found.append(near[-1])
    return sum(found) / len(found) if found else None


def rollback_target(job: Job, values: dict[str, Any]) -> CheckpointRecord:
    """The checkpoint a ``rollback`` loads: ``values["to"]`` (an id), else the newest complete
    one at or before ``values["step"]``, else the newest complete one.

    Raises:
        InvalidRequestError: no such checkpoint, it is not complete, a live rank cannot load
            one (no Checkpointer), or ``step`` is not a whole number.
    """
    not_ready = [f"{r.key[1]}/{r.key[2]}" for r in job.live_ranks() if not r.checkpointing]
    if not job.live_ranks() or not_ready:
        raise InvalidRequestError(
            f"job {job.job_id!r} cannot roll back: rank(s) {', '.join(not_ready) or 'none'} "
            "run no Checkpointer"
            if not_ready
            else f"job {job.job_id!r} has no live rank to roll back"
        )
    if values.get("to"):
        rec = job.checkpoints.get(str(values["to"]))
        if rec is None:
            raise InvalidRequestError(f"job {job.job_id!r} has no checkpoint {values['to']!r}")
        if rec.state != "complete":
            raise InvalidRequestError(
                f"checkpoint {rec.id} is {rec.state}: only a complete checkpoint can be loaded"
            )
        return rec
    at = None
    if values.get("step") is not None:
        try:
            at = int(values["step"])
        except (TypeError, ValueError):
            raise InvalidRequestError(f"step {values['step']!r} is not a whole number") from None
    rec = newest_complete(job, at_or_before=at)
    if rec is None:
        raise InvalidRequestError(f"job {job.job_id!r} has no complete checkpoint to roll back to")
    return rec


def newest_complete(job: Job, *, at_or_before: int | None = None) -> CheckpointRecord | None:
    """The complete checkpoint with the highest step (then version), at or before step
    ``at_or_before`` if given, or None."""
    done = [
        c
        for c in job.checkpoints.values()
        if c.state == "complete" and (at_or_before is None or c.step <= at_or_before)
    ]
    return max(done, key=lambda c: (c.step, c.version), default=None)


def resume_choice(job: Job, replica_id: str | None = None) -> tuple[CheckpointRecord | None, str]:
    """The checkpoint a starting job (or its replica group ``replica_id``) loads, and why (or
    why none): the one a person pinned, else the newest complete one — unless the job's last
    run ended cleanly (a new launch after a finished run starts anew), or, under torchft,
    another replica group is training past it (torchft heals the starting group from that
    peer, which is newer)."""
    pinned = next((c for c in job.checkpoints.values() if c.pinned and c.state == "complete"), None)
    choice = pinned or newest_complete(job)
    if choice is None:
        return None, "no complete checkpoint"
    if pinned is None and job.ended_cleanly:
        return None, "the job's last run ended cleanly: a new launch starts from scratch"
    ahead = [
        r
        for r in job.live_ranks()
        if replica_id is not None
        and r.key[1] != replica_id
        and r.quorum
        and r.entry.last_step > choice.step
    ]
    if ahead:
        peer = min(ahead, key=lambda r: r.key)
        return None, (
            f"replica group {peer.key[1]} is training at step {peer.entry.last_step}: torchft "
            "heals this group from it"
        )
    if pinned is not None:
        return pinned, f"pinned (step {pinned.step})"
    return choice, f"the newest complete checkpoint (step {choice.step})"


def listing(job: Job, replica_id: str | None = None) -> dict[str, Any]:
    """The ``checkpoints`` read op's answer: every record, newest first, the one a resume
    would load — for a starting replica group ``replica_id``, if given — (``resume_from``,
    with ``resume_why``) and, after it, the other complete ones
    newest first (``fallbacks``: a starting rank tries them in turn when one fails its
    checksums)."""
    records = sorted(job.checkpoints.values(), key=lambda c: (c.version, c.step), reverse=True)
    choice, why = resume_choice(job, replica_id)
    fallbacks = [
        c.id
        for c in sorted(records, key=lambda c: (c.step, c.version), reverse=True)
        if c.state == "complete" and choice is not None and c.id != choice.id
    ]
    return {
        "job_id": job.job_id,
        "checkpoints": [msgspec.to_builtins(c) for c in records],
        "resume_from": choice.id if choice else None,
        "resume_why": why,
        "fallbacks": fallbacks,
    }
