"""The GPT reference job (examples/gpt): 2 ranks under torchrun with DDP (steered by a real
`torchloom up`) and FSDP2, one seed twice, and configs refused before training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import BIN, REPO, cli, history, kill_tree, ranks, wait_for

pytestmark = pytest.mark.integration
TRAIN = REPO / "examples" / "gpt" / "train.py"
EVALUATE = REPO / "examples" / "gpt" / "evaluate.py"
HELD_OUT_BELOW = 2.6  # nats per byte after 150 steps (a byte-unigram model: ~3.0)
SMALL = ("--layers", "2", "--context", "64", "--max-steps", "150")  # ~15 s on 2 CPU ranks


def gpt(tmp: Path, *args: str, url: str | None, nproc: int = 2) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHLOOM_STATE_DIR": str(tmp / "no-state")}
    env.pop("TORCHLOOM_JOB", None)
    env["TORCHLOOM_NATS_URL"] = url or "nats://127.0.0.1:1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]  # fmt: skip
    log = open(tmp / "train.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [*launcher, str(TRAIN), "--out-dir", str(tmp / "out"), *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def past(client: Any, at: int, *, job: str = "gpt", n: int = 2) -> list[dict[str, Any]]:
    """Wait until the job's ``n`` ranks are all past step ``at``; their rows."""

    def rows() -> list[dict[str, Any]] | None:
        rs = ranks(client, job)
        return rs if len(rs) == n and min(r["step"] for r in rs) >= at else None

    return wait_for(rows, timeout_s=180, what=f"{n} ranks of {job} past step {at}")


@contextlib.contextmanager
def torchloom_run(
    up: Any, tmp: Path, run_args: tuple[str, ...], train_args: tuple[str, ...]
) -> Iterator[subprocess.Popen[bytes]]:
    """`torchloom run --nproc-per-group 2 [run_args] -- python train.py [train_args]` (job
    ``gpt`` unless ``run_args`` names one), its output in ``tmp/run.log``; killed at the end."""
    job = () if "--job" in run_args else ("--job", "gpt")
    cmd = [str(BIN / "torchloom"), "run", "--nproc-per-group", "2", *job,
           "--state-dir", str(up.state_dir), *run_args, "--",
           sys.executable, str(TRAIN), *train_args, "--out-dir", str(tmp / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHLOOM_NATS_URL": up.url}
    with open(tmp / "run.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            yield proc
        finally:
            kill_tree(proc)


def finish(proc: subprocess.Popen[bytes], tmp: Path, n: int = 2) -> list[dict[str, Any]]:
    try:
        rc = proc.wait(300)
    finally:
        kill_tree(proc)
    assert rc == 0, (tmp / "train.log").read_text()[-3000:]
    return [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(n)]


def test_ddp_learns_and_takes_lr_and_batch_size_at_one_step(tmp_path, up):
    client = up.client()
    proc = gpt(tmp_path, *SMALL, "--eval-every", "75", "--step-delay-ms", "20", url=up.url)
    try:
        past(client, 20)
        r = cli("set", "lr=0.002", "batch_size=24", "--job", "gpt", "--wait", url=up.url)
        assert r.returncode == 0 and "v2 applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr
        effective = int(re.search(r"effective at step (\d+)", r.stdout).group(1))
        out = finish(proc, tmp_path)
    finally:
        kill_tree(proc)
    applied = [e for e in history(client, "gpt") if e.kind == "config_applied"]
    assert applied[0].data["ranks"] == {"0/0": effective, "0/1": effective}
    for s in out:
        assert (s["lr"], s["batch_size"], s["step"]) == (0.002, 24, 149)
        assert s["eval_loss"] < HELD_OUT_BELOW, s["evals"]
        assert s["flops_per_s"] > 0 and s["mfu"] is None  # CPU: FLOP/s, no MFU
    assert out[0]["params_sha256"] == out[1]["params_sha256"]
    assert out[0]["losses"] != out[1]["losses"]  # each rank its own windows


def test_fsdp2_shards_and_learns(tmp_path):
    out = finish(
        gpt(tmp_path, "--parallel", "fsdp", *SMALL, "--eval-every", "0", url=None), tmp_path
    )
    assert all(s["sharded"] and s["parallel"] == "fsdp" for s in out)
    assert all(s["eval_loss"] < HELD_OUT_BELOW for s in out), [s["eval_loss"] for s in out]
    assert out[0]["params_sha256"] == out[1]["params_sha256"]  # the gathered full weights


def test_the_same_seed_gives_the_same_loss_curve(tmp_path):
    curves = []
    for i, seed in enumerate(("3", "3", "4")):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        args = ("--max-steps", "25", "--eval-every", "0", "--seed", seed, "--layers", "2")
        curves.append(finish(gpt(tmp, *args, url=None, nproc=1), tmp, n=1)[0]["losses"])
    assert len(curves[0]) == 25 and curves[0] == curves[1]
    assert curves[0] != curves[2]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ("--d-model", "100", "--heads", "3"),
            "gpt: model: d_model=100 is not a multiple of heads=3",
        ),
        (("--out-dir", "/proc/no-such-dir"), "gpt: --out-dir /proc/no-such-dir: not writable"),
        (("--context", "40000"), "must hold a window of --context 40000 + 1"),
        (("--batch-size", "0"), "gpt: --batch-size=0 must be at least 1"),
    ],
)
def test_a_bad_config_is_refused_before_training_with_one_line(args, says):
    out = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TORCHLOOM_NATS_URL": "nats://127.0.0.1:1"})  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr


