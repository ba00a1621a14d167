"""`torchloom policy` and `torchloom sim` against a real `torchloom up`: settings changed live
and kept across a Weaver restart, bad input refused with nothing changed, a dry run that only
records, simulated ranks whose straggler the real Weaver rebalances, decisions exported."""

import json

import pytest

from tests.helpers import Up, cli, history, wait_for

pytestmark = pytest.mark.integration


def listed(url):
    r = cli("policy", "list", "--json", url=url)
    assert r.returncode == 0, r.stderr
    return {p["name"]: p for p in json.loads(r.stdout)}


def test_policy_settings_change_live_survive_a_restart_and_refuse_bad_input(tmp_path):
    up = Up(tmp_path / "state")
    try:
        p = listed(up.url)
        assert {n for n, x in p.items() if x["enabled"]} == {
            "straggler",
            "divergence",
            "failure",
            "checkpoint",
            "memory",
        }
        assert not p["sync_every"]["enabled"] and p["straggler"]["params"]["slow_ratio"] == 1.2

        r = cli("policy", "set", "straggler", "slow_ratio=1.5", "mitigation=alert", url=up.url)
        assert r.returncode == 0 and "slow_ratio=1.5" in r.stdout, r.stderr
        assert cli("policy", "enable", "sync_every", "--dry-run", url=up.url).returncode == 0
        assert cli("policy", "disable", "failure", url=up.url).returncode == 0
        for args, words in [
            (("set", "straggler", "slow_ratio=0.5"), "slow_ratio must be > 1"),
            (("set", "straggler", "slow_ratio=fast"), "slow_ratio"),
            (("set", "straggler", "speed=1"), "no parameter speed"),
            (("set", "straggler", "slow_ratio"), "PARAM=VALUE"),
            (("enable", "nope"), "unknown policy 'nope'"),
        ]:
            r = cli("policy", *args, url=up.url)
            assert r.returncode == 2 and words in r.stderr, (args, r.stdout, r.stderr)
        kinds = [e for e in history(up.client(), None) if e.kind == "policy_settings"]
        assert len(kinds) == 3  # the refused ones left no trace
    finally:
        up.stop()
    up = Up(tmp_path / "state")  # a new Weaver on the same state dir
    try:
        p = listed(up.url)
        assert p["straggler"]["params"]["slow_ratio"] == 1.5
        assert p["straggler"]["params"]["mitigation"] == "alert"
        assert p["sync_every"]["enabled"] and p["sync_every"]["dry_run"]
        assert not p["failure"]["enabled"]
    finally:
        up.stop()
    # a settings file given at start wins over the stored settings
    f = tmp_path / "policies.toml"
    f.write_text("[straggler]\nslow_ratio = 1.25\n[failure]\nenabled = true\n")
    up = Up(tmp_path / "state", "--policies", str(f))
    try:
        p = listed(up.url)
        assert p["straggler"]["params"]["slow_ratio"] == 1.25 and p["failure"]["enabled"]
    finally:
        up.stop()
    f.write_text("[straggler]\nslow_ratio = -1\n")
    r = cli("up", "--state-dir", str(tmp_path / "other"), "--policies", str(f))
    assert r.returncode == 2 and "slow_ratio" in r.stderr


def test_simulated_ranks_are_rebalanced_by_the_real_weaver_and_decisions_export(tmp_path, up):
    r = cli(
        "sim", "--job", "simjob", "--groups", "4", "--ranks-per-group", "2",
        "--duration-s", "14", "--slow", "2:5:1.8", url=up.url, timeout_s=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "policy_straggler" in r.stdout
    events = history(up.client(), "simjob")
    d = next(e for e in events if e.kind == "policy_straggler")
    assert d.data["action"] == "set" and d.data["outcome"]["done"]
    assert "2/0" in d.data["features"]["flagged"] and "2/1" in d.data["features"]["flagged"]
    wait_for(  # recorded from the last telemetry: may land after the run ends
        lambda: any(
            e.kind == "config_applied" and e.version == d.version
            for e in history(up.client(), "simjob")
        ),
        timeout_s=30,
        what=f"config_applied for v{d.version}",
    )

    out = tmp_path / "decisions.jsonl"
    r = cli("policy", "export", "--out", str(out), "--job", "simjob", url=up.url)
    assert r.returncode == 0 and "1 decision(s)" in r.stdout, r.stdout + r.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["policy"] == "straggler" and row["features"]["weights_after"]["2"] < 1.0
    assert row["outcome"]["version"] == d.version


def test_a_dry_run_policy_records_what_it_would_do_and_changes_nothing(tmp_path, up):
    assert cli("policy", "enable", "straggler", "--dry-run", url=up.url).returncode == 0
    r = cli(
        "sim", "--job", "dry", "--groups", "3", "--duration-s", "10", "--slow", "1:3:2",
        url=up.url, timeout_s=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    events = history(up.client(), "dry")
    d = next(e for e in events if e.kind == "policy_straggler")
    assert d.message.startswith("[dry run]") and d.data["dry_run"]
    assert d.data["outcome"] == {"done": False, "why": "dry run"}
    assert not [e for e in events if e.kind == "config_set"]
