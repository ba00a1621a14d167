"""One endless, shuffled stream of sample indices, shared by every rank of a job through a cursor.

Epoch ``e`` of the stream is a permutation of ``range(n)`` drawn from a generator
seeded with ``(seed, e)``; the stream is the epochs one after the other, so
position ``p`` holds index ``permutation_{p // n}[p % n]``. Every rank computes
the same stream from the same seed; no rank owns a fixed shard.

A step's global batch is the stretch ``[cursor, cursor + global_batch)``; each rank
takes its share at ``cursor + offset`` (:class:`~torchloom.protocol.batching.BatchPlan`),
and after a *committed* step every rank moves the cursor by the global batch.
The cursor is the whole state (:meth:`SampleStream.state_dict`): it travels with
the model when a replica group heals from a peer, and goes into checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch


class SampleStream:
    """The job's index stream and its cursor.

    Args:
        n: samples in the dataset, ≥ 1.
        seed: shuffling seed, the same on every rank.
        shuffle: False keeps every epoch in dataset order.

    Raises:
        ValueError: ``n < 1``.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError(f"a sample stream needs at least one sample, got n={n}")
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = 0
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def epoch(self) -> int:
        """The epoch the cursor is in (0-based)."""
        return self.cursor // self.n

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.n, generator=g)
            else:
                perm = torch.arange(self.n)
            if len(self._perms) >= 2:  # the cursor only moves forward: keep this epoch and the next
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices at stream positions ``[start, start + count)``.

        Returns:
            ``[count] int64`` tensor (it may span an epoch boundary).

        Raises:
            ValueError: a negative ``start`` or ``count``.
        """
        if start < 0 or count < 0:
            raise ValueError(f"bad stream range start={start} count={count}")
        parts = []
        pos, end = start, start + count
        while pos < end:
            epoch, i = divmod(pos, self.n)
            take = min(end - pos, self.n - i)
            parts.append(self._permutation(epoch)[i : i + take])
            pos += take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def advance(self, count: int) -> None:
        """Move the cursor past a committed step's global batch of ``count`` samples."""
        if count < 0:
            raise ValueError(f"the cursor only moves forward, got {count}")
        self.cursor += count

    def state_dict(self) -> dict[str, Any]:
        """``{"cursor", "n", "seed", "shuffle"}``: all a peer needs to continue the stream."""
        return {"cursor": self.cursor, "n": self.n, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a peer's or a checkpoint's cursor.

        Raises:
            ValueError: the state is of another stream (other ``n``, ``seed`` or ``shuffle``).
        """
        theirs = (state.get("n"), state.get("seed"), state.get("shuffle"))
        if theirs != (self.n, self.seed, self.shuffle):
            raise ValueError(
                f"sample stream state is for n/seed/shuffle={theirs}, "
                f"this stream is {(self.n, self.seed, self.shuffle)}"
            )
        self.cursor = int(state["cursor"])