def direct(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    small = ("--layers", "2", "--context", "64", "--max-steps", "10", "--eval-every", "0")
    return subprocess.run(
        [sys.executable, str(TRAIN), *small, "--out-dir", str(tmp / "out"), *args],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "TORCHLOOM_NATS_URL": "nats://127.0.0.1:1", **(env or {})},
    )  # fmt: skip


def test_run_with_python_it_relaunches_under_torchrun_with_rank_0_alone_on_the_console(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, str(TRAIN), "--nproc", "2", "--layers", "2", "--context", "64",
         "--max-steps", "10", "--eval-every", "0", "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=180,
        env={**env, "TORCHLOOM_NATS_URL": "nats://127.0.0.1:1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("rank*.json")) == [
        "rank0.json",
        "rank1.json",
    ]
    assert "gpt: rank 0 done at step 9" in out.stdout and "rank 1 done" not in out.stdout
    assert "OMP_NUM_THREADS" not in out.stderr  # torchrun's warning: the launcher set it


def test_on_a_machine_without_gpus_it_stays_one_process(tmp_path):
    out = direct(tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert [p.name for p in (tmp_path / "out").glob("rank*.json")] == ["rank0.json"]


def test_the_finders_micro_batches_keep_the_batch_and_the_losses(tmp_path, up):
    """A CPU budget too small for the batch: the finder's max_batch_size splits each step into
    micro-batches (gradient accumulation) and the loss curve stays that of the whole batch."""
    runs = {}
    for label, extra in (
        ("whole", ()),
        ("found", ("--find-batch-size", "--memory-budget-gb", "0.02")),
    ):
        tmp = tmp_path / label
        tmp.mkdir()
        args = ("--layers", "2", "--context", "64", "--max-steps", "10", "--eval-every", "0",
                "--batch-size", "32", "--job-id", f"gpt-{label}", *extra)  # fmt: skip
        runs[label] = finish(gpt(tmp, *args, url=up.url, nproc=1), tmp, n=1)[0]
    found, whole = runs["found"], runs["whole"]
    assert whole["micro_batches"] == 1 and whole["max_batch_size"] is None
    assert 1 <= found["max_batch_size"] < 32 and found["micro_batches"] >= 2
    assert found["losses"] == pytest.approx(whole["losses"], rel=1e-4)
    said = wait_for(
        lambda: [e for e in history(up.client(), "gpt-found") if e.kind == "batch_size_found"],
        timeout_s=30,
        what="the finder's event in the history",
    )
    assert said[0].data["max_batch_size"] == found["max_batch_size"], said


def _peaks(*sizes: int) -> list[float]:
    """GB of live tensors at the peak of one training step of the SMALL model on a micro-batch
    of each size, measured as the job measures it (examples/gpt/train.py's probe)."""
    import torch

    sys.path.insert(0, str(TRAIN.parent))
    try:
        import train  # type: ignore[import-not-found]
        from model import GPTConfig  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(TRAIN.parent))
    from torchloom.batchsize import peak_step_bytes

    step, track = train.probe(
        GPTConfig(layers=2, context=64), train.parse_args([]), torch.device("cpu")
    )
    return [peak_step_bytes(step, b, track=track) / 1e9 for b in sizes]


def test_a_budget_lowered_mid_run_shrinks_the_micro_batches_and_keeps_the_batch(tmp_path, up):
    """`set max_memory_gb=…` below what a micro-batch of 16 needs: each rank's next step runs
    out of its budget, is retried in micro-batches of 8 instead of ending the process, and the
    memory policy makes max_batch_size=8 job-wide; every step still trains on 16 samples per
    rank, and the run finishes and learns."""
    p16, p8 = _peaks(16, 8)
    budget = round((p16 + p8) / 2, 4)  # 8 fits, below the policy's high water (0.9 of it)
    assert p8 < 0.9 * budget < budget < p16
    client = up.client()
    proc = gpt(tmp_path, *SMALL, "--eval-every", "0", "--step-delay-ms", "20", url=up.url)
    try:
        past(client, 20)
        r = cli("set", f"max_memory_gb={budget}", "--job", "gpt", "--wait", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
        set_at = int(re.search(r"effective at step (\d+)", r.stdout).group(1))
        shrunk = wait_for(
            lambda: [
                e
                for e in history(client, "gpt")
                if e.kind == "config_set" and (e.data.get("values") or {}).get("max_batch_size")
            ],
            timeout_s=120,
            what="the memory policy's max_batch_size",
        )
        out = finish(proc, tmp_path)
    finally:
        kill_tree(proc)
    events = history(client, "gpt")
    retried = [e for e in events if e.kind == "oom_retried"]
    assert {(e.replica_id, e.rank) for e in retried} == {("0", 0), ("0", 1)}, retried
    assert all(e.step >= set_at and e.data["micro_batch"] == 8 for e in retried), retried
    assert shrunk[0].data["values"]["max_batch_size"] == 8
    assert shrunk[0].data["requested_by"] == "policy:memory", shrunk[0].data
    # no rank failed; a clean exit whose connection's close reached the Weaver before its
    # goodbye is failed for an instant and then corrected (`rank_exited`, "goodbye came …")
    late_goodbye = {
        (e.replica_id, e.rank)
        for e in events
        if e.kind == "rank_exited" and "goodbye came" in e.message
    }
    failed = [e for e in events if e.kind == "rank_failed"]
    assert not [e for e in failed if (e.replica_id, e.rank) not in late_goodbye], failed
    for s in out:
        assert s["step"] == 149 and s["stop_reason"] == "finished"
        assert s["samples"] == [16] * 150  # the batch never changed
        assert s["max_batch_size"] == 8 and s["micro_batches"] == 2
        assert 1 <= s["oom_retries"] <= 2, s["oom_retries"]
        assert s["eval_loss"] < HELD_OUT_BELOW
    assert out[0]["params_sha256"] == out[1]["params_sha256"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_evaluator_started_by_torchloom_run_scores_each_complete_checkpoint(tmp_path, up):
    """`torchloom run --evaluator …` beside a DDP group of 2 ranks: two checkpoints taken during
    the run are each scored once by the separate evaluator process (held-out loss on the
    checkpoint's weights, read back from DCP's shards without a process group); the scores are
    on the registry entries, in the history and in `checkpoint list`, and they equal the
    held-out loss of the same weights computed here."""
    client = up.client()
    model = ("--layers", "2", "--context", "64")
    evaluator = f"{sys.executable} {EVALUATE} {' '.join(model)}"
    train = (*model, "--max-steps", "200", "--step-delay-ms", "30", "--eval-every", "0",
             "--checkpoint-dir", str(tmp_path / "ckpt"))  # fmt: skip
    with torchloom_run(up, tmp_path, ("--replicas", "1", "--evaluator", evaluator), train) as proc:
        ids = []
        for at in (30, 90):
            past(client, at)
            r = cli("checkpoint", "save", "--job", "gpt", "--wait", url=up.url, timeout_s=120)
            assert r.returncode == 0 and "complete" in r.stdout, r.stdout + r.stderr
            ids.append(re.search(r"checkpoint (ckpt-v\d+) complete", r.stdout).group(1))
        assert proc.wait(300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    run_log = (tmp_path / "run.log").read_text()
    assert "[evaluator] started" in run_log and "[evaluator] exited with code 0" in run_log
    recs = {c["id"]: c for c in client.control("checkpoints", "gpt").data["checkpoints"]}
    evaluated = [e for e in history(client, "gpt") if e.kind == "checkpoint_evaluated"]
    assert sorted(e.data["id"] for e in evaluated) == sorted(ids)  # each once
    for cid in ids:
        scores = recs[cid]["scores"]
        assert recs[cid]["scored_by"].startswith("evaluator:")
        assert scores["eval_perplexity"] == pytest.approx(math.exp(scores["eval_loss"]))
        assert scores["eval_loss"] == pytest.approx(_held_out_loss(recs[cid]["storage"]), rel=1e-5)
    first, second = (recs[cid] for cid in ids)
    assert first["step"] < second["step"] and second["scores"]["eval_loss"] < 3.0
    listing = cli("checkpoint", "list", "--job", "gpt", url=up.url)
    assert f"{second['scores']['eval_loss']:.4g}" in listing.stdout, listing.stdout


def _held_out_loss(directory: str) -> float:
    """The held-out loss of a checkpoint's weights, loaded and evaluated in this process."""
    import torch
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, str(TRAIN.parent))
    try:
        import train  # type: ignore[import-not-found]
        from model import GPT, GPTConfig  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(TRAIN.parent))
    args = train.parse_args(["--layers", "2", "--context", "64"])
    model = GPT(GPTConfig(layers=2, context=64))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    model.load_state_dict(state["model"])
    text = torch.frombuffer(bytearray(args.corpus.read_bytes()), dtype=torch.uint8).long()
    return train.evaluate(model, text[len(text) * 9 // 10 :], args)


def test_hsdp_under_torchft_a_killed_group_restarts_heals_and_ends_identical(tmp_path, up):
    """`torchloom run --replicas 2 --nproc-per-group 2` of the GPT job with `--ft --parallel
    fsdp`: FSDP2 shards within each replica group, torchft averages each shard's gradients
    across the groups (HSDP). A `kill -9` of one rank takes its group down; `torchloom run`
    restarts it, its ranks heal their shards from the other group's same ranks, and all four
    ranks end with the same full weights, having learned."""
    client = up.client()
    train = ("--ft", "--parallel", "fsdp", *SMALL[:4], "--max-steps", "200",
             "--step-delay-ms", "20", "--eval-every", "0")  # fmt: skip
    with torchloom_run(up, tmp_path, ("--replicas", "2", "--job", "gptft"), train) as proc:
        rs = past(client, 40, job="gptft", n=4)
        victim = next(r for r in rs if (r["replica_id"], r["rank"]) == ("1", 1))
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = victim["step"]
        assert proc.wait(300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    run_log = (tmp_path / "run.log").read_text()
    assert "[replica 1] restarted" in run_log and "[replica 0] restarted" not in run_log
    healed = [
        e
        for e in history(client, "gptft")
        if e.kind == "healed" and e.replica_id == "1" and (e.step or 0) >= killed_at
    ]
    assert {e.rank for e in healed} == {0, 1}, healed  # both ranks of the restarted group
    out = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("replica*.json"))]
    assert len(out) == 4 and all(s["sharded"] and s["step"] == 199 for s in out)
    assert len({s["params_sha256"] for s in out}) == 1  # the full weights, on every rank
    assert all(s["eval_loss"] < HELD_OUT_BELOW for s in out)
