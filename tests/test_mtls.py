"""TLS and mTLS on the agents' port: real TLS sockets on loopback, certificates made by certs/make_dev_certs.py."""

from __future__ import annotations

import datetime
import importlib.util
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, Stack, start_stack
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.cli import build_parser, settings_from
from gateway.settings import Settings
from gateway.tls import cert_agent_id, server_context


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_dev_certs", ROOT / "certs" / "make_dev_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_dev_certs"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


certs = _load_script()


@dataclass
class Pki:
    dir: Path
    ca: Path
    server: tuple[Path, Path]

    def agent(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    assert certs.main(["--out", str(out), "--trust-domain", "example.org"]) == 0  # the script, as run by hand
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    issuer = certs.Issued(ca, key)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    certs.make_agent(issuer, "invoice-bot", not_before=past,
                     not_after=past + datetime.timedelta(days=1)).write(out, "expired")
    other = certs.make_ca("some other CA")
    certs.make_agent(other, "invoice-bot").write(out, "foreign")
    certs.make_agent(issuer, "nobody-bot").write(out, "nobody")
    return Pki(out, out / "ca.pem", (out / "server.pem", out / "server.key"))


def tls_overrides(pki: Pki, client_cert: str = "required", **extra: object) -> dict[str, object]:
    return {"tls_cert": str(pki.server[0]), "tls_key": str(pki.server[1]), "client_ca": str(pki.ca),
            "client_cert": client_cert, **extra}


def client_context(pki: Pki, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        pem, key = pki.agent(cert)
        context.load_cert_chain(str(pem), str(key))
    return context


@pytest.fixture
async def make_stack(pki: Pki) -> AsyncIterator[Callable[..., Any]]:
    stacks: list[Stack] = []

    async def make(client_cert: str = "required", **extra: object) -> Stack:
        s = await start_stack(**tls_overrides(pki, client_cert, **extra))  # type: ignore[arg-type]
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        await s.gateway.close()
        await s.fakes.close()


async def get(stack: Stack, pki: Pki, cert: str | None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.get(f"{stack.url}/erp/vendors", headers=headers) as response:
        body = await response.json(content_type=None)
        return response.status, body


async def test_url_is_https(make_stack: Callable[..., Any]) -> None:
    stack = await make_stack()
    assert stack.url.startswith("https://127.0.0.1:")


async def test_certificate_alone_identifies_the_agent(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("required")
    status, _ = await get(stack, pki, "invoice-bot")
    assert status == 200
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp")
    assert event["agent"] == "invoice-bot"


async def test_certificate_and_matching_jwt(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("required")
    status, _ = await get(stack, pki, "invoice-bot", stack.token("invoice-bot"))
    assert status == 200


async def test_certificate_and_disagreeing_jwt_is_unauthenticated(make_stack: Callable[..., Any],
                                                                  pki: Pki) -> None:
    stack = await make_stack("required")
    status, body = await get(stack, pki, "invoice-bot", stack.token("support-bot"))
    assert status == 401
    assert "unauthenticated" in str(body)
    event = await stack.trace.wait_for(lambda e: e.get("error") == "unauthenticated")
    assert event["status"] == 401
    assert "invoice-bot" in event["reason"] and "support-bot" in event["reason"]


async def test_binding_off_lets_the_jwt_decide(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("required", identity_binding="off")
    status, _ = await get(stack, pki, "invoice-bot", stack.token("support-bot"))
    assert status != 401
    event = await stack.trace.wait_for(lambda e: e.get("upstream") == "erp")
    assert event["agent"] == "support-bot"


async def test_certificate_for_an_agent_not_in_the_rules(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("required")
    status, _ = await get(stack, pki, "nobody")
    assert status == 401


async def test_no_certificate_with_required_is_refused(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("required")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await get(stack, pki, None, stack.token("invoice-bot"))


async def test_no_certificate_with_optional(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("optional")
    status, _ = await get(stack, pki, None)
    assert status == 401
    status, _ = await get(stack, pki, None, stack.token("invoice-bot"))
    assert status == 200


async def test_optional_certificate_still_needs_a_jwt_and_binds(make_stack: Callable[..., Any], pki: Pki) -> None:
    stack = await make_stack("optional")
    assert (await get(stack, pki, "invoice-bot"))[0] == 401
    assert (await get(stack, pki, "invoice-bot", stack.token("invoice-bot")))[0] == 200
    assert (await get(stack, pki, "invoice-bot", stack.token("support-bot")))[0] == 401


@pytest.mark.parametrize("mode", ["required", "optional"])
@pytest.mark.parametrize("cert", ["expired", "foreign"])
async def test_expired_or_foreign_certificate_is_refused(make_stack: Callable[..., Any], pki: Pki, mode: str,
                                                         cert: str) -> None:
    stack = await make_stack(mode)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await get(stack, pki, cert, stack.token("invoice-bot"))


async def test_tls_without_client_certificates(pki: Pki) -> None:
    stack = await start_stack(tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]))
    try:
        assert (await get(stack, pki, None, stack.token("invoice-bot")))[0] == 200
        assert (await get(stack, pki, "invoice-bot"))[0] == 401  # not asked for, so not used
    finally:
        await stack.gateway.close()
        await stack.fakes.close()


def test_cert_agent_id() -> None:
    san = {"subjectAltName": (("DNS", "x"), ("URI", "spiffe://example.org/agent/ops-bot")),
           "subject": ((("commonName", "cn-bot"),),)}
    assert cert_agent_id(san) == "ops-bot"
    assert cert_agent_id({"subjectAltName": (("URI", "spiffe://example.org/workload/x"),),
                          "subject": ((("commonName", "cn-bot"),),)}) == "cn-bot"
    assert cert_agent_id({"subjectAltName": (("URI", "spiffe://td/agent/a/b"),)}) is None
    assert cert_agent_id({}) is None


def test_inconsistent_settings_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="need --tls-cert"):
        server_context(Settings(client_cert="required"))
    with pytest.raises(ValueError, match="needs --tls-key"):
        server_context(Settings(tls_cert=str(pki.server[0])))
    with pytest.raises(ValueError, match="needs --client-ca"):
        server_context(Settings(tls_cert=str(pki.server[0]), tls_key=str(pki.server[1]), client_cert="optional"))
    assert server_context(Settings()) is None


def test_flags_and_environment() -> None:
    env = {"AGENT_GATEWAY_TLS_CERT": "s.pem", "AGENT_GATEWAY_TLS_KEY": "s.key", "AGENT_GATEWAY_CLIENT_CA": "ca.pem",
           "AGENT_GATEWAY_CLIENT_CERT": "optional"}
    settings = settings_from(build_parser(env).parse_args(["serve", "--identity-binding", "off"]), env)
    assert (settings.tls_cert, settings.tls_key, settings.client_ca) == ("s.pem", "s.key", "ca.pem")
    assert (settings.client_cert, settings.identity_binding) == ("optional", "off")
    settings = settings_from(build_parser({}).parse_args(["serve", "--client-cert", "required"]), {})
    assert (settings.client_cert, settings.identity_binding, settings.tls_cert) == ("required", "required", None)


async def test_peer_certificate_is_parsed_once_per_connection(make_stack: Callable[..., Any], pki: Pki,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.tls

    stack = await make_stack("required")
    parsed: list[dict[str, Any]] = []
    real = gateway.tls.cert_agent_id

    def counting(cert: dict[str, Any]) -> str | None:
        parsed.append(cert)
        return real(cert)

    monkeypatch.setattr(gateway.tls, "cert_agent_id", counting)
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "invoice-bot"), limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(3):
            async with http.get(f"{stack.url}/erp/vendors") as response:
                assert response.status == 200
                await response.read()
    assert len(parsed) == 1
