"""What a policy is: a pure ``decide(now, state) -> [Decision]``, and the robust statistics they share.

A policy reads the Weaver's state (the DR map, each rank's recent
:class:`~torchloom.weaver.state.RankWindow`, the desired configs, and
:attr:`~torchloom.weaver.state.WeaverState.acted` for its own past actions) and
returns decisions; it never does I/O and never mutates the state. The engine
(:mod:`~torchloom.weaver.policies.engine`) sends each decision through the one
control entry point, like a person's action, and records it with its reason
and the features it saw.

Writing one (the entry-point group ``torchloom.policies``; see
``examples/policies/``)::

    class Params(msgspec.Struct, kw_only=True):
        threshold: float = 3.0
        cooldown_s: float = 60.0

    class MyPolicy:
        name = "my_policy"
        doc = "one line for `torchloom policy list`"
        Params = Params

        def __init__(self, params: Params) -> None:
            self.params = params

        def decide(self, now: float, state: WeaverState) -> list[Decision]:
            ...
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import msgspec

from torchloom.protocol import ControlRequest

Action = Literal["set", "drain", "pause", "checkpoint", "rollback", "alert"]


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing a policy wants done, with why.

    Attributes:
        policy: the deciding policy's name.
        job_id: the job it acts on.
        action: ``set`` (knob ``values``, job-wide or for ``replica_id``), ``drain``
            (``replica_id`` or ``device``, ``replace``), ``pause``, ``checkpoint``,
            ``rollback`` (``values``: ``to`` and knob changes), or ``alert`` (history only).
        reason: one human sentence with the numbers that led to it.
        key: what it acts on, e.g. ``straggler/mnist/1``: the engine holds back a
            decision whose key was acted on within the policy's ``cooldown_s``.
        features: the state features the policy saw (numbers and short strings),
            kept in the history and exported as trajectories.
    """

    policy: str
    job_id: str
    action: Action
    reason: str
    key: str
    values: dict[str, Any] = field(default_factory=dict)
    replica_id: str | None = None
    device: str | None = None
    replace: bool = False
    features: dict[str, Any] = field(default_factory=dict)

    def request(self) -> ControlRequest | None:
        """The control request that carries the decision out (None for an alert)."""
        if self.action == "alert":
            return None
        return ControlRequest(
            op=self.action,
            job_id=self.job_id,
            replica_id=self.replica_id,
            values=dict(self.values),
            device=self.device,
            replace=self.replace,
            reason=self.reason,
            requested_by=f"policy:{self.policy}",
        )


class Policy(Protocol):
    """The interface of a policy class (built in or from the ``torchloom.policies`` entry points).

    ``Params`` is a ``msgspec.Struct`` with defaults for every field (units in the
    names); a policy may define ``check(params)`` raising ``ValueError`` for
    values out of range. ``cooldown_s`` in it, if present, is honoured by the engine.
    """

    name: ClassVar[str]
    doc: ClassVar[str]
    Params: ClassVar[type[msgspec.Struct]]
    params: Any

    def decide(self, now: float, state: Any) -> list[Decision]: ...


def per_job(state: Any, decide_job: Callable[[Any], Decision | None]) -> list[Decision]:
    """``decide_job(job)`` for every job of ``state``, the decisions it made (policies that
    decide one job at a time)."""
    return [d for job in state.jobs.values() if (d := decide_job(job)) is not None]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def mad(xs: Sequence[float], center: float | None = None) -> float:
    """Median absolute deviation (unscaled; × 1.4826 estimates σ for normal data)."""
    c = median(xs) if center is None else center
    return median([abs(x - c) for x in xs])


def median_without(ordered: Sequence[float], j: int) -> float:
    """The median of sorted ``ordered`` without its element at index ``j``, in O(1).

    Raises:
        ValueError: fewer than two elements.
    """
    n = len(ordered) - 1
    if n < 1:
        raise ValueError("the median of nothing")

    def at(i: int) -> float:
        return ordered[i] if i < j else ordered[i + 1]

    mid = n // 2
    return at(mid) if n % 2 else (at(mid - 1) + at(mid)) / 2.0


def robust_z(x: float, xs: Sequence[float], *, floor: float) -> float:
    """``(x - median) / (1.4826 · MAD)``, the MAD floored at ``floor`` (same unit as ``x``)
    so that a window of near-identical values does not turn noise into huge scores."""
    c = median(xs)
    return (x - c) / max(1.4826 * mad(xs, c), floor)


def finite(xs: Iterable[float | None]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]
