"""Fault injection: kill ranks on a schedule (``torchloom chaos``) or at chosen steps (``fail_at``),
slow a replica group down, poison a step's loss with NaN, or degrade its device telemetry.

Deciding is pure (:func:`choose_victim`, :func:`parse_duration`); the CLI does the
killing. :class:`FailurePlan` is the builder tests use: it travels to the training
processes as environment variables (``TORCHLOOM_FAIL_AT``, ``TORCHLOOM_SLOW``,
``TORCHLOOM_NAN_AT``, ``TORCHLOOM_DEVICE_TRACE``) and the training script asks
:func:`maybe_fail`, :func:`slowdown` and :func:`nan_steps` once per step.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Mapping, Sequence
from typing import Any

ENV_FAIL_AT = "TORCHLOOM_FAIL_AT"
ENV_SLOW = "TORCHLOOM_SLOW"
ENV_NAN_AT = "TORCHLOOM_NAN_AT"
ENV_DEVICE_TRACE = "TORCHLOOM_DEVICE_TRACE"  # read by torchloom.threadlet.device

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or ``"12"`` (seconds) → seconds.

    Raises:
        ValueError: not a duration.
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 500ms, 2m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def choose_victim(
    ranks: Sequence[Mapping[str, Any]], *, target: str, host: str, rng: random.Random
) -> Mapping[str, Any] | None:
    """The rank to kill next: a live rank on this host, of replica group ``target`` or any
    (``target="random"``), drawn with ``rng``; None when there is none."""
    live = [
        r
        for r in ranks
        if r.get("state") in ("training", "joining", "paused", "suspect", "hung")
        and r.get("host") == host
        and r.get("pid")
    ]
    if target != "random":
        live = [r for r in live if str(r.get("replica_id")) == target]
    live.sort(key=lambda r: (str(r["replica_id"]), int(r["rank"])))
    return rng.choice(live) if live else None


class FailurePlan:
    """Builder of crashes at chosen steps: ``FailurePlan().fail_at("1", 120).env()``."""

    def __init__(self) -> None:
        self._items: dict[str, list[str]] = {}

    def _add(self, env: str, *fields: object) -> FailurePlan:
        self._items.setdefault(env, []).append(":".join(str(f) for f in fields))
        return self

    def fail_at(self, replica: str, step: int) -> FailurePlan:
        """Make every rank of replica group ``replica`` die (SIGKILL) before running ``step``."""
        return self._add(ENV_FAIL_AT, replica, int(step))

    def slow(self, replica: str, *, from_step: int, factor: float) -> FailurePlan:
        """From ``from_step`` on, make ``replica``'s compute take ``factor`` times as long (a
        slower device: the extra time grows with the batch, as a slow GPU's would)."""
        return self._add(ENV_SLOW, replica, int(from_step), float(factor))

    def nan_at(self, replica: str, step: int) -> FailurePlan:
        """Make ``replica``'s loss NaN at ``step`` (so its gradients are NaN too)."""
        return self._add(ENV_NAN_AT, replica, int(step))

    def degrade(self, replica: str, *, after_s: float, rate: float = 1.0) -> FailurePlan:
        """Make ``replica``'s device telemetry degrade from ``after_s`` seconds after its
        Threadlet starts (:func:`torchloom.threadlet.device.degradation`)."""
        return self._add(ENV_DEVICE_TRACE, replica, float(after_s), float(rate))

    def env(self) -> dict[str, str]:
        """The environment to give the training processes."""
        return {k: ",".join(v) for k, v in self._items.items()}


def _items(env_name: str, replica_id: str, env: Mapping[str, str] | None) -> list[list[str]]:
    spec = (env if env is not None else os.environ).get(env_name, "")
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        fields = item.split(":")
        if fields[0] == replica_id:
            out.append(fields[1:])
    return out


def slowdown(replica_id: str, env: Mapping[str, str] | None = None) -> tuple[int, float] | None:
    """``(from_step, factor)`` of this replica group's injected slowdown, from ``TORCHLOOM_SLOW``."""
    for fields in _items(ENV_SLOW, replica_id, env):
        if len(fields) == 2:
            return int(fields[0]), float(fields[1])
    return None


def nan_steps(replica_id: str, env: Mapping[str, str] | None = None) -> frozenset[int]:
    """The steps at which this replica group's loss is made NaN, from ``TORCHLOOM_NAN_AT``."""
    return frozenset(int(f[0]) for f in _items(ENV_NAN_AT, replica_id, env) if f and f[0].isdigit())


def failure_steps(replica_id: str, env: Mapping[str, str] | None = None) -> frozenset[int]:
    """The steps at which this replica group must crash, from ``TORCHLOOM_FAIL_AT``."""
    return frozenset(
        int(f[0]) for f in _items(ENV_FAIL_AT, replica_id, env) if f and f[0].isdigit()
    )


def maybe_fail(step: int, steps: frozenset[int]) -> None:
    """SIGKILL this process if ``step`` is one of ``steps`` (a crash, not an exit)."""
    if step in steps:
        os.kill(os.getpid(), signal.SIGKILL)
