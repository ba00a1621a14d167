"""Status beyond a few hundred ranks, joins limited per connection, gone ranks forgotten
(issue 16.4): a real `torchloom up`, thousands of ranks on real NATS subjects."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.helpers import Up, cli, wait_for
from torchloom.protocol import (
    ControlReply,
    ControlRequest,
    JoinInfo,
    Telemetry,
    decode,
    encode,
    names,
)
from torchloom.transport import connect

pytestmark = pytest.mark.integration

N = 3000


async def _join_burst(url: str, job: str, n: int) -> list[ControlReply]:
    conn = await connect(url, name="join-burst")
    try:

        async def one(i: int) -> ControlReply:
            req = ControlRequest(
                op="join",
                job_id=job,
                join=JoinInfo(replica_id=f"j{i}", rank=0, pid=100_000 + i, host="burst"),
            )
            raw = await conn.request(names.join_subject(job), encode(req), timeout_s=30.0)
            return decode(raw, ControlReply)

        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await conn.close()


async def _telemetry_once(url: str, job: str, n: int) -> None:
    conn = await connect(url, name="many-ranks")
    try:
        for i in range(n):
            tel = Telemetry(
                job_id=job, replica_id=f"t{i}", rank=0, ts=time.time(), step=5, pid=200_000 + i
            )
            await conn.publish(names.telemetry_subject(job, f"t{i}", 0), encode(tel))
        await conn.flush()
    finally:
        await conn.close()


def _status(url: str, *args: str) -> dict:
    r = cli("status", "--job", "big", "--json", *args, url=url)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["jobs"][0]


@pytest.fixture
def up(tmp_path):
    """`torchloom up` keeping every gone rank: the Weaver's trimming to 1,000 gone ranks a job
    (every 5 s) must not race the counts this test reads."""
    proc = Up(tmp_path / "state", "--hang-timeout-s", "3", "--keep-gone-ranks", "100000")
    yield proc
    proc.stop()


def test_a_join_burst_is_limited_and_status_works_at_thousands_of_ranks(up):
    replies = asyncio.run(_join_burst(up.url, "big", N))
    ok = [r for r in replies if r.ok]
    limited = [r for r in replies if not r.ok and r.error.code == "rate_limited"]
    assert 200 <= len(ok) <= 600 and len(ok) + len(limited) == N, (len(ok), len(limited))
    asyncio.run(_telemetry_once(up.url, "big", N))
    # every one of them goes silent: failed
    wait_for(
        lambda: (
            _status(up.url, "--limit", "0")["summary"]["states"].get("failed", 0) >= N + len(ok) - 1
        ),
        timeout_s=60,
        what="the silent ranks failed",
    )
    job = _status(up.url)
    assert job["summary"]["ranks"] == N + len(ok)
    assert len(job["ranks"]) == 50 and job["page"]["matched"] == N + len(ok)
    r = cli("status", "--job", "big", url=up.url)  # the table and its summary line
    assert r.returncode == 0 and f"{N + len(ok)} rank(s)" in r.stdout, r.stdout + r.stderr
    assert "showing 1–50 of" in r.stdout
    page = _status(
        up.url, "--state", "failed", "--offset", "100", "--limit", "10", "--sort", "rank"
    )
    ids = sorted([f"j{i}" for i, r in enumerate(replies) if r.ok] + [f"t{i}" for i in range(N)])
    assert [x["replica_id"] for x in page["ranks"]] == ids[100:110]
    # an operator forgets the gone ranks
    r = cli("forget", "--job", "big", url=up.url)
    assert r.returncode == 0 and f"forgot {N + len(ok)} gone rank(s)" in r.stdout, r.stdout
    assert _status(up.url, "--limit", "0")["summary"]["ranks"] == 0
