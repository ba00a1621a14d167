"""A minimal training process for tests: ``torchloom.init`` with an explicit identity and step
counter, a ~10 ms step, and one line on stdout for every config version it applies.

python rank_loop.py URL JOB REPLICA RANK [START_STEP]
"""

import sys
import time

import torchloom

url, job, replica, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start_step = int(sys.argv[5]) if len(sys.argv) > 5 else 0
run = torchloom.init(
    job_id=job,
    replica_id=replica,
    rank=rank,
    knobs={"lr": 0.1},
    nats_url=url,
    start_step=start_step,
    interval_ms=100,
)
print(f"started pid {run.identity.pid}", flush=True)
applied = 0
for step in run.steps():
    if run.applied_version != applied:
        applied = run.applied_version
        print(f"applied v{applied} at step {step} lr={run['lr']}", flush=True)
    run.log(loss=1.0)
    time.sleep(0.01)
print(f"left at step {run.step}: {run.stop_reason}", flush=True)
