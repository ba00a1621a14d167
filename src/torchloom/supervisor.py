"""``torchloom run``: one torchrun per replica group, restarted when it fails, started by a
scheduler adapter (:mod:`torchloom.scheduler`: this machine, Slurm job steps).

The restart decision is a pure function of the group's history
(:meth:`RestartPolicy.decide`); :class:`Supervisor` does the process work.
Each group gets ``REPLICA_GROUP_ID``, ``NUM_REPLICA_GROUPS``, ``TORCHFT_LIGHTHOUSE``
and ``TORCHLOOM_NATS_URL`` in its environment, so torchft's Manager and the
Threadlet find their peers. A group that exits 0 is done; one that fails is
started again after a backoff while the other groups keep training.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from torchloom.errors import TorchloomError
from torchloom.scheduler import LocalScheduler, Scheduler


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When to start a failed replica group again.

    Attributes:
        max_restarts: restarts allowed per group; after that it stays down.
        backoff_s: the wait before the first restart, in seconds; doubled each time.
        max_backoff_s: the longest wait, in seconds.
    """

    max_restarts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def decide(self, *, returncode: int, restarts: int) -> float | None:
        """Seconds to wait before restarting a group that exited with ``returncode``;
        None when it must not be restarted (it finished, or it used up its restarts)."""
        if returncode == 0 or restarts >= self.max_restarts:
            return None
        return float(min(self.backoff_s * 2.0**restarts, self.max_backoff_s))


@dataclass(slots=True)
class Group:
    replica_id: int
    log_path: Path
    shard: int = 0
    replace: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    start_at: float | None = 0.0
    returncode: int | None = None
    history: list[str] = field(default_factory=list)
    node: str | None = None

    @property
    def done(self) -> bool:
        return self.proc is None and self.start_at is None


def script_argv(cmd: list[str]) -> list[str]:
    """``python train.py …``, ``train.py …`` or ``python -m pkg.mod …`` → what torchrun runs:
    the script (or ``-m`` and the module) and its arguments."""
    if cmd and (Path(cmd[0]).name.startswith("python") or cmd[0] == sys.executable):
        cmd = cmd[1:]
    if not cmd:
        raise ValueError(
            "give the training command after --, e.g. -- python -m torchloom.examples.mnist.train --ft"
        )
    return cmd


