"""Losses that need every rank's outputs: a differentiable all-gather.

A pairwise loss (contrastive, triplet, a distance matrix over the batch) compares every sample
with every other. Under DDP each rank holds only its shard of the batch, so computing the loss
on the shard compares a sample with 1/world of the others — a different loss and different
gradients from the single-process full batch. :func:`gather_with_grad` gives every rank the whole
batch's outputs with the autograd graph kept: each rank computes the full-batch loss on them, the
backward sends every rank's share of the gradient back to the rank that produced those outputs
(torch's ``all_gather`` backward is a reduce-scatter, a sum), and DDP's average of the parameter
gradients then equals the single-process full-batch gradient exactly (the world-size factor of
the sum cancels the 1/world of the average)::

    emb = model(x)                        # [B, D] on each rank (its shard of the batch)
    everyone = gather_with_grad(emb)      # [world * B, D], rank r's rows at [r*B:(r+1)*B]
    labels = gather_with_grad(y)          # (integer tensors carry no gradient; gathered as well)
    loss = pairwise_loss(everyone, labels)
    loss.backward()                       # DDP averages: the full-batch gradient

``nn.DataParallel`` gets the same result by running the whole batch's loss in one process
(outputs are gathered on device 0), but only on one host, single-process, with a GIL-bound
scatter every step and device 0 holding every output; torch recommends DDP instead. Use this
under DDP (or torchft's DDP) whenever the loss couples samples across the batch; a per-sample
loss (cross entropy) needs nothing of this.

Built on ``torch.distributed.nn.functional.all_gather`` (the autograd-aware collective in
torch), not on a hand-written ``autograd.Function``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def gather_with_grad(x: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, differentiable with respect to this rank's ``x``.

    Args:
        x: this rank's tensor, ``[B, ...]`` of any dtype; every rank of ``group`` must pass the
            same shape (``all_gather`` needs equal sizes: drop or pad a short last batch).
        group: the process group (default: the whole world).

    Returns:
        ``[world * B, ...]``, the same dtype and device, rank ``r``'s rows at
        ``[r * B, (r + 1) * B)``. With no process group initialised (one process), ``x`` itself.

    Raises:
        RuntimeError: from the collective, when the ranks' shapes differ or a peer is gone.
    """
    if not dist.is_available() or not dist.is_initialized():
        return x
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return x
    if not (x.is_floating_point() or x.is_complex()):  # no gradient to carry
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous(), group=group), dim=0)  # type: ignore[no-untyped-call]


def pairwise_distance_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0
) -> torch.Tensor:
    """A contrastive loss over every pair of the batch (Hadsell, Chopra and LeCun, 2006):
    pairs with the same label pulled together, others pushed at least ``margin`` apart.

    Args:
        embeddings: ``[N, D]`` float.
        labels: ``[N]`` integer.
        margin: the distance below which a pair of different labels is penalised.

    Returns:
        A 0-d tensor: the mean over the N·(N−1) ordered pairs of ``d²`` (same label) or
        ``max(0, margin − d)²`` (different labels), ``d`` the Euclidean distance.
    """
    n = embeddings.shape[0]
    d = torch.cdist(embeddings, embeddings)  # [N, N]
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    per_pair = torch.where(same, d.pow(2), torch.clamp(margin - d, min=0).pow(2))
    return per_pair[off_diagonal].mean()
