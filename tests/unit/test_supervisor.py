import sys

import pytest

from torchloom.supervisor import RestartPolicy, script_argv


def test_restart_policy_backs_off_and_gives_up():
    p = RestartPolicy(max_restarts=3, backoff_s=1.0, max_backoff_s=3.0)
    assert [p.decide(returncode=1, restarts=k) for k in range(4)] == [1.0, 2.0, 3.0, None]
    assert p.decide(returncode=0, restarts=0) is None  # finished: never restarted
    assert p.decide(returncode=-9, restarts=0) == 1.0  # killed by a signal


def test_script_argv_strips_the_interpreter():
    assert script_argv(["python", "train.py", "--ft"]) == ["train.py", "--ft"]
    assert script_argv([sys.executable, "train.py"]) == ["train.py"]
    assert script_argv(["train.py"]) == ["train.py"]
    assert script_argv(["python", "-m", "pkg.train", "--ft"]) == ["-m", "pkg.train", "--ft"]
    with pytest.raises(ValueError):
        script_argv(["python3"])
