"""A data loader whose batch size, sharding and transforms follow the run, exactly at each step.

A plain ``DataLoader`` with ``num_workers > 0`` cuts batches ahead of time: a
batch-size change reaches training several prefetched batches late, and a
replica group that leaves or joins shifts every rank's shard. Here:

* **Each batch's config travels with its indices.** Batches are requested
  ahead from the main process as ``(stream start, count, transform settings)``,
  forecast with the newest desired config the Threadlet holds
  (:meth:`~torchloom.threadlet.Run.config_at`) and the last step's quorum. At
  step ``s`` the loader computes what ``s`` really needs from the config in force
  and the step's quorum (:func:`~torchloom.protocol.batching.plan_step`); a
  prefetched batch is used only if it is exactly that. Otherwise — a config
  version that arrived after the batch was requested, a quorum change, a step
  that was not committed, a healed cursor — the batch for ``s`` is loaded in the
  main process (same code, same transforms, same random seed), the prefetched
  ones are dropped and the workers restart from the new forecast. So a change
  takes effect exactly at its effective step, in the workers from then on.
* **One shared index stream** (:class:`~torchloom.data.SampleStream`): a step's
  global batch is ``[cursor, cursor + global batch)`` of one shuffled stream; each
  rank takes its share at its offset; the cursor moves only when the step is
  committed (:meth:`ElasticLoader.advance`).

What happens at a membership change (torchft): the step where a group fails is
not committed anywhere, so the cursor stays and the survivors re-split the same
stretch among themselves at the next step; a group that leaves between steps
simply gets no share of the next one; a group that joins heals the cursor from
its peer (put :meth:`ElasticLoader.state_dict` in the Manager's state dict) and
gets a share from the first step it participates in. Within an epoch, no sample
of a committed step is trained twice or skipped. A step in which a group takes
part but then fails is retried whole by the survivors — the samples of that
failed attempt are trained once, in the retry. (The same holds only if every
rank computes the same global batch: ``global_batch_size`` set, or a job-wide
``batch_size``; per-replica ``batch_size`` overrides break the tiling.)
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data._utils.collate import default_collate

from torchloom._proc import signal_on_parent_death
from torchloom.data.stream import SampleStream
from torchloom.data.transforms import Settings, Transforms
from torchloom.protocol.batching import BatchPlan, plan_step

Key = tuple[int, int, Settings]
"""``(stream start, count, transform settings)``: what a batch is, independent of when it was made."""


class ConfigSource(Protocol):
    """What the loader reads of a :class:`~torchloom.threadlet.Run`."""

    @property
    def config(self) -> Mapping[str, Any]: ...

    def config_at(self, step: int) -> Mapping[str, Any]: ...


class Batch(NamedTuple):
    """One rank's data for one step.

    Attributes:
        data: the collated samples (for ``(image, label)`` samples:
            ``(images [local_samples, ...], labels [local_samples])``).
        indices: ``[local_samples] int64`` dataset indices, in order.
        plan: the share (micro-batches for gradient accumulation, offset, global batch).
        start: stream position of the first sample.
        settings: the transform settings the samples were made with.
        source: ``"worker"`` (prefetched) or ``"main"`` (loaded at the step, after a change).
    """

    data: Any
    indices: torch.Tensor
    plan: BatchPlan
    start: int
    settings: Settings
    source: str


class _Request(NamedTuple):
    key: Key
    indices: np.ndarray
    seed: int


class _Piece(NamedTuple):
    key: Key
    indices: np.ndarray
    data: Any
    source: str


class _Pieces:
    """The dataset the workers see: a request in, the transformed, collated samples out."""

    def __init__(
        self, dataset: Any, transforms: Transforms | None, collate_fn: Callable[[list[Any]], Any]
    ) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.collate_fn = collate_fn

    def __getitem__(self, request: _Request) -> _Piece:
        idx = request.indices.tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = list(getitems(idx)) if getitems else [self.dataset[i] for i in idx]
        fn = self.transforms.compose(request.key[2]) if self.transforms else None
        if fn is not None:
            # seeded by the batch's stream position: the same samples whether a worker or
            # the main process makes them, and the caller's random state is left alone
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request.seed)
                samples = [fn(s) for s in samples]
        source = "worker" if get_worker_info() is not None else "main"
        return _Piece(request.key, request.indices, self.collate_fn(samples), source)


def _as_is(x: Any) -> Any:
    return x


def _die_with_trainer(worker_id: int) -> None:
    """``worker_init_fn``: a worker is SIGKILLed the moment its training process dies.

    A forked worker holds copies of the trainer's sockets (the collectives' TCP
    connections among them). Were it to outlive a ``kill -9`` of its trainer by
    the DataLoader's 5 s parent check, the peers' allreduce would not see the
    connection drop for those 5 s, and every surviving replica group would stall.
    """
    if signal_on_parent_death(signal.SIGKILL) and os.getppid() == 1:
        os._exit(0)  # the trainer died before prctl


_Quorum = tuple[int, int, "tuple[str, ...] | None"]
"""``(participants, replica rank, participant ids or None)`` of a step."""


class ElasticLoader:
    """Batches that follow the run's config and quorum exactly at every step.

    Args:
        dataset: map-style dataset (``dataset[i]`` → one sample; ``__getitems__`` used if present).
        run: the rank's :class:`~torchloom.threadlet.Run` (its ``config`` and ``config_at``).
        stream: the job's index stream (default: ``SampleStream(len(dataset), seed=seed)``).
        transforms: runtime-switchable transforms (their knobs must be registered on the run).
        group_world_size: ranks in this rank's replica group (torchrun's ``WORLD_SIZE``).
        group_rank: this rank within its group.
        num_workers: loader worker processes; 0 loads every batch in the main process.
        prefetch_steps: batches each worker prepares ahead.
        seed: shuffling seed (same on every rank) and base of the transforms' seeds.
        collate_fn: list of samples → batch (default ``default_collate``).
        pin_memory: pin the batches (CUDA host-to-device copies).
        multiprocessing_context: ``fork`` (default on Linux), ``spawn`` or ``forkserver``;
            the dataset and transform builders must be picklable for the last two.

    Raises:
        ValueError: bad sizes.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        run: ConfigSource,
        stream: SampleStream | None = None,
        transforms: Transforms | None = None,
        group_world_size: int = 1,
        group_rank: int = 0,
        num_workers: int = 0,
        prefetch_steps: int = 2,
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ) -> None:
        if num_workers < 0 or prefetch_steps < 1 or not 0 <= group_rank < group_world_size:
            raise ValueError(
                f"bad loader sizes: num_workers={num_workers} prefetch_steps={prefetch_steps} "
                f"group_rank={group_rank} group_world_size={group_world_size}"
            )
        self.run = run
        self.stream = stream or SampleStream(len(dataset), seed=seed)
        self.transforms = transforms
        self.group_world_size = group_world_size
        self.group_rank = group_rank
        self.seed = seed
        self._pieces = _Pieces(dataset, transforms, collate_fn or default_collate)
        self._loader: DataLoader[Any] | None = (
            DataLoader(
                self._pieces,  # type: ignore[arg-type]
                batch_size=None,
                sampler=_Forecast(self),
                num_workers=num_workers,
                prefetch_factor=prefetch_steps,
                persistent_workers=True,
                collate_fn=_as_is,
                pin_memory=pin_memory,
                worker_init_fn=_die_with_trainer,
                multiprocessing_context=multiprocessing_context,
            )
            if num_workers > 0
            else None
        )
        self._it: Iterator[_Piece] | None = None
        self._last_plan: BatchPlan | None = None
        # where the next forecast starts: step, stream cursor, and the quorum
        self._base: tuple[int, int, _Quorum] = (0, 0, (1, 0, None))
        self.stats = {"worker": 0, "main": 0}
        """Batches served from the workers' prefetch and made in the main process."""

    # ---- what a step needs -----------------------------------------------------------

    def _plan(self, config: Mapping[str, Any], quorum: _Quorum) -> BatchPlan:
        participants, replica_rank, ids = quorum
        return plan_step(
            config,
            participants=participants,
            replica_rank=replica_rank,
            group_world_size=self.group_world_size,
            group_rank=self.group_rank,
            participant_ids=ids,
        )

    def _key(self, cursor: int, plan: BatchPlan, config: Mapping[str, Any]) -> Key:
        settings = self.transforms.settings(config) if self.transforms else ()
        return (cursor + plan.offset, plan.local_samples, settings)

    def _request(self, key: Key) -> _Request:
        start, count, _ = key
        return _Request(key, self.stream.indices(start, count).numpy(), self.seed * 7919 + start)

    def forecast(self) -> Iterator[_Request]:
        """Requests for the steps after the last one served, assuming each is committed with the
        same quorum, under the config the newest known desired config puts in force then."""
        step, cursor, quorum = self._base
        for s in itertools.count(step):
            config = self.run.config_at(s)
            plan = self._plan(config, quorum)
            yield self._request(self._key(cursor, plan, config))
            cursor += plan.global_samples

    # ---- the training loop's calls -----------------------------------------------------

    def next(
        self,
        *,
        step: int,
        participants: int = 1,
        replica_rank: int = 0,
        participant_ids: tuple[str, ...] | None = None,
    ) -> Batch:
        """This rank's batch for ``step``, under the config in force and the step's quorum.

        Args:
            step: the step about to run (the index ``run.steps()`` yielded).
            participants: replica groups in this step's quorum (torchft: ``manager.num_participants()``).
            replica_rank: this group's rank among them (``manager.participating_rank()``).
            participant_ids: the participants' replica ids in quorum order, for uneven
                shares by ``batch_weights`` (:func:`~torchloom.protocol.batching.plan_step`).
        """
        config = self.run.config
        quorum: _Quorum = (participants, replica_rank, participant_ids)
        plan = self._plan(config, quorum)
        key = self._key(self.stream.cursor, plan, config)
        piece = None
        if self._loader is not None:
            if self._it is None:
                self._base = (step, self.stream.cursor, quorum)
                self._it = iter(self._loader)
            piece = next(self._it)
        self._last_plan = plan
        if piece is None or piece.key != key:
            piece = self._pieces[self._request(key)]  # made here; re-forecast from the next step
            if self._loader is not None:
                cursor = self.stream.cursor + plan.global_samples
                self._base = (step + 1, cursor, quorum)
                self._it = iter(self._loader)
        self.stats[piece.source] += 1
        start, _, settings = key
        return Batch(
            piece.data, torch.from_numpy(piece.indices), plan, start, settings, piece.source
        )

    def advance(self, *, committed: bool = True) -> None:
        """After the step: move the shared cursor past its global batch if it was committed."""
        if committed and self._last_plan is not None:
            self.stream.advance(self._last_plan.global_samples)

    def state_dict(self) -> dict[str, Any]:
        """The stream cursor (for torchft's Manager state dict and for checkpoints)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a peer's or a checkpoint's cursor (prefetched batches are re-checked)."""
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the worker processes."""
        self._it = None
        self._loader = None


class _Forecast:
    """The DataLoader's sampler: a fresh forecast each time the loader's iterator is (re)made."""

    def __init__(self, loader: ElasticLoader) -> None:
        self._loader = loader

    def __iter__(self) -> Iterator[_Request]:
        return self._loader.forecast()
