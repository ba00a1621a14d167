"""Checkpoints the Weaver orders: every writing rank saves the same step, asynchronously.

``torchloom checkpoint save`` (or a policy) becomes a config version whose snapshot carries a
:class:`~torchloom.protocol.CheckpointOrder`; at that version's effective step the
:class:`Checkpointer` of every writing rank snapshots its state with
``torch.distributed.checkpoint.async_save`` (PyTorch DCP): the training thread pays only the
copy to CPU memory, a background thread writes the files, and the rank reports its part
durable (``checkpoint_saved``, with bytes and times) or not (``checkpoint_failed``). The
Weaver records the checkpoint *complete* once every writer reported it and DCP's metadata is
written (:mod:`torchloom.weaver.checkpoints`).

Typical use (the MNIST reference job does this)::

    run = torchloom.init(job_id="mnist", ...)
    ckpt = torchloom.checkpoint.Checkpointer(
        run, state={"model": ddp_model, "optim": optimizer, "data": loader}, storage="ckpts"
    )
    ckpt.resume()                   # the checkpoint the Weaver chooses, if any: sets run.start_step

Layout: ``<storage>/<job>/<checkpoint id>/`` holds DCP's files (``.metadata`` and one
``__<rank>_*.distcp`` per rank); ``storage`` is a directory or an fsspec URL
(:mod:`torchloom.checkpoint.storage`).
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchloom.checkpoint.export import export_safetensors
from torchloom.checkpoint.storage import Store
from torchloom.errors import CheckpointCorruptError, NotReachableError
from torchloom.protocol import CheckpointOrder, ControlRequest, RollbackOrder
from torchloom.threadlet.run import Run

log = logging.getLogger("torchloom.checkpoint")

__all__ = ["Checkpointer", "export_safetensors"]


class Checkpointer:
    """Saves this rank's state when the Weaver orders a checkpoint, and loads one.

    Args:
        run: this process's :class:`~torchloom.threadlet.run.Run`.
        state: what a rank needs to continue, as DCP takes it: objects with
            ``state_dict()``/``load_state_dict()`` (module — DDP-wrapped or not —, optimizer,
            LR scheduler, :class:`~torchloom.data.ElasticLoader`) or tensors. The step, the
            config version in force and this rank's python/numpy/torch (and CUDA) RNG states
            are added under ``"torchloom"``.
        storage: a local directory every writing rank shares, or an fsspec URL
            (``s3://bucket/prefix`` with ``s3fs``; see :class:`~torchloom.checkpoint.storage.Store`).
        storage_options: keyword options of the URL's filesystem (e.g. ``endpoint_url``).
        compress: zstd-compress the files (DCP's ZStandard extension; needs ``zstandard``):
            smaller, slower to write and read — ``bench/checkpoint.py`` reports both.
        backup: a second storage (directory or URL): every complete checkpoint is copied
            there by the writing group's rank 0 (off the training thread, after its save),
            with the retention below, which the Weaver applies (``checkpoint_backed_up`` in
            the history).
        backup_options: keyword options of the backup URL's filesystem.
        keep_last: the backup keeps the newest this many checkpoints…
        keep_every: … and every this-many-th checkpoint of the job (0: none) …
        keep_best: … and the one with the lowest loss.
        backup_every: copy every this-many-th complete checkpoint (1: each). With ``storage``
            in host RAM (a tmpfs such as ``/dev/shm/…``: outside the training process, so it
            survives a crash of every rank) and ``backup`` on disk, a restart loads from RAM
            and falls back to the disk copy when the host's RAM copy is gone.
        blocking: save with ``dcp.save`` on the training thread instead of ``async_save`` (a
            baseline for ``bench/checkpoint.py``).

    At most one save is in flight: an order that comes while the previous one is still
    writing waits for it on the training thread (the Weaver refuses a new checkpoint while one
    is pending, so this only happens when an order follows a save within a few steps).
    """

    def __init__(
        self,
        run: Run,
        *,
        state: Mapping[str, Any],
        storage: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        compress: bool = False,
        backup: str | os.PathLike[str] | None = None,
        backup_options: Mapping[str, Any] | None = None,
        keep_last: int = 3,
        keep_every: int = 0,
        keep_best: bool = False,
        backup_every: int = 1,
        blocking: bool = False,
    ) -> None:
        if keep_last < 1 or keep_every < 0 or backup_every < 1:
            raise ValueError(
                f"keep_last >= 1, keep_every >= 0, backup_every >= 1 "
                f"({keep_last}, {keep_every}, {backup_every})"
            )
        self.run = run
        self.state = _adapted(state)
        self.store = Store(storage, options=storage_options)
        self.backup = Store(backup, options=backup_options) if backup is not None else None
        self._backup_options = backup_options
        self.compress = compress
        self.blocking = blocking
        self._pending: Future[Any] | None = None
        self._distributed = dist.is_available() and dist.is_initialized()
        self._rank = dist.get_rank() if self._distributed else 0
        # DCP's collectives run on the writer thread: they get their own group, never the
        # one the training step's collectives use
        self._pg = dist.new_group(backend="gloo") if self._distributed else None
        run.on_checkpoint(self._on_order)
        run.on_rollback(self._on_rollback)
        ready: dict[str, Any] = {"storage": self.store.url}
        if self.backup is not None:  # the Weaver keeps the backup's retention
            ready["backup"] = {
                "keep_last": keep_last,
                "keep_every": keep_every,
                "keep_best": keep_best,
                "every": backup_every,
            }
        run.emit("checkpoint_ready", **ready)  # the interval policy may ask

    def path(self, checkpoint_id: str) -> str:
        """Where checkpoint ``checkpoint_id`` of this job is written (in the storage's terms)."""
        return self.store.path(self.run.identity.job_id, checkpoint_id)

    def wait(self) -> None:
        """Block until the save in flight (if any) has ended."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # reported by its callback
                pass
            self._pending = None

    def _state_dict(self, step: int) -> dict[str, Any]:
        rng: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        meta = {"step": step, "version": self.run.applied_version, f"rng_{self._rank}": rng}
        return {**self.state, "torchloom": meta}

    def save(self, checkpoint_id: str, *, step: int) -> None:
        """Save this rank's state as checkpoint ``checkpoint_id`` now, outside the Weaver's
        orders (a script's own save, a benchmark); every rank of the process group must call
        it at the same step. Asynchronous unless ``blocking``: :meth:`wait` for the write. The
        Weaver hears ``checkpoint_saved`` but keeps no record of a checkpoint it did not
        order."""
        self._on_order(CheckpointOrder(id=checkpoint_id), step)

    def _on_order(self, order: CheckpointOrder, step: int) -> None:
        self.wait()
        target = self.path(order.id)
        t0 = time.perf_counter()
        try:
            sd = self._state_dict(step)
            writer = self.store.writer(target, compress=self.compress)
            if self.blocking:
                dcp_save(
                    sd, storage_writer=writer, process_group=self._pg, no_dist=not self._distributed
                )
                stall = time.perf_counter() - t0
                self._report(order, target, step, stall, stall, None)
                return
            fut = dcp_async_save(
                sd,
                storage_writer=writer,
                process_group=self._pg,
                no_dist=not self._distributed,
            )
        except Exception as exc:  # full, read-only, unreachable: reported, training goes on
            log.warning("torchloom: checkpoint %s not saved: %s", order.id, exc)
            self.run.emit("checkpoint_failed", step=step, id=order.id, reason=_why(exc))
            return
        stall = time.perf_counter() - t0
        assert isinstance(fut, Future)
        self._pending = fut
        fut.add_done_callback(
            lambda f: self._report(
                order, target, step, stall, time.perf_counter() - t0, f.exception()
            )
        )

    def _report(
        self,
        order: CheckpointOrder,
        target: str,
        step: int,
        stall_s: float,
        total_s: float,
        error: BaseException | None,
    ) -> None:
        """Tell the Weaver this rank's part is durable — its files' sizes and SHA-256 — or
        why not; then remove the old checkpoints the order names (any thread: the writer's)."""
        if error is not None:
            self.run.emit("checkpoint_failed", step=step, id=order.id, reason=_why(error))
            return
        store = self.store
        try:
            mine = store.files(target, f"__{self._rank}_*.distcp")
            meta = posixpath.join(target, ".metadata")
            if self._rank == 0 and store.exists(meta):
                mine.append(meta)
            files = {posixpath.basename(p): store.sha256(p) for p in mine}
            written = sum(store.size(p) for p in mine)
        except Exception as exc:  # written, then unreadable: not durable for us
            self.run.emit("checkpoint_failed", step=step, id=order.id, reason=_why(exc))
            return
        removed = self._remove_old(order) if self._cleaner(order) else []
        self.run.emit(
            "checkpoint_saved",
            step=step,
            id=order.id,
            bytes=written,
            stall_s=round(stall_s, 6),
            write_s=round(total_s, 6),
            storage=store.display(target),
            metadata_sha256=files.get(".metadata", ""),
            files=files,
            removed=removed,
        )
        if self.backup is not None and order.backup and self._cleaner(order):
            self._back_up(order, target, step)

    def _cleaner(self, order: CheckpointOrder) -> bool:
        """Whether this rank removes old files and makes the backup: rank 0 of the first
        writing group (its save's end means every writer's files and the metadata are written:
        DCP's coordinator finishes last)."""
        first = order.writers[0] if order.writers else self.run.identity.replica_id
        return self._rank == 0 and first == self.run.identity.replica_id

    def _back_up(self, order: CheckpointOrder, target: str, step: int) -> None:
        """Copy the checkpoint to the backup, then drop the copies the retention lets go."""
        assert self.backup is not None
        dest = self.backup.path(self.run.identity.job_id, order.id)
        t0 = time.perf_counter()
        try:
            copied = self.store.copy(target, self.backup, dest)
        except Exception as exc:  # the primary copy is complete; the backup is best effort
            log.warning("torchloom: checkpoint %s not backed up: %s", order.id, exc)
            self.run.emit("checkpoint_backed_up", step=step, id=order.id, reason=_why(exc))
            return
        dropped = []
        for cid in order.backup_drop:
            try:
                self.backup.remove(self.backup.path(self.run.identity.job_id, cid))
                dropped.append(cid)
            except OSError as exc:
                log.warning("torchloom: backup of %s not removed: %s", cid, exc)
        self.run.emit(
            "checkpoint_backed_up",
            step=step,
            id=order.id,
            backup=self.backup.display(dest),
            bytes=copied,
            copy_s=round(time.perf_counter() - t0, 3),
            dropped=dropped,
        )

    def _remove_old(self, order: CheckpointOrder) -> list[str]:
        """Remove the files of the failed and deleted checkpoints ``order.remove`` names (rank
        0 of the first writing group does it); the ids whose files are gone."""
        removed = []
        for cid in order.remove:
            try:
                self.store.remove(self.path(cid))
            except OSError as exc:
                log.warning("torchloom: could not remove checkpoint %s: %s", cid, exc)
                continue
            removed.append(cid)
        return removed

    def resume(self, *, from_scratch: bool = False, timeout_s: float = 10.0) -> str | None:
        """Load the checkpoint the Weaver says this job resumes from — the pinned one, else
        its newest complete one — and start the run's steps at its step. Every rank of the
        process group loads the same one (rank 0 asks, checks its files' SHA-256 — in
        ``storage``, else in its backup — and tells the others); one that fails is reported
        ``checkpoint_corrupt`` and the next newest complete one is tried. Call it once, after
        :func:`torchloom.init` and before ``run.steps()``.

        Args:
            from_scratch: load nothing (the job starts at ``run.start_step``).
            timeout_s: how long to wait for the Weaver's answer, in seconds. With no answer
                (NATS or the Weaver down) the job starts from scratch, said in a warning:
                training goes on without the controller, as everywhere in torchloom.

        Returns:
            The id of the checkpoint loaded, or None.

        Raises:
            FileNotFoundError: the Weaver's choice is not in this ``storage``.
            NotReachableError: the storage cannot be read (rank 0): starting from scratch
                would bury the job's checkpoints under new ones, so it does not.
        """
        choice: str | None = None
        why, location = "", None
        if not from_scratch and self._rank == 0:
            choice, why, location = self._choose(timeout_s)
        if self._distributed:
            box: list[Any] = [choice, why, location]
            dist.broadcast_object_list(box, src=0, group=self._pg)
            choice, why, location = box[0], str(box[1]), box[2]
        if choice is None:
            if why:  # a silent Weaver is worth a warning; a job with no checkpoint is not
                (log.warning if why.startswith("the Weaver") else log.info)(
                    "torchloom: no checkpoint loaded: %s", why
                )
            return None
        step = self.load(choice, location=location)
        self.run.start_step = step
        source = location or self.store.display(self.path(choice))
        self.run.emit("checkpoint_loaded", step=step, id=choice, why="resume", source=source)
        log.warning("torchloom: resumed from checkpoint %s (%s) at step %d", choice, source, step)
        return choice

    def _choose(self, timeout_s: float) -> tuple[str | None, str, str | None]:
        """``(id, why not, location)``: the Weaver's choice, or the next newest complete
        checkpoint whose files pass their checksums — in ``storage``, else in its backup
        (``location``: a storage in host RAM is gone with its host; the disk copy is not).
        Each one that fails both is reported ``checkpoint_corrupt``. Rank 0 only."""
        listing, why = self._ask_weaver(timeout_s)
        if listing is None:
            return None, why, None
        records = {c["id"]: c for c in listing.get("checkpoints", [])}
        first = listing.get("resume_from")
        if first is None:
            return None, str(listing.get("resume_why", "")), None
        for cid in [first, *listing.get("fallbacks", [])]:
            rec = records.get(cid, {})
            problems = []
            for location in [None, *([rec["backup"]] if rec.get("backup") else [])]:
                try:
                    self.verify(cid, rec.get("files", {}), location=location)
                    return cid, "", location
                except CheckpointCorruptError as exc:
                    problems.append(str(exc))
                    log.warning("torchloom: checkpoint %s not loadable: %s", cid, exc)
                except Exception as exc:  # the storage cannot be read (unreachable, denied)
                    raise NotReachableError(
                        f"checkpoint storage {location or self.store.url} cannot be read "
                        f"({_why(exc)}): the job does not start from scratch over its "
                        "checkpoints; fix the storage, or resume(from_scratch=True)"
                    ) from exc
            self.run.emit("checkpoint_corrupt", id=cid, reason="; ".join(problems))
        return None, "every complete checkpoint failed its checksums", None

    def _ask_weaver(self, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
        """The Weaver's checkpoint listing (:func:`torchloom.weaver.checkpoints.listing`), or
        None and why not."""
        ident = self.run.identity
        req = ControlRequest(op="checkpoints", job_id=ident.job_id, replica_id=ident.replica_id)
        try:
            reply = self.run.shared.ask(req).result(timeout=timeout_s)
        except Exception as exc:  # no NATS, no Weaver, no answer in time
            return None, f"the Weaver did not say which checkpoint to resume from ({_why(exc)})"
        if not reply.ok or not isinstance(reply.data, dict):
            return None, f"the Weaver refused the checkpoint listing: {reply.error}"
        return reply.data, ""

    def verify(
        self, checkpoint_id: str, files: Mapping[str, str], *, location: str | None = None
    ) -> None:
        """Check that checkpoint ``checkpoint_id``'s files have the SHA-256 its writers
        reported (``files``: name → hex digest, from the registry). Reads every file once.

        Args:
            location: the checkpoint's directory or URL when not in ``storage`` (its backup).

        Raises:
            CheckpointCorruptError: a file is missing, or its content changed.
        """
        store, target = self._where(checkpoint_id, location)
        if not files:
            raise CheckpointCorruptError(f"the registry holds no checksums for {checkpoint_id}")
        for name, digest in sorted(files.items()):
            p = posixpath.join(target, name)
            try:
                ok = store.sha256(p) == digest
            except FileNotFoundError:
                raise CheckpointCorruptError(f"{store.display(p)} is missing") from None
            if not ok:
                raise CheckpointCorruptError(
                    f"{store.display(p)} changed since it was written (SHA-256)"
                )

    def _where(self, checkpoint_id: str, location: str | None) -> tuple[Store, str]:
        """The store and path of a checkpoint: in ``storage``, or at ``location``."""
        if location is None:
            return self.store, self.path(checkpoint_id)
        store = Store(location, options=self._backup_options)
        return store, store.root

    def _on_rollback(self, order: RollbackOrder) -> int:
        """Load the rollback's checkpoint now (training thread, at the effective step)."""
        self.wait()  # a save in flight finishes first
        why = ""
        if self._rank == 0:  # one read of the files per group; every rank hears the verdict
            try:
                self.verify(order.id, order.files)
            except CheckpointCorruptError as exc:
                why = str(exc)
                self.run.emit("checkpoint_corrupt", id=order.id, reason=why)
        if self._distributed:
            box: list[Any] = [why]
            dist.broadcast_object_list(box, src=0, group=self._pg)
            why = str(box[0])
        if why:
            raise CheckpointCorruptError(why)
        step = self.load(order.id)
        self.run.emit("checkpoint_loaded", step=step, id=order.id, why="rollback")
        log.warning("torchloom: rolled back to checkpoint %s: going on at step %d", order.id, step)
        return step

    def load(self, checkpoint_id: str, *, location: str | None = None) -> int:
        """Load checkpoint ``checkpoint_id`` into ``state`` in place, and this rank's RNG
        states; return the step to go on at.

        Args:
            location: its directory or URL when not in ``storage`` (its backup copy).

        Raises:
            FileNotFoundError: no such checkpoint there.
        """
        store, target = self._where(checkpoint_id, location)
        if not store.exists(posixpath.join(target, ".metadata")):
            raise FileNotFoundError(f"no checkpoint {checkpoint_id} in {store.display(target)}")
        sd = self._state_dict(0)
        dcp_load(
            sd,
            storage_reader=store.reader(target),
            process_group=self._pg,
            no_dist=not self._distributed,
        )
        meta = sd["torchloom"]
        rng = meta.get(f"rng_{self._rank}")
        if rng is not None:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return int(meta["step"])

    def close(self) -> None:
        """Wait for the save in flight (call before the process exits)."""
        self.wait()


class _ModuleState:
    """A module's weights by their names without DDP's ``module.`` prefix (DCP's
    ``get_model_state_dict``), so a checkpoint loads with or without the wrapper."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.module, sd)


class _OptimizerState:
    """An optimizer's state keyed by parameter names (DCP's ``get_optimizer_state_dict``):
    its lazily made buffers (momentum, Adam's moments) exist before a load, so a fresh
    optimizer takes them — a plain ``optimizer.state_dict()`` is empty before the first step
    and DCP would load nothing into it."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=sd)


def _adapted(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with modules and optimizers wrapped for DCP (see the two classes above).

    Raises:
        ValueError: optimizers without exactly one module to name their parameters.
    """
    modules = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    out: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, torch.nn.Module):
            out[name] = _ModuleState(value)
        elif isinstance(value, torch.optim.Optimizer):
            if len(modules) != 1:
                raise ValueError(
                    f"state[{name!r}] is an optimizer: give exactly one module with it "
                    f"({len(modules)} given) so its parameters are saved by name"
                )
            out[name] = _OptimizerState(modules[0], value)
        else:
            out[name] = value
    return out


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
