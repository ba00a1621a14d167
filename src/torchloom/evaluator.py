"""An evaluator: scores every complete checkpoint of a job, apart from the training ranks.

Evaluating on the training ranks costs their step time and sees only the weights they hold
now; an evaluator is a separate process (``torchloom run --evaluator CMD`` starts one beside
the replica groups) that follows the job's checkpoint registry, loads each checkpoint as it
becomes *complete* (every writer's part durable), scores it with the user's function — a
held-out loss, a benchmark — and reports the numbers to the Weaver (``checkpoint_score``).
They land on the checkpoint's registry entry (``scores``, shown by ``torchloom checkpoint
list`` and the dashboard's eval-against-training-loss chart) and in the history as
``checkpoint_evaluated``. Each checkpoint is scored once, oldest first; one that fails to
score is logged and skipped, the evaluator goes on.

The pattern is torchtitan's and NeMo's "eval on checkpoints" job, with the registry as the
queue::

    def score(rec: CheckpointRecord) -> dict[str, float]:
        model = load_weights(rec.storage)           # DCP's files, e.g. via dcp.load(no_dist=True)
        loss = held_out_loss(model)
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}

    torchloom.evaluator.watch("gpt", score)         # until the job's ranks are all gone
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from torchloom.client import WeaverClient, who
from torchloom.errors import TorchloomError, UnknownJobError
from torchloom.protocol import CheckpointRecord, ControlRequest

log = logging.getLogger("torchloom.evaluator")

Score = Callable[[CheckpointRecord], dict[str, float]]
"""``score(record) -> {name: number}``: the scores of one complete checkpoint (its files are
at ``record.storage``)."""


def to_score(listing: dict[str, Any], done: set[str]) -> list[CheckpointRecord]:
    """The complete, unscored checkpoints of a ``checkpoints`` listing not tried here yet
    (``done``), oldest step first. Pure."""
    records = [msgspec.convert(c, CheckpointRecord) for c in listing.get("checkpoints") or []]
    todo = [c for c in records if c.state == "complete" and not c.scores and c.id not in done]
    return sorted(todo, key=lambda c: (c.step, c.version))


def watch(
    job_id: str,
    score: Score,
    *,
    client: WeaverClient | None = None,
    poll_interval_s: float = 2.0,
    until_idle: bool = True,
    stop: threading.Event | None = None,
) -> dict[str, dict[str, float]]:
    """Score every complete checkpoint of ``job_id`` once, as they come.

    Args:
        job_id: the job.
        score: the scoring function (:data:`Score`).
        client: how to reach the Weaver (default: from the environment, as the CLI does).
        poll_interval_s: seconds between two looks at the registry.
        until_idle: return once the job had ranks, none is live any more and every complete
            checkpoint was tried; False: run until ``stop`` is set.
        stop: set it to end the watch (after the checkpoint being scored).

    Returns:
        The scores reported here, by checkpoint id.

    A Weaver that cannot be reached, or a job not started yet, is waited for; a checkpoint
    whose scoring raises is logged and not tried again; a report the Weaver refuses (the
    checkpoint was deleted meanwhile) is logged.
    """
    client = client or WeaverClient()
    stop = stop or threading.Event()
    done: set[str] = set()
    reported: dict[str, dict[str, float]] = {}
    me = who("evaluator")
    while not stop.is_set():
        try:
            todo = to_score(client.control("checkpoints", job_id).data or {}, done)
        except UnknownJobError:
            todo = []  # not started yet
        except TorchloomError as exc:
            log.warning("evaluator: no registry of %s: %s", job_id, exc)
            stop.wait(poll_interval_s)
            continue
        for rec in todo:
            if stop.is_set():
                break
            done.add(rec.id)
            try:
                scores = score(rec)
            except Exception as exc:  # one bad checkpoint does not end the evaluator
                log.error("evaluator: %s (step %d) not scored: %s", rec.id, rec.step, exc)
                continue
            try:
                client.request(
                    ControlRequest(
                        op="checkpoint_score",
                        job_id=job_id,
                        values={"id": rec.id, "scores": scores},
                        requested_by=me,
                    )
                )
            except TorchloomError as exc:
                log.error("evaluator: scores of %s not recorded: %s", rec.id, exc)
                continue
            reported[rec.id] = scores
            log.info("evaluator: %s (step %d): %s", rec.id, rec.step, scores)
        if until_idle and not todo and _ended(client, job_id):
            break
        stop.wait(poll_interval_s)
    return reported


def _ended(client: WeaverClient, job_id: str) -> bool:
    """Whether the job had ranks and none is live any more."""
    try:
        jobs = client.status(job_id, limit=1).get("jobs") or []
    except TorchloomError:
        return False
    summary = jobs[0].get("summary", {}) if jobs else {}
    return bool(summary.get("ranks")) and not summary.get("replica_groups_live")