class Supervisor:
    """Runs ``replicas`` torchrun processes of ``nproc_per_group`` ranks each.

    Args:
        script: the training script and its arguments (see :func:`script_argv`).
        env: extra environment for every group (NATS URL, lighthouse, job id).
        log_dir: each group writes ``replica-<id>.log`` here.
        policy: the restart policy.
        say: where progress lines go.
        clock: monotonic time source, in seconds.
        scheduler: what starts the groups (default: torchrun on this machine).
        job: the job's id, in the groups' scheduler names (``torchloom-<job>-r<replica>``).
    """

    def __init__(
        self,
        *,
        script: list[str],
        replicas: int,
        nproc_per_group: int,
        env: dict[str, str],
        log_dir: Path,
        policy: RestartPolicy,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        scheduler: Scheduler | None = None,
        job: str = "job",
    ) -> None:
        self.scheduler = scheduler or LocalScheduler()
        self.job = job
        self.excluded: set[str] = set()
        """Nodes taken out of service for drained groups: no group is started there again."""
        self.script = script
        self.nproc_per_group = nproc_per_group
        self.env = env
        self.policy = policy
        self.say = say
        self.clock = clock
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.num_shards = replicas
        self.groups = [Group(i, log_dir / f"replica-{i}.log", shard=i) for i in range(replicas)]
        self._replace_requests: queue.SimpleQueue[int] = queue.SimpleQueue()

    def request_replacement(self, replica_id: int) -> None:
        """Start a fresh group in place of ``replica_id`` once it has exited 0 (a drain with
        replacement). Thread-safe: the history follower calls it."""
        self._replace_requests.put(replica_id)

    def _start(self, g: Group) -> None:
        env = {
            **os.environ,
            **self.env,
            "REPLICA_GROUP_ID": str(g.replica_id),
            "NUM_REPLICA_GROUPS": str(self.num_shards),
            # a replacement keeps its predecessor's data shard
            "TORCHLOOM_SHARD_INDEX": str(g.shard),
            **({"TORCHLOOM_RESTARTED": "1"} if g.restarts else {}),
        }
        with open(g.log_path, "ab") as log:
            g.proc = self.scheduler.launch(
                name=self.group_name(g.replica_id),
                script=self.script,
                nproc=self.nproc_per_group,
                env=env,
                log=log,
                exclude=sorted(self.excluded),
            )
        g.start_at = None
        what = "restarted" if g.restarts else "started"
        where = "" if self.scheduler.name == "local" else f" as a {self.scheduler.name} job step"
        self.say(f"[replica {g.replica_id}] {what}{where} (pid {g.proc.pid}), log {g.log_path}")

    def group_name(self, replica_id: int) -> str:
        """The group's name at the scheduler."""
        return f"torchloom-{self.job}-r{replica_id}"

    def _free_node_of(self, g: Group) -> None:
        """Take the node of a group being drained out of service (its replacement and every
        later start go elsewhere)."""
        try:
            g.node = g.node or self.scheduler.node_of(self.group_name(g.replica_id))
            if g.node is None:
                return
            self.say(
                self.scheduler.drain_node(
                    g.node, reason=f"torchloom: replica group {g.replica_id} of {self.job} drained"
                )
            )
            if self.scheduler.name != "local":
                self.excluded.add(g.node)
        except TorchloomError as exc:
            self.say(f"[replica {g.replica_id}] its node stays in service: {exc.message}")

    def poll(self) -> None:
        """Start groups whose time has come; handle groups that exited."""
        now = self.clock()
        while not self._replace_requests.empty():
            rid = self._replace_requests.get()
            for g in list(self.groups):
                if g.replica_id != rid:
                    continue
                self._free_node_of(g)
                if g.done and g.returncode == 0:  # it left before we heard: replace it now
                    self._replace(g)
                else:
                    g.replace = True
        for g in list(self.groups):
            if g.proc is None:
                if g.start_at is not None and now >= g.start_at:
                    self._start(g)
                continue
            rc = g.proc.poll()
            if rc is None:
                continue
            kill_tree(g.proc)  # torchrun's workers run in their own sessions
            g.proc, g.returncode = None, rc
            delay = self.policy.decide(returncode=rc, restarts=g.restarts)
            if rc == 0 and g.replace:
                self._replace(g)
            elif rc == 0:
                self.say(f"[replica {g.replica_id}] finished")
            elif delay is None:
                self.say(
                    f"[replica {g.replica_id}] exited with code {rc}; no restarts left "
                    f"({g.restarts}/{self.policy.max_restarts}), the other groups go on"
                )
            else:
                g.restarts += 1
                g.start_at = now + delay
                self.say(
                    f"[replica {g.replica_id}] exited with code {rc}; restart "
                    f"{g.restarts}/{self.policy.max_restarts} in {delay:g} s"
                )

    def _replace(self, g: Group) -> None:
        g.replace = False
        rid = max(x.replica_id for x in self.groups) + 1
        self.groups.append(Group(rid, self.log_dir / f"replica-{rid}.log", shard=g.shard))
        self.say(f"[replica {g.replica_id}] drained; replica {rid} takes its place")

    def run(self, *, poll_s: float = 0.2) -> int:
        """Supervise until every group is done; returns 0 if all finished cleanly, else 1."""
        try:
            while not all(g.done for g in self.groups):
                self.poll()
                time.sleep(poll_s)
        finally:
            self.stop()
        return 0 if all(g.returncode == 0 for g in self.groups) else 1

    def stop(self, *, timeout_s: float = 15.0) -> None:
        """SIGTERM every running group (torchrun stops its workers), then SIGKILL leftovers."""
        for g in self.groups:
            if g.proc is not None:
                kill_tree(g.proc, graceful_s=timeout_s)
                g.returncode = g.proc.returncode
                g.proc = None
            g.start_at = None


def kill_tree(proc: subprocess.Popen[bytes], *, graceful_s: float = 0.0) -> None:
    """Stop a launcher and all its descendants: SIGTERM first when ``graceful_s`` > 0, then SIGKILL."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if graceful_s > 0 and proc.poll() is None:
        proc.terminate()
        _, family = psutil.wait_procs(family, timeout=graceful_s)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
