"""`torchloom demo` as a newcomer runs it: one command, real MNIST, ≥ 98 % test accuracy, nothing left behind."""

import re
import subprocess

import psutil
import pytest

from tests.helpers import BIN

pytestmark = pytest.mark.integration


def test_demo_trains_mnist_to_98_percent_and_cleans_up(tmp_path):
    state = tmp_path / "state"
    r = subprocess.run(
        [str(BIN / "torchloom"), "demo", "--max-steps", "800", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"done at step (\d+) \(finished\): test accuracy ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:]
    assert int(m.group(1)) == 799 and float(m.group(2)) >= 0.98
    assert re.search(r"\bv\d+\b", r.stdout) and "rank_exited" in r.stdout
    # issue 16.5: a healthy run is left alone (no drain, no lr cut); the demo's checkpoint
    # policy saves every ~10 s, which changes nothing in the training
    decisions = re.search(r"policy decisions: (.*)", r.stdout)
    assert decisions, r.stdout[-2000:]
    assert decisions.group(1) == "none" or re.fullmatch(
        r"checkpoint ×\d+ \(torchloom events -k policy_checkpoint\)", decisions.group(1)
    ), decisions.group(1)
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(state) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers
