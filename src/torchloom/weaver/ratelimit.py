"""Request rate per client at the control entry point: a token bucket per requester.

Pure (time is a parameter). A requester is what the request says it is
(``requested_by``: ``cli:user@host``, ``web:<address>``, ``policy:<name>``): NATS does not
tell the Weaver which credentials sent a message, so this is a guard against a runaway
script or page flooding the Weaver and the ranks with versions, not an identity check
(that is the server's permissions, :mod:`torchloom.secure`).
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """Token buckets: each key may make ``burst`` requests at once, refilled at ``rate_per_s``.

    Args:
        rate_per_s: sustained requests per second per key.
        burst: bucket size (requests allowed back to back).
        max_keys: keys remembered; beyond it the least recently seen is forgotten (bounded
            memory whatever the requesters claim to be).
    """

    def __init__(self, *, rate_per_s: float, burst: int, max_keys: int = 10_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket at time ``now`` (seconds); False: none left."""
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate_per_s)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if not ok:
            self.refused += 1
        return ok
