"""Scheduler adapters: what starts a replica group, finds the node it runs on, and takes a
node out of service — behind ``torchloom run`` and ``torchloom drain --replace``.

* :class:`LocalScheduler` — torchrun on this machine (the default).
* :class:`SlurmScheduler` — each replica group is one Slurm job step (``srun``: inside an
  allocation a step of it, outside one a job of its own), restarted or replaced as a new
  step; a drained group's node is set ``DRAIN`` with ``scontrol`` so no new work lands on it,
  and its replacement is started with ``--exclude`` of the nodes drained so far.
* :class:`KubernetesScheduler` — replica groups are pods of a Job/JobSet (see ``deploy/k8s``);
  a drained group's node is cordoned through the official ``kubernetes`` client and its pod
  deleted, so the Job starts a new one elsewhere.

A group is one node's worth of ranks (``--nproc-per-group`` on one node); groups spanning
nodes are not supported yet.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import IO, Any

from torchloom.errors import TorchloomError
from torchloom.launch import torchrun_argv


class Scheduler(ABC):
    """Starts replica groups and takes nodes out of service."""

    name = "scheduler"

    @abstractmethod
    def argv(
        self, *, name: str, script: Sequence[str], nproc: int, exclude: Sequence[str]
    ) -> list[str]:
        """The command that runs one replica group of ``nproc`` ranks running ``script``
        (torchrun's arguments), called ``name``, away from the nodes in ``exclude``."""

    def launch(
        self,
        *,
        name: str,
        script: Sequence[str],
        nproc: int,
        env: dict[str, str],
        log: IO[bytes],
        exclude: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start one replica group (:meth:`argv`) in a session of its own, output to ``log``.
        The process returned ends when the group does, with its exit code."""
        return subprocess.Popen(
            self.argv(name=name, script=script, nproc=nproc, exclude=exclude),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def node_of(self, name: str) -> str | None:
        """The node the group called ``name`` runs on (None: not known)."""
        return socket.gethostname()

    def drain_node(self, node: str, *, reason: str) -> str:
        """Take ``node`` out of service (running work finishes; nothing new starts there).
        Returns what was done, for the log.

        Raises:
            TorchloomError: the scheduler refused.
        """
        return f"node {node} stays in service (the {self.name} scheduler has no nodes to drain)"


class LocalScheduler(Scheduler):
    """torchrun on this machine, each group in its own session."""

    name = "local"

    def argv(
        self, *, name: str, script: Sequence[str], nproc: int, exclude: Sequence[str]
    ) -> list[str]:
        return torchrun_argv(script, nproc=nproc)


def _run(cmd: list[str], *, what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise TorchloomError(f"{cmd[0]} not found: is Slurm installed here?") from None
    except subprocess.TimeoutExpired:
        raise TorchloomError(f"{what}: {cmd[0]} did not answer in 30 s") from None
    if proc.returncode != 0:
        raise TorchloomError(f"{what}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


class SlurmScheduler(Scheduler):
    """Each replica group one Slurm job step, started with ``srun``.

    Args:
        partition: the partition to run in; None: the cluster's default.
        srun_args: more ``srun`` options (``--account``, ``--gpus-per-task``, …).

    Raises:
        TorchloomError: ``srun`` is not on PATH.
    """

    name = "slurm"

    def __init__(self, *, partition: str | None = None, srun_args: Sequence[str] = ()) -> None:
        if shutil.which("srun") is None:
            raise TorchloomError("srun not found: --scheduler slurm needs Slurm's client commands")
        self.partition = partition
        self.srun_args = list(srun_args)

    def argv(
        self, *, name: str, script: Sequence[str], nproc: int, exclude: Sequence[str]
    ) -> list[str]:
        """The ``srun`` command line of one group (one node, one task, ``nproc`` CPUs; a
        failed rank ends the step)."""
        return [
            "srun",
            f"--job-name={name}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={nproc}",
            "--kill-on-bad-exit=1",
            *([f"--partition={self.partition}"] if self.partition else []),
            *([f"--exclude={','.join(sorted(exclude))}"] if exclude else []),
            *self.srun_args,
            *torchrun_argv(script, nproc=nproc),
        ]

    def node_of(self, name: str) -> str | None:
        out = _run(["squeue", "-h", "-s", "-o", "%j|%N"], what="squeue")
        for line in out.splitlines():
            step, _, nodes = line.partition("|")
            if step == name and nodes:
                return nodes.split(",")[0]
        return None

    def drain_node(self, node: str, *, reason: str) -> str:
        _run(
            ["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason[:200]}"],
            what=f"drain of node {node}",
        )
        return f"node {node} set DRAIN in Slurm ({reason})"


class KubernetesScheduler(Scheduler):
    """Replica groups are the pods of a JobSet (``deploy/k8s/training-jobset.yaml``: one Job
    per group, its index the replica group id); torchloom does not start them. For a drained
    group it cordons the node and deletes the group's pods, so its Job starts new ones
    elsewhere. Uses the official ``kubernetes`` client (in-cluster config, else
    ``~/.kube/config``; ``pip install 'torchloom[kubernetes]'``).

    Args:
        jobset: the JobSet's name (the torchloom job's id in the shipped manifests).
        namespace: its namespace.
    """

    name = "kubernetes"

    def __init__(self, *, jobset: str, namespace: str = "default") -> None:
        self.jobset = jobset
        self.namespace = namespace
        self._api: Any = None

    def _core(self) -> Any:
        if self._api is None:
            try:
                from kubernetes import client, config  # the only module that imports it
            except ImportError:
                raise TorchloomError(
                    "the kubernetes client is not installed: pip install 'torchloom[kubernetes]'"
                ) from None
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def argv(
        self, *, name: str, script: Sequence[str], nproc: int, exclude: Sequence[str]
    ) -> list[str]:
        raise TorchloomError(
            "on Kubernetes a JobSet starts the replica groups (deploy/k8s); "
            "torchloom run --scheduler kubernetes only follows drains"
        )

    def selector(self, replica_id: int) -> str:
        """The label selector of replica group ``replica_id``'s pods (JobSet's own labels)."""
        return (
            f"jobset.sigs.k8s.io/jobset-name={self.jobset},"
            f"jobset.sigs.k8s.io/job-index={replica_id}"
        )

    def node_of_group(self, replica_id: int) -> str | None:
        """The node replica group ``replica_id``'s pod runs on (None: not scheduled)."""
        pods = self._core().list_namespaced_pod(
            self.namespace, label_selector=self.selector(replica_id)
        )
        return next((p.spec.node_name for p in pods.items if p.spec.node_name), None)

    def drain_node(self, node: str, *, reason: str) -> str:
        self._core().patch_node(node, cordon_patch())
        return f"node {node} cordoned in Kubernetes ({reason})"

    def replace_group(self, replica_id: int) -> int:
        """Delete replica group ``replica_id``'s pods (its Job starts new ones); how many."""
        core = self._core()
        pods = core.list_namespaced_pod(self.namespace, label_selector=self.selector(replica_id))
        for pod in pods.items:
            core.delete_namespaced_pod(pod.metadata.name, self.namespace)
        return len(pods.items)


def cordon_patch() -> dict[str, Any]:
    """The node patch ``kubectl cordon`` sends."""
    return {"spec": {"unschedulable": True}}


def scheduler_for(name: str, **options: Any) -> Scheduler:
    """The adapter called ``name`` (``local``, ``slurm``, ``kubernetes``).

    Raises:
        TorchloomError: an unknown name, or the scheduler's commands are missing.
    """
    if name == "local":
        return LocalScheduler()
    if name == "slurm":
        return SlurmScheduler(**options)
    if name == "kubernetes":
        return KubernetesScheduler(**options)
    raise TorchloomError(f"unknown scheduler {name!r} (local, slurm or kubernetes)")
