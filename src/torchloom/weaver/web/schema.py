"""Shapes of what the dashboard API answers, as TypedDicts.

One definition serves three ends: mypy checks that :mod:`~torchloom.weaver.web.frames`
builds them with these keys and types, FastAPI validates every answer against them,
and the OpenAPI description at ``/api/openapi.json`` documents them. Units are in
the names (``_s`` seconds, ``_ms`` milliseconds, ``_per_s`` per second); times are
Unix seconds.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12


class Health(TypedDict):
    """The Weaver's own health."""

    ready: bool
    nats_connected: bool
    nats_url: str | None
    nats_rtt_ms: float | None
    replication: dict[str, str]
    loop_late_ms: float
    policy_round_ms: float
    unsaved_events: int
    dropped_messages: dict[str, int]


class Header(TypedDict):
    """A job's run header."""

    job_id: str
    run_state: str | None
    step: int | None
    samples_per_s: float | None
    loss: float | None
    test_acc: float | None
    mfu: float | None
    """Mean model FLOPs utilisation (0-1) of the live ranks that report ``mfu``."""
    flops_per_s: float | None
    """Achieved FLOP/s of the job: the sum of its live ranks' ``flops_per_s``."""
    groups_healthy: int
    groups_total: int
    ranks_live: int
    ranks_total: int
    goodput: float | None
    weaver: Health


class RankRow(TypedDict):
    """One rank in the DR map and the replicas table (``id`` is ``"<replica_id>/<rank>"``).

    ``participants`` is the replica groups in the rank's last torchft quorum (None without
    torchft); ``straggler`` (flagged by the straggler policy's scores) and ``risk`` (its
    device's failure risk, 0-1, from the failure policy) are None while the policy is off or
    has nothing to judge.
    """

    id: str
    replica_id: str
    rank: int
    group_world_size: int
    state: str
    host: str
    pid: int
    device: str
    step: int
    step_time_s: float | None
    samples_per_s: float | None
    applied_version: int
    applied_at_step: int | None
    desired_version: int | None
    heartbeat_age_s: float
    loss: float | None
    test_acc: float | None
    healing: bool
    participants: int | None
    straggler: bool | None
    risk: float | None


class RankDetail(RankRow):
    """A rank with everything the Weaver knows of it."""

    steps_per_s: float
    metrics: dict[str, float | None]
    dropped_points: int
    quorum: dict[str, Any] | None
    config: dict[str, Any]


class SlowRank(TypedDict):
    """A live rank among the slowest: its id, mean step time (s) and step."""

    id: str
    step_time_s: float | None
    step: int


class Summary(TypedDict):
    """A job of any size in a few numbers (``torchloom status``'s summary line)."""

    ranks: int
    states: dict[str, int]
    replica_groups: int
    replica_groups_live: int
    applied_versions: dict[str, int]
    slowest: list[SlowRank]
    outliers: list[str]


class KnobInfo(TypedDict):
    """A knob of the registry with its desired value (see ``torchloom.protocol.KnobSpec``)."""

    name: str
    type: str
    min: float | None
    max: float | None
    min_exclusive: bool
    allow_off: bool
    scope: str
    consistent: bool
    choices: list[str] | None
    multiple_of: int | None
    doc: str
    rule: str
    value: Any


class ApplyInfo(TypedDict):
    """Who applied a config version, at which step (rank id → step)."""

    version: int
    effective_step: int
    done: bool
    expected: int
    applied: dict[str, int]
    flagged: list[str]


class ConfigView(TypedDict):
    """The desired config of a job."""

    job_id: str
    version: int | None
    knobs: list[KnobInfo]
    epoch: int | None
    effective_step: int | None
    values: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    run_state: str | None
    drained: list[str]
    applies: list[ApplyInfo]


class SeriesView(TypedDict):
    """Aligned chart columns: ``ts`` and, per column, one value (or null) per time."""

    ts: list[float]
    columns: dict[str, list[float | None]]


class EventView(TypedDict):
    """A history event (``loom.<job>.history.<kind>``) and its place in the page's tail."""

    v: int
    job_id: str
    kind: str
    ts: float
    message: str
    replica_id: str | None
    rank: int | None
    step: int | None
    version: int | None
    data: dict[str, Any]
    seq: int


class CheckpointsView(TypedDict):
    """A job's checkpoint registry (records as ``torchloom.protocol.CheckpointRecord``)."""

    job_id: str
    checkpoints: list[dict[str, Any]]
    resume_from: str | None
    resume_why: str
    fallbacks: list[str]
