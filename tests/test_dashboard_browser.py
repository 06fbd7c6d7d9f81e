"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real gateway + simulator.

Synchronisation is on conditions only (Playwright's `expect`), never on sleeps.
Screenshots land in `test-artifacts/` (the README's `docs/dashboard.png` is a copy of one).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.codec.closes import SHUTTING_DOWN
from tests.conftest import Gateway, Sim
from tests.proxy import tcp_proxy

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.requires("chromium")]

if importlib.util.find_spec("playwright") is not None:
    from playwright.async_api import Browser, Page, async_playwright, expect
else:  # pragma: no cover - the module is skipped
    Browser = Page = Any


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


async def new_page(browser: Browser) -> Page:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(15000)
    return page


async def dashboard(gateway_factory: Any, **overrides: Any) -> Gateway:
    gateway: Gateway = await gateway_factory(dashboard={"enabled": True}, **overrides)
    return gateway


async def row_indices(page: Page) -> list[int]:
    indices: list[int] = await page.eval_on_selector_all(
        "#rows tbody tr", "rows => rows.map(row => Number(row.dataset.index))")
    return indices


async def wait_rows(page: Page, at_least: int) -> None:
    # Locator assertions, not wait_for_function: the page's CSP (rightly) forbids evaluating strings.
    await expect(page.locator("#rows tbody tr").nth(at_least - 1)).to_be_attached()


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)


async def test_streams_an_evaluation_to_completion(sim: Sim, gateway_factory: Any, browser: Browser) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/eval-demo-1", "rows": 25, "interval": 0.04})
    gateway = await dashboard(gateway_factory)
    token = gateway.token("viewer")
    page = await new_page(browser)
    await page.goto(f"{gateway.url}/#token={token}")
    # The token left the URL at once and now lives in the session cookie.
    await expect(page).to_have_url(re.compile(r"^[^#]*$"))
    assert "token" not in page.url
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies["gateway_session"]["value"] == token
    assert cookies["gateway_session"]["sameSite"] == "Strict" and cookies["gateway_session"]["path"] == "/"

    # Keyboard only: focus the listed evaluation and press Enter.
    pick = page.get_by_role("button", name=re.compile("eval-demo-1"))
    await pick.focus()
    await page.keyboard.press("Enter")
    await expect(pick).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "ended")
    assert await row_indices(page) == list(range(25))
    await expect(page.locator("#progress-text")).to_have_text("25 of 25")
    await expect(page.locator("#score-text")).to_contain_text("final")
    await expect(page.locator("#status")).to_have_text("completed")
    await expect(page.locator("#d-duplicates")).to_have_text("0")
    assert await page.eval_on_selector("#progress", "p => p.value === p.max")
    assert (await sim.resource("evaluations/eval-demo-1"))["connects"] == 1
    # Rows streamed into a fixed-layout, fixed-height table: nothing on the page moved unprompted.
    shifts = await page.evaluate("""() => new Promise(resolve => {
        const seen = [];
        new PerformanceObserver(list => seen.push(...list.getEntries()))
            .observe({type: "layout-shift", buffered: true});
        requestAnimationFrame(() => requestAnimationFrame(
            () => resolve(seen.filter(e => !e.hadRecentInput).reduce((sum, e) => sum + e.value, 0))));
    })""")
    assert shifts == 0
    await screenshot(page, "dashboard.png")


async def test_reconnects_after_a_drop_and_shows_every_row_once(sim: Sim, gateway_factory: Any,
                                                               browser: Browser) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-drop", "rows": 50, "interval": 0.05})
    gateway = await dashboard(gateway_factory)
    async with tcp_proxy(gateway.url) as (proxy, url):
        page = await new_page(browser)
        await page.goto(f"{url}/?watch=evaluations/e-drop#token={gateway.token()}")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        await wait_rows(page, 8)
        # The upstream drops and, at the same moment, the browser's own connection to the gateway is cut.
        assert (await sim.post("/_sim/drop", {"resource": "evaluations/e-drop", "mode": "abort"}))["dropped"] == 1
        assert proxy.cut() >= 1
        await expect(page.locator("#d-reconnects")).not_to_have_text("0")
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ended", timeout=18000)
    assert await row_indices(page) == list(range(50))
    await expect(page.locator("#d-duplicates")).to_have_text("0")
    await expect(page.locator("#progress-text")).to_have_text("50 of 50")


