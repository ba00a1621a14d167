"""Checkpoints ordered by the Weaver (issue 18): every rank saves the same step with DCP's
async_save, the Weaver records it complete, a crashed job resumes from its choice with the
weights of a run that loaded it, rollbacks, the registry (checksums, pin, delete, export),
S3, backups. Real nats-server, `torchloom up`, torchrun, gloo DDP, DCP, moto's S3 server."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, Up, checkpoint_loads, cli, history, kill_tree, ranks, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def up(tmp_path):
    """`torchloom up` with every policy off: the runs compared bit for bit must see no change
    but the checkpoints (a policy's lr cut after a restart's loss jump would change the
    weights)."""
    policies = tmp_path / "policies.toml"
    policies.write_text(
        "".join(
            f"[{p}]\nenabled = false\n"
            for p in ("straggler", "divergence", "failure", "sync_every", "checkpoint")
        )
    )
    proc = Up(tmp_path / "state", "--hang-timeout-s", "3", "--policies", str(policies))
    yield proc
    proc.stop()


LOOP = REPO / "tests" / "integration" / "ckpt_loop.py"


def launch(up, job, storage, out, steps, *extra, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(LOOP), up.url, job, str(storage), str(out), str(steps), *extra]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def outputs(out):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def loaded_digest(weights):
    """SHA-256 of the loop's model after loading exported ``weights`` into a fresh one (strict:
    the names and shapes must be the model's), as ckpt_loop.py digests its own."""
    import hashlib

    import torch

    model = torch.nn.Linear(32, 1)
    model.load_state_dict(weights)
    return hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    ).hexdigest()


def wait_past(client, job, step, *, timeout_s=120, what="both ranks training"):
    """Wait until both ranks of ``job`` are in the DR map and past ``step``."""

    def past():
        rs = ranks(client, job)
        return len(rs) == 2 and min(r["step"] for r in rs) > step

    wait_for(past, timeout_s=timeout_s, what=what)


