"""The knob registry: names, types, bounds and scopes of runtime-mutable parameters.

A knob is a training parameter that the Weaver may change while the run trains.
Built-in knobs are listed in :data:`BUILTIN_KNOBS`; a training script adds its
own with :class:`KnobSpec` through ``torchloom.init(custom_knobs=[...])``.
Validation is pure: :func:`coerce` turns a raw value (a JSON value, or a string
from the command line) into the knob's type or raises
:class:`~torchloom.errors.InvalidKnobError` naming the knob and the rule broken.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import msgspec

from torchloom.errors import InvalidKnobError
from torchloom.protocol.compression import CODEC_PATTERN, OPTIMIZERS

KnobType = Literal["float", "int", "bool", "str"]
KnobScope = Literal["job", "replica"]

_OFF_WORDS = {"off", "none", "null"}
TRUE_WORDS = frozenset({"true", "on", "yes", "1"})
FALSE_WORDS = frozenset({"false", "off", "no", "0"})


class KnobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How one knob may be set.

    Attributes:
        name: the knob's name, as used in ``torchloom set NAME=VALUE``.
        type: ``float``, ``int``, ``bool`` or ``str``.
        min: lower bound (inclusive unless ``min_exclusive``), or None.
        max: upper bound (inclusive), or None.
        min_exclusive: whether ``min`` itself is refused (``lr > 0``).
        allow_off: whether the knob may be switched off (value ``None``, typed
            ``off`` on the command line), e.g. ``grad_clip``.
        scope: ``replica`` if it may differ between replica groups, ``job`` if
            it must be the same job-wide (``sync_every``, ``max_steps``).
        consistent: whether every rank must change it at the same effective
            step (True for anything that affects the math of a step).
        choices: allowed values of a ``str`` knob, or None for any string.
        multiple_of: an ``int`` knob's values must be multiples of this, or None
            (DiLoCo's ``sync_every`` with several model fragments).
        pattern: a ``str`` knob's values must match this regular expression in full, or None.
        example: a valid value, shown in the knob's rule instead of ``pattern``.
        doc: one line shown in ``torchloom knobs`` and the dashboard.
    """

    name: str
    type: KnobType
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    allow_off: bool = False
    scope: KnobScope = "replica"
    consistent: bool = True
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None
    pattern: str | None = None
    example: str | None = None
    doc: str = ""

    def rule(self) -> str:
        """A short human description of the allowed values, e.g. ``float > 0``."""
        parts: list[str] = [self.type]
        if self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {_fmt(self.min)}")
        if self.max is not None:
            parts.append(f"{'and ' if self.min is not None else ''}<= {_fmt(self.max)}")
        if self.choices:
            parts.append("in {" + ", ".join(self.choices) + "}")
        text = " ".join(parts)
        if self.multiple_of is not None:
            text += f", a multiple of {self.multiple_of}"
        if self.pattern is not None:
            text += f" like {self.example or repr(self.pattern)}"
        return f"{text} or off" if self.allow_off else text


_WEIGHT = r"(?:\d+(?:\.\d*)?|\.\d+)"
WEIGHTS_PATTERN = rf"[A-Za-z0-9_-]{{1,64}}:{_WEIGHT}(?:,[A-Za-z0-9_-]{{1,64}}:{_WEIGHT})*"
"""``batch_weights``: ``replica_id:weight`` pairs, e.g. ``0:1,1:0.55``."""


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


