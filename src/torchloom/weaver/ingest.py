"""What the Weaver's intake costs and how late it is: counters and a lag histogram.

Lag is measured from a message's own ``ts`` (the sender's wall clock when it built the
message) to the moment the Weaver's state holds it, so it includes NATS, the client
library's queue and the Weaver's handler. Across hosts it also includes their clock
offset (negative lags count as 0). The histogram has fixed, geometric bucket bounds
(eight per decade, 0.1 ms to 100 s): one ``bisect`` and one increment per message, no
allocation, constant memory, and Prometheus can aggregate it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LAG_BOUNDS_S: tuple[float, ...] = tuple(float(f"{10 ** (k / 8) * 1e-4:.3g}") for k in range(49))
"""Upper bounds of the lag buckets in seconds: 0.1 ms × 10^(k/8), k = 0…48 (up to 100 s)."""


@dataclass(slots=True)
class IngestStats:
    """Counts of one kind of message (telemetry, rank events) and their lag.

    Attributes:
        messages: messages folded into the state.
        bytes: their payload bytes.
        lag_counts: messages per lag bucket; index ``i`` counts lags ≤ ``LAG_BOUNDS_S[i]``
            and above the previous bound, the last index those above 100 s.
        lag_sum_s: the sum of all lags, in seconds.
    """

    messages: int = 0
    bytes: int = 0
    lag_counts: list[int] = field(default_factory=lambda: [0] * (len(LAG_BOUNDS_S) + 1))
    lag_sum_s: float = 0.0

    def observe(self, *, nbytes: int, lag_s: float) -> None:
        """Count one message of ``nbytes`` bytes that took ``lag_s`` seconds to arrive."""
        lag_s = max(lag_s, 0.0)
        self.messages += 1
        self.bytes += nbytes
        self.lag_sum_s += lag_s
        self.lag_counts[bisect.bisect_left(LAG_BOUNDS_S, lag_s)] += 1

    def copy(self) -> IngestStats:
        return IngestStats(self.messages, self.bytes, list(self.lag_counts), self.lag_sum_s)

    def since(self, earlier: IngestStats) -> IngestStats:
        """The messages counted after ``earlier`` (a :meth:`copy` of this one) was taken."""
        return IngestStats(
            self.messages - earlier.messages,
            self.bytes - earlier.bytes,
            [a - b for a, b in zip(self.lag_counts, earlier.lag_counts, strict=True)],
            self.lag_sum_s - earlier.lag_sum_s,
        )

    def lag_quantile_s(self, q: float) -> float | None:
        """The ``q``-quantile (0 < q ≤ 1) of the lag in seconds, interpolated linearly inside
        its bucket (within ±15 % of the true value); None when nothing was counted.

        Raises:
            ValueError: ``q`` is not in (0, 1].
        """
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile {q} is not in (0, 1]")
        total = sum(self.lag_counts)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.lag_counts):
            if n and seen + n >= rank:
                lo = LAG_BOUNDS_S[i - 1] if i > 0 else 0.0
                hi = LAG_BOUNDS_S[i] if i < len(LAG_BOUNDS_S) else LAG_BOUNDS_S[-1]
                return lo + (hi - lo) * (rank - seen) / n
            seen += n
        return LAG_BOUNDS_S[-1]  # unreachable: the counts sum to total
