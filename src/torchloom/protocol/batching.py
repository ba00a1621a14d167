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
from collections.abc import Mapping
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
    """

    micro_batches: tuple[int, ...]
    local_samples: int
    global_samples: int
    offset: int = 0


def plan_batch(
    *, global_batch: int, participants: int, replica_rank: int, max_batch: int | None
) -> BatchPlan:
    """This replica group's share of ``global_batch`` among ``participants`` groups.

    The remainder of an uneven split goes to the lowest replica ranks (128 over 3
    groups is 43, 43, 42), so the shares add up to ``global_batch`` exactly.

    Args:
        global_batch: samples per step over all replica groups, ≥ 1.
        participants: replica groups in this step's quorum, ≥ 1.
        replica_rank: this group's rank in the quorum, in ``[0, participants)``.
        max_batch: the most samples one micro-batch may hold (None: no limit).

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
    base, extra = divmod(global_batch, participants)
    local = base + (1 if replica_rank < extra else 0)
    offset = replica_rank * base + min(replica_rank, extra)
    if local == 0:
        return BatchPlan(
            micro_batches=(), local_samples=0, global_samples=global_batch, offset=offset
        )
    steps = math.ceil(local / max_batch) if max_batch else 1
    size, rest = divmod(local, steps)
    micro = tuple(size + (1 if i < rest else 0) for i in range(steps))
    return BatchPlan(
        micro_batches=micro, local_samples=local, global_samples=global_batch, offset=offset
    )


def plan_step(
    config: Mapping[str, Any],
    *,
    participants: int,
    replica_rank: int,
    group_world_size: int = 1,
    group_rank: int = 0,
) -> BatchPlan:
    """One rank's share of a step, from the knobs in force and the step's quorum.

    With ``global_batch_size`` set, it is split among the ``participants``
    replica groups (:func:`plan_batch`), and each group's share among its
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

    Raises:
        ValueError: an argument out of range.
    """
    max_batch = config.get("max_batch_size")
    global_batch = config.get("global_batch_size")
    if global_batch is None:
        global_batch = int(config.get("batch_size") or 1) * group_world_size * participants
    group = plan_batch(
        global_batch=global_batch,
        participants=participants,
        replica_rank=replica_rank,
        max_batch=None,
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
        rank, global_samples=global_batch, offset=group.offset + rank.offset
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
