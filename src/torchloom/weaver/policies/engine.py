"""The policy engine: which policies run, with what parameters, and which decisions go out.

It holds one instance per policy (built in, or loaded from the ``torchloom.policies``
entry-point group), each one's settings (``enabled``, ``dry_run``, ``params``), and
filters the decisions: one per key per round, none for a key acted on within
the policy's ``cooldown_s`` (read from :attr:`WeaverState.acted`). Pure: the
Weaver service calls :meth:`PolicyEngine.decide` on its tick and carries the
decisions out through its control entry point.

Settings come from a TOML file (``torchloom up --policies FILE``)::

    [straggler]
    enabled = true
    mitigation = "rebalance"   # any other key is a parameter
    slow_ratio = 1.3

    [failure]
    dry_run = true

and live from ``torchloom policy enable|disable|set``.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from torchloom.errors import InvalidRequestError
from torchloom.protocol.knobs import FALSE_WORDS, TRUE_WORDS
from torchloom.weaver.policies.base import Decision, Policy
from torchloom.weaver.policies.checkpoint_interval import CheckpointIntervalPolicy
from torchloom.weaver.policies.divergence import DivergencePolicy
from torchloom.weaver.policies.failure import FailurePolicy
from torchloom.weaver.policies.memory import MemoryPolicy
from torchloom.weaver.policies.network import NetworkPolicy
from torchloom.weaver.policies.straggler import StragglerPolicy
from torchloom.weaver.policies.sync_period import SyncPeriodPolicy
from torchloom.weaver.policies.timeouts import TimeoutPolicy
from torchloom.weaver.state import RankKey, WeaverState

log = logging.getLogger("torchloom.weaver")

ENTRY_POINT_GROUP = "torchloom.policies"

P = TypeVar("P")

BUILTIN: tuple[type[Any], ...] = (
    StragglerPolicy,
    DivergencePolicy,
    FailurePolicy,
    SyncPeriodPolicy,
    CheckpointIntervalPolicy,
    TimeoutPolicy,
    NetworkPolicy,
    MemoryPolicy,
)


DEFAULT_ENABLED = frozenset({"straggler", "divergence", "failure", "checkpoint", "memory"})
"""On unless settings say otherwise (``memory`` acts only where ``max_memory_gb`` is set); ``sync_every`` and ``network`` change the optimisation
trade-off, and ``timeouts`` the failure detection, so they wait to be enabled."""


@dataclass(slots=True)
class Slot:
    """One policy and its settings."""

    policy: Policy
    enabled: bool = True
    dry_run: bool = False
    source: str = "builtin"
    errors: int = 0


def discover() -> dict[str, tuple[type[Any], str]]:
    """Built-in policy classes and those of installed plugins: ``{name: (class, source)}``.

    A plugin that fails to load is logged and left out; it never stops the Weaver.
    """
    found: dict[str, tuple[type[Any], str]] = {cls.name: (cls, "builtin") for cls in BUILTIN}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            name = str(cls.name)
            if name in found:
                raise ValueError(f"policy name {name!r} is taken")
            _check_class(cls)
        except Exception as exc:
            log.error("policy plugin %s (%s) not loaded: %s", ep.name, ep.value, exc)
            continue
        found[name] = (cls, ep.value)
    return found


def _check_class(cls: Any) -> None:
    for attr in ("name", "doc", "Params", "decide"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls!r} has no {attr!r} (see torchloom.weaver.policies.base)")


def _params(cls: Any, raw: Mapping[str, Any], base: Any | None = None) -> Any:
    """``cls.Params`` from ``raw`` (strings from the command line are converted) over ``base``.

    Raises:
        InvalidRequestError: an unknown parameter, a wrong type, or a value the policy refuses.
    """
    current = msgspec.structs.asdict(base) if base is not None else {}
    fields = {f.name for f in msgspec.structs.fields(cls.Params)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise InvalidRequestError(
            f"policy {cls.name!r} has no parameter {', '.join(unknown)}; it has {', '.join(sorted(fields))}"
        )
    try:
        params = msgspec.convert({**current, **raw}, cls.Params, strict=False)
        cls(params)  # the policy's own checks
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"policy {cls.name!r}: {exc}") from None
    return params


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise InvalidRequestError(f"{name} must be true or false, got {value!r}")


class PolicyEngine:
    """The policies of one Weaver and their settings.

    Args:
        settings: per policy name: ``enabled``, ``dry_run`` and parameters (the TOML
            file's tables). Policies not named run with their defaults.
        enabled: policy names enabled when ``settings`` does not say (plugins: always).

    Raises:
        InvalidRequestError: an unknown policy or a bad parameter in ``settings``.
    """

    def __init__(
        self,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        enabled: frozenset[str] = DEFAULT_ENABLED,
    ) -> None:
        self.slots: dict[str, Slot] = {}
        for name, (cls, source) in discover().items():
            on = name in enabled or source != "builtin"
            self.slots[name] = Slot(cls(cls.Params()), enabled=on, source=source)
        for name, table in (settings or {}).items():
            self.update(name, dict(table))

    @classmethod
    def from_file(cls, path: Path) -> PolicyEngine:
        """Settings from a TOML file (see the module doc).

        Raises:
            InvalidRequestError: the file is missing, not TOML, or names a bad setting.
        """
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidRequestError(f"policy file {path}: {exc}") from None
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise InvalidRequestError(f"policy file {path}: {', '.join(bad)} must be [tables]")
        return cls(data)

    def update(
        self,
        name: str,
        changes: dict[str, Any],
    ) -> dict[str, Any]:
        """Change one policy: ``enabled``, ``dry_run`` (bools) and any of its parameters.

        Returns:
            The policy's description after the change (:meth:`describe`).

        Raises:
            InvalidRequestError: an unknown policy, parameter or value; nothing changes.
        """
        slot = self.slots.get(name)
        if slot is None:
            raise InvalidRequestError(
                f"unknown policy {name!r}; known: {', '.join(sorted(self.slots))}"
            )
        changes = dict(changes)
        flags = {k: changes.pop(k) for k in ("enabled", "dry_run") if k in changes}
        flag_values = {k: _flag(k, v) for k, v in flags.items()}
        cls: Any = type(slot.policy)
        if changes:
            slot.policy = cls(_params(cls, changes, slot.policy.params))
        slot.enabled = flag_values.get("enabled", slot.enabled)
        slot.dry_run = flag_values.get("dry_run", slot.dry_run)
        return self.describe(name)

    def describe(self, name: str) -> dict[str, Any]:
        slot = self.slots[name]
        return {
            "name": name,
            "enabled": slot.enabled,
            "dry_run": slot.dry_run,
            "source": slot.source,
            "doc": type(slot.policy).doc,
            "params": msgspec.structs.asdict(slot.policy.params),
            "errors": slot.errors,
        }

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(n) for n in sorted(self.slots)]

    def settings(self) -> dict[str, dict[str, Any]]:
        """Everything :meth:`update` needs to rebuild this engine (persisted by the Weaver)."""
        return {
            n: {
                "enabled": s.enabled,
                "dry_run": s.dry_run,
                **msgspec.structs.asdict(s.policy.params),
            }
            for n, s in self.slots.items()
        }

    def params(self, name: str) -> Any:
        return self.slots[name].policy.params

    def _policy(self, name: str, kind: type[P]) -> P:
        policy = self.slots[name].policy
        assert isinstance(policy, kind), f"{name} is not a {kind.__name__}"
        return policy

    def scores(
        self, now: float, state: WeaverState
    ) -> dict[RankKey, tuple[bool | None, float | None]]:
        """Per rank: flagged as a straggler, and its device's failure risk (None where the
        policy is off or has nothing to judge) — what the dashboard and API show."""
        out: dict[RankKey, tuple[bool | None, float | None]] = {}
        if self.slots["straggler"].enabled:
            for job in state.jobs.values():
                for key, a in (
                    self._policy("straggler", StragglerPolicy)
                    .assessed(job, now, state.updates)
                    .items()
                ):
                    out[key] = (a.flagged, None)
        if self.slots["failure"].enabled:
            for key, (risk, _) in (
                self._policy("failure", FailurePolicy).assessed(state, now).items()
            ):
                out[key] = (out.get(key, (None, None))[0], risk.score)
        return out

    def decide(self, now: float, state: WeaverState) -> list[tuple[Decision, bool]]:
        """Every enabled policy's decisions that may go out now, each with its ``dry_run`` flag.

        A policy that raises is counted and logged (once) and skipped this round.
        """
        out: list[tuple[Decision, bool]] = []
        seen: set[str] = set()
        for name, slot in sorted(self.slots.items()):
            if not slot.enabled:
                continue
            try:
                decisions = slot.policy.decide(now, state)
            except Exception:
                slot.errors += 1
                if slot.errors == 1:
                    log.exception("policy %s failed; it is skipped until it decides cleanly", name)
                continue
            cooldown_s = float(getattr(slot.policy.params, "cooldown_s", 0.0))
            for d in decisions:
                last = state.last_acted(d.key)
                if d.key in seen or (last is not None and now - last < cooldown_s):
                    continue
                seen.add(d.key)
                out.append((d, slot.dry_run))
        return out
