"""The real command line as a subprocess: `rules check` on broken and good rules, `serve` refusing broken
rules, `token`, `--help`, and `serve` draining in-flight calls on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from conftest import ROOT, RULES, SECRET, UPSTREAM_KEYS, start_stack

from gateway.policy.conditions import ConditionError, compile_condition
from gateway.policy.load import load_rules, summary
from gateway.policy.spec import RuleSetInvalid

CLI_TIMEOUT = 30

BROKEN = {
    "upstreams.yaml": """\
upstreams:
  erp:
    kind: http
    url: http://127.0.0.1:9
    credential: {header: Authorization, value: "Bearer ${PAYROLL_TOKEN}"}
    read_timout: 5s
  llm:
    kind: openai
    url: https://api.openai.com/v1
    connect_timeout: [1]
""",
    "agents/a-bot.yaml": """\
agent: a-bot
allow:
  - {upstream: erp, verb: [read]}
  - {upstream: erpp, verbs: [read]}
  - {upstream: llm, verbs: chat}
""",
    "agents/b-bot.yaml": """\
agent: b-bot
allow:
  - upstream: erp
    verbs: [create]
    when: "request.json.amount <="
  - {upstream: erp, verbs: [read], when: 'amount > 5'}
  - {upstream: llm, verbs: [chat], when: 'request.json.model.startsWith("gpt-")'}
""",
}


def at(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first `needle` in `text`."""
    offset = text.index(needle)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def cel_message(source: str) -> str:
    with pytest.raises(ConditionError) as caught:
        compile_condition(source)
    return str(caught.value)


def expected_errors(root: Path) -> list[str]:
    """Every error of BROKEN, sorted as printed, with line and column found in the text written."""
    up, a, b = BROKEN["upstreams.yaml"], BROKEN["agents/a-bot.yaml"], BROKEN["agents/b-bot.yaml"]
    cases = [
        ("agents/a-bot.yaml", at(a, "{upstream: erp, verb"), "missing_key", "allow[0].verbs",
         "missing required key 'verbs'"),
        ("agents/a-bot.yaml", at(a, "verb:"), "unknown_key", "allow[0].verb", "did you mean 'verbs'?"),
        ("agents/a-bot.yaml", at(a, "erpp"), "unknown_upstream", "allow[1].upstream",
         "unknown upstream 'erpp'; did you mean 'erp'?"),
        ("agents/a-bot.yaml", at(a, "chat"), "bad_type", "allow[2].verbs", "expected a list of strings, got a string"),
        ("agents/b-bot.yaml", at(b, '"request.json.amount <="'), "rule_error", "allow[0].when",
         cel_message("request.json.amount <=")),
        ("agents/b-bot.yaml", at(b, "'amount > 5'"), "rule_error", "allow[1].when",
         "unknown variable 'amount': conditions see only agent, action and request"),
        ("upstreams.yaml", at(up, '"Bearer ${PAYROLL_TOKEN}"'), "unset_variable", "upstreams.erp.credential.value",
         "${PAYROLL_TOKEN} is not set"),
        ("upstreams.yaml", at(up, "read_timout"), "unknown_key", "upstreams.erp.read_timout",
         "did you mean 'read_timeout'?"),
        ("upstreams.yaml", at(up, "[1]"), "bad_type", "upstreams.llm.connect_timeout",
         "expected a duration, got a list"),
    ]
    return [f"{root / rel}:{line}:{col}: {code}: {path}: {message}" for rel, (line, col), code, path, message in cases]


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    for rel, text in BROKEN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any gateway setting or upstream secret, plus `extra`."""
    drop = {*UPSTREAM_KEYS, "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "ERP_URL", "CRM_MCP_URL", "PAYROLL_TOKEN"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_") and k not in drop}
    return {**env, **extra}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, check=False)


# --- rules check --------------------------------------------------------------------------------------------


def test_rules_check_prints_every_error_when_rules_are_broken(broken: Path) -> None:
    result = cli("rules", "check", str(broken), env=clean_env())
    expected = expected_errors(broken)
    assert result.returncode == 1
    assert result.stdout.splitlines() == expected
    assert result.stderr == f"{len(expected)} error(s) in {broken}\n"


def test_rules_check_prints_one_line_summary_when_rules_are_good() -> None:
    env = clean_env(**UPSTREAM_KEYS)
    result = cli("rules", "check", "rules", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == summary(load_rules(RULES, env)) + "\n"
    assert result.stdout.startswith("rules OK: 3 agents, 4 upstreams, ")
    assert result.stderr == ""


def test_rules_check_reports_unset_secrets_of_the_example_without_env() -> None:
    result = cli("rules", "check", "rules", env=clean_env())
    assert result.returncode == 1
    assert [line.split(": ")[1:3] for line in result.stdout.splitlines()] == [
        ["unset_variable", f"upstreams.{name}.credential.value"] for name in ("openai", "anthropic", "erp",
                                                                             "crm-tools")]


# --- serve and the in-process gateway refuse broken rules ---------------------------------------------------


def test_serve_exits_1_with_every_error_when_rules_are_broken(broken: Path) -> None:
    env = clean_env(AGENT_GATEWAY_JWT_SECRET=SECRET.decode())
    result = cli("serve", "--rules", str(broken), "--port", "0", "--admin-port", "0", env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == expected_errors(broken)
    assert result.stdout == ""


async def test_start_gateway_raises_rule_set_invalid_when_rules_are_broken(broken: Path) -> None:
    with pytest.raises(RuleSetInvalid) as caught:
        await start_stack(broken)
    assert [str(error) for error in caught.value.errors] == expected_errors(broken)


# --- token and help -----------------------------------------------------------------------------------------


def test_token_prints_an_hour_long_agent_jwt_when_secret_is_set() -> None:
    result = cli("token", "--agent", "invoice-bot", env=clean_env(AGENT_GATEWAY_JWT_SECRET=SECRET.decode()))
    assert result.returncode == 0, result.stderr
    [token] = result.stdout.splitlines()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="agent-gateway")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert claims["sub"] == "invoice-bot"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["exp"] - (time.time() + 3600)) < 60


def test_token_exits_2_without_secret() -> None:
    result = cli("token", "--agent", "invoice-bot", env=clean_env())
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "agent-gateway token: set AGENT_GATEWAY_JWT_SECRET or --jwt-secret-file\n"


def test_help_lists_subcommands() -> None:
    result = cli("--help", env=clean_env())
    assert result.returncode == 0
    assert result.stdout.startswith("usage: agent-gateway ")
    for command in ("serve", "token", "rules"):
        assert command in result.stdout


def test_serve_help_lists_flags() -> None:
    result = cli("serve", "--help", env=clean_env())
    assert result.returncode == 0
    for flag in ("--rules", "--host", "--port", "--admin-host", "--admin-port", "--trace", "--max-body",
                 "--jwt-secret-file", "--jwks-file", "--jwks-url", "--jwt-audience", "--jwt-issuer",
                 "--admin-token-file", "--hold-timeout", "--drain-timeout"):
        assert f"{flag} " in result.stdout, flag


# --- SIGTERM drains in-flight calls -------------------------------------------------------------------------


class SlowErp:
    """An ERP whose vendor answer sends its first half, then waits for the test to release the rest."""

    FIRST = b'{"id": "v-100", '
    REST = b'"name": "Acme Supplies"}'

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/vendors/{id}", self.vendor)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        self.url = ""

    async def vendor(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(self.FIRST)
        self.arrived.set()
        await self.release.wait()
        await response.write(self.REST)
        await response.write_eof()
        return response

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def close(self) -> None:
        self.release.set()
        await self.runner.cleanup()


@pytest.fixture
async def slow_erp() -> AsyncIterator[SlowErp]:
    erp = SlowErp()
    await erp.start()
    yield erp
    await erp.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_healthy(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    """Poll /healthz until it answers; connection refusals are retried after a short backoff."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.returncode is None, "the gateway exited before it was ready"
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway did not become healthy")


