"""Replica groups on hosts of their own, their link shaped with tc: the gradients really cross
it (limiting it slows the steps down), and a codec switched live buys the speed back."""

from __future__ import annotations

import json
import os
import time

import pytest

from torchloom.client import WeaverClient
from torchloom.sim.hosts import Network, available

pytest.importorskip("torchft")
pytestmark = pytest.mark.integration

WHY = available()


def steps_per_s(client: WeaverClient, job: str, seconds: float) -> float:
    def step() -> int:
        return min(r["step"] for r in client.status(job)["jobs"][0]["ranks"])

    s0, t0 = step(), time.monotonic()
    time.sleep(seconds)  # a rate over a span of time: the span is the measurement, not a wait
    return (step() - s0) / (time.monotonic() - t0)


@pytest.mark.skipif(WHY is not None, reason=WHY or "")
def test_a_limited_link_slows_the_groups_and_powersgd_wins_the_speed_back(tmp_path):
    from tests.helpers import wait_for
    from torchloom.sim.groups import Site

    with Network(net=40 + os.getpid() % 20, tag="sl") as net:
        hosts = [net.add_host(f"g{i}") for i in range(2)]
        with Site(net, state_dir=tmp_path / "site") as site:
            client = WeaverClient(nats_url=site.nats_url, timeout_s=10.0)
            for i, h in enumerate(hosts):
                site.start_group(
                    h,
                    replica_id=str(i),
                    groups=2,
                    job="shaped",
                    args=[
                        *("--max-steps", "1000000", "--eval-every", "0", "--log-every", "0"),
                        *("--out-dir", str(tmp_path / "out")),
                    ],
                )
            wait_for(
                lambda: (
                    len(rs := client.status("shaped")["jobs"][0]["ranks"]) == 2
                    and all(
                        r["step"] >= 20 and (r["quorum"] or {}).get("participants") == 2 for r in rs
                    )
                ),
                timeout_s=180,
                what="both groups in one quorum",
            )
            free = steps_per_s(client, "shaped", 6)
            hosts[1].limit(rate_mbit=10, both_ways=True)
            limited = steps_per_s(client, "shaped", 6)
            reply = client.control("set", "shaped", values={"grad_compression": "powersgd:4"})
            assert reply.ok
            wait_for(
                lambda: all(
                    r["applied_version"] >= reply.version
                    for r in client.status("shaped")["jobs"][0]["ranks"]
                ),
                timeout_s=120,
                what="powersgd:4 applied",
            )
            compressed = steps_per_s(client, "shaped", 6)
            client.control("stop", "shaped")
            wait_for(
                lambda: len(list((tmp_path / "out").glob("*.json"))) == 2,
                timeout_s=120,
                what="both groups' summaries",
            )
    print(
        f"steps/s: free {free:.1f}, 10 Mbit/s {limited:.1f}, 10 Mbit/s powersgd:4 {compressed:.1f}"
    )
    assert limited < free / 2  # the link is what the groups' gradients cross
    assert compressed > 2 * limited  # a tenth of the bytes
    out = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))]
    assert (
        len({o["params_sha256"] for o in out}) == 1 and out[0]["grad_compression"] == "powersgd:4"
    )
