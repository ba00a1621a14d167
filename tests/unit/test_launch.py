"""Auto-launch decisions: GPUs counted without torch, processes wanted, arguments passed on."""

import pytest

from torchloom.launch import (
    RELAUNCH_OPTIONS,
    processes_wanted,
    torchrun_argv,
    visible_gpus,
    without_option,
)


def test_visible_gpus_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,3")
    assert visible_gpus() == 3 and processes_wanted(None) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0 and processes_wanted(None) == 1  # a CPU machine: one process
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == 0
    assert processes_wanted(4) == 4
    with pytest.raises(ValueError, match="at least 1"):
        processes_wanted(0)


def test_the_scripts_own_option_is_left_out_and_rank_0_alone_is_shown():
    args = ["--nproc", "2", "--lr", "1", "--nproc=3", "--nproc-x", "5"]
    assert without_option(args, "--nproc") == ["--lr", "1", "--nproc-x", "5"]
    argv = torchrun_argv(["/x/train.py", "--lr", "1"], nproc=2, options=RELAUNCH_OPTIONS)
    assert "--nproc-per-node=2" in argv and "--local-ranks-filter=0" in argv
    assert argv[-3:] == ["/x/train.py", "--lr", "1"]
