"""A real Slurm on this machine for the tests: slurmctld and two slurmd (nodes ``n1``, ``n2``,
each 2 CPUs, both on this host with ports of their own), authenticated by munge, from
Debian's ``slurm-wlm`` and ``munge`` packages (``scripts/setup.sh`` installs them where it
can). :func:`unavailable` says why not, for a skip."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchloom._proc import free_port

NODES = ("n1", "n2")


def unavailable() -> str | None:
    for tool in ("slurmctld", "slurmd", "srun", "munged"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd needs root"
    if not Path("/etc/munge/munge.key").exists():
        return "munge has no key (/etc/munge/munge.key)"
    return None


def _munged() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["munged", "--force"], check=True, capture_output=True)


def write_conf(d: Path) -> Path:
    host = socket.gethostname()
    ctld, slurmd = free_port(), free_port()
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 "
        "RealMemory=2000"
        for n in NODES
    )
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=loomtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{node_lines}
PartitionName=main Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    (d / "state").mkdir(exist_ok=True)
    return conf


def sinfo(conf: Path) -> dict[str, str]:
    """Each node's state as ``sinfo`` says it (``idle``, ``mixed``, ``drain``, …)."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": str(conf)},
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@contextmanager
def slurm_cluster(d: Path) -> Iterator[Path]:
    """slurmctld + two slurmd, up until the block ends; yields the ``slurm.conf`` to export
    as ``SLURM_CONF``."""
    _munged()
    d.mkdir(parents=True, exist_ok=True)
    conf = write_conf(d)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    for node in NODES:
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while set(sinfo(conf).values()) != {"idle"}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle: {sinfo(conf)}")
            time.sleep(0.5)
        yield conf
    finally:
        for pid_file in [d / "slurmctld.pid", *(d / f"slurmd-{n}.pid" for n in NODES)]:
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
