"""The admin subcommands, run as the real `python -m gateway` against a running gateway's admin API."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import ADMIN_TOKEN, ROOT, Stack, free_port

HOLD_RULE = "invoice-bot.yaml#hold[0]"
HOLD_REASON = "Payments over 10,000 need a manager"
WAIT = 30.0  # seconds; bounds a subprocess run or a read the test makes happen, never a sleep


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any AGENT_GATEWAY_* setting that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
    return {**env, **extra}


async def cli(*args: str, env: dict[str, str] | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=ROOT, env=env or cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def admin(stack: Stack, *args: str) -> Run:
    return await cli(*args, "--admin-url", stack.admin_url, "--token", ADMIN_TOKEN)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def pay(http: aiohttp.ClientSession, stack: Stack, amount: int = 25000) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {stack.token('invoice-bot')}"}
    async with http.post(f"{stack.url}/erp/payments", json={"vendor": "v-1", "amount": amount},
                         headers=headers) as resp:
        return resp.status, await resp.json()


async def pending(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    """The one pending approval, once it exists. Each admin round trip lets the held call progress: no sleeps."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(f"{stack.admin_url}/approvals?status=pending", headers=stack.admin_headers) as resp:
                assert resp.status == 200
                approvals: list[dict[str, Any]] = (await resp.json())["approvals"]
            if approvals:
                [approval] = approvals
                return approval


async def vendor(http: aiohttp.ClientSession, stack: Stack, agent: str, vendor_id: str = "v-100",
                 method: str = "GET", n: int = 0) -> int:
    """`n` varies the query, so repeated calls are not taken for a loop."""
    headers = {"Authorization": f"Bearer {stack.token(agent)}"}
    async with http.request(method, f"{stack.url}/erp/vendors/{vendor_id}", params={"n": str(n)},
                            headers=headers) as resp:
        await resp.read()
        return resp.status


# -- approvals list ----------------------------------------------------------------------------------------------------
async def test_approvals_list_says_so_when_nothing_is_pending(stack: Stack) -> None:
    run = await admin(stack, "approvals", "list")
    assert (run.code, run.out, run.err) == (0, "no pending approvals\n", "")
    as_json = await admin(stack, "approvals", "list", "--json")
    assert (as_json.code, orjson.loads(as_json.out)) == (0, {"approvals": []})


async def test_approvals_list_shows_a_held_call(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack))
    approval = await pending(http, stack)
    run = await admin(stack, "approvals", "list")
    mine = await admin(stack, "approvals", "list", "--agent", "invoice-bot", "--json")
    others = await admin(stack, "approvals", "list", "--agent", "ops-bot")
    await admin(stack, "approvals", "deny", approval["id"], "--reason", "test over")
    await call
    assert run.code == 0, run.err
    header, row = run.out.splitlines()
    assert header.split() == ["ID", "AGE", "STATUS", "AGENT", "ACTION", "RULE", "REASON"]
    assert re.fullmatch(rf"{approval['id'][:8]}\s+\d+s\s+pending\s+invoice-bot\s+create erp/payments\s+"
                        rf"{re.escape(HOLD_RULE)}\s+{HOLD_REASON}", row)
    assert mine.code == 0
    assert [a["id"] for a in orjson.loads(mine.out)["approvals"]] == [approval["id"]]
    assert (others.code, others.out) == (0, "no pending approvals for ops-bot\n")


# -- approve / deny ----------------------------------------------------------------------------------------------------
async def test_approvals_approve_lets_the_held_call_complete(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack))
    approval = await pending(http, stack)
    run = await admin(stack, "approvals", "approve", approval["id"], "--reason", "Vendor verified by phone",
                      "--category", "edge_case")
    status, body = await call
    assert run.code == 0, run.err
    assert run.out == f"approved {approval['id'][:8]} (invoice-bot: create erp/payments) by admin\n"
    assert (status, body["amount"]) == (201, 25000)
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp")
    assert (event["approval"]["outcome"], event["approval"]["reason"]) == ("approved", "Vendor verified by phone")