BUILTIN_KNOBS: dict[str, KnobSpec] = {
    k.name: k
    for k in (
        KnobSpec(
            name="lr",
            type="float",
            min=0.0,
            min_exclusive=True,
            max=1e3,
            doc="learning rate of every bound optimizer param group",
        ),
        KnobSpec(
            name="batch_size", type="int", min=1, max=1 << 20, doc="per-rank batch size, in samples"
        ),
        KnobSpec(
            name="grad_clip",
            type="float",
            min=0.0,
            allow_off=True,
            doc="max total gradient norm (clip_grad_norm_), or off",
        ),
        KnobSpec(
            name="max_steps",
            type="int",
            min=1,
            max=1 << 40,
            scope="job",
            doc="the step at which every rank stops",
        ),
        KnobSpec(
            name="sync_every",
            type="int",
            min=1,
            max=1 << 20,
            scope="job",
            doc="inner steps between outer syncs (LocalSGD / DiLoCo)",
        ),
        KnobSpec(
            name="global_batch_size",
            type="int",
            min=1,
            max=1 << 24,
            allow_off=True,
            scope="job",
            doc="samples per step over all replica groups, held as groups come and go; off: per-rank batch_size",
        ),
        KnobSpec(
            name="max_batch_size",
            type="int",
            min=1,
            max=1 << 20,
            allow_off=True,
            doc="largest micro-batch per rank; a larger share is split into gradient-accumulation steps",
        ),
        KnobSpec(
            name="max_memory_gb",
            type="float",
            min=0.0,
            min_exclusive=True,
            max=1e6,
            allow_off=True,
            doc="memory budget per rank, GB (1e9 bytes): micro-batches shrink to stay within it (torchloom.memory)",
        ),
        KnobSpec(
            name="batch_weights",
            type="str",
            allow_off=True,
            scope="job",
            pattern=WEIGHTS_PATTERN,
            example="0:1,1:0.5",
            doc="shares of global_batch_size per replica group, e.g. 0:1,1:0.5 (unlisted: 1); off: even",
        ),
        KnobSpec(
            name="skip_nonfinite",
            type="bool",
            doc="zero a step's gradients on the device when their norm is NaN/Inf (Run.guard_gradients)",
        ),
        KnobSpec(
            name="lr_scaling",
            type="str",
            choices=("none", "linear", "sqrt"),
            scope="job",
            doc="scale lr when global_batch_size changes: linear (Goyal et al. 2017) or sqrt (Krizhevsky 2014)",
        ),
        KnobSpec(
            name="weight_decay",
            type="float",
            min=0.0,
            max=10.0,
            doc="weight decay of every bound optimizer param group",
        ),
        KnobSpec(
            name="momentum",
            type="float",
            min=0.0,
            max=1.0,
            doc="SGD momentum (or beta1 of Adam-like optimizers)",
        ),
        KnobSpec(
            name="grad_compression",
            type="str",
            scope="job",
            pattern=CODEC_PATTERN,
            example="none, bf16, fp16, powersgd:R (1 ≤ R ≤ 64) or topk:F (0 < F < 1)",
            doc="how gradients travel in the allreduce: none, bf16, fp16, powersgd:R, topk:F (torchloom.comm)",
        ),
        KnobSpec(
            name="optimizer",
            type="str",
            scope="job",
            choices=OPTIMIZERS,
            doc="the optimizer, rebuilt at the effective step with its state mapped (torchloom.optim)",
        ),
        KnobSpec(
            name="beta2",
            type="float",
            min=0.0,
            max=1.0,
            min_exclusive=True,
            doc="second-moment decay of AdamW (and Muon's AdamW part), Lion's β2",
        ),
        KnobSpec(
            name="collective_timeout_s",
            type="float",
            min=0.1,
            max=3600.0,
            scope="job",
            doc="torchft: a collective, heal or commit not done in this many seconds fails the step",
        ),
        KnobSpec(
            name="quorum_timeout_s",
            type="float",
            min=0.1,
            max=3600.0,
            scope="job",
            doc="torchft: the longest wait for a step's quorum, in seconds",
        ),
        KnobSpec(
            name="failure_timeout_s",
            type="float",
            min=0.2,
            max=3600.0,
            allow_off=True,
            scope="job",
            consistent=False,
            doc="Weaver: no heartbeat for this long → failed (suspect at 60 %); off: the Weaver's default",
        ),
        KnobSpec(
            name="hang_timeout_s",
            type="float",
            min=0.5,
            max=86400.0,
            allow_off=True,
            scope="job",
            consistent=False,
            doc="Weaver: a rank whose step has not moved for this long is hung (off: the Weaver's default)",
        ),
    )
}


def coerce(spec: KnobSpec, raw: Any) -> Any:
    """Convert ``raw`` to the knob's type and check its bounds.

    Args:
        spec: the knob's registry entry.
        raw: a JSON value, or a string as typed on the command line.

    Returns:
        The value as ``float``, ``int``, ``bool``, ``str`` or ``None`` (off).

    Raises:
        InvalidKnobError: wrong type, out of bounds, not a finite number, or
            ``off`` for a knob that cannot be switched off.
    """
    if _means_off(spec, raw):
        if spec.allow_off:
            return None
        raise InvalidKnobError(spec.name, f"cannot be switched off; must be {spec.rule()}")
    value = _to_type(spec, raw)
    if spec.type in ("float", "int"):
        _check_bounds(spec, value)
    if spec.choices is not None and value not in spec.choices:
        raise InvalidKnobError(spec.name, f"{value!r} is not one of {list(spec.choices)}")
    if spec.multiple_of is not None and value % spec.multiple_of:
        raise InvalidKnobError(spec.name, f"{value!r} is not a multiple of {spec.multiple_of}")
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        form = (
            f"is not of the form {spec.example}"
            if spec.example
            else f"does not match {spec.pattern!r}"
        )
        raise InvalidKnobError(spec.name, f"{value!r} {form}")
    return value


