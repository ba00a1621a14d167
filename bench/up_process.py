"""`torchloom up` in its own process for benchmarks, started as users start it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from torchloom.paths import read_endpoint


class UpProcess:
    """`torchloom up` in its own process (NATS + Weaver [+ dashboard]), as users run it: the
    Weaver must not share a GIL with what is being measured.

    Args:
        state_dir: its state dir.
        args: extra `torchloom up` arguments (default: no lighthouse, no dashboard).
    """

    def __init__(self, state_dir: Path, *args: str) -> None:
        exe = Path(sys.executable).parent / "torchloom"
        self.proc = subprocess.Popen(
            [
                str(exe),
                "up",
                "--state-dir",
                str(state_dir),
                "--lighthouse",
                "none",
                *(args or ("--no-ui",)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while (ep := read_endpoint(state_dir)) is None or ep.get("pid") != self.proc.pid:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("torchloom up did not start")
            time.sleep(0.05)
        self.nats_url: str = ep["nats_url"]
        self.ui_url: str | None = ep.get("ui_url")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
