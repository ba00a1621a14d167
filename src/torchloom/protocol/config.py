"""Which config version a rank runs at a given step: pure functions shared by both sides.

The rule that makes a change consistent: before running step ``s``, a rank runs
the snapshot with the highest version whose ``effective_step <= s``. The Weaver
keeps effective steps non-decreasing in version, and every snapshot is a full
config, so two ranks holding the same :class:`DesiredConfig` pick the same
snapshot at the same step — whatever order they heard of the versions in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchloom.protocol.messages import ConfigSnapshot


def select_snapshot(snapshots: Sequence[ConfigSnapshot], step: int) -> ConfigSnapshot | None:
    """The snapshot in force at ``step``: the newest with ``effective_step <= step``.

    Args:
        snapshots: ascending by version (as stored in :class:`DesiredConfig`).
        step: the step about to run.

    Returns:
        The snapshot, or None when every snapshot takes effect later.
    """
    for snap in reversed(snapshots):
        if snap.effective_step <= step:
            return snap
    return None


def resolve_values(snapshot: ConfigSnapshot, replica_id: str) -> dict[str, Any]:
    """The knob values one replica group runs under ``snapshot``: job values, then its overrides."""
    values = dict(snapshot.values)
    values.update(snapshot.overrides.get(replica_id, {}))
    return values
