"""The CLI's status rendering in a narrow terminal (issue 16.9: at 80 columns every cell was
cut to "tra…", "0.…")."""

from rich.console import Console

from torchloom.cli import render


def rank(replica, r, state="training"):
    return {
        "replica_id": replica,
        "rank": r,
        "state": state,
        "step": 123456,
        "metrics": {"loss": 0.0123456, "test_acc": 0.9876},
        "samples_per_s": 1914.2,
        "step_time_s": 0.0669,
        "applied_version": 12,
        "applied_at_step": 123000,
        "desired_version": 12,
        "heartbeat_age_s": 0.2,
        "device": "GPU-2f1c8d9e-aaaa-bbbb-cccc-1234567890ab",
        "host": "node-0042.cluster.example.org",
        "pid": 4323123,
        "quorum": {"quorum_id": 7, "participants": 2},
    }


def job():
    return {
        "job_id": "mnist",
        "desired": {"version": 12, "effective_step": 123000, "run_state": "running", "values": {}},
        "ranks": [rank("0", 0), rank("1", 0, "failed")],
        "summary": {
            "ranks": 2,
            "states": {"failed": 1, "training": 1},
            "replica_groups": 2,
            "replica_groups_live": 1,
            "applied_versions": {"12": 1},
            "slowest": [],
            "outliers": [],
        },
        "page": {"offset": 0, "limit": 50, "matched": 2, "sort": "attention"},
    }


def text(width):
    console = Console(width=width, record=True, color_system=None)
    console.print(render.status_view({"jobs": [job()]}, width=width))
    return console.export_text()


def test_a_narrow_terminal_shows_fewer_columns_whole_instead_of_every_column_cut():
    narrow = text(80)
    assert "…" not in narrow
    for cell in ("0/0", "training", "failed", "123456", "v12 @ 123000", "0.01235"):
        assert cell in narrow
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert "host:pid" not in narrow  # the least useful columns went
    wide = text(220)
    assert "node-0042.cluster.example.org:4323123" in wide and "q7 ×2" in wide
    assert "1 failed · 1 training | 1/2 replica groups live" in wide


def test_mfu_shows_only_when_a_rank_reports_it_as_a_percentage_or_tflops():
    assert "MFU" not in text(220)
    j = job()
    j["ranks"][0]["metrics"] = {"loss": 1.0, "mfu": 0.4123}
    j["ranks"][1]["metrics"] = {"loss": 1.0, "flops_per_s": 3.5e10}  # a CPU: no peak, no MFU
    console = Console(width=220, record=True, color_system=None)
    console.print(render.status_view({"jobs": [j]}, width=220))
    out = console.export_text()
    assert "MFU" in out and "41.2%" in out and "0.035 TF/s" in out
