from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
