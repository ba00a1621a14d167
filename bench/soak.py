"""Soak: thousands of config changes while Weavers are killed, ranks die and NATS restarts.

Run:  python bench/soak.py [--duration-s 120] [--changes-per-s 40]

One real nats-server (JetStream on disk), two `torchloom up --nats-url` Weavers (leader and
standby, each restarted as a standby after it is killed), a simulated job of 8 ranks
(`torchloom sim`, one process: killing it kills every rank, which then rejoin), and a
client sending `set` changes from 8 requesters, each with a request id and retried until
answered (as the CLI does). Faults, on a fixed schedule:

* the leading Weaver: ``kill -9`` every ``--weaver-kill-every-s``;
* the simulated job: ``kill -9`` and restart every ``--ranks-kill-every-s``;
* the NATS server: stopped and started again (same port, same storage) every
  ``--nats-restart-every-s``.

Counted at the end, from the stream and the KV bucket themselves:

* lost versions: a change answered OK whose version has no ``config_set`` entry, or is
  beyond the stored config's newest version (must be 0);
* doubled entries: a version with more than one ``config_set`` entry (must be 0);
* the Weavers' RSS (MiB) sampled each second: first, last and peak per process life.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgspec
import psutil

from torchloom.client import WeaverClient
from torchloom.errors import TorchloomError
from torchloom.nats_server import NatsServer
from torchloom.protocol import ControlRequest, DesiredConfig, HistoryEvent, decode, names
from torchloom.transport import History, KeyValue, connect
from torchloom.weaver.lease import Holder

BIN = Path(sys.executable).parent


def start_weaver(url: str, state: Path) -> subprocess.Popen[bytes]:
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "up.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "torchloom"), "up", "--nats-url", url, "--state-dir", str(state), "--no-ui",
         "--lighthouse", "none"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def start_ranks(url: str, duration_s: float, log_dir: Path) -> subprocess.Popen[bytes]:
    log = open(log_dir / "sim.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "torchloom"), "sim", "--job", "soak", "--groups", "4", "--ranks-per-group",
         "2", "--duration-s", str(duration_s), "--nats-url", url],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def leader_pid(url: str) -> int | None:
    """The pid of the Weaver holding the leader lease."""
    conn = await connect(url, name="soak-leader")
    try:
        raw = await (await KeyValue.open(conn, names.LEADER_BUCKET)).get(names.LEADER_KEY)
        return msgspec.json.decode(raw, type=Holder).pid if raw else None
    finally:
        await conn.close()


async def read_back(url: str) -> tuple[collections.Counter[int], int]:
    conn = await connect(url, name="soak-check")
    try:
        versions: collections.Counter[int] = collections.Counter()
        async for raw in History(conn).read(names.history_subject("soak", "config_set")):
            ev = decode(raw, HistoryEvent)
            versions[ev.version or 0] += 1
        kv = await KeyValue.open(conn, names.CONFIG_BUCKET)
        raw = await kv.get("soak")
        assert raw is not None
        latest = decode(raw, DesiredConfig).latest()
        return versions, latest.version if latest else 0
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration-s", type=float, default=120.0)
    ap.add_argument("--changes-per-s", type=float, default=40.0)
    ap.add_argument("--weaver-kill-every-s", type=float, default=20.0)
    ap.add_argument("--ranks-kill-every-s", type=float, default=15.0)
    ap.add_argument("--nats-restart-every-s", type=float, default=45.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="torchloom-soak-"))
    server = NatsServer(store_dir=tmp / "nats")
    url = server.start()
    weavers = [start_weaver(url, tmp / "w0")]
    time.sleep(3)
    weavers.append(start_weaver(url, tmp / "w1"))
    ranks = start_ranks(url, args.duration_s + 60, tmp)
    client = WeaverClient(nats_url=url, timeout_s=20.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.status("soak").get("jobs"):
                break
        except TorchloomError:  # not up yet, or not the leader yet
            pass
        time.sleep(0.5)

    accepted: dict[str, int] = {}
    refused: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def changes() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            req = ControlRequest(
                op="set", job_id="soak", values={"lr": round(0.001 * (1 + i % 97), 6)},
                requested_by=f"soak-{i % 8}", request_id=uuid.uuid4().hex,
            )  # fmt: skip
            try:
                reply = client.request(req)
                accepted[req.request_id] = reply.version or 0
            except TorchloomError as exc:
                refused[exc.code if exc.remote else "no_reply"] += 1
            time.sleep(1.0 / args.changes_per_s)

    rss: dict[int, list[float]] = collections.defaultdict(list)
    sender = threading.Thread(target=changes, daemon=True)
    sender.start()
    t0 = time.monotonic()
    faults: collections.Counter[str] = collections.Counter()
    next_w, next_r, next_n = (args.weaver_kill_every_s, args.ranks_kill_every_s,
                              args.nats_restart_every_s)  # fmt: skip
    while (now := time.monotonic() - t0) < args.duration_s:
        for p in weavers:
            try:
                rss[p.pid].append(psutil.Process(p.pid).memory_info().rss / 2**20)
            except psutil.Error:
                pass
        if now >= next_w:
            next_w += args.weaver_kill_every_s
            pid = asyncio.run(leader_pid(url))
            leader = next((p for p in weavers if p.pid == pid), None)
            if leader is not None:
                i = weavers.index(leader)
                leader.send_signal(signal.SIGKILL)
                leader.wait()
                weavers[i] = start_weaver(url, tmp / f"w{i}")
            faults["weaver kill -9"] += 1
        if now >= next_r:
            next_r += args.ranks_kill_every_s
            ranks.send_signal(signal.SIGKILL)
            ranks.wait()
            ranks = start_ranks(url, args.duration_s + 60, tmp)
            faults["job kill -9 (8 ranks)"] += 1
        if now >= next_n:
            next_n += args.nats_restart_every_s
            server.stop()
            server = NatsServer(store_dir=tmp / "nats", port=server.port)
            server.start()
            faults["NATS restart"] += 1
        time.sleep(1.0)
    stop.set()
    sender.join(30)
    versions, stored_latest = asyncio.run(read_back(url))
    acked = set(accepted.values())
    lost = sorted(v for v in acked if versions[v] == 0 or v > stored_latest)
    doubled = sorted(v for v, n in versions.items() if n > 1)
    print(f"soak {args.duration_s:g} s · faults: {dict(faults)}")
    print(
        f"changes answered OK: {len(accepted)} (distinct versions {len(acked)}), "
        f"refused/unanswered: {dict(refused)}"
    )
    print(
        f"config_set entries in the history: {sum(versions.values())}; stored newest v{stored_latest}"
    )
    print(
        f"LOST versions: {len(lost)} {lost[:10]} · DOUBLED entries: {len(doubled)} {doubled[:10]}"
    )
    for pid, samples in rss.items():
        if len(samples) >= 3:
            print(f"weaver pid {pid}: RSS first {samples[0]:.0f} MiB, last {samples[-1]:.0f}, "
                  f"peak {max(samples):.0f} over {len(samples)} s")  # fmt: skip
    for p in weavers:
        p.send_signal(signal.SIGTERM)
    ranks.send_signal(signal.SIGKILL)
    for p in [*weavers, ranks]:
        p.wait(15)
    server.stop()


if __name__ == "__main__":
    main()
