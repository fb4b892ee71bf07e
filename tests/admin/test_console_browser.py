"""The web console in real headless Chromium against a running gateway: decide held calls, watch traces, agents.

Debian's chromium (/usr/bin/chromium, installed by scripts/setup.sh) driven by Playwright; `playwright install`
is never needed. Screenshots go to test-artifacts/console/ for a human to look at.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, ROOT, SECRET, Stack
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect

from gateway.tokens import issue_token

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "console"
WAIT_MS = 10_000  # Playwright's auto-waiting bound for the console to show something; never a sleep
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def chromium_path() -> Path:
    """The system Chromium; a missing one fails the run (never a skip), like a missing redis-server."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the console tests need Debian's chromium (run scripts/setup.sh, or "
                    "apt-get install chromium)", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return CHROMIUM


@pytest.fixture
async def browser(chromium_path: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        chromium = await playwright.chromium.launch(executable_path=str(chromium_path), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


class Console:
    """One browser page on the console, failing the test on any script error or CSP violation."""

    def __init__(self, page: Page, stack: Stack) -> None:
        self.page = page
        self.stack = stack
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        # The browser logs every non-2xx fetch as "Failed to load resource"; the tests provoke some on purpose.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    async def sign_in(self, token: str = ADMIN_TOKEN) -> None:
        await self.page.goto(f"{self.stack.admin_url}/")  # the redirect to /console/ is part of the test
        await self.page.get_by_label("Admin or approver token").fill(token)
        await self.page.get_by_role("button", name="Sign in").click()
        await expect(self.page.get_by_role("heading", name="Pending approvals")).to_be_visible(timeout=WAIT_MS)

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=ARTIFACTS / f"{name}.png")

    def queue_row(self, agent: str) -> Any:
        return self.page.locator("#queue > li", has_text=agent)

    def history_row(self, agent: str) -> Any:
        return self.page.locator("#history-body tr", has_text=agent)


async def open_console(browser: Browser, stack: Stack, *, viewport: dict[str, int] = DESKTOP,
                       scheme: str = "dark") -> tuple[Console, Any]:
    context = await browser.new_context(viewport=viewport, color_scheme=scheme)  # type: ignore[arg-type]
    return Console(await context.new_page(), stack), context


async def pay(stack: Stack, amount: int) -> tuple[int, Any]:
    """The invoice bot's payment: over 10,000 it is held by `invoice-bot.yaml#hold[0]` until a human decides."""
    async with (aiohttp.ClientSession() as http,
                http.post(f"{stack.url}/erp/payments", json={"vendor": "v-100", "amount": amount},
                          headers={"Authorization": f"Bearer {stack.token('invoice-bot')}"}) as resp):
        return resp.status, await resp.json()


async def served(stack: Stack, path: str) -> bool:
    """Whether the admin API has this GET route yet (routes arrive while the console is being built)."""
    async with (aiohttp.ClientSession(headers=stack.admin_headers) as http,
                http.get(f"{stack.admin_url}{path}") as resp):
        return resp.status != 404


async def finish(call: asyncio.Task[tuple[int, Any]]) -> tuple[int, Any]:
    async with asyncio.timeout(WAIT_MS / 1000):
        return await call


async def test_console_approves_held_call_with_reason_and_category(browser: Browser, stack: Stack) -> None:
    console, context = await open_console(browser, stack)
    page = console.page
    call = asyncio.create_task(pay(stack, 25000))
    try:
        await console.sign_in()
        row = console.queue_row("invoice-bot")
        await expect(row).to_be_visible(timeout=WAIT_MS)
        await expect(row).to_contain_text("erp · create · payments")
        await expect(row).to_contain_text("invoice-bot.yaml#hold[0]")
        await expect(row).to_contain_text("Payments over 10,000 need a manager")
        await expect(row.locator("table.kv tr", has_text="request.json.amount")).to_contain_text("25000")
        await expect(row.locator(".left")).to_contain_text("left")
        await expect(page.locator("#pending-count")).to_have_text("1")
        await expect(page).to_have_title("(1) agent-gateway console")
        await console.shot("01-queue-pending")

        await row.get_by_role("button", name="Approve").click()
        form = row.locator("form.decide")
        await expect(form.get_by_label("Reason")).to_be_focused()
        await form.get_by_label("Reason").fill("Vendor v-100 confirmed the invoice by phone")
        await form.get_by_label("Category").select_option("edge_case")
        await console.shot("02-approve-form")
        await form.get_by_role("button", name="Approve").click()

        status, body = await finish(call)
        assert status == 201, body
        assert body["status"] == "created"
        await expect(row).to_have_count(0, timeout=WAIT_MS)
        await expect(page.get_by_text("Nothing is waiting for a human.")).to_be_visible()

        await page.get_by_role("button", name="Show history").click()
        decided = console.history_row("invoice-bot")
        await expect(decided).to_contain_text("approved", timeout=WAIT_MS)
        await expect(decided).to_contain_text("admin")
        await expect(decided).to_contain_text("edge case")
        await expect(decided).to_contain_text("Vendor v-100 confirmed the invoice by phone")
        await console.shot("03-after-approve-history")

        await page.keyboard.press("g")
        await page.keyboard.press("t")
        await expect(page.get_by_role("heading", name="Live traces")).to_be_visible()
        if await served(stack, "/traces/stream"):
            trace = page.locator("#trace-list > details", has_text="invoice-bot")
            await expect(trace.first).to_contain_text("hold → approved", timeout=WAIT_MS)
            await trace.first.locator("summary").click()
            await expect(trace.first.locator("pre.json")).to_contain_text('"outcome": "approved"')
            await expect(page.locator("#stream-state")).to_have_attribute("data-state", "live")
        else:  # no stream route yet: the console says it is retrying, and keeps working
            await expect(page.locator("#stream-state")).to_have_attribute("data-state", "retrying", timeout=WAIT_MS)
        await console.shot("04-traces")

        await page.keyboard.press("3")
        await expect(page.get_by_role("heading", name="Agents")).to_be_visible()
        if await served(stack, "/agents"):
            card = page.locator("article.card", has=page.get_by_role("heading", name="invoice-bot"))
            await expect(card).to_be_visible(timeout=WAIT_MS)
            await expect(card).to_contain_text("ap-team@example.com")
            await expect(card.locator(".gauge").first).to_be_visible()
            await console.shot("05-agents")
            await card.get_by_role("button", name="Pause").click()
            await card.get_by_label("Reason").fill("runaway spend on vendor v-100")
            await page.keyboard.press("Enter")
            await expect(card.locator(".paused-note")).to_contain_text("Paused by admin", timeout=WAIT_MS)
            await expect(card.locator(".paused-note")).to_contain_text("runaway spend on vendor v-100")
            await console.shot("05b-agent-paused")
            await card.get_by_role("button", name="Resume").click()
            await card.get_by_role("button", name="Resume invoice-bot").click()
            await expect(card.locator(".pill-ok")).to_have_text("active", timeout=WAIT_MS)
        else:
            await expect(page.locator("#agents-note")).to_contain_text("404", timeout=WAIT_MS)
        assert console.errors == []
    finally:
        call.cancel()
        await context.close()


async def test_console_denies_held_call_from_keyboard(browser: Browser, stack: Stack) -> None:
    # A narrow, light screen: the same flow must work on a phone-sized window.
    console, context = await open_console(browser, stack, viewport=PHONE, scheme="light")
    page = console.page
    call = asyncio.create_task(pay(stack, 30000))
    try:
        await console.sign_in()
        row = console.queue_row("invoice-bot")
        await expect(row.locator("table.kv")).to_contain_text("30000", timeout=WAIT_MS)

        await page.keyboard.press("j")
        await expect(row).to_have_attribute("aria-current", "true")
        await page.keyboard.press("d")
        reason = row.locator("form.decide.deny").get_by_label("Reason")
        await expect(reason).to_be_focused()
        await page.keyboard.type("Amount does not match the invoice")
        await console.shot("06-deny-form-keyboard-narrow")
        await page.keyboard.press("Enter")

        status, body = await finish(call)
        assert status == 403, body
        assert body["error"]["type"] == "approval_denied"
        assert "Amount does not match the invoice" in body["error"]["message"]
        await expect(row).to_have_count(0, timeout=WAIT_MS)
        await page.keyboard.press("h")
        decided = console.history_row("invoice-bot")
        await expect(decided).to_contain_text("denied", timeout=WAIT_MS)
        await expect(decided).to_contain_text("Amount does not match the invoice")
        await console.shot("07-after-deny-narrow")

        await page.keyboard.press("?")
        await expect(page.get_by_role("dialog", name="Keyboard shortcuts")).to_be_visible()
        await console.shot("08-help-narrow")
        await page.keyboard.press("Escape")
        await expect(page.get_by_role("dialog")).to_be_hidden()
        assert console.errors == []
    finally:
        call.cancel()
        await context.close()


async def test_console_second_decision_shows_who_decided(browser: Browser, stack: Stack) -> None:
    console, context = await open_console(browser, stack)
    page = console.page
    call = asyncio.create_task(pay(stack, 12000))
    try:
        await console.sign_in()
        row = console.queue_row("invoice-bot")
        await expect(row).to_be_visible(timeout=WAIT_MS)
        await page.keyboard.press("a")
        await page.keyboard.type("looks fine")
        # Someone else decides first, through the API, before this console submits.
        approval_id = await row.get_attribute("data-id")
        async with (aiohttp.ClientSession(headers=stack.admin_headers) as http,
                    http.post(f"{stack.admin_url}/approvals/{approval_id}/deny",
                              json={"reason": "duplicate payment", "category": "data_quality"}) as resp):
            assert resp.status == 200
        await page.keyboard.press("Enter")
        problem = row.locator(".form-error")
        await expect(problem).to_contain_text("Already denied by admin", timeout=WAIT_MS)
        await expect(problem).to_contain_text("duplicate payment")
        await console.shot("09-conflict")
        status, _ = await finish(call)
        assert status == 403
        assert console.errors == []
    finally:
        call.cancel()
        await context.close()


async def test_console_token_refused_then_signed_out(browser: Browser, stack: Stack) -> None:
    console, context = await open_console(browser, stack)
    page = console.page
    try:
        await page.goto(f"{stack.admin_url}/console/")
        await page.get_by_label("Admin or approver token").fill("not-a-token")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#signin-error")).to_contain_text("refused", timeout=WAIT_MS)
        assert await page.evaluate("sessionStorage.length") == 0

        approver = issue_token("alice", SECRET, audience="agent-gateway-admin", extra={"role": "approver"})
        await console.sign_in(approver)
        await expect(page.locator("#who")).to_have_text("alice (approver)")
        await expect(page.locator("#policy-version")).not_to_have_text("—", timeout=WAIT_MS)
        await page.reload()  # the token lasts the browser session, not just the page
        await expect(page.get_by_role("heading", name="Pending approvals")).to_be_visible(timeout=WAIT_MS)

        if await served(stack, "/agents"):  # pausing is for admins: the approver sees the server's refusal
            await page.keyboard.press("3")
            card = page.locator("article.card", has=page.get_by_role("heading", name="invoice-bot"))
            await card.get_by_role("button", name="Pause").click()
            await card.get_by_label("Reason").fill("testing")
            await card.get_by_role("button", name="Pause invoice-bot").click()
            await expect(card.locator(".form-error")).to_contain_text("Refused", timeout=WAIT_MS)
            await console.shot("10-approver-pause-refused")

        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("Admin or approver token")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0
        assert console.errors == []
    except Error:
        await console.shot("failure-sign-in")
        raise
    finally:
        await context.close()
