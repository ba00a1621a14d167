"""Test helpers: real `torchloom up` processes, real torchrun jobs, polling without fixed sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torchloom.client import WeaverClient
from torchloom.paths import read_endpoint
from torchloom.protocol import HistoryEvent
from torchloom.supervisor import kill_tree  # noqa: F401 - the tests' way to end a launcher tree

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "mnist" / "train.py"
SHARED_MNIST = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent
T = TypeVar("T")


def mnist_dir() -> Path:
    """The repo's shipped MNIST; ../shared/data as a fallback for CI checkouts."""
    shipped = REPO / "examples" / "mnist" / "data"
    return shipped if (shipped / "mnist.npz").exists() else SHARED_MNIST


def wait_for(
    pred: Callable[[], T], *, timeout_s: float, interval_s: float = 0.05, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what} (last error: {last_exc})"
    )


class Up:
    """A `torchloom up` subprocess (embedded NATS unless nats_url is given)."""

    def __init__(
        self,
        state_dir: Path,
        *args: str,
        nats_url: str | None = None,
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        self.state_dir = state_dir
        cmd = [*wrap, str(BIN / "torchloom"), "up", "--state-dir", str(state_dir), *args]
        if "--ui-port" not in args and "--no-ui" not in args:
            cmd += ["--ui-port", "0"]  # tests run beside each other and beside a user's `up`
        if nats_url:
            cmd += ["--nats-url", nats_url]
        self.log_path = state_dir.parent / f"{state_dir.name}-up.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        endpoint = wait_for(
            lambda: self._endpoint(), timeout_s=30, what="torchloom up to write its endpoint"
        )
        self.url: str = endpoint["nats_url"]
        self.ui_url: str | None = endpoint.get("ui_url")

    def _endpoint(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"torchloom up exited: {self.log_path.read_text()}")
        ep = read_endpoint(self.state_dir)
        return ep if ep and ep.get("pid") == self.proc.pid else None

    def client(self, timeout_s: float = 5.0) -> WeaverClient:
        return WeaverClient(nats_url=self.url, timeout_s=timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def cli(
    *args: str, url: str | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    if url:
        env["TORCHLOOM_NATS_URL"] = url
    return subprocess.run(
        [str(BIN / "torchloom"), *args], capture_output=True, text=True, env=env, timeout=timeout_s
    )


def launch_mnist(
    url: str | None,
    tmp: Path,
    *args: str,
    nproc: int = 2,
    job: str = "mnist",
    torchrun: bool = True,
    wrap: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start the reference MNIST job; its output goes to tmp/train.log, its summaries to tmp/out.
    ``wrap``: a command prefix (``ip netns exec NS``: on another host)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHLOOM_NATS_URL", None)
    if url:
        env["TORCHLOOM_NATS_URL"] = url
    env["TORCHLOOM_STATE_DIR"] = str(tmp / "no-state-dir")  # only the explicit URL counts
    base = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if torchrun
        else [sys.executable]
    )
    cmd = [
        *wrap,
        *base,
        str(TRAIN),
        "--job-id",
        job,
        "--data-dir",
        str(mnist_dir()),
        "--out-dir",
        str(tmp / "out"),
        *args,
    ]
    log = open(tmp / "train.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def start_two_groups(
    up: Up,
    tmp_path: Path,
    max_steps: int,
    *extra: str,
    env: dict[str, str] | None = None,
    nproc_per_group: int = 1,
    step_delay_ms: int = 30,
    run_args: Sequence[str] = (),
    job: str = "ft",
) -> tuple[subprocess.Popen[bytes], Any]:
    """`torchloom run --replicas 2` of the MNIST job under torchft; output in tmp_path/run.log.
    ``run_args``: more `torchloom run` options (``--scheduler slurm``)."""
    cmd = [
        str(BIN / "torchloom"),
        "run",
        "--replicas",
        "2",
        "--nproc-per-group",
        str(nproc_per_group),
        "--job",
        job,
        "--state-dir",
        str(up.state_dir),
        *run_args,
        "--",
        "python",
        str(TRAIN),
        "--ft",
        "--max-steps",
        str(max_steps),
        "--eval-every",
        "0",
        "--log-every",
        "50",
        "--data-dir",
        str(mnist_dir()),
        "--out-dir",
        str(tmp_path / "out"),
        # ~60 ms steps: a restarted group (5-10 s to start here) rejoins well before the end
        "--step-delay-ms",
        str(step_delay_ms),
        *extra,
    ]
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    return proc, log


def checkpoint_loads(
    client: WeaverClient, job: str, *, why: str | None = None, at_least: int = 2
) -> list[HistoryEvent] | None:
    """The job's ``checkpoint_loaded`` events (only those loaded for ``why``: ``resume`` or
    ``rollback``), or None while there are fewer than ``at_least`` (for :func:`wait_for`)."""
    ev = [
        e
        for e in history(client, job)
        if e.kind == "checkpoint_loaded" and (why is None or e.data.get("why") == why)
    ]
    return ev if len(ev) >= at_least else None


def job_status(client: WeaverClient, job: str) -> dict[str, Any] | None:
    jobs = client.status(job).get("jobs", [])
    return jobs[0] if jobs else None


def ranks(client: WeaverClient, job: str) -> list[dict[str, Any]]:
    js = job_status(client, job)
    return js["ranks"] if js else []


def history(client: WeaverClient, job: str | None) -> list[HistoryEvent]:
    out: list[HistoryEvent] = []
    client.history(job, follow=False, on_event=out.append)
    return out


def summaries(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "out").glob("*.json"))]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class TelemetryTap:
    """Collects every telemetry message of a job from NATS, on a background thread."""

    def __init__(self, url: str, job: str) -> None:
        import asyncio
        import threading

        from torchloom.protocol import Telemetry, decode, names
        from torchloom.transport import connect

        self.messages: list[Telemetry] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def main() -> None:
            conn = await connect(url, name="telemetry-tap", retry_forever=True)

            async def on_msg(msg: Any) -> None:
                self.messages.append(decode(msg.data, Telemetry))

            await conn.subscribe(f"{names.PREFIX}.{job}.telemetry.>", on_msg)
            await conn.flush()
            self._ready.set()
            while True:
                await asyncio.sleep(3600)

        self._thread = threading.Thread(
            target=lambda: self._loop.run_until_complete(main()), daemon=True
        )
        self._thread.start()
        self._ready.wait(10)

    def wait_final_flush(self, *ranks: tuple[str, int], timeout_s: float = 60.0) -> None:
        """Wait until each ``(replica_id, rank)`` sent its last flush (state ``exited``: the
        Threadlet's goodbye carries every point still buffered)."""
        want = set(ranks)
        wait_for(
            lambda: (
                want <= {(m.replica_id, m.rank) for m in list(self.messages) if m.state == "exited"}
            ),
            timeout_s=timeout_s,
            what=f"the last telemetry flush of {sorted(want)}",
        )

    def points(self) -> list[tuple[str, int, dict[str, Any]]]:
        """``(replica_id, step, values)`` of every logged metric point seen so far."""
        return [(m.replica_id, p.step, p.values) for m in list(self.messages) for p in m.points]


