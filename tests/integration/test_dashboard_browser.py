"""The dashboard in a real browser (Debian's Chromium, headless, via Playwright) against a real
`torchloom up` and a real MNIST job: what a person sees and does on the page."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import REPO, Up, kill_tree, launch_mnist, start_two_groups, wait_for

pytestmark = pytest.mark.integration

TOKEN = "browser-token-42"
VIEWPORT = {"width": 1440, "height": 900}


class Page:
    """A Playwright page that records console errors and every URL it requests."""

    def __init__(self, browser, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self.page = browser.new_page(viewport=VIEWPORT)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def external(self) -> list[str]:
        return [
            u for u in self.requests if not (u.startswith(self.base + "/") or u.startswith("data:"))
        ]

    def chip(self, rank_id: str, state: str | None = None) -> str:
        sel = f'#drmap .chip[data-id="{rank_id}"]'
        return sel + (f'[data-state="{state}"]' if state else "")


def api_get(url: str, path: str, token: str | None = None):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url.rstrip("/") + path, headers=headers, timeout=10).json()


def test_the_page_shows_and_steers_a_live_job(tmp_path, browser, screenshots):
    up = Up(tmp_path / "state", "--ui-token", TOKEN)
    proc = launch_mnist(
        up.url,
        tmp_path,
        *("--max-steps", "100000", "--eval-every", "40", "--step-delay-ms", "15"),
        *("--checkpoint-dir", str(tmp_path / "ckpt")),
    )
    p = Page(browser, up.ui_url or "")
    page = p.page
    get = lambda path: api_get(up.ui_url or "", path, TOKEN)  # noqa: E731
    try:
        # a one-click link logs in (the token travels in the fragment, never to the server)
        page.goto(f"{up.ui_url}#token={TOKEN}")
        page.wait_for_selector(p.chip("0/0", "training"), timeout=60_000)
        page.wait_for_selector(p.chip("0/1", "training"), timeout=30_000)
        assert page.locator("#ranks tbody tr").count() == 2
        assert p.errors == []  # the page loaded clean
        # charts have a few points and a test accuracy before the picture is taken
        page.wait_for_function(
            "document.querySelector('#h-acc').textContent.includes('%')"
            " && window.__loomPerf.frames > 12",
            timeout=60_000,
        )
        assert page.locator("#h-groups").text_content() == "1 / 1"
        assert page.locator("#run-state").text_content() == "running"

        # change lr in the knobs panel: the job applies it, the page says at which step
        version = get("/api/jobs/mnist/config")["version"]
        page.fill('#knob-list input[name="lr"]', "0.02")
        page.click("#apply")
        page.wait_for_function(
            "document.querySelector('#apply-status').dataset.applied", timeout=30_000
        )
        text = page.locator("#apply-status").text_content() or ""
        m = re.fullmatch(r"v(\d+) applied at step (\d+)", text)
        assert m, text
        v, step = int(m.group(1)), int(m.group(2))
        assert v == version + 1
        applies = [a for a in get("/api/jobs/mnist/config")["applies"] if a["version"] == v]
        assert applies[0]["done"] and set(applies[0]["applied"].values()) == {step}
        assert all(r["config"]["lr"] == 0.02 for r in get("/api/jobs/mnist/ranks"))

        # an invalid value: an inline error under the knob, and nothing changes
        page.fill('#knob-list input[name="lr"]', "-1")
        page.click("#apply")
        err = page.locator('#knob-list .knob[data-knob="lr"] .err')
        err.wait_for(timeout=30_000)
        page.wait_for_function(
            "document.querySelector('#knob-list .knob[data-knob=\"lr\"] .err').textContent"
        )
        assert "lr" in (err.text_content() or "")
        assert "invalid" in (page.get_attribute('#knob-list input[name="lr"]', "class") or "")
        assert get("/api/jobs/mnist/config")["version"] == v
        page.locator(".knobs-card").screenshot(path=str(screenshots / "knobs-invalid.png"))
        page.click("#revert")

        # pause and resume from the action buttons
        page.click("#act-pause")
        page.wait_for_selector(p.chip("0/0", "paused"), timeout=30_000)
        page.wait_for_selector(p.chip("0/1", "paused"), timeout=30_000)
        assert get("/api/jobs/mnist")["run_state"] == "paused"
        page.click("#act-resume")
        page.wait_for_selector(p.chip("0/0", "training"), timeout=30_000)

        # checkpoints: save one, pin it, download its weights, roll back to it
        page.click("#ckpt-save")
        done = "#ckpts tbody tr.st-complete"
        page.wait_for_selector(done, timeout=60_000)
        ckpt = page.get_attribute(done, "data-id")
        row = f'#ckpts tr[data-id="{ckpt}"]'
        page.click(f'{row} button[data-ck="pin"]')
        page.wait_for_function(
            "t => document.querySelector('#ckpt-note').textContent.includes(t)",
            arg=f"resumes from {ckpt} (pinned",
        )
        with page.expect_download(timeout=60_000) as download:
            page.click(f"{row} a")
        from safetensors.torch import load_file

        weights = load_file(download.value.path())
        assert "fc2.weight" in weights, sorted(weights)
        page.click(f'{row} button[data-ck="rollback"]')
        page.click("#confirm-ok")
        page.wait_for_selector('#events li[data-kind="checkpoint_loaded"]', timeout=60_000)
        page.locator(".ckpt-card").screenshot(path=str(screenshots / "checkpoints.png"))

        # select a replica: highlighted in the map and the table; details on hover
        page.click(p.chip("0/1"))
        assert page.locator("#ranks tbody tr.sel").count() == 2  # both ranks of group 0
        page.hover(p.chip("0/1"))
        tip = page.locator("#tip")
        tip.wait_for(state="visible", timeout=30_000)
        assert "pid" in (tip.text_content() or "")
        page.screenshot(path=str(screenshots / "dashboard-selected.png"))

        # kill -9 one rank: failed in the DR map and in the history (how fast is the detection
        # bench's figure, bench/scale.py: a test on a slower machine must not miss a schedule)
        victim = next(r for r in get("/api/jobs/mnist/ranks") if r["id"] == "0/1")
        page.mouse.move(0, 0)
        t0 = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        page.wait_for_selector(p.chip("0/1", "failed"), timeout=30_000)
        in_map_s = time.monotonic() - t0
        page.wait_for_selector('#events li[data-kind="rank_failed"]', timeout=30_000)
        in_history_s = time.monotonic() - t0
        print(
            f"kill -9 → failed in the DR map {in_map_s:.2f} s, in the history {in_history_s:.2f} s"
        )

        # the history filter
        page.click('#filters button[data-cat="failure"]')
        kinds = set(page.locator("#events li").evaluate_all("els => els.map(e => e.dataset.kind)"))
        assert "rank_failed" in kinds and kinds <= {
            "rank_failed",
            "rank_hung",
            "rank_suspect",
            "commit_failed",
        }
        page.click('#filters button[data-cat=""]')
        page.screenshot(path=str(screenshots / "dashboard-failure.png"), full_page=True)

        # the one console line is Chromium's own note of the refused lr=-1 (HTTP 400)
        assert p.errors == [
            "Failed to load resource: the server responded with a status of 400 (Bad Request)"
        ]
        assert p.external() == [], "the page must work air-gapped"
        assert any(u.endswith("/static/vendor/uPlot.iife.min.js") for u in p.requests)
    finally:
        page.close()
        kill_tree(proc)
        up.stop()


def test_a_killed_replica_group_heals_and_one_is_drained_from_the_page(
    tmp_path, browser, screenshots
):
    up = Up(tmp_path / "state", "--hang-timeout-s", "5")
    proc, log = start_two_groups(up, tmp_path, 100_000, "--eval-every", "100")
    p = Page(browser, up.ui_url or "")
    page = p.page
    try:
        page.goto(up.ui_url or "")
        page.wait_for_selector(p.chip("0/0", "training"), timeout=90_000)
        page.wait_for_selector(p.chip("1/0", "training"), timeout=90_000)
        page.wait_for_function("document.querySelector('#h-groups').textContent === '2 / 2'")

        victim = next(r for r in api_get(up.ui_url or "", "/api/jobs/ft/ranks") if r["id"] == "1/0")
        os.kill(victim["pid"], signal.SIGKILL)
        page.wait_for_selector(p.chip("1/0", "failed"), timeout=30_000)
        page.wait_for_selector('#events li[data-kind="rank_failed"]', timeout=30_000)
        # one group of two healthy (group 0 may look late for a moment while torchft waits out
        # the dead peer's heartbeat on this 2-core machine: wait for it, do not read once)
        page.wait_for_function("document.querySelector('#h-groups').textContent === '1 / 2'")
        # `torchloom run` restarts the group; it heals from group 0 and trains again
        page.wait_for_selector('#events li[data-kind="healed"]', timeout=60_000)
        page.wait_for_selector(p.chip("1/0", "training"), timeout=30_000)
        page.wait_for_function("document.querySelector('#h-groups').textContent === '2 / 2'")
        frames = page.evaluate("window.__loomPerf.frames")
        page.wait_for_function(f"window.__loomPerf.frames > {frames + 10}")  # a few s of training
        page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)

        # a knob for one replica group: selecting group 1 scopes the knobs panel to it
        page.click(p.chip("1/0"))
        assert page.locator("#scope").input_value() == "1"
        page.fill('#knob-list input[name="lr"]', "0.03")
        page.click("#apply")
        page.wait_for_function(
            "document.querySelector('#apply-status').dataset.applied", timeout=30_000
        )
        lrs = {r["id"]: r["config"]["lr"] for r in api_get(up.ui_url or "", "/api/jobs/ft/ranks")}
        assert lrs == {"0/0": 0.05, "1/0": 0.03}
        page.click(p.chip("1/0"))  # unselect

        # drain group 1 from the page: a confirmation first; cancelling does nothing
        page.click(p.chip("1/0"))
        page.click("#act-drain")
        page.click('#confirm button[value="cancel"]')
        time.sleep(1.0)
        assert page.locator(p.chip("1/0")).count() == 1
        page.click("#act-drain")
        page.click("#confirm-ok")
        page.wait_for_selector('#events li[data-kind="replica_drained"]', timeout=30_000)
        wait_for(
            lambda: page.locator(p.chip("1/0")).count() == 0,
            timeout_s=15,
            what="1/0 leaves the map",
        )
        assert page.locator(p.chip("0/0", "training")).count() == 1

        # stop, confirmed: the job ends cleanly
        page.click("#act-stop")
        page.click("#confirm-ok")
        assert proc.wait(60) == 0
        page.wait_for_function("document.querySelector('#run-state').textContent === 'stopped'")
        assert p.errors == [] and p.external() == []
    finally:
        page.close()
        kill_tree(proc)
        log.close()
        up.stop()


def simulated_job(nats_url: str, job: str, ranks: int):
    """Simulated ranks of ``job`` publishing real telemetry (bench/dashboard.py's simulator)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "dashboard.py"), "--simulate", nats_url,
         "--job", job, "--ranks", str(ranks), "--hz", "4", "--duration-s", "60"],
    )  # fmt: skip


def test_the_page_waits_for_a_job_and_switches_between_jobs(tmp_path, browser):
    up = Up(tmp_path / "state")
    p = Page(browser, up.ui_url or "")
    page = p.page
    sims = []
    try:
        page.goto(up.ui_url or "")
        page.wait_for_function("document.querySelector('#run-state').textContent === 'no job yet'")
        sims.append(simulated_job(up.url, "alpha", 3))
        page.wait_for_selector(
            p.chip("0/2"), timeout=30_000
        )  # it follows the first job that appears
        sims.append(simulated_job(up.url, "beta", 9))
        page.wait_for_function(
            "[...document.querySelectorAll('#job option')].map(o => o.value).join() === 'alpha,beta'",
            timeout=30_000,
        )
        page.select_option("#job", "beta")
        page.wait_for_selector(p.chip("1/0"), timeout=30_000)  # beta's second replica group
        assert page.locator("#drmap .chip").count() == 9
        assert "job=beta" in page.url
        assert p.errors == [] and p.external() == []
    finally:
        page.close()
        for sim in sims:
            sim.terminate()
            sim.wait(10)
        up.stop()