async def test_continuity_lost_clears_and_rebuilds_the_table(sim: Sim, gateway_factory: Any, browser: Browser) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-lost", "rows": 60, "interval": 0.03})
    gateway = await dashboard(gateway_factory, limits={"replay_buffer": 8, "linger": 30})
    async with tcp_proxy(gateway.url) as (proxy, url):
        page = await new_page(browser)
        await page.goto(f"{url}/?watch=evaluations/e-lost#token={gateway.token()}")
        await wait_rows(page, 5)
        # Cut the browser off for longer than 8 events: its resume point falls out of the replay buffer.
        proxy.cut()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "ended", timeout=18000)
    await expect(page.locator("#d-continuity")).to_have_text("1")
    await expect(page.locator("#notice")).to_contain_text("lost resume point")
    rows = await row_indices(page)
    assert rows == sorted(set(rows)) and rows[-1] == 59 and len(rows) < 60
    await expect(page.locator("#status")).to_have_text("completed")
    await expect(page.locator("#progress-text")).to_have_text("60 of 60")


async def test_reconnect_close_code_resumes_and_superseded_stops(sim: Sim, gateway_factory: Any,
                                                                 browser: Browser) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-close", "rows": 60, "interval": 0.08})
    gateway = await dashboard(gateway_factory)
    token = gateway.token("sam")
    page = await new_page(browser)
    await page.goto(f"{gateway.url}/?watch=evaluations/e-close#token={token}")
    await wait_rows(page, 5)
    # A gateway close with a reconnect code (what a rolling restart sends): the page comes back by itself.
    topic = gateway.app.hub.topics["evaluations/e-close"]
    for sub in list(topic.subscribers):
        sub.close(SHUTTING_DOWN)
    await expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    # The page waits a jittered 1-5 s before it reconnects (the evaluation runs for ~10 s: still live then).
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10000)
    # The same user opens the same stream in a second tab: the first one is superseded and says so.
    second = await page.context.new_page()
    await second.goto(f"{gateway.url}/?watch=evaluations/e-close")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "superseded")
    await expect(page.locator("#conn-label")).to_contain_text("Superseded")
    await expect(second.locator("#conn")).to_have_attribute("data-state", "ended", timeout=18000)
    assert await row_indices(second) == list(range(60))
    first_rows = await row_indices(page)
    assert first_rows == sorted(set(first_rows)) and len(first_rows) >= 5


async def test_job_view_shows_its_chart(sim: Sim, gateway_factory: Any, browser: Browser) -> None:
    await sim.post("/_sim/configure", {"resource": "optimizations/job-demo-1", "iterations": 5, "interval": 0.05})
    gateway = await dashboard(gateway_factory)
    page = await new_page(browser)
    await page.goto(f"{gateway.url}/#token={gateway.token()}")
    await page.get_by_role("button", name=re.compile("job-demo-1")).click()
    await expect(page.locator("#job-panel")).to_be_visible()
    # Pause and resume the job upstream: the page shows the state as it changes.
    await expect(page.locator("#chart circle.point").first).to_be_attached()
    await sim.post("/_sim/jobs/job-demo-1/pause")
    await expect(page.locator("#status")).to_have_text("paused")
    await expect(page.locator("#view-meta")).to_contain_text("paused by operator")
    await sim.post("/_sim/jobs/job-demo-1/resume")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "ended")
    await expect(page.locator("#status")).to_have_text("completed")
    assert await page.locator("#chart circle.point").count() == 5
    assert await page.locator("#chart polyline.best-line").count() == 1
    assert await page.locator("#chart line.baseline").count() == 1
    await expect(page.locator("#chart desc")).to_contain_text("5 variant scores")
    await expect(page.locator("#progress-text")).to_have_text("5 of 5")
    await expect(page.locator("#best-prompt")).to_contain_text("Answer the question.")
    await expect(page.locator("#job-log li").first).to_be_attached()
    await screenshot(page, "dashboard-job.png")


async def test_inactivity_close_switches_to_polling(sim: Sim, gateway_factory: Any, browser: Browser) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-slow", "rows": 3, "interval": 30})
    gateway = await dashboard(gateway_factory, limits={"inactivity_timeout": 1.0})
    page = await new_page(browser)
    await page.goto(gateway.url + "/")
    # No fragment this time: the token is pasted into the field.
    await expect(page.locator("#session-state")).to_contain_text("No session token")
    await page.get_by_label("Paste a session token").fill(gateway.token())
    await page.get_by_role("button", name="Use token").click()
    await expect(page.locator("#session-state")).to_contain_text("saved")
    await page.get_by_label("Id", exact=True).fill("e-slow")
    await page.get_by_role("button", name="Watch").click()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "polling")
    await expect(page.locator("#conn-label")).to_have_text(re.compile("inactivity.*polling"))
    await expect(page.locator("#notice")).to_contain_text("Polled at")
    await expect(page.locator("#status")).to_have_text("pending")  # the REST view of a queued evaluation
    await expect(page.locator("#reconnect")).to_be_visible()
    stats = await sim.resource("evaluations/e-slow")
    assert stats["polls"] >= 1 and stats["connects"] == 1
