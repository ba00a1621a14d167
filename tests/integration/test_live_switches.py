"""The gradient codec and the optimizer switched live on the MNIST job: on 2 DDP ranks and on 2
torchft replica groups, every rank switches at the same step, the weights stay identical, the
bytes sent follow the codec, and MNIST still trains to ≥ 98 %."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import pytest

from tests.helpers import (
    TelemetryTap,
    cli,
    history,
    kill_tree,
    launch_mnist,
    ranks,
    start_two_groups,
    summaries,
    wait_for,
)

pytestmark = pytest.mark.integration

SWITCHES = (
    ("grad_compression=bf16",),
    ("grad_compression=powersgd:2",),
    ("grad_compression=topk:0.05",),
    ("optimizer=adamw", "lr=0.001"),
    ("optimizer=lion", "lr=0.0001"),
)
EXPECTED_RATIO = {
    "none": (1.0, 1.0),
    "bf16": (0.5, 0.5),
    "powersgd:2": (0.0, 0.35),
    "topk:0.05": (0.1, 0.101),
}
"""Bytes sent over bytes a float32 allreduce would send, per codec (PowerSGD: rank 2 of the
CNN's matrices, its biases uncompressed; Top-K: a value and an index, 8 bytes, for 5 % of the
elements, rounded up per bucket)."""


def _live(client: Any, job: str, n: int, min_step: int) -> list[dict[str, Any]] | None:
    rs = ranks(client, job)
    ok = len(rs) == n and all(r["state"] == "training" and r["step"] >= min_step for r in rs)
    return rs if ok else None


def _steer(url: str, client: Any, job: str, n: int) -> tuple[list[int], int]:
    """The switches of SWITCHES one by one, then a switch while paused; returns the effective
    steps of the four switches and the step of the pause."""
    effs = []
    for values in SWITCHES:
        r = cli("set", *values, "--job", job, "--wait", url=url)
        assert r.returncode == 0, r.stdout + r.stderr
        effs.append(int(r.stdout.split("effective at step ")[1].split()[0]))
        wait_for(
            lambda e=effs[-1]: _live(client, job, n, e + 40),
            timeout_s=120,
            what=f"40 steps under {values}",
        )
    for bad, knob in (
        ("grad_compression=gzip", "grad_compression"),
        ("optimizer=adam", "optimizer"),
    ):
        r = cli("set", bad, "--job", job, url=url)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"knob '{knob}'" in lines[0], r.stderr
    assert cli("pause", "--job", job, url=url).returncode == 0
    paused = wait_for(
        lambda: (
            (rs := ranks(client, job))
            and len(rs) == n
            and all(x["state"] == "paused" for x in rs)
            and rs
        ),
        timeout_s=60,
        what="every rank paused",
    )
    pause_step = paused[0]["step"]
    assert {x["step"] for x in paused} == {pause_step}
    r = cli(
        "set", "grad_compression=none", "optimizer=sgd", "lr=0.05", "--job", job, "--wait", url=url
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split("effective at step ")[1].split()[0]) == pause_step
    assert cli("resume", "--job", job, url=url).returncode == 0
    return effs, pause_step


def _check(
    client: Any,
    tap: TelemetryTap,
    tmp_path: Any,
    job: str,
    effs: list[int],
    pause_step: int,
    *,
    groups: int,
) -> None:
    s = summaries(tmp_path)
    assert len(s) == 2 and len({x["params_sha256"] for x in s}) == 1, s
    assert all(x["optimizer"] == "sgd" and x["grad_compression"] == "none" for x in s)
    assert min(x["test_acc"] for x in s) >= 0.98, [x["test_acc"] for x in s]

    applied = [e for e in history(client, job) if e.kind == "config_applied"]
    steps = {e.version: e.step for e in applied}
    for e in applied:  # every rank took every version at the same step
        assert e.data["consistent"] is True and len(set(e.data["ranks"].values())) == 1, e
    assert sorted(steps.values())[: len(effs)] == effs
    assert pause_step in steps.values()

    # identical weights on both ranks at every checksummed step, before and after each switch
    # (under torchft: at steps both groups committed together; a group that starts alone
    # trains on its own until the other joins and heals from it)
    sums: dict[int, dict[str, float]] = defaultdict(dict)
    alone: set[int] = set()
    for m in list(tap.messages):
        for p in m.points:
            if "weights_sum" in p.values:
                sums[p.step][f"{m.replica_id}/{m.rank}"] = p.values["weights_sum"]
            if p.values.get("participants", groups) != groups or not p.values.get("committed", 1):
                alone.add(p.step)
    both = {step: v for step, v in sums.items() if len(v) == 2 and step not in alone}
    assert len(both) >= 100, len(both)
    assert all(len(set(v.values())) == 1 for v in both.values()), [
        (k, v) for k, v in both.items() if len(set(v.values())) > 1
    ][:3]
    for e in effs:
        assert any(e <= st < e + 10 for st in both), f"no checksum right after the switch at {e}"

    # bytes per step follow the codec: flushes wholly inside one codec's steps
    phases = [
        ("none", 0, effs[0]),
        ("bf16", effs[0], effs[1]),
        ("powersgd:2", effs[1] + 2, effs[2]),
        ("topk:0.05", effs[2], effs[3]),
    ]
    by_rank: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for m in list(tap.messages):
        if m.comm_bytes:
            by_rank[(m.replica_id, m.rank)].append(m)
    for codec, lo, hi in phases:
        ratios = []
        for msgs in by_rank.values():
            for prev, m in itertools.pairwise(msgs):
                if prev.step >= lo and m.step < hi and m.step > prev.step:
                    ratios.append(m.comm_bytes["sent"] / m.comm_bytes["dense"])
        assert ratios, f"no flush inside the {codec} steps {lo}..{hi}"
        low, high = EXPECTED_RATIO[codec]
        assert all(low - 1e-6 <= r <= high + 1e-6 for r in ratios), (codec, ratios)
    print(f"switches at {effs}, pause at {pause_step}; test accuracy {[x['test_acc'] for x in s]}")


def test_codec_and_optimizer_switch_live_on_two_ddp_ranks(tmp_path, up):
    tap = TelemetryTap(up.url, "mnist")
    client = up.client()
    proc = launch_mnist(
        up.url,
        tmp_path,
        *("--max-steps", "1500", "--eval-every", "0", "--checksum-every", "3"),
        *("--step-delay-ms", "4"),
    )
    try:
        wait_for(lambda: _live(client, "mnist", 2, 20), timeout_s=60, what="both ranks training")
        effs, pause_step = _steer(up.url, client, "mnist", 2)
        assert proc.wait(300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        kill_tree(proc)
    tap.wait_final_flush(("0", 0), ("0", 1))
    _check(client, tap, tmp_path, "mnist", effs, pause_step, groups=1)


def test_codec_and_optimizer_switch_live_on_two_torchft_groups(tmp_path, up):
    pytest.importorskip("torchft")
    tap = TelemetryTap(up.url, "ft")
    client = up.client()
    sup, log = start_two_groups(up, tmp_path, 2000, "--checksum-every", "3", step_delay_ms=4)
    try:
        wait_for(lambda: _live(client, "ft", 2, 20), timeout_s=120, what="both groups training")
        effs, pause_step = _steer(up.url, client, "ft", 2)
        assert sup.wait(400) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(sup)
        log.close()
    tap.wait_final_flush(("0", 0), ("1", 0))
    _check(client, tap, tmp_path, "ft", effs, pause_step, groups=2)
    assert "restarted" not in (tmp_path / "run.log").read_text()
    print(json.dumps([x["ft_step"] for x in summaries(tmp_path)]))


def test_an_optimizer_switch_is_checkpointed_first_and_rolled_back_when_it_diverges(tmp_path, up):
    """`set optimizer=adamw lr=0.5` (far too high for AdamW): the Weaver orders a checkpoint of
    the state before the switch in the same version; the loss climbs; the divergence guard
    (mitigation=rollback) judges it against the losses before the switch and rolls every rank
    back to that checkpoint — the optimizer goes back to SGD with it."""
    client = up.client()
    r = cli("policy", "set", "divergence", "mitigation=rollback", url=up.url)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = launch_mnist(
        up.url,
        tmp_path,
        *("--max-steps", "100000", "--eval-every", "0", "--step-delay-ms", "4"),
        *("--checkpoint-dir", str(tmp_path / "ckpt")),
    )
    try:
        wait_for(lambda: _live(client, "mnist", 2, 400), timeout_s=180, what="400 steps")
        r = cli("set", "optimizer=adamw", "lr=0.5", "--wait", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "of the state before it is taken at step" in r.stdout, r.stdout
        eff = int(r.stdout.split("effective at step ")[1].split()[0])
        try:
            rolled = wait_for(
                lambda: [
                    e
                    for e in history(client, "mnist")
                    if e.kind == "config_set" and "rollback" in e.data
                ],
                timeout_s=120,
                what="the divergence guard's rollback",
            )
        except AssertionError as e:
            seen = [
                (h.kind, h.step, h.message or h.data.get("reason"))
                for h in history(client, "mnist")
                if h.kind not in ("rank_joined", "config_applied")
            ]
            raise AssertionError(f"{e}; history after step {eff - 1}: {seen[-30:]}") from None
        status = client.status("mnist")["jobs"][0]
        assert status["desired"]["values"]["optimizer"] == "sgd"
        assert status["desired"]["values"]["lr"] == pytest.approx(0.025)  # 0.05 × lr_factor
        wait_for(lambda: _live(client, "mnist", 2, rolled[0].step + 30), timeout_s=60, what="on")
        assert cli("stop", url=up.url).returncode == 0
        assert proc.wait(120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        kill_tree(proc)
    events = history(client, "mnist")
    ckpt = next(e for e in events if e.kind == "checkpoint_requested")
    assert ckpt.step == eff and ckpt.data["id"] == rolled[0].data["rollback"]["id"]
    assert rolled[0].data["rollback"]["step"] == eff
    assert rolled[0].data["requested_by"] == "policy:divergence"
    recs = client.control("checkpoints", "mnist").data["checkpoints"]
    rec = next(c for c in recs if c["step"] == eff)
    assert rec["values"]["optimizer"] == "sgd" and rec["values"]["lr"] == 0.05
    s = summaries(tmp_path)
    assert len({x["params_sha256"] for x in s}) == 1
    assert all(x["optimizer"] == "sgd" and x["lr"] == pytest.approx(0.025) for x in s)
