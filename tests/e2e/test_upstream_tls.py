"""An https upstream with its own CA and a client certificate (`tls:` in upstreams.yaml), over real sockets:
the gateway verifies the upstream with that CA and presents the certificate; without `tls:` it fails closed."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from conftest import Stack, start_stack

AGENT = """\
agent: erp-bot
allow:
  - {upstream: erp, verbs: [read]}
"""


@dataclass
class TlsUpstream:
    """An https server that requires a client certificate from its CA and records each caller's subject."""

    url: str
    ca: Path
    cert: Path
    key: Path
    callers: list[str]


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[TlsUpstream]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    client = ca.issue_cert("gateway.test")
    files = TlsUpstream("", tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key", [])
    ca.cert_pem.write_to_path(str(files.ca))
    client.cert_chain_pems[0].write_to_path(str(files.cert))
    client.private_key_pem.write_to_path(str(files.key))

    async def vendors(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport is not None else None
        names = [value for kind, value in (peer or {}).get("subjectAltName", ()) if kind == "DNS"]
        files.callers.append(",".join(names))
        return web.json_response({"vendors": ["v-1"]})

    app = web.Application()
    app.router.add_get("/vendors", vendors)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = runner.addresses[0][1]
    files.url = f"https://127.0.0.1:{port}"
    yield files
    await runner.cleanup()


def rules_dir(root: Path, upstream: str) -> Path:
    rules = root / "rules-tls"
    (rules / "agents").mkdir(parents=True)
    (rules / "upstreams.yaml").write_text(f"upstreams:\n  erp:\n{upstream}")
    (rules / "agents" / "erp-bot.yaml").write_text(AGENT)
    return rules


StartGateway = Callable[[str], Awaitable[Stack]]


@pytest.fixture
async def gateway_for(tmp_path: Path) -> AsyncIterator[StartGateway]:
    stacks: list[Stack] = []

    async def start(upstream: str) -> Stack:
        stack = await start_stack(rules_dir(tmp_path, upstream))
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        await stack.gateway.close()
        await stack.fakes.close()


async def get_vendors(stack: Stack) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {stack.token('erp-bot')}"}
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/erp/vendors", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_upstream_tls_verifies_with_its_ca_and_presents_the_client_certificate(
        tls_upstream: TlsUpstream, gateway_for: StartGateway) -> None:
    up = tls_upstream
    stack = await gateway_for(f"    kind: http\n    url: {up.url}\n"
                              f"    tls: {{ca_file: '{up.ca}', cert_file: '{up.cert}', key_file: '{up.key}'}}\n")
    status, body = await get_vendors(stack)
    assert (status, body) == (200, {"vendors": ["v-1"]})
    assert tls_upstream.callers == ["gateway.test"]
    event = await stack.trace.wait_for(lambda e: e["upstream"] == "erp")
    assert event["status"] == 200 and event["decision"] == "allow"


async def test_upstream_tls_without_its_ca_fails_closed_with_a_traced_handshake_error(
        tls_upstream: TlsUpstream, gateway_for: StartGateway) -> None:
    stack = await gateway_for(f"    kind: http\n    url: {tls_upstream.url}\n")  # system CAs: the upstream's is not
    status, body = await get_vendors(stack)
    assert status == 502, body
    error = body["error"]
    assert isinstance(error, dict) and error["type"] == "upstream_error"
    assert error["message"] == "upstream 'erp' failed: cannot connect (TLS handshake failed: CERTIFICATE_VERIFY_FAILED)"
    assert tls_upstream.callers == []
    # The trace records the error code under the trace id the agent was given (the message stays in the answer).
    event = await stack.trace.wait_for(lambda e: e["upstream"] == "erp")
    assert (event["status"], event["error"], event["trace_id"]) == (502, "upstream_error", error["trace_id"])
    assert str(tls_upstream.ca) not in str(event) and str(tls_upstream.ca) not in error["message"]
