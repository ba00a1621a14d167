"""Time series for the dashboard's charts, in bounded memory; pure data, no I/O.

:class:`Series` holds aligned columns (one timestamp list, one list per column,
``None`` where a column had no value) as uPlot draws them. When it is full,
every other point is dropped and from then on only every second sample is
kept: the whole run stays visible at a resolution that halves each time the
run doubles, and memory never grows past ``capacity`` points per column
(the decimation of RRDtool / Graphite's roll-ups, without their fixed tiers).
"""

from __future__ import annotations

from torchloom.weaver.web.schema import SeriesView


class Series:
    """Aligned time series of bounded length.

    Args:
        capacity: points kept per column (at least 4); older points are thinned.

    Attributes:
        ts: sample times, Unix seconds, ascending.
        columns: column name → values aligned with ``ts`` (``None`` = no value).
        stride: only every ``stride``-th offered sample is kept (doubles when full).
    """

    def __init__(self, *, capacity: int = 720) -> None:
        if capacity < 4:
            raise ValueError(f"capacity must be at least 4 points, got {capacity}")
        self.capacity = capacity
        self.ts: list[float] = []
        self.columns: dict[str, list[float | None]] = {}
        self.stride = 1
        self._offered = 0

    def add(self, ts: float, values: dict[str, float | None]) -> bool:
        """Offer one sample at ``ts`` (Unix s); returns True if it was kept.

        A column seen for the first time is back-filled with ``None``; a column
        missing from ``values`` gets ``None`` at this point.
        """
        self._offered += 1
        if (self._offered - 1) % self.stride:
            return False
        if len(self.ts) >= self.capacity:
            self._thin()
        n = len(self.ts)
        for name in values:
            if name not in self.columns:
                self.columns[name] = [None] * n
        self.ts.append(ts)
        for name, col in self.columns.items():
            col.append(values.get(name))
        return True

    def _thin(self) -> None:
        self.ts = self.ts[::2]
        self.columns = {k: v[::2] for k, v in self.columns.items()}
        self.stride *= 2

    def since(self, ts: float) -> SeriesView:
        """The points after ``ts`` (Unix s) as ``{"ts": [...], "columns": {name: [...]}}``."""
        start = len(self.ts)
        while start > 0 and self.ts[start - 1] > ts:
            start -= 1
        return {
            "ts": self.ts[start:],
            "columns": {k: v[start:] for k, v in self.columns.items()},
        }
