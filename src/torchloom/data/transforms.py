"""Data transforms that are switched on, off or re-parameterised at runtime, by name.

Each transform is a knob (a :class:`~torchloom.protocol.KnobSpec` the script
registers with ``torchloom.init(custom_knobs=transforms.knobs())``) and a
builder that turns the knob's value into a per-sample function, or into None
to leave the transform out::

    transforms = Transforms()
    transforms.register(
        KnobSpec(name="noise_std", type="float", min=0.0, max=2.0, allow_off=True),
        lambda std: None if not std else AddNoise(std),
    )
    # torchloom set noise_std=0.1   → added from the effective step
    # torchloom set noise_std=off   → removed from the effective step

Transforms run in the data-loader workers (:class:`~torchloom.data.ElasticLoader`)
in registration order, each sample ``sample -> sample``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torchloom.protocol import KnobSpec
from torchloom.protocol.knobs import check_spec

Transform = Callable[[Any], Any]
"""One sample in, one sample out (e.g. ``(image [1,28,28] float32, label) -> same``)."""

Settings = tuple[tuple[str, Any], ...]
"""The values of every registered transform knob, in registration order (hashable)."""


class Transforms:
    """A registry of named, runtime-switchable transforms."""

    def __init__(self) -> None:
        self._specs: dict[str, KnobSpec] = {}
        self._builders: dict[str, Callable[[Any], Transform | None]] = {}
        self._built: dict[Settings, Transform | None] = {}

    def register(self, spec: KnobSpec, build: Callable[[Any], Transform | None]) -> None:
        """Add a transform controlled by the knob ``spec``.

        Args:
            spec: the knob (its name names the transform); ``allow_off=True`` lets
                ``torchloom set NAME=off`` remove it.
            build: ``value -> Transform | None``; None leaves the transform out.
                Must be picklable when the loader's workers are spawned rather than forked.

        Raises:
            InvalidKnobError: a bad knob definition.
            ValueError: the name is already registered.
        """
        check_spec(spec)
        if spec.name in self._specs:
            raise ValueError(f"transform {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        self._builders[spec.name] = build

    def knobs(self) -> list[KnobSpec]:
        """The knobs to pass to ``torchloom.init(custom_knobs=...)``."""
        return list(self._specs.values())

    def settings(self, config: Mapping[str, Any]) -> Settings:
        """The transform knobs' values in ``config`` (None where unset)."""
        return tuple((name, config.get(name)) for name in self._specs)

    def compose(self, settings: Settings) -> Transform | None:
        """The per-sample function for ``settings`` (cached), or None when every transform is off."""
        if settings in self._built:
            return self._built[settings]
        steps = [
            fn
            for name, value in settings
            if name in self._builders and (fn := self._builders[name](value)) is not None
        ]

        def apply(sample: Any) -> Any:
            for fn in steps:
                sample = fn(sample)
            return sample

        built = apply if steps else None
        self._built[settings] = built
        return built
