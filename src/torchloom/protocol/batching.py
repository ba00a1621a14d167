"""Holding the global batch constant while replica groups come and go (pure, shared by all ranks).

torchft issues #171 / #186 ask for this: when a replica group fails or is drained,
the survivors should take over its share of the global batch so that the
optimizer sees the same number of samples per step. Every rank knows the
quorum of the step it is running (participants, its replica rank), so each rank
computes its own share with :func:`plan_batch` from the same inputs and the
shares always add up to ``global_batch`` — from the very step the membership
changes, with no round trip to the Weaver.

When a share exceeds the per-replica ``max_batch`` (memory), it is split into
gradient-accumulation micro-batches. When the *global* batch itself is changed,
the ``lr_scaling`` knob can scale the learning rate with it (:func:`scale_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec


class BatchPlan(msgspec.Struct, frozen=True):
    """One replica group's share of a step.

    Attributes:
        micro_batches: sizes of the micro-batches to run (samples each); their sum is
            ``local_samples``; more than one means gradient accumulation.
        local_samples: this share of the global batch.
        global_samples: the global batch the shares add up to.
        offset: where this share starts within the step's global batch, in samples
            (shares of ranks in quorum order are consecutive: ``[offset, offset +
            local_samples)``), so that a shared index stream hands every sample
            of the step to exactly one rank (:mod:`torchloom.data`).
        loss_scale: multiply this rank's mean loss by it before ``backward()``: with
            uneven shares (``batch_weights``), the equal-weight gradient average of
            DDP/torchft then equals the mean gradient over the global batch
            (``local_samples × ranks in the step / global_samples``; 1.0 for even shares).
    """

    micro_batches: tuple[int, ...]
    local_samples: int
    global_samples: int
    offset: int = 0
    loss_scale: float = 1.0


def parse_weights(text: str | None) -> dict[str, float]:
    """``"0:1,1:0.5"`` (the ``batch_weights`` knob) → ``{"0": 1.0, "1": 0.5}``; None or "" → {}.

    Raises:
        ValueError: a pair that is not ``replica_id:weight`` or a weight that is not a
            finite number > 0.
    """
    out: dict[str, float] = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        rid, sep, raw = pair.rpartition(":")
        try:
            w = float(raw)
        except ValueError:
            w = math.nan
        if not sep or not rid or not math.isfinite(w) or w <= 0:
            raise ValueError(f"bad batch weight {pair!r}: want replica_id:weight with weight > 0")
        out[rid] = w
    return out


def format_weights(weights: Mapping[str, float]) -> str:
    """The inverse of :func:`parse_weights`, ids sorted, weights to 3 significant digits."""
    return ",".join(f"{rid}:{w:.3g}" for rid, w in sorted(weights.items()))


def split(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` samples split in proportion to ``weights`` (largest remainder, ties to the
    lower index), so the parts add up to ``total`` exactly. Equal weights give the even
    split with the remainder on the lowest indices (128 over 3 is 43, 43, 42)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def plan_batch(
    *,
    global_batch: int,
    participants: int,
    replica_rank: int,
    max_batch: int | None,
    weights: Sequence[float] | None = None,
) -> BatchPlan:
    """This replica group's share of ``global_batch`` among ``participants`` groups.

    Even by default: the remainder goes to the lowest replica ranks (128 over 3
    groups is 43, 43, 42). With ``weights`` (one per participant, in quorum order)
    the shares are in proportion to them (:func:`split`). Either way they add up
    to ``global_batch`` exactly.

    Args:
        global_batch: samples per step over all replica groups, ≥ 1.
        participants: replica groups in this step's quorum, ≥ 1.
        replica_rank: this group's rank in the quorum, in ``[0, participants)``.
        max_batch: the most samples one micro-batch may hold (None: no limit).
        weights: positive weights of the participants in quorum order, or None (even).

    Raises:
        ValueError: an argument out of range.
    """
    if global_batch < 1 or participants < 1 or not 0 <= replica_rank < participants:
        raise ValueError(
            f"bad batch plan inputs: global {global_batch}, participants {participants}, "
            f"replica rank {replica_rank}"
        )
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if weights is not None and (len(weights) != participants or min(weights) <= 0):
        raise ValueError(f"want {participants} positive weights, got {list(weights)}")
    parts = split(global_batch, weights if weights is not None else [1.0] * participants)
    local = parts[replica_rank]
    offset = sum(parts[:replica_rank])
    if local == 0:
        return BatchPlan(
            micro_batches=(), local_samples=0, global_samples=global_batch, offset=offset
        )
    steps = math.ceil(local / max_batch) if max_batch else 1
    size, rest = divmod(local, steps)
    micro = tuple(size + (1 if i < rest else 0) for i in range(steps))
    return BatchPlan(
        micro_batches=micro,
        local_samples=local,
        global_samples=global_batch,
        offset=offset,
        loss_scale=local * participants / global_batch,
    )


def plan_step(
    config: Mapping[str, Any],
    *,
    participants: int,
    replica_rank: int,
    group_world_size: int = 1,
    group_rank: int = 0,
    participant_ids: Sequence[str] | None = None,
) -> BatchPlan:
    """One rank's share of a step, from the knobs in force and the step's quorum.

    With ``global_batch_size`` set, it is split among the ``participants``
    replica groups (:func:`plan_batch`) — in proportion to ``batch_weights`` when
    that knob is set and ``participant_ids`` names every participant (unlisted
    groups weigh 1), evenly otherwise — and each group's share among its
    ``group_world_size`` ranks; otherwise every rank takes ``batch_size`` and the
    global batch is ``batch_size × group_world_size × participants``. Either way
    a share larger than ``max_batch_size`` becomes gradient-accumulation
    micro-batches, and ``offset`` places the share in the step's global batch
    (group by group in quorum order, rank by rank within a group).

    Args:
        config: knob values (``global_batch_size``, ``batch_size``, ``max_batch_size``).
        participants: replica groups committing this step, ≥ 1.
        replica_rank: this group's rank among them.
        group_world_size: ranks in this replica group, ≥ 1.
        group_rank: this rank within its group.
        participant_ids: torchloom replica ids of the participants in quorum order
            (:func:`torchloom.integrations.torchft.participant_ids`), or None.

    Raises:
        ValueError: an argument out of range.
    """
    max_batch = config.get("max_batch_size")
    global_batch = config.get("global_batch_size")
    weights = None
    if global_batch is None:
        global_batch = int(config.get("batch_size") or 1) * group_world_size * participants
    elif config.get("batch_weights") and participant_ids and len(participant_ids) == participants:
        table = parse_weights(config["batch_weights"])
        weights = [table.get(rid, 1.0) for rid in participant_ids]
    group = plan_batch(
        global_batch=global_batch,
        participants=participants,
        replica_rank=replica_rank,
        max_batch=None,
        weights=weights,
    )
    if group.local_samples == 0:
        return group
    rank = plan_batch(
        global_batch=group.local_samples,
        participants=group_world_size,
        replica_rank=group_rank,
        max_batch=max_batch,
    )
    return msgspec.structs.replace(
        rank,
        global_samples=global_batch,
        offset=group.offset + rank.offset,
        loss_scale=rank.local_samples * group_world_size * participants / global_batch,
    )


def scale_lr(lr: float, *, old_global: int, new_global: int, rule: str) -> float:
    """The learning rate for a changed global batch.

    ``linear``: lr × new/old — the linear scaling rule of Goyal et al., "Accurate, Large
    Minibatch SGD: Training ImageNet in 1 Hour" (2017). ``sqrt``: lr × √(new/old) —
    Krizhevsky, "One weird trick for parallelizing convolutional neural networks" (2014),
    and Hoffer et al., "Train longer, generalize better" (2017). ``none``: unchanged.

    Raises:
        ValueError: an unknown rule or a non-positive batch.
    """
    if old_global < 1 or new_global < 1:
        raise ValueError("global batch sizes must be >= 1")
    ratio = new_global / old_global
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (none, linear, sqrt)")
