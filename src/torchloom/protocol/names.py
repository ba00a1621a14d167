"""Subjects, KV buckets and stream names on the wire; pure string functions.

| what                          | where                                                   |
| ----------------------------- | ------------------------------------------------------- |
| telemetry + heartbeat         | core NATS ``loom.<job>.telemetry.<replica>.<rank>``     |
| lifecycle events from ranks   | core NATS ``loom.<job>.events.<replica>.<rank>``        |
| control requests              | request/reply ``loom.<job>.control``                    |
| a rank's join                 | request/reply ``loom.<job>.join``                       |
| desired config                | KV bucket ``loom_config`` key ``<job>``                 |
| DR map / registry             | KV bucket ``loom_registry`` key ``<job>.<replica>.<rank>`` |
| event history                 | stream ``LOOM_EVENTS``, subjects ``loom.<job>.history.<kind>`` |
| Weaver leader lease           | KV bucket ``loom_leader`` key ``weaver`` (TTL = max age)  |

The desired config of a job is one KV entry holding the job-wide values, the
per-replica-group overrides and the pending versions (see
:mod:`torchloom.protocol.config`): one key per job means one atomic write per
version, and one core-NATS subscription per rank to follow it.
"""

from __future__ import annotations

import re

from torchloom.errors import DecodeError, InvalidRequestError

PREFIX = "loom"
CONFIG_BUCKET = "loom_config"
REGISTRY_BUCKET = "loom_registry"
CHECKPOINTS_BUCKET = "loom_checkpoints"
LEADER_BUCKET = "loom_leader"
"""KV bucket of the Weaver's leader lease (entries expire after the lease's TTL)."""
LEADER_KEY = "weaver"
EVENTS_STREAM = "LOOM_EVENTS"
EVENTS_STREAM_SUBJECTS = f"{PREFIX}.*.history.>"

ALL_JOBS = "_"
"""The job id of a ``status`` request that asks about every job (reserved)."""

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid job or replica id, else raise.

    Ids become subject tokens and KV keys, so they are limited to
    ``[A-Za-z0-9_-]``, 1 to 64 characters.

    Raises:
        InvalidRequestError: the id is empty, too long or has other characters.
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidRequestError(
            f"{kind} {value!r} is not valid: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return value


def telemetry_subject(job_id: str, replica_id: str, rank: int) -> str:
    return f"{PREFIX}.{job_id}.telemetry.{replica_id}.{rank}"


def events_subject(job_id: str, replica_id: str, rank: int) -> str:
    return f"{PREFIX}.{job_id}.events.{replica_id}.{rank}"


def control_subject(job_id: str) -> str:
    return f"{PREFIX}.{job_id}.control"


def join_subject(job_id: str) -> str:
    """Where a rank asks to join (request/reply): apart from ``control`` so that a job's
    credentials may join without being allowed to change anything."""
    return f"{PREFIX}.{job_id}.join"


def ingest_subject(instance: str) -> str:
    """Where a Weaver's ingest workers send it the telemetry they took in (one subject per
    Weaver instance: a standby's or a dead leader's workers never feed another)."""
    return f"{PREFIX}._weaver.ingest.{instance}"


def check_rank_subject(subject: str, job_id: str, replica_id: str, rank: int) -> None:
    """Check that a rank's message came on its own subject (``loom.<job>.<kind>.<replica>.<rank>``).

    Raises:
        DecodeError: it names another job, replica group or rank.
    """
    parts = subject.split(".")
    if len(parts) != 5 or parts[1] != job_id or parts[3] != replica_id or parts[4] != str(rank):
        raise DecodeError("subject", f"{subject} does not match the message's job/replica/rank")


def history_subject(job_id: str, kind: str) -> str:
    return f"{PREFIX}.{job_id}.history.{kind}"


def history_filter(job_id: str | None) -> str:
    return f"{PREFIX}.{job_id or '*'}.history.>"


# Wildcards the Weaver listens on.
ALL_TELEMETRY = f"{PREFIX}.*.telemetry.*.*"
ALL_EVENTS = f"{PREFIX}.*.events.*.*"
ALL_CONTROL = f"{PREFIX}.*.control"
ALL_JOIN = f"{PREFIX}.*.join"
ALL_CONFIG_WATCH = f"$KV.{CONFIG_BUCKET}.*"
"""Every job's config key (the policy settings' key has a dot, so it is not one of them)."""


def config_key(job_id: str) -> str:
    return job_id


POLICIES_KEY = "_weaver.policies"
"""Key of the Weaver's policy settings in the config bucket (no job id has a dot)."""


def config_watch_subject(job_id: str) -> str:
    """The subject a KV put on the job's desired config is published on."""
    return f"$KV.{CONFIG_BUCKET}.{config_key(job_id)}"


def registry_key(job_id: str, replica_id: str, rank: int) -> str:
    return f"{job_id}.{replica_id}.{rank}"


def checkpoint_key(job_id: str, checkpoint_id: str) -> str:
    return f"{job_id}.{checkpoint_id}"


def job_of_subject(subject: str) -> str | None:
    """The job id token of a ``loom.<job>.…`` subject, or None."""
    parts = subject.split(".")
    if len(parts) >= 3 and parts[0] == PREFIX:
        return parts[1]
    return None