def _means_off(spec: KnobSpec, raw: Any) -> bool:
    """Whether ``raw`` switches the knob off: None, or an off word (``off``, ``none``,
    ``null``) that is not itself a value of the knob (``off`` of a bool is False; a
    choice named ``none``, or ``none`` where the knob's pattern takes it, is that value)."""
    if raw is None:
        return True
    if not isinstance(raw, str) or raw.strip().lower() not in _OFF_WORDS:
        return False
    if spec.type == "bool" and raw.strip().lower() == "off":
        return False
    if spec.pattern is not None and re.fullmatch(spec.pattern, raw):
        return False  # a value of the knob (grad_compression=none)
    return not (spec.choices is not None and raw in spec.choices)


def _to_type(spec: KnobSpec, raw: Any) -> Any:
    bad = InvalidKnobError(spec.name, f"{raw!r} is not a valid {spec.type}; must be {spec.rule()}")
    if spec.type == "str":
        if not isinstance(raw, str):
            raise bad
        return raw
    if spec.type == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in TRUE_WORDS | FALSE_WORDS:
            return raw.lower() in TRUE_WORDS
        raise bad
    if isinstance(raw, bool):
        raise bad
    if isinstance(raw, str):
        raw = _parse_number(raw)
        if raw is None:
            raise bad
    if not isinstance(raw, (int, float)):
        raise bad
    if spec.type == "float":
        value = float(raw)
        if not math.isfinite(value):
            raise InvalidKnobError(spec.name, f"{raw!r} is not a finite number")
        return value
    if isinstance(raw, float):
        if not raw.is_integer():
            raise InvalidKnobError(spec.name, f"{raw!r} is not an integer; must be {spec.rule()}")
        raw = int(raw)
    return int(raw)


def _parse_number(text: str) -> int | float | None:
    for parse in (int, float):
        try:
            return parse(text.strip())
        except ValueError:
            continue
    return None


def _check_bounds(spec: KnobSpec, value: float) -> None:
    if spec.min is not None:
        if spec.min_exclusive and not value > spec.min:
            raise InvalidKnobError(spec.name, f"{value!r} must be > {_fmt(spec.min)}")
        if not spec.min_exclusive and value < spec.min:
            raise InvalidKnobError(spec.name, f"{value!r} must be >= {_fmt(spec.min)}")
    if spec.max is not None and value > spec.max:
        raise InvalidKnobError(spec.name, f"{value!r} must be <= {_fmt(spec.max)}")


def check_spec(spec: KnobSpec) -> KnobSpec:
    """Validate a custom knob definition sent by a training script.

    Raises:
        InvalidKnobError: bad name, bounds the wrong way round, ``multiple_of``
            on a non-int knob, or a redefinition of a built-in knob with another
            type or with ``replica`` scope where the built-in is job-wide (a script
            may narrow a built-in knob, not loosen it).
    """
    if not spec.name.isidentifier():
        raise InvalidKnobError(spec.name, "a knob name must be a Python identifier")
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise InvalidKnobError(spec.name, f"min {spec.min} > max {spec.max}")
    if spec.multiple_of is not None and (spec.type != "int" or spec.multiple_of < 1):
        raise InvalidKnobError(spec.name, "multiple_of must be a positive int, for an int knob")
    if spec.pattern is not None:
        if spec.type != "str":
            raise InvalidKnobError(spec.name, "pattern is for a str knob")
        try:
            re.compile(spec.pattern)
        except re.error as exc:
            raise InvalidKnobError(spec.name, f"pattern does not compile: {exc}") from None
    builtin = BUILTIN_KNOBS.get(spec.name)
    if builtin is not None and builtin.type != spec.type:
        raise InvalidKnobError(
            spec.name, f"is built in as {builtin.type}; cannot be redefined as {spec.type}"
        )
    if builtin is not None and builtin.scope == "job" and spec.scope != "job":
        raise InvalidKnobError(spec.name, "is job-wide; cannot be redefined per replica group")
    return spec


def coerce_all(registry: dict[str, KnobSpec], raw_values: dict[str, Any]) -> dict[str, Any]:
    """Validate every ``name=value`` of a request; all or nothing.

    Raises:
        InvalidKnobError: for the first unknown knob or bad value (sorted by name).
    """
    out: dict[str, Any] = {}
    for name in sorted(raw_values):
        spec = registry.get(name)
        if spec is None:
            known = ", ".join(sorted(registry))
            raise InvalidKnobError(name, f"unknown knob; known knobs: {known}")
        out[name] = coerce(spec, raw_values[name])
    return out
