"""Hot reload under load, broken changes, rollback, and staged (shadow / warn) rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ADMIN_TOKEN, Stack, start_stack

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INVOICE = "agents/invoice-bot.yaml"


@pytest.fixture
async def live(rules_copy: Callable[[], Path]) -> AsyncIterator[Stack]:
    """The example rules, copied so the test can change them; the watcher is off: tests reload explicitly."""
    stack = await start_stack(rules_copy(), rules_watch=0)
    yield stack
    await stack.gateway.close()
    await stack.fakes.close()


def edit(stack: Stack, name: str, old: str, new: str) -> None:
    path = stack.rules / name
    text = path.read_text()
    assert old in text, f"{old!r} not in {name}"
    path.write_text(text.replace(old, new))


async def admin(http: aiohttp.ClientSession, stack: Stack, method: str, path: str,
                body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with http.request(method, f"{stack.admin_url}{path}", json=body, headers=ADMIN) as response:
        return response.status, await response.json()


async def pay(http: aiohttp.ClientSession, stack: Stack, amount: int, vendor: str = "v-1") -> tuple[int, str | None]:
    async with http.post(f"{stack.url}/erp/payments", json={"vendor": vendor, "amount": amount},
                         headers={"Authorization": f"Bearer {stack.token('invoice-bot')}"}) as response:
        await response.read()
        return response.status, response.headers.get("x-agent-gateway-warning")


class Progress:
    """Counts finished requests; `reach(n)` waits until n have finished."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self._changed = asyncio.Event()

    def add(self, status: int) -> None:
        self.statuses.append(status)
        self._changed.set()

    async def reach(self, count: int) -> None:
        async with asyncio.timeout(30):
            while len(self.statuses) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_reload_under_load_loses_no_request_and_later_calls_cite_the_new_version(live: Stack) -> None:
    old_version = live.gateway.runtime.policy.version
    stop = asyncio.Event()
    progress = Progress()

    async def traffic(http: aiohttp.ClientSession, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1  # every body differs: identical repeats would (rightly) trip loop detection
            progress.add((await pay(http, live, 500, vendor=f"v-{worker}-{n}"))[0])

    async with aiohttp.ClientSession() as http:
        workers = [asyncio.create_task(traffic(http, w)) for w in range(8)]
        await progress.reach(200)  # traffic is flowing
        edit(live, INVOICE, "purpose: Pay verified vendor invoices", "purpose: Pay vendor invoices (v2)")
        status, body = await admin(http, live, "POST", "/rules/reload")
        await progress.reach(len(progress.statuses) + 200)  # and keeps flowing after the swap
        stop.set()
        await asyncio.gather(*workers)
    new_version = body["version"]
    assert (status, body["changed"]) == (200, True)
    assert new_version != old_version
    assert set(progress.statuses) == {201}, "a request failed while the rules changed"
    versions = [e["policy_version"] for e in live.trace.events if e.get("upstream") == "erp"]
    assert versions[0] == old_version and versions[-1] == new_version
    swapped = versions.index(new_version)
    assert set(versions[swapped:]) == {new_version}  # once swapped, never back


async def test_broken_change_is_rejected_with_its_errors_and_the_old_version_keeps_serving(live: Stack) -> None:
    old_version = live.gateway.runtime.policy.version
    edit(live, INVOICE, "verbs: [read]}", "verbz: [read]}")
    async with aiohttp.ClientSession() as http:
        status, body = await admin(http, live, "POST", "/rules/reload")
        assert (status, body["error"]["type"]) == (422, "rules_invalid")
        errors = body["error"]["errors"]
        [error] = [e for e in errors if "unknown_key" in e]
        assert "agents/invoice-bot.yaml:" in error and "unknown_key: allow[1].verbz: did you mean 'verbs'?" in error
        async with http.get(f"{live.admin_url}/readyz") as response:
            ready = await response.json()
        assert (response.status, ready["ready"], ready["policy_version"]) == (200, True, old_version)
        assert ready["rules_error"]["errors"] == errors
        assert (await pay(http, live, 500))[0] == 201
        state = (await admin(http, live, "GET", "/rules"))[1]
        assert (state["version"], state["last_error"]["errors"]) == (old_version, errors)
    rejected = await live.trace.wait_for(lambda e: e.get("kind") == "rules_rejected")
    assert rejected["detail"]["errors"] == errors


async def test_rollback_serves_an_earlier_version_again(live: Stack) -> None:
    first = live.gateway.runtime.policy.version
    edit(live, INVOICE, 'when: "request.json.amount > 10000"', 'when: "request.json.amount > 100"')
    async with aiohttp.ClientSession() as http:
        assert (await admin(http, live, "POST", "/rules/reload"))[1]["changed"] is True
        held = asyncio.create_task(pay(http, live, 500))  # 500 is now over the hold threshold: held
        async with asyncio.timeout(10):
            while not (await admin(http, live, "GET", "/approvals?status=pending"))[1]["approvals"]:
                pass
        status, body = await admin(http, live, "POST", "/rules/rollback", {"version": first})
        assert (status, body) == (200, {"version": first, "changed": True})
        assert (await pay(http, live, 500))[0] == 201  # the first version allows it again
        approval = (await admin(http, live, "GET", "/approvals?status=pending"))[1]["approvals"][0]
        await admin(http, live, "POST", f"/approvals/{approval['id']}/deny", {"reason": "test"})
        assert (await held)[0] == 403
        state = (await admin(http, live, "GET", "/rules"))[1]
        assert [h["source"] for h in state["history"]] == ["rollback", "admin", "startup"]
        assert state["history"][0]["by"] == "admin"
        assert (await admin(http, live, "POST", "/rules/rollback", {"version": "sha256:nope"}))[0] == 404


async def test_watcher_reloads_a_changed_file_by_itself(rules_copy: Callable[[], Path]) -> None:
    stack = await start_stack(rules_copy(), rules_watch=0.1)
    try:
        before = stack.gateway.runtime.policy.version
        edit(stack, INVOICE, "owner: ap-team@example.com", "owner: payables@example.com")
        loaded = await stack.trace.wait_for(lambda e: e.get("kind") == "rules_loaded")
        assert loaded["detail"]["source"] == "watch"
        assert stack.gateway.runtime.policy.version == loaded["policy_version"] != before
    finally:
        await stack.gateway.close()
        await stack.fakes.close()


async def test_shadow_rule_is_traced_and_counted_but_does_not_decide(live: Stack) -> None:
    edit(live, INVOICE, "deny:\n", 'deny:\n  - {id: no-big-payments, upstream: erp, verbs: [create], enforce: shadow,\n'
                                   '     when: "request.json.amount > 1000"}\n')
    async with aiohttp.ClientSession() as http:
        assert (await admin(http, live, "POST", "/rules/reload"))[0] == 200
        assert await pay(http, live, 5000) == (201, None)  # the shadow deny does not decide
        assert await pay(http, live, 500) == (201, None)
        staged = [row for row in (await admin(http, live, "GET", "/rules/staged"))[1]["staged"]
                  if row["agent"] == "invoice-bot"]
    event = await live.trace.wait_for(lambda e: e.get("upstream") == "erp" and e.get("shadow"))
    assert (event["decision"], event["shadow"]) == ("allow", [{"rule": "no-big-payments", "would": "deny"}])
    assert staged == [{"rule": "no-big-payments", "agent": "invoice-bot", "effect": "deny", "enforce": "shadow",
                       "counts": {"would_deny": 1}}]


async def test_warn_rule_lets_the_call_through_with_a_warning(live: Stack) -> None:
    edit(live, INVOICE, "deny:\n", 'deny:\n  - {id: warn-big-payments, upstream: erp, verbs: [create], enforce: warn,\n'
                                   '     when: "request.json.amount > 1000"}\n')
    async with aiohttp.ClientSession() as http:
        assert (await admin(http, live, "POST", "/rules/reload"))[0] == 200
        assert await pay(http, live, 5000) == (201, "warn-big-payments would deny")
        staged = [row for row in (await admin(http, live, "GET", "/rules/staged"))[1]["staged"]
                  if row["agent"] == "invoice-bot"]
    event = await live.trace.wait_for(lambda e: e.get("upstream") == "erp" and e.get("warnings"))
    assert event["warnings"] == [{"rule": "warn-big-payments", "warn": "deny"}]
    assert staged[0]["counts"] == {"warn_deny": 1}


async def test_enforced_rule_decides(live: Stack) -> None:
    edit(live, INVOICE, "deny:\n", 'deny:\n  - {id: no-big-payments, upstream: erp, verbs: [create],\n'
                                   '     when: "request.json.amount > 1000"}\n')
    async with aiohttp.ClientSession() as http:
        assert (await admin(http, live, "POST", "/rules/reload"))[0] == 200
        assert (await pay(http, live, 5000))[0] == 403
        assert (await pay(http, live, 500))[0] == 201


async def test_reload_and_rollback_need_the_admin_role(live: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{live.admin_url}/rules/reload") as response:
        assert response.status == 401
