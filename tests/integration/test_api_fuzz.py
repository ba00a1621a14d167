"""schemathesis fuzzes the dashboard's HTTP API from its own OpenAPI description, against a
real `torchloom up` holding a job: no request may get a 5xx or an answer off its schema."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.integration.test_failover import join
from torchloom.client import WeaverClient

pytestmark = pytest.mark.integration


def test_http_api_survives_schemathesis(up, tmp_path):
    join(up.client(), "j")
    assert up.ui_url is not None
    wait_for(lambda: WeaverClient(nats_url=up.url).status()["jobs"], timeout_s=10, what="job")
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"), "run",
            up.ui_url + "api/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
            "--max-examples", "25",
            "--exclude-path", "/api/stream",
            "--phases", "examples,fuzzing",
            "--no-color",
        ],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )  # fmt: skip
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the Weaver is still fine after the barrage
    assert WeaverClient(nats_url=up.url).status()["jobs"]
