"""Gradient codecs and the network policy on a shaped link between two replica groups.

Two replica groups of the MNIST job under torchft, each in a network namespace of its own
(torchloom.sim.groups: NATS, the Weaver and the lighthouse on the machine's bridge address), so
every gradient byte crosses their links. For each codec and for the ``network`` policy, one run:
the link of group 1 limited to ``--rate-mbit`` both ways for ``--limited-s`` seconds, then freed
for ``--free-s`` seconds (measured in two halves: the policy needs a while to find the link
again), then stopped; samples per second in each phase (from the committed
steps the Weaver sees, × the global batch of 128), bytes per step per rank (the ranks' own
count) and the test accuracy at the end — side by side, and the policy against ``none``.

    sudo python bench/network.py [--rate-mbit 20] [--limited-s 45] [--free-s 60]
        [--codecs none,bf16,powersgd:4,topk:0.01]

Needs root (network namespaces, tc) and the torchft extra. CPU only: both groups share this
machine's cores, so compute is slow and the link matters only once it is limited.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torchloom.client import WeaverClient
from torchloom.protocol import ControlRequest
from torchloom.protocol.names import ALL_JOBS
from torchloom.sim.groups import Site
from torchloom.sim.hosts import Network, available

GLOBAL_BATCH = 128


def ranks(client: WeaverClient, job: str) -> list[dict[str, Any]]:
    jobs = client.status(job).get("jobs", [])
    return jobs[0]["ranks"] if jobs else []


def wait(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = pred()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}")


def set_policy(client: WeaverClient, *, enabled: bool) -> None:
    client.request(
        ControlRequest(
            op="policy", job_id=ALL_JOBS, values={"policy": "network", "enabled": enabled}
        )
    )


def rate(client: WeaverClient, job: str, seconds: float) -> float:
    """Samples per second over ``seconds``: committed steps of the slower group × the batch."""

    def step() -> int:
        return min(r["step"] for r in ranks(client, job))

    s0, t0 = step(), time.monotonic()
    time.sleep(seconds)
    return (step() - s0) * GLOBAL_BATCH / (time.monotonic() - t0)


def one_run(
    site: Site, hosts: list[Any], client: WeaverClient, name: str, codec: str, args: Any, out: Path
) -> dict[str, Any]:
    job = "net-" + name.replace(":", "-").replace(".", "")
    policy = name == "policy"
    if policy:
        set_policy(client, enabled=True)
    procs = [
        site.start_group(
            h,
            replica_id=str(i),
            groups=2,
            job=job,
            args=[
                *("--max-steps", "1000000", "--eval-every", "0", "--log-every", "0"),
                *("--global-batch-size", str(GLOBAL_BATCH), "--grad-compression", codec),
                *("--out-dir", str(out / job)),
            ],
        )
        for i, h in enumerate(hosts)
    ]
    try:
        wait(
            lambda: (
                len(rs := ranks(client, job)) == 2
                and all(
                    r["step"] >= 20 and (r["quorum"] or {}).get("participants") == 2 for r in rs
                )
            ),
            180,
            "both groups in one quorum",
        )
        hosts[1].limit(rate_mbit=args.rate_mbit, both_ways=True)
        limited = rate(client, job, args.limited_s)
        hosts[1].limit(rate_mbit=None)
        free_early = rate(client, job, args.free_s / 2)  # the policy finds the link again
        free = rate(client, job, args.free_s / 2)
        client.control("stop", job)
        for p in procs:
            p.wait(120)
    finally:
        hosts[1].limit(rate_mbit=None)
        if policy:
            set_policy(client, enabled=False)
        for p in procs:
            if p.poll() is None:
                p.kill()
    summaries = [json.loads(f.read_text()) for f in sorted((out / job).glob("*.json"))]
    sent = [s["comm_bytes"].get("sent", 0) / max(1, s["steps_run"]) for s in summaries]
    decisions = []
    if policy:
        events: list[Any] = []
        client.history(job, follow=False, on_event=events.append)
        decisions = [e.message for e in events if e.kind == "policy_network"]
    return {
        "run": name,
        "limited_samples_per_s": round(limited, 1),
        "free_early_samples_per_s": round(free_early, 1),
        "free_samples_per_s": round(free, 1),
        "bytes_per_step": round(sum(sent) / max(1, len(sent))),
        "test_acc": min((s["test_acc"] or 0.0) for s in summaries) if summaries else None,
        "final_codec": summaries[0]["grad_compression"] if summaries else None,
        "decisions": decisions,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-mbit", type=float, default=20.0)
    ap.add_argument("--limited-s", type=float, default=45.0)
    ap.add_argument("--free-s", type=float, default=60.0)
    ap.add_argument("--codecs", default="none,bf16,powersgd:4,topk:0.01")
    ap.add_argument("--no-policy", action="store_true", help="leave out the policy's run")
    args = ap.parse_args()
    why = available()
    if why is not None or shutil.which("tc") is None:
        print(f"cannot run: {why or 'tc (iproute2) is not installed'}", file=sys.stderr)
        return 2
    runs = [(c, c) for c in args.codecs.split(",")]
    if not args.no_policy:
        runs.append(("policy", "none"))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="loom-net-"))
    with Network(net=60 + os.getpid() % 30, tag="nb") as net:
        hosts = [net.add_host(f"g{i}") for i in range(2)]
        with Site(net, state_dir=work / "site") as site:
            client = WeaverClient(nats_url=site.nats_url, timeout_s=10.0)
            for name, codec in runs:
                row = one_run(site, hosts, client, name, codec, args, work)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{time.strftime('%Y-%m-%d')} · {os.cpu_count()} CPUs · link of group 1 limited to "
        f"{args.rate_mbit:g} Mbit/s both ways for {args.limited_s:g} s, then free for {args.free_s:g} s"
    )
    print("samples/s: limited; free, first half; free, second half")
    print(
        f"{'run':<12}{'limited':>9}{'free 1st':>10}{'free 2nd':>10}{'bytes/step':>12}{'test acc':>10}"
    )
    for r in rows:
        print(
            f"{r['run']:<12}{r['limited_samples_per_s']:>9}{r['free_early_samples_per_s']:>10}"
            f"{r['free_samples_per_s']:>10}{r['bytes_per_step']:>12}{r['test_acc']!s:>10}"
        )
    base = next((r for r in rows if r["run"] == "none"), None)
    pol = next((r for r in rows if r["run"] == "policy"), None)
    if base and pol:
        print(
            f"policy / none: limited ×{pol['limited_samples_per_s'] / base['limited_samples_per_s']:.2f}, "
            f"free, second half ×{pol['free_samples_per_s'] / base['free_samples_per_s']:.2f}"
        )
        for d in pol["decisions"]:
            print("  " + d)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
