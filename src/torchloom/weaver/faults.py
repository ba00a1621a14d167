"""Crash points for the Weaver's own crash tests (``tests/integration/test_failover.py``)."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("torchloom.weaver")

ENV_CRASH_AT = "TORCHLOOM_WEAVER_CRASH_AT"
"""Fault injection for crash tests: ``before_config_write:<op>`` or
``after_config_write:<op>`` makes the Weaver ``SIGKILL`` its own process at that point of
the first ``<op>`` request (``set``, ``drain``, …): before its KV write, or after the write
was acknowledged but before its history entry and the reply."""


class CrashPoints:
    """Reads :data:`ENV_CRASH_AT` once; :meth:`maybe_crash` kills the process at the point named."""

    def __init__(self) -> None:
        self.at = os.environ.get(ENV_CRASH_AT, "")

    def maybe_crash(self, point: str, op: str) -> None:
        if self.at == f"{point}:{op}":
            log.error("fault injection (%s): killing this weaver at %s", ENV_CRASH_AT, point)
            os.kill(os.getpid(), signal.SIGKILL)
