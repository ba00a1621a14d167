"""Typed errors of torchloom, all under one root :class:`TorchloomError`.

Every error carries structured fields (``knob``, ``job_id``, …) so that a CLI,
an HTTP API or a log line can show it without parsing the message, and a
``code`` string that travels on the wire in control replies.
"""

from __future__ import annotations


class TorchloomError(Exception):
    """Root of every error torchloom raises on purpose.

    Attributes:
        code: a stable, machine-readable name of the error kind, sent on the wire.
    """

    code = "error"
    remote = False
    """True for an error the Weaver answered with (raised by a client from its reply)."""
    knob: str | None = None
    """The knob a refusal is about, where there is one."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidKnobError(TorchloomError):
    """A knob value broke a rule of the knob registry (type, bounds, unknown name)."""

    code = "invalid_knob"

    def __init__(self, knob: str, rule: str) -> None:
        super().__init__(f"knob {knob!r}: {rule}")
        self.knob = knob
        self.rule = rule


class UnknownJobError(TorchloomError):
    """No rank of this job has ever joined the Weaver."""

    code = "unknown_job"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"unknown job {job_id!r}: no rank of it has joined this Weaver")
        self.job_id = job_id


class UnknownReplicaError(TorchloomError):
    """The replica group named in a request is not in the job's DR map."""

    code = "unknown_replica"

    def __init__(self, job_id: str, replica_id: str) -> None:
        super().__init__(f"unknown replica group {replica_id!r} in job {job_id!r}")
        self.job_id = job_id
        self.replica_id = replica_id


class InvalidRequestError(TorchloomError):
    """A control request is malformed or asks for something that is not allowed now."""

    code = "invalid_request"


class DecodeError(TorchloomError):
    """A message on the wire did not decode into its schema (malformed, oversized, wrong version)."""

    code = "decode_error"

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"bad {kind} message: {reason}")
        self.kind = kind
        self.reason = reason


class NotReachableError(TorchloomError):
    """The NATS server or the Weaver did not answer within the timeout."""

    code = "not_reachable"


class ConflictError(TorchloomError):
    """A compare-and-set write lost: someone else wrote the key since it was read
    (another Weaver took over the job's config, or the leader lease moved)."""

    code = "conflict"

    def __init__(self, bucket: str, key: str, expected_revision: int) -> None:
        super().__init__(
            f"{bucket}/{key} was written by someone else (expected revision {expected_revision})"
        )
        self.bucket = bucket
        self.key = key
        self.expected_revision = expected_revision


class DuplicateRankError(TorchloomError):
    """A second process asked to be a rank whose identity a live process holds (a stale
    worker from an earlier launch, a script started twice): the first keeps it."""

    code = "duplicate_rank"

    def __init__(
        self, job_id: str, replica_id: str, rank: int, *, holder_host: str, holder_pid: int
    ) -> None:
        super().__init__(
            f"rank {replica_id}/{rank} of job {job_id!r} is held by pid {holder_pid} on "
            f"{holder_host or '?'} (a stale process from an earlier launch?); this process "
            "trains without control and joins once that one is gone"
        )
        self.job_id = job_id
        self.replica_id = replica_id
        self.rank = rank
        self.holder_host = holder_host
        self.holder_pid = holder_pid


class RateLimitedError(TorchloomError):
    """A requester sent more changes than the control entry point takes per second."""

    code = "rate_limited"


class LeadershipLostError(TorchloomError):
    """Another Weaver holds the leader lease now; this one must stop serving."""

    code = "leadership_lost"


class PortInUseError(TorchloomError):
    """The dashboard's address is taken by another process."""

    code = "port_in_use"


class AlreadyRunningError(TorchloomError):
    """A ``torchloom up`` already holds this state directory."""

    code = "already_running"

    def __init__(self, state_dir: str, pid: int | None, nats_url: str | None) -> None:
        where = f" (pid {pid}, NATS at {nats_url})" if pid else ""
        super().__init__(f"torchloom is already running on state dir {state_dir}{where}")
        self.state_dir = state_dir
        self.pid = pid
        self.nats_url = nats_url


class CheckpointCorruptError(TorchloomError):
    """A checkpoint's files differ from what its writers reported (changed, truncated or
    missing): it is not loaded."""

    code = "checkpoint_corrupt"


class NothingFitsError(TorchloomError):
    """The batch-size finder's smallest size does not fit in memory."""

    code = "nothing_fits"


class MemoryBudgetError(TorchloomError):
    """A micro-batch's measured peak memory is above the ``max_memory_gb`` budget (on a CPU,
    where no allocator enforces it; :class:`torchloom.memory.MemoryGuard` retries the step)."""

    code = "memory_budget"


ERRORS_BY_CODE: dict[str, type[TorchloomError]] = {
    cls.code: cls
    for cls in (
        TorchloomError,
        InvalidKnobError,
        UnknownJobError,
        UnknownReplicaError,
        InvalidRequestError,
        DecodeError,
        NotReachableError,
        ConflictError,
        DuplicateRankError,
        RateLimitedError,
        LeadershipLostError,
        PortInUseError,
        AlreadyRunningError,
        CheckpointCorruptError,
        NothingFitsError,
        MemoryBudgetError,
    )
}


def from_wire(code: str, message: str, *, knob: str | None = None) -> TorchloomError:
    """The error a Weaver's refusal stands for: an instance of the class whose ``code`` it
    carries (:data:`ERRORS_BY_CODE`; an unknown code is a plain :class:`TorchloomError`),
    with ``remote`` set and the reply's message and knob. Its structured fields other than
    ``knob`` are not on the wire, so they are not set."""
    cls = ERRORS_BY_CODE.get(code, TorchloomError)
    exc = cls.__new__(cls)
    TorchloomError.__init__(exc, message)
    exc.remote = True
    exc.knob = knob
    return exc
