"""What the framework callbacks share: their options, starting the Run, and applying a change
without ever failing the training (no framework is imported here)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchloom.protocol import KnobSpec
from torchloom.threadlet import Run, init


@dataclass(frozen=True)
class RunOptions:
    """A callback's keyword options (see the callbacks' docstrings)."""

    job_id: str | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict)
    custom_knobs: Sequence[KnobSpec] = ()
    nats_url: str | None = None
    interval_ms: float = 200.0
    connect: bool = True

    def start(
        self, *, initial: Mapping[str, Any], rank: int, group_world_size: int, start_step: int
    ) -> Run:
        """The rank's Run: ``initial`` (read off the trainer) overridden by ``knobs``."""
        return init(
            job_id=self.job_id,
            knobs={**initial, **self.knobs},
            custom_knobs=list(self.custom_knobs),
            rank=rank,
            group_world_size=group_world_size,
            nats_url=self.nats_url,
            interval_ms=self.interval_ms,
            start_step=start_step,
            connect=self.connect,
        )


def apply_failing_open(
    run: Run,
    log: logging.Logger,
    apply: Callable[[Mapping[str, Any], Mapping[str, Any]], None],
    config: Mapping[str, Any],
    changed: Mapping[str, Any],
) -> None:
    """``apply(config, changed)``; an exception is logged and sent as ``config_not_applied``,
    and the training goes on with what it had."""
    try:
        apply(config, changed)
    except Exception as exc:
        log.error("torchloom: could not apply %s: %s", dict(changed), exc)
        run.emit("config_not_applied", reason=f"{type(exc).__name__}: {exc}")
