import random

import pytest

from torchloom.chaos import FailurePlan, choose_victim, failure_steps, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("12", 12.0)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "-3s", "3 parsecs"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


RANKS = [
    {"replica_id": "0", "rank": 0, "state": "training", "host": "a", "pid": 10, "step": 5},
    {"replica_id": "1", "rank": 0, "state": "training", "host": "a", "pid": 11, "step": 5},
    {"replica_id": "2", "rank": 0, "state": "failed", "host": "a", "pid": 12, "step": 5},
    {"replica_id": "3", "rank": 0, "state": "training", "host": "b", "pid": 13, "step": 5},
]


def test_victims_are_live_local_and_seeded():
    picks = [
        choose_victim(RANKS, target="random", host="a", rng=random.Random(7))["pid"]
        for _ in range(5)
    ]
    assert len(set(picks)) == 1 and picks[0] in (
        10,
        11,
    )  # same seed, same choice; never failed or remote
    assert choose_victim(RANKS, target="1", host="a", rng=random.Random(0))["pid"] == 11
    assert choose_victim(RANKS, target="3", host="a", rng=random.Random(0)) is None


def test_failure_plan_round_trips_through_the_environment():
    env = FailurePlan().fail_at("1", 60).fail_at("0", 200).fail_at("1", 90).env()
    assert failure_steps("1", env) == {60, 90}
    assert failure_steps("0", env) == {200}
    assert failure_steps("7", env) == frozenset()
    assert failure_steps("1", {}) == frozenset()
