"""Timeouts that follow the run: a replica group slowed by SIGSTOP duty cycling (stopped 1.5 s
of every 2 s, and in short bursts in between) outlasts a fixed 1 s collective timeout and the Weaver's 0.8 s heartbeat timeout.
With the timeouts policy off it is cut off over and over (its peers' steps are not committed,
the Weaver declares it failed at every stop); with it on, the policy raises the timeouts from
the measured stalls and silences, the group stays in, and the straggler policy rebalances the
global batch away from it (with the samples per second the job loses to it)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import (
    DutyCycle,
    Up,
    cli,
    history,
    job_status,
    kill_tree,
    ranks,
    start_two_groups,
    wait_for,
)

pytest.importorskip("torchft")
pytestmark = pytest.mark.integration


def slow_pid(client) -> int | None:
    """The pid of replica group 1's rank, once it trains."""
    return next(
        (
            r["pid"]
            for r in ranks(client, "ft")
            if r["replica_id"] == "1" and r["state"] == "training"
        ),
        None,
    )


def kinds(events, kind, replica):
    return [e for e in events if e.kind == kind and e.replica_id == replica]


@pytest.mark.parametrize("policy", ["off", "on"])
def test_a_slowed_group_is_cut_off_by_fixed_timeouts_and_kept_by_the_policy(tmp_path, policy):
    # the lighthouse keeps a stopped group for 5 s (torchft's default), so what cuts it off is
    # what this test is about: torchft's collective timeout and the Weaver's heartbeat timeout
    up = Up(tmp_path / "up", "--lighthouse-heartbeat-timeout-ms", "5000")
    client = up.client()
    if policy == "on":
        r = cli("policy", "enable", "timeouts", url=up.url)
        assert r.returncode == 0, r.stdout + r.stderr
    sup, log = start_two_groups(
        up,
        tmp_path,
        100000,
        *("--global-batch-size", "128", "--collective-timeout-s", "1"),
        step_delay_ms=10,
    )
    cycle = None
    try:
        rs = wait_for(
            lambda: (
                (x := ranks(client, "ft"))
                and len(x) == 2
                and all(r["step"] > 30 and (r["quorum"] or {}).get("participants") == 2 for r in x)
                and x
            ),
            timeout_s=120,
            what="two groups in one quorum",
        )
        slow = next(r for r in rs if r["replica_id"] == "1")
        # stalls of 1.5 s every 2 s, and in between every step slowed (stopped 20 of every 40 ms)
        # (a group that crashed under the stops is restarted on the same slow "host": the stops
        # follow its new process)
        cycle = DutyCycle(
            slow["pid"],
            stop_s=1.5,
            run_s=0.5,
            fine=(0.02, 0.02),
            follow=lambda: slow_pid(client),
        )
        if policy == "off":
            try:
                events = wait_for(
                    lambda: (
                        (ev := history(client, "ft"))
                        and len(kinds(ev, "rank_failed", "1")) >= 2
                        and len(kinds(ev, "commit_failed", "0")) >= 1
                        and ev
                    ),
                    timeout_s=120,
                    what="group 1 cut off and a step of group 0 not committed",
                )
            except AssertionError:
                ev = history(client, "ft")
                raise AssertionError(
                    f"group 1 failed {len(kinds(ev, 'rank_failed', '1'))}x, group 0's commits "
                    f"failed {len(kinds(ev, 'commit_failed', '0'))}x in {cycle.cycles} stops; "
                    "last events: " + " | ".join(e.message for e in ev[-15:])
                ) from None
            assert not [e for e in events if e.kind == "policy_timeouts"]
            print(
                f"fixed timeouts: group 1 failed {len(kinds(events, 'rank_failed', '1'))}×, "
                f"group 0's step not committed {len(kinds(events, 'commit_failed', '0'))}× "
                f"in {cycle.cycles} stops"
            )
            return

        # the timeouts in force are the desired config's (each policy decision names only the
        # timeouts it moves, and a decision may be refused or superseded): wait until the stops'
        # silences were judged and the desired config holds both raised timeouts
        def raised_enough() -> tuple[Any, int, dict[str, Any]] | None:
            decisions = [e for e in history(client, "ft") if e.kind == "policy_timeouts"]
            silences = [e for e in decisions if e.data["features"]["silence_s"] >= 1.0]
            desired = (job_status(client, "ft") or {}).get("desired") or {}
            values = desired.get("values") or {}
            if (
                silences
                and values.get("collective_timeout_s", 0) >= 3.0
                and values.get("failure_timeout_s", 0) >= 3.0
            ):
                return silences[-1], desired["version"], values
            return None

        decided, version, raised = wait_for(
            raised_enough, timeout_s=120, what="the timeouts policy to raise them on the stops"
        )
        # from the first quorum formed under the raised timeouts (the process group takes its
        # timeout when it is reconfigured) on, nothing is cut off, and the straggler policy
        # moves work away from the slow group (a later version, the straggler's rebalance,
        # may supersede this one before it takes effect: it carries the same timeouts)
        applied = wait_for(
            lambda: [
                e
                for e in history(client, "ft")
                if e.kind == "config_applied" and (e.version or 0) >= version
            ],
            timeout_s=60,
            what=f"the raised timeouts (v{version} or later) applied",
        )[0]
        rebalanced = wait_for(
            lambda: [
                e
                for e in history(client, "ft")
                if e.kind == "policy_straggler" and e.data["values"].get("batch_weights")
            ],
            timeout_s=180,
            what="the straggler policy's rebalance",
        )[-1]

        def thirty_more_steps() -> None:
            end_step = max(r["step"] for r in ranks(client, "ft")) + 30
            wait_for(
                lambda: min(r["step"] for r in ranks(client, "ft")) >= end_step,
                timeout_s=120,
                what="30 more steps",
            )

        # (a stop right after the change may still fail once: the process group takes its
        # new timeout when it is next reconfigured, at the quorum after that failure — which
        # may come before or after the rebalance)
        thirty_more_steps()
        reconfigured = [
            e for e in history(client, "ft") if e.kind == "quorum_changed" and e.ts > applied.ts
        ]
        start_ts = reconfigured[0].ts if reconfigured else applied.ts
        thirty_more_steps()  # at least 30 steps under the new timeouts, whatever start_ts is
        after = [e for e in history(client, "ft") if e.ts > start_ts]
        assert not kinds(after, "rank_failed", "1"), kinds(after, "rank_failed", "1")
        assert not [e for e in after if e.kind == "commit_failed"], after
        # the policy moved work away from the slow group (on a loaded machine a later round may
        # correct an overshoot back: any of its rebalances counts, not only the last)
        rebalances = [
            e
            for e in history(client, "ft")
            if e.kind == "policy_straggler" and e.data["values"].get("batch_weights")
        ]
        assert any(e.data["features"]["weights_after"]["1"] < 1.0 for e in rebalances), [
            e.message for e in rebalances
        ]
        assert rebalanced.data["features"]["lost_samples_per_s"] is not None
        print(
            f"{decided.message} (in force: {raised})\n{rebalanced.message}\n"
            f"stops meanwhile: {cycle.cycles}, pids stopped: {cycle.pids}"
        )
    except Exception:  # say what the run did: every change of config, then the last events
        events = history(client, "ft")
        changes = [e for e in events[:-40] if e.kind.startswith(("config_", "policy_"))]
        for e in changes + events[-40:]:
            print(f"{e.ts:.2f} v{e.version} {e.kind}: {e.message}")
        raise
    finally:
        if cycle is not None:
            cycle.end()
        kill_tree(sup)
        log.close()
        up.stop()
