"""The gradient codecs: how one codec averages gradients within a DDP group and across
torchft replica groups, with its own error-feedback state.

Each codec object holds the state of one codec (error feedback, PowerSGD's warm-started
``Q``) and is dropped when the job switches to another codec: a residual kept for one
codec's approximation is not carried into another's (see :mod:`torchloom.comm`).

- Within a group: :meth:`Codec.within` is a DDP communication hook body: it takes a
  ``GradBucket``'s flat float32 buffer and returns a ``Future`` of the group's average.
- Across groups: :meth:`Codec.across` averages a list of gradients in place through a
  ``torchft.Manager`` (its ``allreduce``, or its process group's ``allgather`` for Top-K,
  which the Manager does not offer), waiting for the result. A failed collective is
  reported to the Manager (the step is then not committed), never raised.

Every method returns or counts the bytes it hands to collectives (``sent``) and what
an uncompressed float32 allreduce of the same gradients would hand over (``dense``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from torchloom.protocol.compression import Codec as CodecSpec

Count = Callable[[int, int], None]
"""``count(sent_bytes, dense_bytes)``: what a collective call handed over."""

MIN_COMPRESSION_RATE = 2.0
"""PowerSGD compresses a matrix only when that sends under half its elements (torch's rule)."""


def _world(group: Any) -> int:
    return dist.get_world_size(group)


def _unflatten(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _wait(manager: Any, tensor: torch.Tensor) -> None:
    """``manager.allreduce(tensor)`` (the mean over the participating groups) and wait."""
    manager.allreduce(tensor).wait()


class Codec:
    """The ``none`` codec (the plain mean) and the interface of the others."""

    def __init__(self, spec: CodecSpec, *, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed

    def within(self, bucket: Any, group: Any, count: Count) -> torch.futures.Future[torch.Tensor]:
        """The DDP hook body: the mean of ``bucket.buffer()`` (flat float32) over ``group``."""
        t = bucket.buffer()
        count(4 * t.numel(), 4 * t.numel())
        t.div_(_world(group))
        fut = dist.all_reduce(t, group=group, async_op=True).get_future()
        out: torch.futures.Future[torch.Tensor] = fut.then(lambda f: f.value()[0])
        return out

    def across(self, grads: list[torch.Tensor], manager: Any, count: Count) -> None:
        """Replace each of ``grads`` (float32 tensors) by its mean over the replica groups."""
        flat = _flat(grads)
        count(4 * flat.numel(), 4 * flat.numel())
        _wait(manager, flat)
        _unflatten(flat, grads)


class HalfCodec(Codec):
    """``bf16`` / ``fp16``: cast to 16 bits for the collective, back to float32 after
    (torch's ``bf16_compress_hook`` / ``fp16_compress_hook``; the sum of 16-bit values
    loses precision with many ranks)."""

    def __init__(self, spec: CodecSpec, *, seed: int = 0) -> None:
        super().__init__(spec, seed=seed)
        self.dtype = torch.bfloat16 if spec.kind == "bf16" else torch.float16

    def within(self, bucket: Any, group: Any, count: Count) -> torch.futures.Future[torch.Tensor]:
        t = bucket.buffer()
        count(2 * t.numel(), 4 * t.numel())
        half = t.to(self.dtype).div_(_world(group))
        fut = dist.all_reduce(half, group=group, async_op=True).get_future()

        def back(f: torch.futures.Future[Any]) -> torch.Tensor:
            out: torch.Tensor = t.copy_(f.value()[0])
            return out

        out: torch.futures.Future[torch.Tensor] = fut.then(back)
        return out

    def across(self, grads: list[torch.Tensor], manager: Any, count: Count) -> None:
        flat = _flat(grads)
        count(2 * flat.numel(), 4 * flat.numel())
        half = flat.to(self.dtype)
        _wait(manager, half)
        _unflatten(half.to(flat.dtype), grads)


def _compressible(t: torch.Tensor, rank: int) -> bool:
    if t.dim() < 2:
        return False
    rows, cols = t.shape[0], t.numel() // t.shape[0]
    return (rows + cols) * rank * MIN_COMPRESSION_RATE < rows * cols


class PowerSGDCodec(Codec):
    """``powersgd:R``: rank-R PowerSGD with error feedback and warm start (Vogels et al. 2019).

    Within a DDP group it is torch's own hook and state
    (``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``; the first step after
    the switch is a plain allreduce, as there, to fill the error buffers). Across torchft
    groups the same algorithm through the Manager's allreduce: ``P = (G+E)·Q``, mean of
    ``P``, orthogonalise, ``Q = (G+E)ᵀ·P``, mean of ``Q``, ``G ≈ P·Qᵀ``, ``E = G+E − P·Qᵀ``.
    Every group ends with the same ``P`` and ``Q``, so the same gradient, whatever its own
    error buffer holds. Vectors (biases) and matrices too small to gain go uncompressed.
    """

    def __init__(self, spec: CodecSpec, *, seed: int = 0) -> None:
        super().__init__(spec, seed=seed)
        self._torch_state: Any = None
        self._errors: dict[int, torch.Tensor] = {}
        self._qs: dict[int, torch.Tensor] = {}

    def within(self, bucket: Any, group: Any, count: Count) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        if self._torch_state is None:
            self._torch_state = psgd.PowerSGDState(
                process_group=group,
                matrix_approximation_rank=self.spec.rank,
                start_powerSGD_iter=2,
                min_compression_rate=MIN_COMPRESSION_RATE,
                use_error_feedback=True,
                warm_start=True,
                random_seed=self.seed,
            )
        state = self._torch_state
        grads = bucket.gradients()
        dense = 4 * sum(g.numel() for g in grads)
        if state.iter < state.start_powerSGD_iter:
            sent = dense
        else:
            sent = 4 * sum(
                self.spec.rank * (g.shape[0] + g.numel() // g.shape[0])
                if _compressible(g, self.spec.rank)
                else g.numel()
                for g in grads
            )
        count(sent, dense)
        fut: torch.futures.Future[torch.Tensor] = psgd.powerSGD_hook(state, bucket)
        return fut

    def across(self, grads: list[torch.Tensor], manager: Any, count: Count) -> None:
        r = self.spec.rank
        mats = [(i, g) for i, g in enumerate(grads) if _compressible(g, r)]
        rest = [g for g in grads if not _compressible(g, r)]
        ms, ps = [], []
        for i, g in mats:
            m = g.reshape(g.shape[0], -1)
            err = self._errors.get(i)
            if err is None or err.shape != m.shape:
                err = self._errors[i] = torch.zeros_like(m)
            m = m + err  # the gradient with what earlier steps did not send
            q = self._qs.get(i)
            if q is None or q.shape != (m.shape[1], r):
                gen = torch.Generator().manual_seed(self.seed * 1009 + i)
                q = torch.randn(m.shape[1], r, generator=gen).to(m.device, m.dtype)
                self._qs[i] = q
            ms.append(m)
            ps.append(m @ q)
        # round 1: the P matrices and the uncompressed tensors, in one allreduce
        flat = _flat([*ps, *rest]) if ps or rest else None
        dense = 4 * sum(g.numel() for g in grads)
        sent_q = sum(m.shape[1] * r for m in ms)
        count(4 * ((flat.numel() if flat is not None else 0) + sent_q), dense)
        if flat is None:
            return
        _wait(manager, flat)
        _unflatten(flat, [*ps, *rest])
        if not ms:
            return
        qs = []
        for m, p in zip(ms, ps, strict=True):
            p.copy_(torch.linalg.qr(p).Q)  # orthonormal columns (Gram-Schmidt in the paper)
            qs.append(m.t() @ p)
        # round 2: the Q matrices
        flat_q = _flat(qs)
        _wait(manager, flat_q)
        _unflatten(flat_q, qs)
        for (i, g), m, p, q in zip(mats, ms, ps, qs, strict=True):
            approx = p @ q.t()
            self._errors[i] = m - approx
            self._qs[i] = q  # warm start: the next step's power iteration begins here
            g.copy_(approx.view_as(g))


class TopKCodec(Codec):
    """``topk:F``: the largest-magnitude fraction F of the gradient (plus its error feedback)
    goes out as (value, index) pairs gathered from every rank; the rest is kept as error
    feedback for the next step (Lin et al. 2018, Deep Gradient Compression; without its
    momentum correction and warm-up). Indices travel bit-cast into the float32 payload, so
    one allgather carries both."""

    def __init__(self, spec: CodecSpec, *, seed: int = 0) -> None:
        super().__init__(spec, seed=seed)
        self._errors: dict[int, torch.Tensor] = {}

    def _select(self, key: int, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``t`` + its error → the payload ``[values | indices as float32 bits]`` (2k floats);
        the error keeps what is not sent."""
        err = self._errors.get(key)
        if err is None or err.shape != t.shape:
            err = self._errors[key] = torch.zeros_like(t)
        full = t + err
        k = max(1, math.ceil(self.spec.fraction * full.numel()))
        idx = full.abs().topk(k, sorted=False).indices
        vals = full[idx]
        full[idx] = 0.0
        self._errors[key] = full
        payload = torch.cat([vals, idx.to(torch.int32).view(torch.float32)])
        return payload, k

    @staticmethod
    def _sum(gathered: torch.Tensor, k: int, out: torch.Tensor, divisor: int) -> torch.Tensor:
        parts = gathered.view(-1, 2 * k)
        out.zero_()
        for part in parts:
            out.index_add_(0, part[k:].view(torch.int32).long(), part[:k])
        return out.div_(divisor)

    def within(self, bucket: Any, group: Any, count: Count) -> torch.futures.Future[torch.Tensor]:
        t = bucket.buffer()
        payload, k = self._select(bucket.index(), t)
        count(4 * payload.numel(), 4 * t.numel())
        world = _world(group)
        gathered = payload.new_empty(world * payload.numel())
        fut = dist.all_gather_into_tensor(gathered, payload, group=group, async_op=True)
        assert fut is not None
        out: torch.futures.Future[torch.Tensor] = fut.get_future().then(
            lambda _: self._sum(gathered, k, t, world)
        )
        return out

    def across(self, grads: list[torch.Tensor], manager: Any, count: Count) -> None:
        from torch.distributed.distributed_c10d import (  # type: ignore[attr-defined]
            AllgatherOptions,
        )

        flat = _flat(grads)
        payload, k = self._select(0, flat)
        count(4 * payload.numel(), 4 * flat.numel())
        if manager.errored():
            return  # the step will not be committed; no collective on a broken group
        manager.wait_quorum()
        if not manager.is_participating():
            payload.zero_()  # a healing group adds nothing (as torchft's allreduce does)
        pg = manager._pg  # the Manager offers allreduce only; Top-K needs an allgather
        outs = [payload.new_empty(payload.numel()) for _ in range(pg.size())]
        try:
            pg.allgather([outs], [payload], AllgatherOptions()).wait()
        except Exception as exc:  # the step is not committed; the group reconfigures
            manager.report_error(exc)
            return
        self._sum(torch.cat(outs), k, flat, max(1, manager.num_participants()))
        _unflatten(flat, grads)


def make(spec: CodecSpec, *, seed: int = 0) -> Codec:
    """A fresh codec object (with empty error-feedback state) for ``spec``."""
    if spec.kind in ("bf16", "fp16"):
        return HalfCodec(spec, seed=seed)
    if spec.kind == "powersgd":
        return PowerSGDCodec(spec, seed=seed)
    if spec.kind == "topk":
        return TopKCodec(spec, seed=seed)
    return Codec(spec, seed=seed)
