from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Up
from torchloom.nats_server import NatsServer


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a free loopback port, for one test."""
    server = NatsServer(store_dir=tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """A real `torchloom up` (embedded NATS + Weaver) with a short hang timeout."""
    proc = Up(tmp_path / "state", "--hang-timeout-s", "3")
    yield proc
    proc.stop()


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (scripts/browser.sh installs it).

    Module-scoped: Playwright's sync API runs an event loop on the main thread while it is
    open, and the other tests' clients call ``asyncio.run`` there.

    Not skipped when missing: the dashboard tests are part of the suite, and a machine
    without the browser must say so.
    """
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/browser.sh (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the dashboard tests save screenshots: $TORCHLOOM_SCREENSHOTS (the README's
    images come from `TORCHLOOM_SCREENSHOTS=docs/img pytest tests/integration/test_dashboard_browser.py`),
    else the test's tmp dir."""
    out = Path(os.environ.get("TORCHLOOM_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out
