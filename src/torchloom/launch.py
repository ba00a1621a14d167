"""Auto-launch: a script run with plain ``python`` re-executes itself under torchrun when it
should run as more than one process — one per visible GPU, or as many as asked.

::

    from torchloom.launch import relaunch_under_torchrun
    relaunch_under_torchrun(nproc=args.nproc)   # first thing in main(): no-op under torchrun

Counting GPUs reads ``CUDA_VISIBLE_DEVICES`` or NVML (``nvidia-ml-py``), never imports torch, so
the decision costs milliseconds. torchrun's console stays quiet: only local rank 0's output is
shown (``--local-ranks-filter 0``; the other ranks' output is dropped from the console), and
``OMP_NUM_THREADS`` is set (the CPU's cores shared among the processes) so torchrun does not
print its warning about it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def visible_gpus() -> int:
    """GPUs this process may use: the entries of ``CUDA_VISIBLE_DEVICES`` when it is set, else
    NVML's device count, else 0 (no driver, a CPU machine)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0


def processes_wanted(nproc: int | None) -> int:
    """``nproc`` when given, else one process per visible GPU, else 1 (a CPU machine)."""
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"nproc={nproc} must be at least 1")
        return nproc
    return max(1, visible_gpus())


RELAUNCH_OPTIONS = ("--local-ranks-filter=0",)
"""torchrun's options when a script re-executes itself: only local rank 0 on the console."""


def torchrun_argv(script: Sequence[str], *, nproc: int, options: Sequence[str] = ()) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N [options] <script …>``:
    ``script`` (the script and its arguments) as ``nproc`` processes on this host."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *options, *script,
    ]  # fmt: skip


def without_option(args: list[str], option: str) -> list[str]:
    """``args`` without ``option VALUE`` / ``option=VALUE`` (torchrun's parser would take
    ``--nproc`` for an abbreviation of its own ``--nproc-per-node`` and stop)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def relaunch_under_torchrun(*, nproc: int | None = None, option: str = "--nproc") -> None:
    """Replace this process by torchrun running this script as :func:`processes_wanted` processes.

    Returns (does nothing) when the script already runs under torchrun (``LOCAL_RANK`` set) or
    one process is wanted; otherwise it does not return (``os.execve``).

    Args:
        nproc: processes to run; None: one per visible GPU, 1 on a CPU machine.
        option: the script's own option that gave ``nproc``, left out of the processes' arguments.

    Raises:
        ValueError: ``nproc`` is below 1.
    """
    if "LOCAL_RANK" in os.environ:
        return
    n = processes_wanted(nproc)
    if n <= 1:
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    script = os.path.abspath(sys.argv[0])
    sys.stdout.flush()
    sys.stderr.flush()
    args = without_option(sys.argv[1:], option)
    os.execve(
        sys.executable, torchrun_argv([script, *args], nproc=n, options=RELAUNCH_OPTIONS), env
    )
