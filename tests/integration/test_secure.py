"""`torchloom up --secure` against the real server: no anonymous access, TLS, a role per
client, and two jobs that cannot reach each other (the server's permissions, not ours)."""

import asyncio
import json
import ssl

import httpx
import pytest

from tests.helpers import Up, cli, history, kill_tree, launch_mnist, ranks, summaries, wait_for
from torchloom.client import WeaverClient
from torchloom.errors import TorchloomError
from torchloom.protocol import ControlReply, ControlRequest, JoinInfo, decode, encode, names
from torchloom.transport import KeyValue, connect, load_credentials

pytestmark = pytest.mark.integration


@pytest.fixture
def secure_up(tmp_path):
    up = Up(tmp_path / "state", "--secure", "--lighthouse", "none")
    yield up
    up.stop()


def creds_for(up, job):
    r = cli("creds", "job", job, "--state-dir", str(up.state_dir))
    assert r.returncode == 0, r.stderr
    return load_credentials(r.stdout.strip())


def operator(up):
    return load_credentials(up.state_dir / "secure" / "operator.creds.json")


def test_no_anonymous_access_and_tls_everywhere(secure_up):
    assert secure_up.url.startswith("tls://") and secure_up.ui_url.startswith("https://")

    async def anonymous():
        await connect(secure_up.url, name="anonymous", connect_timeout_s=2.0)

    with pytest.raises(TorchloomError):
        asyncio.run(anonymous())
    # the operator on this machine finds its credentials through the state dir
    r = cli("status", "--state-dir", str(secure_up.state_dir))
    assert r.returncode == 0, r.stderr
    # dashboard: HTTPS with the generated CA; a token is required
    ca = ssl.create_default_context(cafile=secure_up.state_dir / "secure" / "ca.pem")
    token = (secure_up.state_dir / "secure" / "dashboard.token").read_text().strip()
    api = secure_up.ui_url + "api/jobs"
    assert httpx.get(api, verify=ca).status_code == 401
    ok = httpx.get(api, verify=ca, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(api.replace("https://", "http://"), timeout=3)


def test_two_jobs_are_isolated_by_the_servers_permissions(secure_up):
    a, b = creds_for(secure_up, "jobA"), creds_for(secure_up, "jobB")
    url = secure_up.url

    async def run():
        ca = await connect(url, name="job-a", creds=a)
        cb = await connect(url, name="job-b", creds=b)
        spy = await connect(url, name="weaver-view", creds=load_credentials(
            secure_up.state_dir / "secure" / "weaver.creds.json"))  # fmt: skip
        got: dict[str, list[str]] = {"spy": [], "a_cfg": [], "b_cfg": [], "a_on_b": [], "inbox": []}

        async def keep(key, msg):
            got[key].append(msg.subject)

        await spy.subscribe("loom.>", lambda m: keep("spy", m))
        await ca.subscribe(names.config_watch_subject("jobA"), lambda m: keep("a_cfg", m))
        await cb.subscribe(names.config_watch_subject("jobB"), lambda m: keep("b_cfg", m))
        # job A tries to follow job B's config and everyone's replies: refused by the server
        await ca.subscribe(names.config_watch_subject("jobB"), lambda m: keep("a_on_b", m))
        await ca.subscribe("_INBOX.>", lambda m: keep("inbox", m))
        for conn in (spy, ca, cb):
            await conn.flush()

        # both jobs join on their own join subject (allowed)
        for conn, job in ((ca, "jobA"), (cb, "jobB")):
            req = ControlRequest(
                op="join", job_id=job,
                join=JoinInfo(replica_id="0", rank=0, pid=1, initial_values={"lr": 0.1}),
            )  # fmt: skip
            raw = await conn.request(names.join_subject(job), encode(req), timeout_s=5)
            assert decode(raw, ControlReply).ok
        # job A may not join as job B, publish as job B, or call the control entry point
        with pytest.raises(TorchloomError):  # no reply: the publish was refused
            await ca.request(
                names.join_subject("jobB"),
                encode(ControlRequest(op="join", job_id="jobB",
                                      join=JoinInfo(replica_id="9", rank=0))),
                timeout_s=1,
            )  # fmt: skip
        await ca.publish(names.telemetry_subject("jobB", "0", 0), b"{}")
        await ca.publish(names.events_subject("jobB", "0", 0), b"{}")
        await ca.publish(names.telemetry_subject("jobA", "0", 0), b"{}")  # its own: allowed
        with pytest.raises(TorchloomError):
            await ca.request(
                names.control_subject("jobA"),
                encode(ControlRequest(op="set", job_id="jobA", values={"lr": 9.0})),
                timeout_s=1,
            )
        # the direct read of a stored config: its own job only
        kv_a = await KeyValue.open(ca, names.CONFIG_BUCKET, timeout_s=2)
        assert await kv_a.get("jobA") is not None
        with pytest.raises(TorchloomError):
            await kv_a.get("jobB")

        # the operator sets job A; job B hears nothing of it (their joins wrote v1 of each)
        await asyncio.sleep(0.3)
        got["a_cfg"].clear()
        got["b_cfg"].clear()
        op = await connect(url, name="operator", creds=operator(secure_up))
        raw = await op.request(
            names.control_subject("jobA"),
            encode(ControlRequest(op="set", job_id="jobA", values={"lr": 0.5})),
            timeout_s=5,
        )
        assert decode(raw, ControlReply).version == 2
        await asyncio.sleep(0.5)
        for conn in (op, spy, ca, cb):
            await conn.close()
        return got

    got = asyncio.run(run())
    assert got["a_cfg"] and not got["b_cfg"]  # the set on A reached A's ranks only
    assert not got["a_on_b"] and not got["inbox"]
    assert "loom.jobA.telemetry.0.0" in got["spy"]
    assert not [s for s in got["spy"] if s.startswith("loom.jobB.telemetry")]
    assert not [s for s in got["spy"] if s.startswith("loom.jobB.events")]
    # one control request reached the server: the operator's, not job A's own attempt
    assert [s for s in got["spy"] if s == "loom.jobA.control"] == ["loom.jobA.control"]
    client = WeaverClient(nats_url=secure_up.url, state_dir=secure_up.state_dir)
    jobs = {j["job_id"]: j for j in client.status()["jobs"]}
    assert {r["replica_id"] for r in jobs["jobB"]["ranks"]} == {"0"}  # no rank "9" in B


def test_training_job_runs_under_its_own_credentials(secure_up, tmp_path):
    path = cli("creds", "job", "mnist", "--state-dir", str(secure_up.state_dir)).stdout.strip()
    import os

    os.environ["TORCHLOOM_CREDS"] = path
    try:
        proc = launch_mnist(  # runs until stopped: a short job could end before the change
            secure_up.url, tmp_path, "--max-steps", "1000000", "--eval-every", "0",
            "--step-delay-ms", "10", nproc=1, torchrun=False,
        )  # fmt: skip
    finally:
        del os.environ["TORCHLOOM_CREDS"]
    client = WeaverClient(nats_url=secure_up.url, state_dir=secure_up.state_dir)
    try:
        wait_for(
            lambda: any(j["job_id"] == "mnist" for j in client.status()["jobs"]),
            timeout_s=60,
            what="the rank to join over TLS with its job credentials",
        )
        r = cli(
            "set", "lr=0.02", "--wait", "--job", "mnist", "--state-dir", str(secure_up.state_dir)
        )
        assert r.returncode == 0 and "applied by 1 rank" in r.stdout, r.stdout + r.stderr
        r = cli("stop", "--job", "mnist", "--state-dir", str(secure_up.state_dir))
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc.wait(120) == 0
    finally:
        kill_tree(proc)
    assert [s["lr"] for s in summaries(tmp_path)] == [0.02]
    print(json.dumps(client.status("mnist")["jobs"][0]["ranks"][0].get("state")))


def test_a_killed_rank_is_failed_from_its_connection_on_a_secure_server(secure_up, tmp_path):
    """The system account of a --secure server (its user an nkey over TLS) reports the closed
    connection of a job's rank: failed at once, not after the heartbeat timeout."""
    import os
    import signal

    path = cli("creds", "job", "sec", "--state-dir", str(secure_up.state_dir)).stdout.strip()
    os.environ["TORCHLOOM_CREDS"] = path
    try:
        proc = launch_mnist(secure_up.url, tmp_path, "--max-steps", "1000000", "--eval-every",
                            "0", nproc=1, torchrun=False, job="sec")  # fmt: skip
    finally:
        del os.environ["TORCHLOOM_CREDS"]
    client = WeaverClient(nats_url=secure_up.url, state_dir=secure_up.state_dir)
    try:
        wait_for(
            lambda: any(r["state"] == "training" for r in ranks(client, "sec")),
            timeout_s=60,
            what="the rank training over TLS",
        )
        os.kill(proc.pid, signal.SIGKILL)
        failed = wait_for(
            lambda: next((e for e in history(client, "sec") if e.kind == "rank_failed"), None),
            timeout_s=30,
            what="the killed rank failed",
        )
        assert "its connection closed" in failed.message
    finally:
        kill_tree(proc)
