"""Lightning and the Hugging Face Trainer steered through their torchloom callbacks: the
examples under torchrun (2 ranks, gloo on CPU) against a real `torchloom up`."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, TelemetryTap, cli, history, kill_tree, mnist_dir, ranks, wait_for

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Framework:
    script: Path
    args: tuple[str, ...]
    lr: float  # the new peak lr the test sets
    lr_metric: str  # the framework's own log of the lr in force


LIGHTNING = Framework(
    REPO / "examples" / "lightning_mnist.py",
    ("--data-dir", str(mnist_dir())),
    lr=0.01,
    lr_metric="lr",
)
TRANSFORMERS = Framework(
    REPO / "examples" / "hf_tiny_lm.py", (), lr=0.0005, lr_metric="learning_rate"
)
FRAMEWORKS = {"lightning": LIGHTNING, "transformers": TRANSFORMERS}


def launch(
    fw: Framework, tmp: Path, *args: str, url: str | None, job: str | None = None
) -> subprocess.Popen[bytes]:
    """The example under torchrun with 2 ranks; output in tmp/train.log, summaries in tmp/out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHLOOM_STATE_DIR": str(tmp / "no-state")}
    env.pop("TORCHLOOM_JOB", None)
    if job:
        env["TORCHLOOM_JOB"] = job
    if url:
        env["TORCHLOOM_NATS_URL"] = url
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(fw.script), *fw.args, "--out-dir", str(tmp / "out"), *args,
    ]  # fmt: skip
    log = open(tmp / "train.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def summaries(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]


def training_at(client: Any, job: str, min_step: int) -> Any:
    rs = ranks(client, job)
    return (
        len(rs) == 2 and all(r["state"] == "training" and r["step"] >= min_step for r in rs) and rs
    )


def finished(proc: subprocess.Popen[bytes], tmp: Path, timeout_s: float = 180) -> None:
    try:
        rc = proc.wait(timeout_s)
    finally:
        kill_tree(proc)
    assert rc == 0, (tmp / "train.log").read_text()[-4000:]


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_set_pause_resume_stop_act_at_one_step_on_both_ranks(name, tmp_path, up):
    fw, job = FRAMEWORKS[name], FRAMEWORKS[name].script.stem  # the job id: the script's name
    client = up.client()
    tap = TelemetryTap(up.url, job)
    proc = launch(fw, tmp_path, "--max-steps", "5000", "--step-delay-ms", "20", url=up.url)
    try:
        wait_for(lambda: training_at(client, job, 10), timeout_s=120, what="both ranks training")

        r = cli("set", f"lr={fw.lr}", "grad_clip=0.5", "--job", job, "--wait", url=up.url)
        assert r.returncode == 0, r.stderr
        effective = int(re.search(r"effective at step (\d+)", r.stdout).group(1))
        assert "v2 applied by 2 rank(s)" in r.stdout

        assert cli("pause", "--job", job, url=up.url).returncode == 0
        paused = wait_for(
            lambda: all(x["state"] == "paused" for x in ranks(client, job)) and ranks(client, job),
            timeout_s=60,
            what="both ranks paused",
        )
        assert len({x["step"] for x in paused}) == 1
        pause_step = paused[0]["step"]
        assert cli("resume", "--job", job, url=up.url).returncode == 0
        wait_for(lambda: training_at(client, job, pause_step + 5), timeout_s=60, what="resumed")

        stop = cli("stop", "--job", job, url=up.url)
        assert stop.returncode == 0, stop.stderr
        stop_step = int(re.search(r"effective at step (\d+)", stop.stdout).group(1))
        finished(proc, tmp_path)
    finally:
        kill_tree(proc)

    out = summaries(tmp_path)
    # the framework's own objects took the new values at the effective step, on both ranks
    for s in out:
        assert s["seen"][-1] == [effective, fw.lr, 0.5], s["seen"]
        assert s["stop_reason"] == "stopped" and s["step"] == stop_step
    assert out[0]["params_sha256"] == out[1]["params_sha256"]

    events = history(client, job)
    applied = [e for e in events if e.kind == "config_applied"]
    assert [e.version for e in applied] == [2, 3, 4, 5]
    for e in applied[:-1]:
        assert e.data["consistent"] is True and set(e.data["ranks"]) == {"0/0", "0/1"}, applied
    # the stop's record: a rank whose connection-closed notice reaches the Weaver before its
    # goodbye and its last report is no longer counted in it (both ranks' own summaries above
    # show the stop step)
    assert applied[-1].data["consistent"] is True and set(applied[-1].data["ranks"]) <= {
        "0/0",
        "0/1",
    }
    assert applied[0].step == effective and applied[-1].step == stop_step

    # what the framework logs reached the Weaver: the lr in force before and after the step
    tap.wait_final_flush(("0", 0), ("0", 1))
    logged = [(step, v[fw.lr_metric]) for _, step, v in tap.points() if fw.lr_metric in v]
    assert logged and {"loss"} <= {k for _, _, v in tap.points() for k in v}
    if name == "lightning":  # logged on every step with the lr of that step
        assert all(
            math.isclose(lr, fw.lr, rel_tol=1e-6) for step, lr in logged if step >= effective
        )
        assert all(math.isclose(lr, 0.05, rel_tol=1e-6) for step, lr in logged if step < effective)
        metrics_csv = next((tmp_path / "out").rglob("metrics.csv")).read_text()
        rows = list(csv.DictReader(metrics_csv.splitlines()))
        after = [float(r["lr"]) for r in rows if r["lr"] and int(r["step"]) >= effective]
        before = [float(r["lr"]) for r in rows if r["lr"] and int(r["step"]) < effective]
        assert after and all(math.isclose(lr, fw.lr, rel_tol=1e-6) for lr in after)
        assert before and all(math.isclose(lr, 0.05, rel_tol=1e-6) for lr in before)
    else:  # the Trainer's cosine schedule, rescaled around the new peak from the step on
        import torch
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.SGD([torch.zeros(1)], lr=1.0)
        lam = get_cosine_schedule_with_warmup(opt, 20, 5000).lr_lambdas[0]
        for entry in out[0]["log_history"]:
            if "learning_rate" in entry and entry["step"] > effective:
                # logged after the step's optimizer step: the lr of step `step - 1`
                assert entry["learning_rate"] == pytest.approx(fw.lr * lam(entry["step"] - 1))
            elif "learning_rate" in entry:
                assert entry["learning_rate"] == pytest.approx(2e-3 * lam(entry["step"] - 1))


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_a_rank_killed_is_reported_failed(name, tmp_path, up):
    fw = FRAMEWORKS[name]
    client = up.client()
    job = f"{name}-kill"  # $TORCHLOOM_JOB names the job: the same script, another job
    proc = launch(fw, tmp_path, "--max-steps", "5000", "--step-delay-ms", "20", url=up.url, job=job)
    try:
        rs = wait_for(
            lambda: training_at(client, job, 5), timeout_s=120, what="both ranks training"
        )
        victim = next(r for r in rs if r["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        failed = wait_for(
            lambda: [e for e in history(client, job) if e.kind == "rank_failed" and e.rank == 1],
            timeout_s=60,
            what="rank 1 reported failed",
        )
        assert failed[0].replica_id == "0"
    finally:
        kill_tree(proc)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_with_nats_down_at_start_the_training_runs_unchanged(name, tmp_path):
    fw = FRAMEWORKS[name]
    runs = {}
    for label, extra in (("down", ()), ("without", ("--no-torchloom",))):
        tmp = tmp_path / label
        tmp.mkdir()
        url = f"nats://127.0.0.1:{closed_port()}"
        finished(launch(fw, tmp, "--max-steps", "40", *extra, url=url), tmp)
        runs[label] = summaries(tmp)
    down, without = runs["down"], runs["without"]
    assert [s["step"] for s in down] == [40, 40]
    assert down[0]["stop_reason"] == "finished"  # the callback ran, on its own knobs
    # the same weights, bit for bit, as the same script without the callback
    assert {s["params_sha256"] for s in down} == {s["params_sha256"] for s in without}
    assert len({s["params_sha256"] for s in down}) == 1
