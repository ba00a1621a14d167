"""The playground page in a real browser (Debian's Chromium via Playwright): two checkpoints of
the GPT job complete one prompt differently, side by side; a downloaded checkpoint imported
back completes it as the original did; the eval chart and the link are on the dashboard."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, Up, cli, kill_tree, wait_for
from tests.integration.test_dashboard_browser import Page, api_get
from tests.integration.test_gpt import gpt

pytestmark = pytest.mark.integration

SAMPLER = f"gpt={REPO / 'examples' / 'gpt' / 'sample.py'}:load"
PROMPT = "And God said"


def _steps_past(url: str, at: int) -> bool:
    """Both ranks past step ``at`` (the HTTP API: Playwright's loop owns this thread, so no
    WeaverClient here)."""
    rs = api_get(url, "/api/jobs/gpt/ranks")
    return isinstance(rs, list) and len(rs) == 2 and min(r["step"] for r in rs) >= at


def _sample(page, timeout_ms: int = 120_000) -> dict[str, str]:
    """Click Sample; the text of each side once both are done (B may be empty: "—")."""
    page.click("#sample")
    page.wait_for_function(
        "[...document.querySelectorAll('.pg-side')].every(s => s.dataset.state === 'done'"
        " || s.dataset.state === 'idle' || s.dataset.state === 'error')",
        timeout=timeout_ms,
    )
    out = {}
    for side in ("a", "b"):
        state = page.get_attribute(f"#side-{side}", "data-state")
        meta = page.locator(f"#side-{side} .pg-meta").text_content() or ""
        assert state == "done", f"side {side}: {state}: {meta}"
        out[side] = page.locator(f"#side-{side} .pg-out").text_content() or ""
    return out


def test_two_checkpoints_side_by_side_and_an_import_round_trip(tmp_path, browser, screenshots):
    up = Up(tmp_path / "state", "--sampler", SAMPLER)
    url = up.ui_url or ""
    proc = gpt(tmp_path, "--layers", "2", "--context", "64", "--max-steps", "100000",
               "--eval-every", "0", "--step-delay-ms", "20",
               "--checkpoint-dir", str(tmp_path / "ckpt"), url=up.url)  # fmt: skip
    p = Page(browser, up.ui_url or "")
    page = p.page
    try:
        ids = []
        for at in (10, 150):
            wait_for(lambda at=at: _steps_past(url, at), timeout_s=120, what=f"step {at}")
            r = cli("checkpoint", "save", "--job", "gpt", "--wait", url=up.url, timeout_s=120)
            assert r.returncode == 0, r.stdout + r.stderr
            ids.append(re.search(r"checkpoint (ckpt-v\d+) complete", r.stdout).group(1))
        assert cli("stop", "--job", "gpt", url=up.url).returncode == 0
        assert proc.wait(120) == 0, (tmp_path / "train.log").read_text()[-3000:]
        early, late = ids

        # the evaluator scores both (the job has ended: it stops when done); the dashboard's
        # checkpoint card shows the eval losses and charts them against the training loss
        scored = subprocess.run(
            [sys.executable, str(REPO / "examples" / "gpt" / "evaluate.py"), "--layers", "2",
             "--context", "64"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "TORCHLOOM_NATS_URL": up.url, "TORCHLOOM_JOB": "gpt"},
        )  # fmt: skip
        assert "2 checkpoint(s) scored" in scored.stdout, scored.stdout + scored.stderr
        page.goto(up.ui_url or "")
        page.wait_for_selector("#chart-eval:not([hidden]) canvas", timeout=30_000)
        evals = page.locator("#ckpts tbody tr td:nth-child(4)").all_text_contents()
        assert len(evals) == 2 and all(re.fullmatch(r"\d\.\d{3}", e) for e in evals), evals
        page.locator(".ckpt-card").screenshot(path=str(screenshots / "checkpoints-eval.png"))

        page.goto(f"{up.ui_url}playground")
        page.wait_for_function(
            "document.querySelectorAll('#side-b .pg-ckpt option').length >= 3", timeout=30_000
        )
        page.select_option("#side-a .pg-ckpt", late)
        page.select_option("#side-b .pg-ckpt", early)
        page.fill("#prompt", PROMPT)
        page.fill("#max-tokens", "48")
        page.fill("#temperature", "0.8")
        page.fill("#seed", "7")
        first = _sample(page)
        assert first["a"].startswith(PROMPT) and first["b"].startswith(PROMPT)
        assert len(first["a"]) > len(PROMPT) and first["a"] != first["b"], first
        assert _sample(page) == first  # the same seed: the same completions
        page.screenshot(path=str(screenshots / "playground.png"), full_page=True)

        # download the later checkpoint's weights, import the file: an imported entry that
        # completes the prompt exactly as the checkpoint did
        with page.expect_download(timeout=60_000) as download:
            page.click("#side-a .pg-download")
        path = tmp_path / "late.safetensors"
        download.value.save_as(path)
        page.set_input_files("#import-file", str(path))
        page.click("#import")
        page.wait_for_function(
            "document.querySelector('#pg-msg').textContent.startsWith('imported as')",
            timeout=30_000,
        )
        imported = (page.locator("#pg-msg").text_content() or "").split()[-1]
        page.wait_for_function(
            "id => [...document.querySelectorAll('#side-b .pg-ckpt option')]"
            ".some(o => o.value === id)",
            arg=imported,
            timeout=30_000,
        )
        page.select_option("#side-b .pg-ckpt", imported)
        again = _sample(page)
        assert again["b"] == again["a"] == first["a"]
        listing = api_get(url, "/api/jobs/gpt/checkpoints")
        recs = {c["id"]: c for c in listing["checkpoints"]}
        assert recs[imported]["state"] == "imported"
        assert recs[imported]["reason"] == "imported from late.safetensors"
        assert listing["resume_from"] != imported  # weights only: never resumed

        # a refused request says why on the page, and the page stays up
        page.fill("#max-tokens", "5000")
        page.click("#sample")
        page.wait_for_function(
            "document.querySelector('#side-a').dataset.state === 'error'", timeout=30_000
        )
        assert "max_tokens" in (page.locator("#side-a .pg-meta").text_content() or "")
        assert p.errors == [] or all("422" in e or "400" in e for e in p.errors), p.errors
        assert p.external() == []
    finally:
        kill_tree(proc)
        page.close()
        up.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="the dashboard tests run on Linux")
def test_the_dashboard_links_the_playground(tmp_path, browser):
    up = Up(tmp_path / "state")
    p = Page(browser, up.ui_url or "")
    try:
        p.page.goto(up.ui_url or "")
        p.page.wait_for_selector('a[href="/playground"]', timeout=30_000)
        p.page.click('a[href="/playground"]')
        p.page.wait_for_function(
            "document.querySelector('#pg-msg').textContent.includes('--sampler')",
            timeout=30_000,
        )
    finally:
        p.page.close()
        up.stop()
