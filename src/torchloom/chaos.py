"""Fault injection: kill ranks on a schedule (``torchloom chaos``) or at chosen steps (``fail_at``).

Deciding is pure (:func:`choose_victim`, :func:`parse_duration`); the CLI does the
killing. :class:`FailurePlan` is the builder tests use to make a replica group crash
at a given step: it travels to the training processes as ``TORCHLOOM_FAIL_AT``
and :func:`maybe_fail` (called once per step by the training script) SIGKILLs the
process when its step comes.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Mapping, Sequence
from typing import Any

ENV_FAIL_AT = "TORCHLOOM_FAIL_AT"

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
        self._points: list[tuple[str, int]] = []

    def fail_at(self, replica: str, step: int) -> FailurePlan:
        """Make every rank of replica group ``replica`` die (SIGKILL) before running ``step``."""
        self._points.append((str(replica), int(step)))
        return self

    def env(self) -> dict[str, str]:
        """The environment to give the training processes."""
        return {ENV_FAIL_AT: ",".join(f"{r}:{s}" for r, s in self._points)}


def failure_steps(replica_id: str, env: Mapping[str, str] | None = None) -> frozenset[int]:
    """The steps at which this replica group must crash, from ``TORCHLOOM_FAIL_AT``."""
    spec = (env if env is not None else os.environ).get(ENV_FAIL_AT, "")
    steps = set()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        replica, _, step = item.partition(":")
        if replica == replica_id and step.isdigit():
            steps.add(int(step))
    return frozenset(steps)


def maybe_fail(step: int, steps: frozenset[int]) -> None:
    """SIGKILL this process if ``step`` is one of ``steps`` (a crash, not an exit)."""
    if step in steps:
        os.kill(os.getpid(), signal.SIGKILL)
