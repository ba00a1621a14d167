"""The terminal's view of the history while `torchloom up` serves: printed off the Weaver's loop."""

from __future__ import annotations

import threading
from collections import deque

from rich.console import Console

from torchloom.cli.render import event_lines
from torchloom.protocol import HistoryEvent


class EventPrinter:
    """Prints the Weaver's history events from its own thread, in batches.

    The Weaver calls :meth:`add` on its loop — a deque append, no terminal I/O there — and
    every ``interval_s`` seconds the printer prints what came, at most ``max_per_kind``
    lines per job and kind and a count of the rest. Beyond ``max_pending`` unprinted
    events the oldest are not printed (they are in the history all the same).

    Args:
        console: where to print.
        interval_s: how often to print, in seconds.
        max_per_kind: lines per job and event kind in one batch.
        max_pending: events kept between batches.
    """

    def __init__(
        self,
        console: Console,
        *,
        interval_s: float = 0.2,
        max_per_kind: int = 5,
        max_pending: int = 10_000,
    ) -> None:
        self.console = console
        self.interval_s = interval_s
        self.max_per_kind = max_per_kind
        self._pending: deque[HistoryEvent] = deque(maxlen=max_pending)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="torchloom-events", daemon=True)

    def add(self, ev: HistoryEvent) -> None:
        self._pending.append(ev)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Print what is left and end the thread."""
        self._stop.set()
        self._thread.join(5.0)

    def flush(self) -> None:
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        for line in event_lines(batch, max_per_kind=self.max_per_kind):
            self.console.print(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()
        self.flush()
