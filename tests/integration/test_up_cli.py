"""`torchloom up` and the CLI as a user runs them: real processes, real NATS."""

import json
import signal

import pytest

from tests.helpers import Up, cli, pid_alive, wait_for
from torchloom.paths import read_endpoint

pytestmark = pytest.mark.integration


def nats_child_pid(up: Up) -> int:
    import psutil

    kids = [p for p in psutil.Process(up.proc.pid).children() if "nats-server" in p.name()]
    assert len(kids) == 1
    return kids[0].pid


def test_second_up_on_the_same_state_dir_says_so_and_sigterm_leaves_no_orphan(tmp_path):
    first = Up(tmp_path / "state")
    nats_pid = nats_child_pid(first)
    second = cli("up", "--state-dir", str(tmp_path / "state"))
    assert second.returncode == 1
    assert (
        "already running" in second.stderr
        and str(first.proc.pid) in second.stderr
        and first.url in second.stderr
    )
    assert "Traceback" not in second.stderr + second.stdout
    assert first.stop(signal.SIGTERM) == 0
    wait_for(lambda: not pid_alive(nats_pid), timeout_s=30, what="nats-server to exit")
    assert read_endpoint(tmp_path / "state") is None


def test_kill_9_of_up_takes_its_nats_server_along(tmp_path):
    up = Up(tmp_path / "state")
    nats_pid = nats_child_pid(up)
    up.stop(signal.SIGKILL)
    wait_for(
        lambda: not pid_alive(nats_pid), timeout_s=30, what="nats-server to die with its parent"
    )
    again = Up(tmp_path / "state")  # the lock died with the process; the state dir is usable
    again.stop()


def test_up_with_an_external_nats_starts_none(tmp_path, nats):
    import psutil

    up = Up(tmp_path / "state", "--lighthouse", "none", nats_url=nats.url)
    try:
        assert up.url == nats.url
        # issue 16.9: it said "(torchft not installed)" with torchft installed
        banner = wait_for(lambda: up.log_path.read_text(), timeout_s=10, what="the banner")
        assert "none (--lighthouse none)" in banner and "not installed" not in banner
        assert not [p for p in psutil.Process(up.proc.pid).children() if "nats-server" in p.name()]
        r = cli("status", "--json", url=up.url)
        assert r.returncode == 0 and json.loads(r.stdout)["jobs"] == []
    finally:
        up.stop()


def test_user_mistakes_get_one_line_and_a_nonzero_exit(tmp_path, up):
    cases = [
        (
            ["status", "--state-dir", str(tmp_path / "nothing-here")],
            None,
            3,
            "no torchloom is running",
        ),
        (
            ["set", "lr=0.1", "--nats-url", "nats://127.0.0.1:9"],
            None,
            3,
            "no NATS server reachable",
        ),
        (["set", "lr=0.1", "--job", "ghost"], up.url, 2, "unknown job 'ghost'"),
        (["set", "lr", "--job", "ghost"], up.url, 2, "expected KNOB=VALUE"),
        (["pause"], up.url, 2, "no job is known"),
    ]
    for args, url, code, fragment in cases:
        r = cli(*args, url=url)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert fragment in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_client_raises_the_weavers_error_class(up):
    import torchloom
    from torchloom.errors import InvalidKnobError, UnknownJobError

    client = up.client()
    with pytest.raises(UnknownJobError) as unknown:
        client.control("set", "nobody", values={"lr": 0.1})
    assert unknown.value.remote
    run = torchloom.init(job_id="typed", knobs={"lr": 0.1}, nats_url=up.url)
    try:
        wait_for(lambda: run.agent.joined.is_set(), timeout_s=30, what="the join")
        with pytest.raises(InvalidKnobError) as bad:
            client.control("set", "typed", values={"lr": -1})
        assert bad.value.knob == "lr" and "must be > 0" in bad.value.message
    finally:
        run.close()


def test_events_follow_streams_new_history_as_json(up):
    import subprocess
    import threading

    import torchloom
    from tests.helpers import BIN

    follower = subprocess.Popen(
        [str(BIN / "torchloom"), "events", "--follow", "--json", "--nats-url", up.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[dict] = []
    reader = threading.Thread(
        target=lambda: [lines.append(json.loads(x)) for x in follower.stdout], daemon=True
    )
    reader.start()
    try:
        # the follower reads the history from its start: no need to wait for it to subscribe
        run = torchloom.init(
            job_id="followed", knobs={"lr": 0.1}, nats_url=up.url, rank=0, replica_id="0"
        )
        wait_for(
            lambda: [e for e in lines if e["kind"] == "job_started" and e["job_id"] == "followed"],
            timeout_s=60,
            what="job_started on the follower",
        )
        run.close()
        wait_for(
            lambda: [e for e in lines if e["kind"] == "rank_exited"],
            timeout_s=60,
            what="rank_exited",
        )
    finally:
        follower.terminate()
        follower.wait(5)
