"""Typed messages on the wire. Every top-level message has a schema version ``v``.

All numbers carry their unit in the field name or docstring: times are wall-clock
seconds since the epoch (``ts``) or durations in seconds (``*_s``); steps are
0-based training step indices.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from torchloom.errors import TorchloomError
from torchloom.protocol.knobs import KnobSpec

SCHEMA_VERSION = 1

RankState = Literal["joining", "training", "paused", "suspect", "hung", "failed", "exited"]
RunState = Literal["running", "paused", "stopped"]
ControlOp = Literal[
    "join",
    "set",
    "pause",
    "resume",
    "stop",
    "drain",
    "replan",
    "forget",
    "status",
    "knobs",
    "policies",
    "policy",
    "checkpoint",
    "checkpoints",
    "checkpoint_pin",
    "checkpoint_delete",
    "checkpoint_score",
    "checkpoint_import",
    "rollback",
]
CHANGE_OPS = frozenset({"set", "pause", "resume", "stop", "drain", "checkpoint", "rollback"})
"""Ops that make a config version: they carry a ``request_id`` and are rate-limited."""
LIMITED_OPS = CHANGE_OPS | {
    "forget",
    "checkpoint_pin",
    "checkpoint_delete",
    "checkpoint_score",
    "checkpoint_import",
}
"""Ops rate-limited per requester at the control entry point."""


class MetricPoint(msgspec.Struct, array_like=True):
    """Numbers a rank logged at one step: ``[step, ts, {name: value}]``; None is NaN or ±Inf."""

    step: int
    ts: float
    values: dict[str, float | None]


class Telemetry(msgspec.Struct, kw_only=True):
    """One flush from a Threadlet; doubles as the heartbeat.

    Sent every ``interval_ms`` on ``loom.<job>.telemetry.<replica>.<rank>``.

    Attributes:
        step: the step the rank is at (the last step index it started), -1 before the first.
        state: what the rank says it is doing (``joining``, ``training``, ``paused``).
        applied_version: the config version in force on this rank (0: the initial knobs).
        step_time_s: mean wall time of a step since the previous flush, or None.
        samples_per_s: samples this rank processed per second since the previous flush.
        points: the metric points logged since the previous flush (oldest first).
        dropped_points: points dropped so far because the bounded buffer was full.
        config_lag_s: how long the newest desired config took to reach this
            rank (receive time minus the Weaver's issue time), in seconds.
        quorum: fault-tolerance facts from an integration (torchft: ``quorum_id``,
            ``participants``, ``ft_step``, ``healing``, ``commit_failures``, ``heals``), or None.
        phases_s: mean seconds per step spent in each phase the training loop marked
            since the previous flush (``data``, ``compute``, ``comm``, ``other``), or None.
        comm_bytes: mean bytes per step this rank handed to gradient collectives since the
            previous flush (``sent``), and what float32 without compression would have sent
            (``dense``) — from :mod:`torchloom.comm`; None without it.
        device_stats: the newest sample of the rank's device health (NVML on a GPU:
            ``temp_c``, ``power_w``, ``sm_clock_mhz``, ``throttle_hw``, ``ecc_corrected``,
            ``ecc_uncorrected``, ``retired_pages_pending``, ``mem_used_frac``; psutil
            on a CPU host: ``cpu_util``, ``mem_used_frac``, ``swap_used_frac``, ``load_per_cpu``,
            ``temp_c`` where readable), sent when a new sample was taken, else None.
        conn: the rank's NATS connection as the server knows it (``<server id>/<client id>``),
            so the Weaver can tie the server's disconnect advisory to the rank; empty when
            unknown.
    """

    v: int = SCHEMA_VERSION
    job_id: str
    replica_id: str
    rank: int
    group_world_size: int = 1
    seq: int = 0
    ts: float
    step: int
    state: RankState = "training"
    applied_version: int = 0
    step_time_s: float | None = None
    samples_per_s: float | None = None
    points: list[MetricPoint] = []
    dropped_points: int = 0
    config_lag_s: float = 0.0
    quorum: dict[str, Any] | None = None
    phases_s: dict[str, float] | None = None
    comm_bytes: dict[str, float] | None = None
    device_stats: dict[str, float] | None = None
    host: str = ""
    pid: int = 0
    device: str = ""
    conn: str = ""


class IngestBatch(msgspec.Struct, kw_only=True):
    """Telemetry an ingest worker took in, checked, for its Weaver's deciding core (on
    ``loom._weaver.ingest.<instance>``; see :mod:`torchloom.weaver.ingest_worker`).

    Attributes:
        worker: the worker's index.
        dropped: telemetry messages the worker dropped since its previous batch (they did
            not decode, or came on another rank's subject).
        telemetry: the flushes, oldest first, each exactly as its rank sent it.
    """

    v: int = SCHEMA_VERSION
    worker: int
    dropped: int = 0
    telemetry: list[Telemetry] = []


RankEventKind = Literal[
    "config_applied",
    "exited",
    "quorum_changed",
    "heal_started",
    "healed",
    "commit_failed",
    "checkpoint_saved",
    "checkpoint_failed",
    "checkpoint_loaded",
    "checkpoint_ready",
    "checkpoint_corrupt",
    "checkpoint_backed_up",
    "rollback_failed",
    "config_not_applied",
    "batch_size_deferred",
    "max_steps_capped",
    "batch_size_found",
    "oom_retried",
]


class RankEvent(msgspec.Struct, kw_only=True):
    """A lifecycle fact from a rank, on ``loom.<job>.events.<replica>.<rank>``.

    ``kind`` is ``config_applied`` (``version`` applied before ``step``),
    ``exited`` (``reason``: ``finished``, ``stopped``, ``error: …``),
    ``checkpoint_saved`` / ``checkpoint_failed`` (this rank's part of checkpoint
    ``data["id"]`` is durable, with ``bytes``, ``stall_s``, ``write_s`` and, from the writing
    group's rank 0, ``metadata_sha256``, ``files`` (name → SHA-256 of what it wrote) and
    ``removed`` (ids of old checkpoints whose files it removed); or it could not be written:
    ``reason``), ``checkpoint_corrupt`` (a complete checkpoint's files failed their checksums
    at a load: ``reason``), ``checkpoint_backed_up`` (a complete checkpoint copied to the
    backup storage: ``backup`` its URL there, ``dropped`` the ids removed from the backup by
    its retention), or a
    fault-tolerance fact reported by an integration (``quorum_changed``,
    ``heal_started``, ``healed``, ``commit_failed``) with details in ``data``, or what a
    framework integration or the batch-size finder did (``config_not_applied``: a knob could
    not be put in force, ``reason`` says why; ``batch_size_deferred``: Lightning takes the new
    ``batch_size`` at the next epoch; ``max_steps_capped``: a Trainer ends at its plan;
    ``batch_size_found``: the finder's ``max_batch_size``; ``oom_retried``: a step that ran out
    of memory ran again in micro-batches of at most ``micro_batch``, ``reason`` the error).
    ``host`` and ``pid`` name the process that sent it (a second process with the same
    identity is told apart by them; 0 / empty: not said).
    """

    v: int = SCHEMA_VERSION
    kind: RankEventKind
    job_id: str
    replica_id: str
    rank: int
    ts: float
    step: int
    version: int = 0
    reason: str = ""
    data: dict[str, Any] = {}
    host: str = ""
    pid: int = 0


class JoinInfo(msgspec.Struct, kw_only=True):
    """Who a rank is, sent with a ``join`` control request."""

    replica_id: str
    rank: int
    group_world_size: int = 1
    host: str = ""
    pid: int = 0
    device: str = ""
    initial_values: dict[str, Any] = {}
    custom_knobs: list[KnobSpec] = []
    resuming: bool = False
    """A restart of a running job (torchrun's elastic restart, ``torchloom run``'s restart):
    it takes the job's current config even if no rank was live, instead of a new epoch."""


class ControlRequest(msgspec.Struct, kw_only=True):
    """A request to the one control entry point ``loom.<job>.control``.

    Attributes:
        op: ``set``, ``pause``, ``resume``, ``stop``, ``drain``, ``status``, ``knobs``, ``join``,
            ``replan`` (the Weaver's own: a new version in place of pending ones out of reach),
            ``forget`` (take gone ranks out of the DR map: ``replica_id``, ``values["rank"]``),
            ``policies`` (list the Weaver's policies), ``policy`` (change one: ``values``
            holds ``policy`` (its name) and any of ``enabled``, ``dry_run``, ``params``),
            ``checkpoint`` (every writing rank saves at one effective step),
            ``checkpoints`` (the job's checkpoint registry), ``checkpoint_score`` (an
            evaluator's scores of a complete checkpoint: ``values`` ``id`` and ``scores``,
            ``{name: number}``; :mod:`torchloom.evaluator`), ``checkpoint_import`` (an
            ``imported`` registry entry for weights the dashboard stored: ``values``
            ``storage``, ``files``, ``bytes``, ``source``, ``step``) or ``rollback`` (every rank loads
            a complete checkpoint at one effective step: ``values["to"]``, an id, or
            ``values["step"]``, the newest at or before it; neither: the newest).
        replica_id: for ``set``: limit the change to one replica group (None: job-wide);
            for ``drain``: the replica group to take out of the run.
        device: for ``drain``: take out every replica group with a rank on this device
            (NVML UUID, or ``cpu:<host>``).
        replace: for ``drain``: ask the launcher (``torchloom run``) to start a fresh replica
            group in place of each drained one.
        values: for ``set``: raw ``{knob: value}``, validated by the Weaver.
        reason: free text recorded in the history with the change.
        requested_by: who asks (``cli:user@host``, ``policy:name``, ``ui``).
        request_id: the caller's id of this request (any string up to 64 characters;
            empty: none). A change sent again with the same id — a retry after a lost
            reply, maybe to a Weaver that took over — is answered with the version the
            first one made instead of making another.
    """

    v: int = SCHEMA_VERSION
    op: ControlOp
    job_id: str
    replica_id: str | None = None
    values: dict[str, Any] = {}
    reason: str = ""
    requested_by: str = ""
    join: JoinInfo | None = None
    device: str | None = None
    replace: bool = False
    request_id: str = ""


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str
    knob: str | None = None


class ControlReply(msgspec.Struct, kw_only=True):
    """The Weaver's answer: ``{version, effective_step}`` or an error."""

    v: int = SCHEMA_VERSION
    ok: bool
    version: int | None = None
    effective_step: int | None = None
    error: ErrorInfo | None = None
    data: Any = None

    @classmethod
    def refusal(cls, exc: TorchloomError, *, prefix: str = "", suffix: str = "") -> ControlReply:
        """The error reply for ``exc``: its ``code``, message (between ``prefix`` and
        ``suffix``) and knob — what :func:`torchloom.errors.from_wire` turns back into the same
        error class."""
        error = ErrorInfo(code=exc.code, message=prefix + exc.message + suffix, knob=exc.knob)
        return cls(ok=False, error=error)


class RollbackOrder(msgspec.Struct, kw_only=True):
    """A config version's order to load a checkpoint at its effective step (every rank).

    Attributes:
        id: the complete checkpoint every rank loads.
        step: its step: the ranks go on from there (the step counter goes back).
        files: the checkpoint's files and their SHA-256 as the registry holds them (about 100
            bytes per writing rank): checked before the load.
    """

    id: str
    step: int
    files: dict[str, str] = {}


class CheckpointOrder(msgspec.Struct, kw_only=True):
    """A config version's order to save a checkpoint at its effective step.

    Attributes:
        id: the checkpoint's id within the job (``ckpt-v<version>``).
        writers: the replica groups that write it (every rank of each); the others train on.
        remove: ids of the job's failed or deleted checkpoints whose files are still in the
            storage: the first writing group's rank 0 removes them once this save is durable.
        backup: copy this one to the backup storage (the job's Checkpointers have one, and
            it is the ``every``-th complete checkpoint).
        backup_drop: ids whose copies leave the backup storage once this one is copied there
            (the retention the Weaver worked out with this checkpoint counted in).
    """

    id: str
    writers: list[str] = []
    remove: list[str] = []
    backup: bool = False
    backup_drop: list[str] = []


CheckpointState = Literal["pending", "complete", "failed", "deleted", "imported"]


class CheckpointRecord(msgspec.Struct, kw_only=True):
    """A checkpoint in the registry, the KV document ``loom_checkpoints/<job>.<id>``.

    It is ``complete`` only when every writing rank reported its part durable (and the
    writing group's rank 0 the checksum of DCP's metadata); ``failed`` when one could not
    write it, left, or failed first. Only a complete checkpoint is ever offered for loading.

    Attributes:
        id: ``ckpt-v<version>``, unique in the job.
        job_id: the job.
        step: the step a run resumes at from it (the state before that step ran).
        version: the config version that ordered it.
        values: the job-wide knob values in force at ``step``.
        state: ``pending``, ``complete``, ``failed`` (could not be written, or its files
            failed their checksums at a load), ``deleted`` (by a person) or ``imported``
            (model weights brought in from a safetensors file: sampled in the playground and
            exported, never resumed or rolled back to — they hold no optimizer state).
        writers: the ranks that write it (``replica/rank``).
        saved: the ranks whose part is durable, with the bytes each wrote.
        storage: where the ranks wrote it (a directory or URL, as the first writer said).
        metadata_sha256: SHA-256 of DCP's ``.metadata`` file (from the writing group's rank 0).
        bytes: bytes written by every writer together.
        requested_by: who asked (``cli:user@host``, ``policy:name``).
        requested_ts: when the Weaver ordered it (wall-clock s).
        ended_ts: when it became complete or failed (0: pending).
        reason: why it failed, or the request's reason.
        loss: the newest ``loss`` the writing ranks logged at or before ``step`` (mean), if any.
        stall_s: the longest time a writer's training thread spent on it, in seconds.
        files: SHA-256 of every file the writers reported (name in the checkpoint's
            directory → hex digest); a load checks them first.
        pinned: a person pinned it: a starting job resumes from it (not the newest), and it
            cannot be deleted.
        files_removed: a failed or deleted checkpoint's files were removed from the storage.
        backup: where its copy in the backup storage is ("": none).
        scores: what an evaluator measured on it (``eval_loss``, ``eval_perplexity``, …; name
            → number), the newest report of each name kept (:mod:`torchloom.evaluator`).
        scored_by: who reported the scores (``evaluator:user@host``).
    """

    v: int = SCHEMA_VERSION
    id: str
    job_id: str
    step: int
    version: int
    values: dict[str, Any] = {}
    state: CheckpointState = "pending"
    writers: list[str] = []
    saved: dict[str, int] = {}
    storage: str = ""
    metadata_sha256: str = ""
    bytes: int = 0
    requested_by: str = ""
    requested_ts: float = 0.0
    ended_ts: float = 0.0
    reason: str = ""
    loss: float | None = None
    stall_s: float = 0.0
    files: dict[str, str] = {}
    pinned: bool = False
    files_removed: bool = False
    backup: str = ""
    scores: dict[str, float] = {}
    scored_by: str = ""


JOURNAL_LENGTH = 8
"""History entries of the newest config versions kept in the config document."""


class ConfigSnapshot(msgspec.Struct, kw_only=True):
    """One version of a job's desired config; a full snapshot, not a delta.

    Attributes:
        version: strictly increasing within the job, across resets.
        effective_step: every rank applies this snapshot before running this step.
        values: job-wide knob values.
        overrides: ``{replica_id: {knob: value}}`` set for one replica group.
        run_state: ``running``, ``paused`` or ``stopped`` from ``effective_step`` on.
        drained: replica groups whose ranks leave the run at ``effective_step`` (exit 0).
        checkpoint: an order to save a checkpoint at ``effective_step`` (this version only:
            the next one does not repeat it).
        rollback: an order to load a checkpoint at ``effective_step`` and go on from its
            step (this version only).
        issued_ts: when the Weaver accepted it (wall-clock s).
        reason: why (the request's reason, or the policy's).
    """

    version: int
    effective_step: int
    values: dict[str, Any]
    overrides: dict[str, dict[str, Any]] = {}
    run_state: RunState = "running"
    drained: list[str] = []
    checkpoint: CheckpointOrder | None = None
    rollback: RollbackOrder | None = None
    issued_ts: float = 0.0
    reason: str = ""


class DesiredConfig(msgspec.Struct, kw_only=True):
    """The KV document ``loom_config/<job>``: knob registry and the versions still needed.

    ``snapshots`` is ascending in version and in effective step; it holds the
    newest snapshot that every live rank has passed plus every later one, so a
    rank that hears late still applies each version at its own step.

    ``journal`` holds the history entries of the newest versions (``config_set``,
    ``job_started``; at most :data:`JOURNAL_LENGTH`), written in the same KV write as the
    version itself: a Weaver that dies between that write and the history append leaves
    them here, and the next one appends those the history lacks. Their ``request_id`` (in
    ``data``) lets a retried request be answered with the version it already made.
    """

    v: int = SCHEMA_VERSION
    job_id: str
    epoch: int = 1
    knobs: dict[str, KnobSpec] = {}
    snapshots: list[ConfigSnapshot] = []
    journal: list[HistoryEvent] = []

    def latest(self) -> ConfigSnapshot | None:
        return self.snapshots[-1] if self.snapshots else None


class RegistryEntry(msgspec.Struct, kw_only=True):
    """One rank of the DR map, persisted at ``loom_registry/<job>.<replica>.<rank>``."""

    v: int = SCHEMA_VERSION
    job_id: str
    replica_id: str
    rank: int
    group_world_size: int = 1
    host: str = ""
    pid: int = 0
    device: str = ""
    state: RankState = "joining"
    last_step: int = -1
    applied_version: int = 0
    joined_ts: float = 0.0
    last_seen_ts: float = 0.0
    state_since_ts: float = 0.0
    epoch: int = 0
    """The job epoch this rank joined (0: only seen in telemetry, not joined yet)."""


class HistoryEvent(msgspec.Struct, kw_only=True):
    """An entry of the job's history, on ``loom.<job>.history.<kind>`` in ``LOOM_EVENTS``."""

    v: int = SCHEMA_VERSION
    job_id: str
    kind: str
    ts: float
    message: str
    replica_id: str | None = None
    rank: int | None = None
    step: int | None = None
    version: int | None = None
    data: dict[str, Any] = {}
