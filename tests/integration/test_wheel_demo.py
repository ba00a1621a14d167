"""`torchloom demo` from an installed package, outside a checkout (issue 17.6): the wheel is
built, installed with its `torch` extra into a fresh venv, and the demo is run from an empty
directory with an empty home.

This machine reaches PyPI only, so MNIST is put into the user cache the demo reads (where it
would download it once); the download itself is tested in tests/unit/test_mnist_data.py."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, mnist_dir

pytestmark = pytest.mark.integration


def test_the_demo_runs_from_an_installed_wheel(tmp_path):
    dist, venv, run_dir, home = (tmp_path / d for d in ("dist", "venv", "run", "home"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("torchloom-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[torch]"], check=True, timeout=600
    )
    cache = tmp_path / "cache"
    (cache / "torchloom" / "mnist").mkdir(parents=True)
    shutil.copy(mnist_dir() / "mnist.npz", cache / "torchloom" / "mnist" / "mnist.npz")
    run_dir.mkdir()
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CACHE_HOME": str(cache)}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torchloom; print(torchloom.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where and str(REPO) not in where  # the installed copy, not the checkout
    r = subprocess.run(
        [str(venv / "bin" / "torchloom"), "demo", "--max-steps", "300", "--no-ui"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"done at step (\d+) \(finished\): test accuracy ([0-9.]+)", r.stdout)
    assert m and int(m.group(1)) == 299 and float(m.group(2)) >= 0.9, r.stdout[-2000:]
    assert (home / ".local" / "state" / "torchloom").is_dir()  # the default state dir, in $HOME