def test_a_checkpoint_no_rank_can_write_fails_and_is_never_offered(up, tmp_path):
    """A rank with no Checkpointer (here: a plain loop) reports it cannot write the order: the
    checkpoint is failed, `save --wait` says why and exits non-zero, and no resume uses it."""
    loop = REPO / "tests" / "integration" / "rank_loop.py"
    proc = subprocess.Popen(
        [sys.executable, str(loop), up.url, "plain", "0", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    client = up.client()
    try:
        wait_for(lambda: ranks(client, "plain"), timeout_s=60, what="the rank joined")
        r = cli("checkpoint", "save", "--wait", "--job", "plain", url=up.url, timeout_s=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "no Checkpointer in this process" in r.stderr, r.stderr
        listing = client.control("checkpoints", "plain").data
        assert [c["state"] for c in listing["checkpoints"]] == ["failed"]
        assert listing["resume_from"] is None
        r = cli("checkpoint", "list", "--job", "plain", url=up.url)
        assert r.returncode == 0 and "failed" in r.stdout, r.stdout + r.stderr
    finally:
        kill_tree(proc)


def test_bad_checkpoint_requests_are_refused(up, tmp_path):
    r = cli("checkpoint", "save", "--job", "nosuchjob", url=up.url)
    assert r.returncode == 2 and "nosuchjob" in r.stderr, r.stdout + r.stderr
    assert not Path(tmp_path / "ckpt").exists()


def test_a_whole_job_killed_resumes_from_the_newest_complete_checkpoint(up, tmp_path):
    """kill -9 of every rank after a checkpoint: the relaunched job asks the Weaver, every rank
    loads the same checkpoint, and it ends with the weights of a run that loaded it by id."""
    storage = tmp_path / "ckpt"
    client = up.client()
    proc = launch(up, "rj", storage, tmp_path / "a", 100000, "--resume")
    try:
        wait_past(client, "rj", 30)
        r = cli("checkpoint", "save", "--wait", "--job", "rj", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
        rec = client.control("checkpoints", "rj").data["checkpoints"][0]
        wait_past(client, "rj", rec["step"] + 30, what="training past the checkpoint")
    finally:
        kill_tree(proc, graceful_s=0)  # SIGKILL: the whole job dies at once
    steps = rec["step"] + 150
    proc = launch(up, "rj", storage, tmp_path / "b", steps, "--resume")
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill_tree(proc)
    b = outputs(tmp_path / "b")
    assert [o["start"] for o in b] == [rec["step"], rec["step"]]  # not step 0
    loaded = wait_for(
        lambda: [e for e in history(client, "rj") if e.kind == "checkpoint_loaded"],
        timeout_s=30,
        what="checkpoint_loaded in the history",
    )
    assert {(e.replica_id, e.rank, e.data["id"]) for e in loaded} == {
        ("0", 0, rec["id"]),
        ("0", 1, rec["id"]),
    }
    proc = launch(up, "rj", storage, tmp_path / "c", steps, "--load", rec["id"])
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill_tree(proc)
    c = outputs(tmp_path / "c")
    assert b[0]["weights"] == b[1]["weights"] == c[0]["weights"] == c[1]["weights"]


def test_the_mnist_job_resumes_from_the_checkpoint_the_weaver_ordered(up, tmp_path):
    """The reference job with --checkpoint-dir: a checkpoint mid-run, the whole job killed,
    relaunched with the same command: it goes on from the checkpoint's step (data cursor and
    all), not from step 0."""
    from tests.helpers import launch_mnist, summaries

    ck = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--eval-every", "0"]
    client = up.client()
    proc = launch_mnist(up.url, tmp_path, "--max-steps", "100000", *ck, job="mk")
    try:
        wait_past(client, "mk", 50, timeout_s=180, what="MNIST training")
        r = cli("checkpoint", "save", "--wait", "--job", "mk", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        kill_tree(proc, graceful_s=0)
    rec = client.control("checkpoints", "mk").data["checkpoints"][0]
    assert rec["state"] == "complete" and rec["step"] > 50
    end = rec["step"] + 150
    proc = launch_mnist(up.url, tmp_path, "--max-steps", str(end), *ck, job="mk")
    try:
        assert proc.wait(300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        kill_tree(proc)
    out = summaries(tmp_path)
    assert [s["start_step"] for s in out] == [rec["step"]] * 2
    assert all(s["step"] == end - 1 and s["stop_reason"] == "finished" for s in out)
    assert out[0]["params_sha256"] == out[1]["params_sha256"]
    # the data cursor went on from the checkpoint's (2 ranks × 64 samples a step since step 0);
    # a loader not restored would stand 128 × the checkpoint's step short
    assert [s["data_cursor"] for s in out] == [end * 128] * 2


def test_a_live_rollback_takes_every_rank_back_to_the_checkpoint_at_one_step(up, tmp_path):
    """`torchloom rollback`: without a restart, both DDP ranks load the checkpoint at the same
    effective step and go on from its step; the loss there is the checkpoint's again (the same
    batch on the same weights), and the ranks end identical."""
    storage = tmp_path / "ckpt"
    client = up.client()
    proc = launch(up, "rb", storage, tmp_path / "a", 100000)
    try:
        wait_past(client, "rb", 30)
        r = cli("checkpoint", "save", "--wait", "--job", "rb", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
        rec = client.control("checkpoints", "rb").data["checkpoints"][0]
        wait_past(client, "rb", rec["step"] + 60, what="training past the checkpoint")
        bad = cli("rollback", "--to", "ckpt-v999", "--job", "rb", url=up.url)
        assert bad.returncode == 2 and "no checkpoint 'ckpt-v999'" in bad.stderr, bad.stderr
        r = cli("rollback", "--to", rec["id"], "--job", "rb", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
        loaded = wait_for(
            lambda: checkpoint_loads(client, "rb", why="rollback"),
            timeout_s=60,
            what="both ranks rolled back",
        )
        assert {(e.rank, e.step) for e in loaded} == {(0, rec["step"]), (1, rec["step"])}
        r = cli("stop", "--job", "rb", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
        stop_at = int(re.search(r"effective at step (\d+)", r.stdout).group(1))
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill_tree(proc)
    a = outputs(tmp_path / "a")
    jumps = []
    for o in a:
        trace = o["trace"]
        back = [i for i in range(1, len(trace)) if trace[i][0] <= trace[i - 1][0]]
        assert len(back) == 1, back  # one rollback, and no other step went back
        i = back[0]
        jumps.append((trace[i - 1][0], trace[i][0]))
        first = next(loss for s, loss in trace if s == rec["step"])
        assert trace[i][1] == first  # the checkpoint's step again: the same loss, bit for bit
    assert jumps[0] == jumps[1] and jumps[0][1] == rec["step"]  # every rank at the same step
    assert a[0]["weights"] == a[1]["weights"]
    sets = [e for e in history(client, "rb") if e.kind == "config_set" and "rollback" in e.data]
    assert [e.data["rollback"] for e in sets] == [{"id": rec["id"], "step": rec["step"]}]
    assert sets[0].step == jumps[0][0] + 1  # the effective step: the first one not run again
    # a change after the rollback is planned from where the ranks are, not held back until
    # they reach the rollback's effective step again
    assert stop_at < sets[0].step


def test_storage_that_cannot_be_written_fails_the_checkpoint_and_training_goes_on(up, tmp_path):
    """Storage that is not a directory (as full, read-only or gone would be): the save fails
    on every rank, the checkpoint is failed with the reason, and both ranks train on."""
    storage = tmp_path / "a-file"
    storage.write_text("not a directory")
    client = up.client()
    proc = launch(up, "bad", storage, tmp_path / "a", 100000)
    try:
        wait_for(
            lambda: len(ranks(client, "bad")) == 2,
            timeout_s=120,
            what="both ranks training",
        )
        r = cli("checkpoint", "save", "--wait", "--job", "bad", url=up.url, timeout_s=120)
        assert r.returncode == 1 and "Error" in r.stderr, r.stdout + r.stderr
        (rec,) = client.control("checkpoints", "bad").data["checkpoints"]
        assert rec["state"] == "failed" and "a-file" in rec["reason"], rec
        past = rec["step"] + 50
        wait_past(client, "bad", past, timeout_s=60, what="training going on after the failed save")
        assert all(x["state"] == "training" for x in ranks(client, "bad"))
    finally:
        kill_tree(proc)


def test_the_registry_checks_files_at_load_falls_back_cleans_up_pins_deletes_and_exports(
    up, tmp_path
):
    """Two checkpoints, the job killed, a file of the newer one truncated: the relaunched job
    finds it fails its checksums, says so, and loads the older one (which is then failed and
    its files removed by the next save); export writes the older one's weights as safetensors,
    the same the job started from; pin makes a checkpoint the resume choice and keeps it from
    deletion; delete takes one out of the registry and off the disk."""
    from safetensors.torch import load_file

    storage = tmp_path / "ckpt"
    client = up.client()

    def save():
        r = cli("checkpoint", "save", "--wait", "--job", "pj", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return client.control("checkpoints", "pj").data["checkpoints"][0]

    proc = launch(up, "pj", storage, tmp_path / "a", 100000, "--resume")
    try:
        wait_past(client, "pj", 20)
        a = save()
        wait_past(client, "pj", a["step"] + 20, what="training past the first checkpoint")
        b = save()
    finally:
        kill_tree(proc, graceful_s=0)
    r = cli("checkpoint", "show", b["id"], "--job", "pj", url=up.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(json.loads(r.stdout)["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shard = storage / "pj" / b["id"] / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated

    meta = storage / "pj" / a["id"] / ".metadata"
    written = meta.stat().st_mtime_ns
    # relaunched as `torchloom run` restarts a job: the same epoch, so the config document
    # still holds the order of the checkpoint it resumes from, at the step it resumes at
    restarted = {"TORCHLOOM_RESTARTED": "1"}
    proc = launch(up, "pj", storage, tmp_path / "b", 100000, "--resume", env=restarted)
    try:
        loaded = wait_for(
            lambda: checkpoint_loads(client, "pj"),
            timeout_s=120,
            what="both relaunched ranks loaded a checkpoint",
        )
        assert {e.data["id"] for e in loaded} == {a["id"]}
        wait_past(client, "pj", a["step"] + 10, what="the relaunched job past its start")
        assert meta.stat().st_mtime_ns == written  # that old order was not carried out again
        recs = {c["id"]: c for c in client.control("checkpoints", "pj").data["checkpoints"]}
        assert recs[b["id"]]["state"] == "failed" and "checksums" in recs[b["id"]]["reason"]
        c = save()  # its writer removes the failed checkpoint's files
        wait_for(
            lambda: not (storage / "pj" / b["id"]).exists(),
            timeout_s=30,
            what="the failed checkpoint's files removed",
        )
        r = cli("stop", "--job", "pj", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill_tree(proc)
    started = outputs(tmp_path / "b")
    assert [o["start"] for o in started] == [a["step"]] * 2  # the older one, not step 0
    # the run was stopped: a new launch starts anew unless a checkpoint is pinned
    wait_for(
        lambda: "ended cleanly" in client.control("checkpoints", "pj").data["resume_why"],
        timeout_s=30,
        what="the Weaver to see the run end cleanly",
    )
    assert client.control("checkpoints", "pj").data["resume_from"] is None

    target = tmp_path / "export" / "model.safetensors"
    r = cli("checkpoint", "export", a["id"], "--out", str(target), "--job", "pj", url=up.url)
    assert r.returncode == 0, r.stdout + r.stderr
    weights = load_file(str(target))
    assert loaded_digest(weights) == started[0]["start_weights"]

    r = cli("checkpoint", "pin", a["id"], "--job", "pj", url=up.url)
    assert r.returncode == 0, r.stdout + r.stderr
    listing = client.control("checkpoints", "pj").data
    assert listing["resume_from"] == a["id"] and "pinned" in listing["resume_why"]
    r = cli("checkpoint", "delete", a["id"], "--job", "pj", url=up.url)
    assert r.returncode == 2 and "unpin it first" in r.stderr, r.stdout + r.stderr
    assert cli("checkpoint", "unpin", a["id"], "--job", "pj", url=up.url).returncode == 0
    r = cli("checkpoint", "delete", a["id"], "--job", "pj", url=up.url)
    assert r.returncode == 0 and "removed" in r.stdout, r.stdout + r.stderr
    assert not (storage / "pj" / a["id"]).exists() and (storage / "pj" / c["id"]).is_dir()
    states = {c["id"]: c["state"] for c in client.control("checkpoints", "pj").data["checkpoints"]}
    assert states == {a["id"]: "deleted", b["id"]: "failed", c["id"]: "complete"}
    kinds = [e.kind for e in history(client, "pj") if e.kind.startswith("checkpoint_")]
    for kind in ("checkpoint_pinned", "checkpoint_unpinned", "checkpoint_deleted"):
        assert kind in kinds, kinds


def test_a_rank_killed_mid_save_fails_that_checkpoint_and_the_job_resumes_from_the_one_before(
    up, tmp_path
):
    """kill -9 of a rank while its part of a checkpoint is being written: the checkpoint is
    failed (never offered), the relaunched job loads the complete one before it, and the next
    save is complete and removes the failed one's files."""
    storage = tmp_path / "ckpt"
    client = up.client()
    proc = launch(up, "kj", storage, tmp_path / "a", 100000, "--resume", "--slow-save", "2")
    try:
        wait_past(client, "kj", 20)
        r = cli("checkpoint", "save", "--wait", "--job", "kj", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
        a = client.control("checkpoints", "kj").data["checkpoints"][0]
        r = cli("checkpoint", "save", "--job", "kj", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: (tmp_path / "a" / "slow").exists(), timeout_s=60, what="the slow write")
        victim = next(x for x in ranks(client, "kj") if x["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)

        def failed():
            recs = client.control("checkpoints", "kj").data["checkpoints"]
            return next((c for c in recs if c["id"] != a["id"] and c["state"] != "pending"), None)

        b = wait_for(failed, timeout_s=60, what="the checkpoint being written to end")
        # rank 0's part fails too (its save's collective loses the peer), or the Weaver marks
        # the dead writer: failed either way
        assert b["state"] == "failed", b
        proc.wait(60)  # torchrun stops the other rank
    finally:
        kill_tree(proc, graceful_s=0)
    assert client.control("checkpoints", "kj").data["resume_from"] == a["id"]
    proc = launch(up, "kj", storage, tmp_path / "b", 100000, "--resume")
    try:
        loaded = wait_for(
            lambda: checkpoint_loads(client, "kj"),
            timeout_s=120,
            what="both ranks loaded a checkpoint",
        )
        assert {e.data["id"] for e in loaded} == {a["id"]}
        r = cli("checkpoint", "save", "--wait", "--job", "kj", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(
            lambda: not (storage / "kj" / b["id"]).exists(),
            timeout_s=30,
            what="the failed checkpoint's files removed",
        )
    finally:
        kill_tree(proc)


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3-compatible server (moto's server mode, its own process) with a bucket; the
    AWS_* environment points s3fs (and the ranks, which inherit it) at it."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def answers():
        try:
            return urllib.request.urlopen(url, timeout=1).status == 200
        except OSError:
            return False

    wait_for(answers, timeout_s=60, what="the S3 server")
    for k, v in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem(anon=False).mkdir("ckpts")
    yield proc
    proc.terminate()
    proc.wait(10)


def test_checkpoints_round_trip_through_s3(up, tmp_path, s3):
    """Storage s3://…: the ranks write through s3fs, the Weaver records the URL, a job killed
    and relaunched resumes from S3, and export reads the weights back from S3."""
    from safetensors.torch import load_file

    client = up.client()
    proc = launch(up, "s3j", "s3://ckpts/runs", tmp_path / "a", 100000, "--resume")
    try:
        wait_past(client, "s3j", 20)
        r = cli("checkpoint", "save", "--wait", "--job", "s3j", url=up.url, timeout_s=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        kill_tree(proc, graceful_s=0)
    rec = client.control("checkpoints", "s3j").data["checkpoints"][0]
    assert rec["state"] == "complete" and rec["storage"] == f"s3://ckpts/runs/s3j/{rec['id']}"
    import s3fs

    names = sorted(p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem().ls(rec["storage"]))
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    proc = launch(up, "s3j", "s3://ckpts/runs", tmp_path / "b", rec["step"] + 20, "--resume")
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill_tree(proc)
    b = outputs(tmp_path / "b")
    assert [o["start"] for o in b] == [rec["step"]] * 2
    target = tmp_path / "w.safetensors"
    r = cli("checkpoint", "export", rec["id"], "--out", str(target), "--job", "s3j", url=up.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert loaded_digest(load_file(str(target))) == b[0]["start_weights"]

    # the S3 server gone: a save fails with one clear event, and the training goes on
    s3.terminate()
    s3.wait(10)
    proc = launch(
        up, "s3j", "s3://ckpts/runs", tmp_path / "c", 100000, env={"AWS_MAX_ATTEMPTS": "1"}
    )
    try:
        wait_for(
            lambda: [x["state"] for x in ranks(client, "s3j")] == ["training", "training"],
            timeout_s=120,
            what="a fresh run training",
        )
        r = cli("checkpoint", "save", "--wait", "--job", "s3j", url=up.url, timeout_s=120)
        assert r.returncode == 1 and "failed" in r.stderr, r.stdout + r.stderr
        rec = client.control("checkpoints", "s3j").data["checkpoints"][0]
        wait_past(client, "s3j", rec["step"] + 50, what="training going on after the failed save")
    finally:
        kill_tree(proc)


def test_complete_checkpoints_are_backed_up_and_a_restart_loads_the_backup_when_ram_is_lost(
    up, tmp_path
):
    """--backup DIR with keep_last=2: each complete checkpoint is copied there (the registry
    says where), and the oldest copy goes once a third is in. The primary storage stands for
    host RAM (a tmpfs in use): gone with the whole job, the restart loads the disk copy."""
    storage, backup = tmp_path / "ckpt", tmp_path / "backup"
    client = up.client()
    proc = launch(
        up, "bj", storage, tmp_path / "a", 100000, "--backup", str(backup), "--keep-last", "2"
    )
    saved = []
    try:
        wait_past(client, "bj", 10)
        for _ in range(3):
            r = cli("checkpoint", "save", "--wait", "--job", "bj", url=up.url, timeout_s=120)
            assert r.returncode == 0, r.stdout + r.stderr
            saved.append(client.control("checkpoints", "bj").data["checkpoints"][0]["id"])

            def backed_up(cid=saved[-1]):
                recs = client.control("checkpoints", "bj").data["checkpoints"]
                return (
                    {c["id"]: c["backup"] for c in recs}
                    if any(c["id"] == cid and c["backup"] for c in recs)
                    else None
                )

            where = wait_for(backed_up, timeout_s=60, what=f"{saved[-1]} backed up")
    finally:
        kill_tree(proc, graceful_s=0)
    assert where == {
        saved[0]: "",
        saved[1]: str(backup / "bj" / saved[1]),
        saved[2]: str(backup / "bj" / saved[2]),
    }
    assert sorted(p.name for p in (backup / "bj").iterdir()) == sorted(saved[1:])
    assert sorted(p.name for p in (backup / "bj" / saved[2]).iterdir()) == sorted(
        p.name for p in (storage / "bj" / saved[2]).iterdir()
    )
    assert (storage / "bj" / saved[0]).is_dir()  # the primary copies are not the backup's
    step = client.control("checkpoints", "bj").data["checkpoints"][0]["step"]

    shutil.rmtree(storage)  # the host's RAM copy is gone
    proc = launch(up, "bj", storage, tmp_path / "b", step + 10, "--resume")
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    finally:
        kill_tree(proc)
    assert [o["start"] for o in outputs(tmp_path / "b")] == [step, step]
    loaded = [e for e in history(client, "bj") if e.kind == "checkpoint_loaded"]
    assert {(e.data["id"], e.data["source"]) for e in loaded} == {(saved[2], where[saved[2]])}


def test_the_step_rate_counts_steps_run_not_the_jump_of_a_resume(up):
    """A process that starts at a checkpoint's step (or heals, or rolls back) jumps its step
    index: its reported step time must come from the steps it ran (a rate from the index made
    a resumed job look 1,000× faster, and the Weaver planned a checkpoint 11,000 steps ahead)."""
    import time

    import torchloom
    from tests.helpers import TelemetryTap

    tap = TelemetryTap(up.url, "rate")
    run = torchloom.init(job_id="rate", knobs={}, nats_url=up.url, interval_ms=100)
    # the Threadlet flushes while resume() waits for the Weaver's answer …
    wait_for(lambda: len(tap.messages) >= 2, timeout_s=30, what="telemetry before the steps")
    run.start_step = 5000  # … then it sets the checkpoint's step
    for step in run.steps():
        time.sleep(0.01)
        if step > 5000 and len([m for m in tap.messages if m.step_time_s and m.step > 5000]) >= 3:
            break
    run.close(reason="test done")
    times = [m.step_time_s for m in tap.messages if m.step_time_s]
    assert times and min(times) > 0.009, times