async def test_approvals_approve_accepts_an_id_prefix(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack))
    approval = await pending(http, stack)
    run = await admin(stack, "approvals", "approve", approval["id"][:8], "--reason", "ok", "--json")
    status, _ = await call
    assert run.code == 0, run.err
    decided = orjson.loads(run.out)
    assert (decided["id"], decided["status"], decided["decided_by"]) == (approval["id"], "approved", "admin")
    assert status == 201


async def test_approvals_approve_and_remember_lets_the_same_action_pass(stack: Stack,
                                                                         http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack))
    approval = await pending(http, stack)
    run = await admin(stack, "approvals", "approve", approval["id"], "--reason", "Quarter-end run", "--remember", "8h")
    first = await call
    second = await pay(http, stack, amount=30000)  # same agent and action: no second hold
    assert run.code == 0, run.err
    assert re.fullmatch(rf"approved {approval['id'][:8]} \(invoice-bot: create erp/payments\) by admin; the same "
                        r"action passes without a hold until \d{4}-\d\d-\d\d \d\d:\d\d\n", run.out)
    assert (first[0], second[0]) == (201, 201)


async def test_approvals_deny_refuses_the_held_call(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack))
    approval = await pending(http, stack)
    run = await admin(stack, "approvals", "deny", approval["id"], "--reason", "Unknown vendor",
                      "--category", "data_quality")
    status, body = await call
    assert run.code == 0, run.err
    assert run.out == f"denied {approval['id'][:8]} (invoice-bot: create erp/payments) by admin\n"
    assert (status, body["error"]["type"]) == (403, "approval_denied")
    assert stack.fakes.http_tool.recorder.requests == []


async def test_deciding_twice_prints_the_conflict_and_exits_1(stack: Stack, http: aiohttp.ClientSession) -> None:
    call = asyncio.create_task(pay(http, stack))
    approval = await pending(http, stack)
    assert (await admin(stack, "approvals", "deny", approval["id"], "--reason", "no")).code == 0
    await call
    again = await admin(stack, "approvals", "approve", approval["id"], "--reason", "yes after all")
    assert again.code == 1
    assert "409 conflict" in again.err
    assert "already denied" in again.err


async def test_unknown_approval_id_exits_1(stack: Stack) -> None:
    unknown = "f" * 32
    run = await admin(stack, "approvals", "approve", unknown, "--reason", "x")
    assert run.code == 1
    assert "404 not_found" in run.err
    prefix = await admin(stack, "approvals", "deny", "ffff", "--reason", "x")
    assert (prefix.code, prefix.err) == (1, "agent-gateway approvals: no approval id starts with 'ffff'\n")


