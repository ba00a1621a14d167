"""Garbage on every subject the Weaver listens to: counted, dropped, and the Weaver keeps serving."""

import asyncio
import json
import threading
import time

import msgspec
import pytest

import torchloom
from tests.helpers import cli, wait_for
from torchloom.protocol import Telemetry, encode, names, to_builtins
from torchloom.transport import connect

pytestmark = pytest.mark.integration


async def _send(url, items):
    conn = await connect(url, name="garbage")
    for subject, data, request in items:
        if request:
            try:
                await conn.request(subject, data, timeout_s=2)
            except Exception:
                pass
        else:
            await conn.publish(subject, data)
    await conn.flush()
    await conn.close()


def test_malformed_oversized_and_wrong_version_messages_are_dropped(up):
    run = torchloom.init(
        job_id="j", knobs={"lr": 0.1}, max_steps=10**9, nats_url=up.url, rank=0, replica_id="0"
    )
    stop = threading.Event()

    def loop():
        for _ in run.steps():
            time.sleep(0.005)
            if stop.is_set():
                break

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        client = up.client()
        wait_for(lambda: run.agent.joined.is_set(), timeout_s=10, what="join")
        good = to_builtins(Telemetry(job_id="j", replica_id="0", rank=5, ts=time.time(), step=1))
        tel = names.telemetry_subject("j", "0", 5)
        ev = names.events_subject("j", "0", 5)
        ctl = names.control_subject("j")
        items = [
            (tel, b"\x00\xff garbage", False),
            (tel, json.dumps({**good, "v": 2}).encode(), False),
            (tel, json.dumps({**good, "step": "many"}).encode(), False),
            (tel, b'{"v":1,' + b" " * (300 * 1024) + b'"x":1}', False),
            (
                names.telemetry_subject("j", "0", 6),
                json.dumps(good).encode(),
                False,
            ),  # subject/body mismatch
            (ev, b"[]", False),
            (
                ev,
                json.dumps(
                    {
                        "v": 1,
                        "kind": "explode",
                        "job_id": "j",
                        "replica_id": "0",
                        "rank": 5,
                        "ts": 1,
                        "step": 1,
                    }
                ).encode(),
                False,
            ),
            (ctl, b"{not json", True),
            (
                ctl,
                json.dumps({"v": 1, "op": "set", "job_id": "other", "values": {"lr": 1}}).encode(),
                True,
            ),
            (ctl, encode({"v": 7, "op": "status", "job_id": "j"}), True),
        ]
        asyncio.run(_send(up.url, items))
        dropped = wait_for(
            lambda: (
                (d := client.status().get("dropped_messages", {}))
                and d.get("telemetry", 0) >= 5
                and d.get("rank_event", 0) >= 2
                and d.get("control", 0) >= 3
                and d
            ),
            timeout_s=10,
            what="drop counters",
        )
        assert dropped == {"telemetry": 5, "rank_event": 2, "control": 3}
        # the phantom rank 5 never made it into the DR map
        assert [r["rank"] for r in client.status("j")["jobs"][0]["ranks"]] == [0]
        r = cli("set", "lr=0.05", "--job", "j", "--wait", url=up.url)
        assert r.returncode == 0, r.stderr
        assert run["lr"] == 0.05
    finally:
        stop.set()
        t.join(5)


def test_a_malformed_control_request_gets_a_readable_error_reply(up):
    async def ask():
        conn = await connect(up.url, name="t")
        raw = await conn.request(names.control_subject("j"), b'{"op": 3}', timeout_s=2)
        await conn.close()
        return msgspec.json.decode(raw)

    reply = asyncio.run(ask())
    assert reply["ok"] is False and reply["error"]["code"] == "decode_error"
    assert "control request" in reply["error"]["message"]
