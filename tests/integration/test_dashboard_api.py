"""The dashboard's HTTP API, SSE feed, /metrics and access rules, against a real `torchloom up`
and a real MNIST job (2 DDP ranks under torchrun)."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from tests.helpers import BIN, Up, kill_tree, launch_mnist, wait_for

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123"


def api(up: Up, *, token: str | None = TOKEN) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=up.ui_url or "", headers=headers, timeout=10)


def both_training(c: httpx.Client, min_step: int = 5):
    r = c.get("/api/jobs/mnist/ranks")
    rows = r.json() if r.status_code == 200 else []
    ok = len(rows) == 2 and all(x["state"] == "training" and x["step"] >= min_step for x in rows)
    return ok and rows


def test_api_reads_steers_and_guards_a_live_job(tmp_path):
    up = Up(tmp_path / "state", "--ui-token", TOKEN)
    proc = launch_mnist(
        up.url, tmp_path, "--max-steps", "100000", "--eval-every", "50", "--step-delay-ms", "20"
    )
    try:
        assert up.ui_url and up.ui_url.startswith("http://127.0.0.1:")
        c = api(up)
        rows = wait_for(lambda: both_training(c), timeout_s=60, what="both ranks in the API")
        assert {r["id"] for r in rows} == {"0/0", "0/1"}
        assert all(r["host"] and r["device"].startswith("cpu:") and r["pid"] for r in rows)

        # access: nothing without the token; the page itself is only the login form
        anon = api(up, token=None)
        assert anon.get("/api/jobs").status_code == 401
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/api/openapi.json").status_code == 401
        page = anon.get("/")
        assert page.status_code == 200 and "Log in" in page.text and "knob" not in page.text
        assert anon.post("/api/session", json={"token": "wrong-token"}).status_code == 401
        assert anon.post("/api/jobs/mnist/pause", json={}).status_code == 401
        login = anon.post("/api/session", json={"token": TOKEN})
        assert login.status_code == 200 and "httponly" in login.headers["set-cookie"].lower()
        assert anon.get("/api/jobs").status_code == 200  # the session cookie now
        assert TOKEN not in login.headers["set-cookie"]
        # no state change by GET, no form posts (CSRF), no other Host (DNS rebinding)
        assert c.get("/api/jobs/mnist/pause").status_code == 405
        form = c.post("/api/jobs/mnist/pause", content=b"reason=x")
        assert form.status_code == 415 and form.json()["error"]["code"] == "invalid_request"
        assert c.post("/api/jobs", content=b"x").status_code == 405  # no POST route there
        assert c.get("/api/jobs", headers={"host": "evil.example:80"}).status_code == 421

        # read-only views
        jobs = c.get("/api/jobs").json()
        assert [j["job_id"] for j in jobs] == ["mnist"]
        assert jobs[0]["groups_total"] == 1 and jobs[0]["ranks_live"] == 2
        cfg = c.get("/api/jobs/mnist/config").json()
        lr = next(k for k in cfg["knobs"] if k["name"] == "lr")
        assert lr["type"] == "float" and lr["min"] == 0.0 and lr["rule"].startswith("float > 0")
        assert c.get("/api/jobs/nope").status_code == 404
        health = c.get("/api/health").json()
        assert health["nats_connected"] and health["ready"]
        spec = c.get("/api/openapi.json").json()
        for path in ("/api/jobs", "/api/jobs/{job_id}/ranks", "/api/jobs/{job_id}/events",
                     "/api/jobs/{job_id}/config", "/api/jobs/{job_id}/drain", "/metrics"):  # fmt: skip
            assert path in spec["paths"], path
        ok_schema = spec["paths"]["/api/jobs/{job_id}/ranks"]["get"]["responses"]["200"]
        assert ok_schema["content"]["application/json"]["schema"]["items"]["$ref"].endswith(
            "/RankDetail"
        )
        assert {"Header", "Health", "ConfigView", "KnobInfo", "EventView"} <= set(
            spec["components"]["schemas"]
        )

        # actions: refused with a readable error that names the knob, nothing changes
        version = cfg["version"]
        bad = c.post("/api/jobs/mnist/config", json={"values": {"lr": "-1"}})
        assert bad.status_code == 400
        assert bad.json()["error"]["knob"] == "lr" and "lr" in bad.json()["error"]["message"]
        unknown = c.post("/api/jobs/mnist/config", json={"values": {"lr": 0.1}, "replica_id": "7"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_replica"
        broken = c.post(
            "/api/jobs/mnist/config",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_request"
        assert c.get("/api/jobs/mnist/config").json()["version"] == version

        # a change through the API is applied by both ranks at one step
        ok = c.post("/api/jobs/mnist/config", json={"values": {"lr": "0.02"}, "reason": "api test"})
        assert ok.status_code == 200, ok.text
        v, step = ok.json()["version"], ok.json()["effective_step"]
        assert v == version + 1

        def applied():
            a = [x for x in c.get("/api/jobs/mnist/config").json()["applies"] if x["version"] == v]
            return a and a[0]["done"] and a[0]

        done = wait_for(applied, timeout_s=30, what=f"v{v} applied")
        assert set(done["applied"].values()) == {step}
        rows = c.get("/api/jobs/mnist/ranks").json()
        assert all(r["config"]["lr"] == 0.02 and r["applied_version"] == v for r in rows)
        events = c.get("/api/jobs/mnist/events", params={"category": "config"}).json()
        assert {"config_set", "config_applied"} <= {e["kind"] for e in events}
        assert any("by web:127.0.0.1" in e["message"] for e in events)

        # the live feed: a snapshot first, then updates that carry the job's progress (read
        # until the step moves: an evaluation every 50 steps holds the job for a few seconds)
        with c.stream("GET", "/api/stream", params={"job": "mnist"}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            frames = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    frames.append(json.loads(line[6:]))
                moved = [f for f in frames[1:] if "header" in f]
                if moved and moved[-1]["header"]["step"] > frames[0]["header"]["step"]:
                    break
                assert len(frames) < 120, "the step did not move in 60 s of frames"
        assert frames[0]["type"] == "snapshot" and len(frames[0]["ranks"]) == 2
        assert frames[0]["config"]["version"] == v
        assert len(frames) >= 2 and {f["type"] for f in frames[1:]} == {"update"}

        # Prometheus
        text = c.get("/metrics").text
        assert 'torchloom_rank_step{job="mnist",rank="0",replica="0"}' in text
        assert f'torchloom_job_config_version{{job="mnist"}} {float(v)}' in text
        assert 'torchloom_rank_state{job="mnist",rank="1",replica="0",state="training"} 1.0' in text

        # stop through the API: both ranks finish, the page's history has it
        stop = c.post("/api/jobs/mnist/stop", json={"reason": "done testing"})
        assert stop.status_code == 200, stop.text
        assert proc.wait(60) == 0
        assert c.post("/api/jobs/mnist/resume", json={}).status_code == 400
    finally:
        kill_tree(proc)
        up.stop()

    # the history survives a Weaver restart, and the page's API shows it
    again = Up(tmp_path / "state", "--ui-token", TOKEN)
    try:
        c = api(again)
        want = {"job_started", "config_set", "config_applied", "weaver_started"}
        kinds = wait_for(  # weaver_started is appended off the start's path
            lambda: (
                want <= (k := {e["kind"] for e in c.get("/api/jobs/mnist/events").json()}) and k
            ),
            timeout_s=30,
            what="history read back",
        )
        assert want <= kinds
        texts = [e["message"] for e in c.get("/api/jobs/mnist/events").json()]
        assert any("done testing" in t or "stop" in t for t in texts)
    finally:
        again.stop()


OFF_LOOPBACK = ("--ui-host", "0.0.0.0", "--no-secure")


def test_the_dashboard_refuses_to_serve_off_loopback_without_a_token(tmp_path):
    # --no-secure: the default beyond loopback is secure mode, which makes a token itself
    r = subprocess.run(
        [str(BIN / "torchloom"), "up", "--state-dir", str(tmp_path / "s"), *OFF_LOOPBACK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "without a token" in r.stderr + r.stdout


def test_a_taken_default_port_falls_back_but_an_explicit_one_fails(tmp_path):
    first = Up(tmp_path / "a")
    try:
        port = (first.ui_url or "").rsplit(":", 1)[1].strip("/")
        r = subprocess.run(
            [str(BIN / "torchloom"), "up", "--state-dir", str(tmp_path / "b"), "--ui-port", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and f"cannot serve the dashboard on 127.0.0.1:{port}" in (
            r.stderr + r.stdout
        )
    finally:
        first.stop()