async def wait_refused(port: int) -> None:
    """Connect until the listener is gone (the drain has begun)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        except ConnectionResetError:  # queued on the listener as it closed: try again
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await asyncio.sleep(0.05)
    raise AssertionError("the agents' port still accepts connections after SIGTERM")


async def test_sigterm_drains_in_flight_call_and_exits_0(tmp_path: Path, slow_erp: SlowErp) -> None:
    port, admin_port = free_port(), free_port()
    trace = tmp_path / "trace.jsonl"
    env = clean_env(AGENT_GATEWAY_JWT_SECRET=SECRET.decode(), ERP_URL=slow_erp.url, **UPSTREAM_KEYS)
    token = jwt.encode({"sub": "invoice-bot", "aud": "agent-gateway", "exp": int(time.time()) + 600}, SECRET,
                       algorithm="HS256")
    with (tmp_path / "out.log").open("wb") as out, (tmp_path / "err.log").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--rules", str(RULES), "--port", str(port),
            "--admin-port", str(admin_port), "--trace", str(trace), "--drain-timeout", "20",
            env=env, cwd=ROOT, stdout=out, stderr=err)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, f"http://127.0.0.1:{admin_port}/healthz", proc)
            url = f"http://127.0.0.1:{port}/erp/vendors/v-100"
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                await asyncio.wait_for(slow_erp.arrived.wait(), 10)
                assert response.status == 200
                proc.send_signal(signal.SIGTERM)
                await wait_refused(port)
                with pytest.raises(aiohttp.ClientConnectorError):
                    async with aiohttp.ClientSession() as late, late.get(url):
                        pass
                slow_erp.release.set()
                assert await response.read() == SlowErp.FIRST + SlowErp.REST
            assert await asyncio.wait_for(proc.wait(), 25) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "draining in-flight requests" in (tmp_path / "err.log").read_text()
    events = [orjson.loads(line) for line in trace.read_bytes().splitlines()]
    [event] = [e for e in events if e.get("path") == "/erp/vendors/v-100"]
    assert (event["agent"], event["upstream"], event["decision"], event["status"]) == (
        "invoice-bot", "erp", "allow", 200)
    assert "error" not in event