# -- credentials and reachability --------------------------------------------------------------------------------------
async def test_wrong_token_prints_the_servers_message_and_exits_1(stack: Stack,
                                                                   http: aiohttp.ClientSession) -> None:
    async with http.get(f"{stack.admin_url}/approvals", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
        message = (await resp.json())["error"]["message"]
    run = await cli("approvals", "list", "--admin-url", stack.admin_url, "--token", "wrong")
    assert (run.code, run.out) == (1, "")
    assert run.err == f"agent-gateway approvals: 401 unauthenticated: {message}\n"


async def test_token_from_the_environment_or_a_file(stack: Stack, tmp_path: Path) -> None:
    from_env = await cli("approvals", "list", env=cli_env(AGENT_GATEWAY_ADMIN_URL=stack.admin_url,
                                                           AGENT_GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN))
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    from_file = await cli("approvals", "list", "--admin-url", stack.admin_url, "--token-file", str(token_file),
                          env=cli_env(AGENT_GATEWAY_ADMIN_TOKEN="wrong"))
    assert (from_env.code, from_env.out) == (0, "no pending approvals\n")
    assert (from_file.code, from_file.out) == (0, "no pending approvals\n")


async def test_missing_token_is_a_usage_error() -> None:
    run = await cli("approvals", "list", "--admin-url", "http://127.0.0.1:9")
    assert run.code == 2
    assert "needs an admin token" in run.err


async def test_unreachable_admin_api_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    run = await cli("approvals", "list", "--admin-url", url, "--token", ADMIN_TOKEN)
    assert run.code == 2
    assert f"cannot reach the admin API at {url}" in run.err


# -- pause / resume (docs/admin-api.md: POST /agents/{id}/pause and /resume) -----------------------------------------
async def test_pause_and_resume_an_agent(stack: Stack, http: aiohttp.ClientSession) -> None:
    paused = await admin(stack, "pause", "invoice-bot", "--reason", "incident 42")
    refused = await vendor(http, stack, "invoice-bot")
    resumed = await admin(stack, "resume", "invoice-bot", "--reason", "incident over", "--json")
    allowed = await vendor(http, stack, "invoice-bot", n=1)
    assert (paused.code, paused.out) == (0, "paused invoice-bot (by admin: incident 42)\n"), paused.err
    assert refused == 403
    assert resumed.code == 0, resumed.err
    card = orjson.loads(resumed.out)
    assert (card["id"], card["paused"]) == ("invoice-bot", None)
    assert allowed == 200


async def test_pause_unknown_agent_exits_1(stack: Stack) -> None:
    run = await admin(stack, "pause", "no-such-bot", "--reason", "x")
    assert run.code == 1
    assert "404 not_found" in run.err


# -- tail (docs/admin-api.md: GET /traces/stream) ----------------------------------------------------------------------
async def follow(stack: Stack, http: aiohttp.ClientSession, *args: str,
                 warm_method: str = "GET") -> tuple[asyncio.subprocess.Process, str]:
    """Start `tail`, and make calls until it prints its first line (it subscribes some time after it starts)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "tail", "--admin-url", stack.admin_url, "--token", ADMIN_TOKEN, *args,
        cwd=ROOT, env=cli_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    first_line = asyncio.create_task(proc.stdout.readline())
    async with asyncio.timeout(WAIT):
        n = 0
        while not first_line.done():  # each call is a real round trip: no sleeps
            await vendor(http, stack, "invoice-bot", method=warm_method, n=n)
            n += 1
        line = (await first_line).decode()
    if not line:
        _, err = await proc.communicate()
        pytest.fail(f"tail exited with {proc.returncode}: {err.decode()}")
    return proc, line


async def lines_until(proc: asyncio.subprocess.Process, needle: str) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    async with asyncio.timeout(WAIT):
        while needle not in (seen[-1] if seen else ""):
            line = await proc.stdout.readline()
            assert line, "tail ended early"
            seen.append(line.decode())
    return seen


async def interrupt(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(WAIT):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_tail_prints_one_line_per_event_and_exits_0_on_ctrl_c(stack: Stack,
                                                                     http: aiohttp.ClientSession) -> None:
    proc, first = await follow(stack, http, "--agent", "invoice-bot")
    assert await vendor(http, stack, "ops-bot") in (200, 403)  # another agent: filtered out
    assert await vendor(http, stack, "invoice-bot", "v-9", method="DELETE") == 403
    lines = await lines_until(proc, "deny")
    code, err = await interrupt(proc)
    assert re.fullmatch(r"\d\d:\d\d:\d\d invoice-bot allow read erp/vendors 200 invoice-bot\.yaml#allow\[1\] .+\n",
                        first)
    assert all("ops-bot" not in line for line in lines)
    assert re.fullmatch(r"\d\d:\d\d:\d\d invoice-bot deny delete erp/vendors 403 policy_denied "
                        r"invoice-bot\.yaml#deny\[0\] The invoice bot never deletes ERP records\n", lines[-1])
    assert (code, err) == (0, "")


async def test_tail_json_prints_raw_events_filtered_by_decision(stack: Stack,
                                                                 http: aiohttp.ClientSession) -> None:
    proc, first = await follow(stack, http, "--json", "--decision", "deny", warm_method="DELETE")
    assert await vendor(http, stack, "invoice-bot") == 200  # allowed: filtered out
    assert await vendor(http, stack, "invoice-bot", "v-last", method="DELETE") == 403
    lines = await lines_until(proc, "/erp/vendors/v-last")
    code, _ = await interrupt(proc)
    events = [orjson.loads(line) for line in [first, *lines]]
    assert {e["decision"] for e in events} == {"deny"}
    assert (events[-1]["agent"], events[-1]["verb"], events[-1]["status"]) == ("invoice-bot", "delete", 403)
    assert code == 0