class DutyCycle:
    """Slows a process by stopping it: SIGSTOP for ``stop_s``, SIGCONT for ``run_s``, over and
    over on a background thread (a device that stalls, a host that swaps) until :meth:`end`,
    which leaves it running. ``fine=(stop_s, run_s)``: during each run window, stop it in
    short bursts too (a throttled device: every step takes longer). ``follow``: when the
    process is gone, ask it for the pid of its replacement (a restarted replica group: the
    same slow host) and go on with that one; None: stop there."""

    def __init__(
        self,
        pid: int,
        *,
        stop_s: float,
        run_s: float,
        fine: tuple[float, float] | None = None,
        follow: Callable[[], int | None] | None = None,
    ) -> None:
        import threading

        self.pid, self.stop_s, self.run_s, self.fine = pid, stop_s, run_s, fine
        self.follow = follow
        self._done = threading.Event()
        self.cycles = 0
        self.pids = [pid]
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _stop_for(self, seconds: float) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self._done.wait(seconds)
        os.kill(self.pid, signal.SIGCONT)

    def _cycle(self) -> None:
        self._stop_for(self.stop_s)
        self.cycles += 1
        if self.fine is None:
            self._done.wait(self.run_s)
            return
        until = time.monotonic() + self.run_s
        while time.monotonic() < until and not self._done.is_set():
            self._done.wait(self.fine[1])
            self._stop_for(self.fine[0])

    def _replacement(self) -> int | None:
        while self.follow is not None and not self._done.is_set():
            try:
                pid = self.follow()
            except Exception:  # the Weaver may not answer for a moment
                pid = None
            if pid and pid != self.pid and pid_alive(pid):
                return pid
            self._done.wait(0.2)
        return None

    def _loop(self) -> None:
        while not self._done.is_set():
            try:
                self._cycle()
            except ProcessLookupError:
                pid = self._replacement()
                if pid is None:
                    return
                self.pid = pid
                self.pids.append(pid)

    def end(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
