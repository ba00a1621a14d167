"""Keep Python's garbage collector from pausing the Weaver's loop while it holds many ranks."""

from __future__ import annotations

import asyncio
import gc
import time


async def freeze_long_lived(*, every_s: float = 10.0, thaw_every_s: float = 600.0) -> None:
    """Keep full garbage collections short, until cancelled.

    A full collection visits every item of every container: with 10,000 ranks' windows that
    is millions of items and a ~200 ms pause of the loop, several times a minute under
    10,000 messages/s. Every ``every_s`` seconds what has lived that long is frozen
    (``gc.freeze``: the collector skips it; reference counting still frees it); every
    ``thaw_every_s`` seconds it is unfrozen once, so that reference cycles among old objects
    are still found — one full pause per ``thaw_every_s``.
    """
    thawed = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        if time.monotonic() - thawed >= thaw_every_s:
            gc.unfreeze()
            thawed = time.monotonic()
        else:
            gc.freeze()
