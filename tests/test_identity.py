"""The identify stage: credentials, algorithms, claims, JWKS file/URL keys and rotation, the token cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import GatewayError
from gateway.identity import Authenticator, JwtSettings
from gateway.keys import KeySource
from gateway.models import Agent
from gateway.tokens import issue_token, parse_ttl

SECRET = b"test-secret-0123456789abcdefghijk"
AGENTS = {"invoice-bot", "support-bot"}


@dataclass
class KeyPair:
    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]


def _rsa(kid: str) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return KeyPair(kid, "RS256", key, {**jwk, "kid": kid})


def _ec(kid: str) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return KeyPair(kid, "ES256", key, {**jwk, "kid": kid})


def _ed(kid: str) -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    return KeyPair(kid, "EdDSA", key, {**jwk, "kid": kid})


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return _rsa("rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return _ec("ec-1")


@pytest.fixture(scope="module")
def ed_key() -> KeyPair:
    return _ed("ed-1")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "invoice-bot", "aud": "agent-gateway", "iat": now, "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(pair: KeyPair, payload: dict[str, Any], kid: str | None = "default") -> str:
    headers = {"kid": pair.kid if kid == "default" else kid} if kid is not None else None
    return jwt.encode(payload, pair.private, algorithm=pair.alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A JWT built by hand, so pyjwt's own guards cannot stop us from crafting a hostile one."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    mac = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def settings(**overrides: Any) -> JwtSettings:
    values: dict[str, Any] = {"secret": SECRET, "jwks_file": None, "jwks_url": None}
    values.update(overrides)
    return JwtSettings(**values)


def write_jwks(tmp_path: Path, *pairs: KeyPair, extra: list[dict[str, Any]] | None = None) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [p.jwk for p in pairs] + (extra or [])}))
    return str(path)


class CountingKeys(KeySource):
    calls = 0

    async def key_for(self, header: Mapping[str, Any]) -> tuple[Any, str]:
        self.calls += 1
        return await super().key_for(header)


async def make_auth(
    cfg: JwtSettings,
    session: aiohttp.ClientSession | None = None,
    agents: set[str] | None = None,
    clock: Callable[[], float] = time.time,
    key_clock: Callable[[], float] = time.monotonic,
) -> tuple[Authenticator, CountingKeys]:
    keys = await CountingKeys.create(cfg, session, clock=key_clock)
    assert isinstance(keys, CountingKeys)
    known = AGENTS if agents is None else agents
    return Authenticator(keys, cfg, known.__contains__, clock=clock), keys


def bearer(token: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {token}"}))


async def refused(call: Awaitable[Any], token: str | None = None) -> str:
    """Await a call that must fail as `unauthenticated`; return its message (checked not to leak the token)."""
    with pytest.raises(GatewayError) as info:
        await call
    err = info.value
    assert type(err) is GatewayError
    assert (err.type, err.status) == ("unauthenticated", 401)
    if token is not None:
        assert token not in err.message
        assert token not in str(err)
    return err.message


# --- credential extraction ----------------------------------------------------------------------


async def test_authenticate_accepts_hs256_bearer() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("invoice-bot", SECRET, ttl=600)
    agent = await auth.authenticate(bearer(token))
    assert isinstance(agent, Agent)
    assert agent.id == "invoice-bot"
    assert agent.claims["aud"] == "agent-gateway"
    assert agent.expires_at == float(agent.claims["exp"])


async def test_authenticate_accepts_x_api_key_and_plain_lowercase_mapping() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("support-bot", SECRET)
    assert (await auth.authenticate({"x-api-key": token})).id == "support-bot"
    assert (await auth.authenticate({"authorization": f"bearer {token}"})).id == "support-bot"


async def test_credential_same_token_in_both_headers_is_accepted() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("invoice-bot", SECRET)
    headers = CIMultiDict({"Authorization": f"Bearer {token}", "X-Api-Key": token})
    assert auth.credential(CIMultiDictProxy(headers)) == token


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'"),
        ({"Authorization": "Basic aW52b2ljZTpwdw=="}, "the Authorization header must use the Bearer scheme"),
        ({"Authorization": "Bearer   "}, "the Authorization header has an empty Bearer token"),
        ({"x-api-key": " "}, "the x-api-key header is empty"),
        (
            {"Authorization": "Bearer a.b.c", "x-api-key": "d.e.f"},
            "conflicting credentials: Authorization and x-api-key carry different tokens",
        ),
    ],
)
async def test_credential_refused_when_missing_or_malformed(headers: dict[str, str], message: str) -> None:
    auth, _ = await make_auth(settings())
    assert await refused(auth.authenticate(CIMultiDictProxy(CIMultiDict(headers)))) == message


async def test_credential_refused_when_authorization_repeated() -> None:
    auth, _ = await make_auth(settings())
    headers = CIMultiDict([("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")])
    assert await refused(auth.authenticate(CIMultiDictProxy(headers))) == "more than one Authorization header"


# --- JWKS file keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa_key", "ec_key", "ed_key"])
async def test_authenticate_accepts_jwks_file_key(
    which: str, request: pytest.FixtureRequest, tmp_path: Path, rsa_key: KeyPair, ec_key: KeyPair, ed_key: KeyPair
) -> None:
    pair: KeyPair = request.getfixturevalue(which)
    auth, _ = await make_auth(settings(secret=None, jwks_file=write_jwks(tmp_path, rsa_key, ec_key, ed_key)))
    agent = await auth.authenticate(bearer(sign(pair, claims())))
    assert agent.id == "invoice-bot"


async def test_jwks_single_key_used_without_kid(tmp_path: Path, ec_key: KeyPair) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_file=write_jwks(tmp_path, ec_key)))
    assert (await auth.authenticate(bearer(sign(ec_key, claims(), kid=None)))).id == "invoice-bot"


async def test_jwks_no_kid_refused_when_several_keys(tmp_path: Path, ec_key: KeyPair, rsa_key: KeyPair) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_file=write_jwks(tmp_path, ec_key, rsa_key)))
    token = sign(ec_key, claims(), kid=None)
    assert (
        await refused(auth.authenticate(bearer(token)), token)
        == "token has no 'kid' header and the JWKS holds more than one key"
    )


async def test_jwks_alg_must_match_key_type(tmp_path: Path, ec_key: KeyPair, rsa_key: KeyPair) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_file=write_jwks(tmp_path, rsa_key, ec_key)))
    token = sign(ec_key, claims(), kid=rsa_key.kid)
    message = await refused(auth.authenticate(bearer(token)), token)
    assert message == "algorithm 'ES256' does not match key 'rsa-1', which is RS256"


async def test_jwks_oct_key_never_accepted(tmp_path: Path, rsa_key: KeyPair) -> None:
    oct_jwk = {"kty": "oct", "kid": "hmac", "k": b64(SECRET), "alg": "HS256"}
    cfg = settings(secret=None, jwks_file=write_jwks(tmp_path, rsa_key, extra=[oct_jwk]))
    auth, _ = await make_auth(cfg)
    token = handmade({"alg": "HS256", "kid": "hmac"}, claims(), SECRET)
    message = await refused(auth.authenticate(bearer(token)), token)
    assert message == "algorithm 'HS256' is not accepted: no shared secret is configured"


# --- hostile tokens ------------------------------------------------------------------------------


async def test_forged_hs256_signature_refused() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("invoice-bot", b"another-secret-0123456789abcdefgh")
    with pytest.raises(GatewayError) as info:
        await auth.authenticate(bearer(token))
    assert info.value.message == "token signature is invalid"
    assert isinstance(info.value.__cause__, jwt.InvalidSignatureError)


async def test_forged_rs256_signature_refused(tmp_path: Path, rsa_key: KeyPair) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_file=write_jwks(tmp_path, rsa_key)))
    impostor = _rsa(rsa_key.kid)
    token = sign(impostor, claims())
    assert await refused(auth.authenticate(bearer(token)), token) == "token signature is invalid"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (claims(exp=int(time.time()) - 120), "token expired"),
        (claims(exp=None), "token has no 'exp' claim"),
        (claims(sub=None), "token has no 'sub' claim"),
        (claims(sub=42), "token 'sub' claim must be a non-empty string"),
        (claims(aud="someone-else"), "token audience must include 'agent-gateway'"),
        (claims(aud=None), "token has no 'aud' claim"),
        (claims(nbf=int(time.time()) + 3600), "token is not valid yet ('nbf' or 'iat' is in the future)"),
        (claims(sub="ghost"), "agent 'ghost' is not in the rules"),
    ],
)
async def test_bad_claims_refused(payload: dict[str, Any], message: str) -> None:
    auth, _ = await make_auth(settings())
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    assert await refused(auth.authenticate(bearer(token)), token) == message


async def test_expiry_within_leeway_accepted() -> None:
    auth, _ = await make_auth(settings(leeway=30))
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer(token))).id == "invoice-bot"


async def test_issuer_enforced_when_configured() -> None:
    auth, _ = await make_auth(settings(issuer="https://idp.example"))
    good = issue_token("invoice-bot", SECRET, issuer="https://idp.example")
    wrong = issue_token("invoice-bot", SECRET, issuer="https://evil.example")
    missing = issue_token("invoice-bot", SECRET)
    assert (await auth.authenticate(bearer(good))).id == "invoice-bot"
    assert await refused(auth.authenticate(bearer(wrong)), wrong) == "token issuer must be 'https://idp.example'"
    assert await refused(auth.authenticate(bearer(missing)), missing) == "token has no 'iss' claim"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_refused(alg: str, tmp_path: Path, rsa_key: KeyPair) -> None:
    auth, _ = await make_auth(settings(jwks_file=write_jwks(tmp_path, rsa_key)))
    token = handmade({"alg": alg, "typ": "JWT"}, claims())
    assert await refused(auth.authenticate(bearer(token)), token) == "algorithm 'none' is not allowed"


@pytest.mark.parametrize("alg", ["HS512", "RS512", "PS256", "ES384"])
async def test_other_algorithms_refused(alg: str) -> None:
    auth, _ = await make_auth(settings())
    token = handmade({"alg": alg}, claims(), SECRET)
    assert (
        await refused(auth.authenticate(bearer(token)), token)
        == f"algorithm '{alg}' is not allowed (accepted: HS256, RS256, ES256, EdDSA)"
    )


async def test_malformed_token_refused() -> None:
    auth, _ = await make_auth(settings())
    assert await refused(auth.authenticate(bearer("not-a-jwt")), "not-a-jwt") == "token is not a well-formed JWT"


@pytest.mark.parametrize("with_secret", [False, True])
async def test_hs256_signed_with_rsa_public_key_refused(with_secret: bool, tmp_path: Path, rsa_key: KeyPair) -> None:
    cfg = settings(secret=SECRET if with_secret else None, jwks_file=write_jwks(tmp_path, rsa_key))
    auth, _ = await make_auth(cfg)
    pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = handmade({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, claims(), pem)
    expected = (
        "token signature is invalid"
        if with_secret
        else "algorithm 'HS256' is not accepted: no shared secret is configured"
    )
    assert await refused(auth.authenticate(bearer(token)), token) == expected


async def test_rs256_refused_without_jwks(rsa_key: KeyPair) -> None:
    auth, _ = await make_auth(settings())
    token = sign(rsa_key, claims())
    assert (
        await refused(auth.authenticate(bearer(token)), token)
        == "algorithm 'RS256' is not accepted: no JWKS is configured"
    )


# --- the verified-token cache --------------------------------------------------------------------


async def test_cache_hit_does_not_verify_again(monkeypatch: pytest.MonkeyPatch) -> None:
    auth, keys = await make_auth(settings())
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    token = issue_token("invoice-bot", SECRET)
    first = await auth.authenticate(bearer(token))
    second = await auth.authenticate({"x-api-key": token})
    assert second is first
    assert (keys.calls, decodes) == (1, 1)


async def test_cache_refuses_expired_token_without_verifying() -> None:
    now = [time.time()]
    auth, keys = await make_auth(settings(leeway=30), clock=lambda: now[0])
    token = issue_token("invoice-bot", SECRET, ttl=60)
    agent = await auth.authenticate(bearer(token))
    now[0] = agent.expires_at + 29
    assert (await auth.authenticate(bearer(token))).id == "invoice-bot"
    now[0] = agent.expires_at + 30
    assert await refused(auth.authenticate(bearer(token)), token) == "token expired"
    assert keys.calls == 1


async def test_cache_hit_rechecks_agent_exists() -> None:
    known = {"invoice-bot"}
    auth, keys = await make_auth(settings(), agents=known)
    token = issue_token("invoice-bot", SECRET)
    await auth.authenticate(bearer(token))
    known.clear()
    assert await refused(auth.authenticate(bearer(token)), token) == "agent 'invoice-bot' is not in the rules"
    assert keys.calls == 1


async def test_refused_token_is_not_cached() -> None:
    known: set[str] = set()
    auth, keys = await make_auth(settings(), agents=known)
    token = issue_token("invoice-bot", SECRET)
    await refused(auth.authenticate(bearer(token)), token)
    known.add("invoice-bot")
    assert (await auth.authenticate(bearer(token))).id == "invoice-bot"
    assert keys.calls == 2


# --- admin JWTs ----------------------------------------------------------------------------------


async def test_verify_admin_accepts_approver() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("alice", SECRET, audience="agent-gateway-admin", extra={"role": "approver"})
    result = await auth.verify_admin(token)
    assert (result["sub"], result["role"]) == ("alice", "approver")


async def test_verify_admin_refuses_agent_token() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("invoice-bot", SECRET, extra={"role": "admin"})
    assert await refused(auth.verify_admin(token), token) == "token audience must include 'agent-gateway-admin'"


async def test_verify_admin_refuses_other_role() -> None:
    auth, _ = await make_auth(settings())
    token = issue_token("bob", SECRET, audience="agent-gateway-admin", extra={"role": "viewer"})
    assert await refused(auth.verify_admin(token), token) == "admin token 'role' claim must be 'admin' or 'approver'"


async def test_authenticate_refuses_admin_token() -> None:
    auth, _ = await make_auth(settings(), agents={"alice"})
    token = issue_token("alice", SECRET, audience="agent-gateway-admin", extra={"role": "admin"})
    assert await refused(auth.authenticate(bearer(token)), token) == "token audience must include 'agent-gateway'"


async def test_token_for_both_audiences_refused_on_both_sides() -> None:
    auth, _ = await make_auth(settings())
    token = jwt.encode(claims(aud=["agent-gateway", "agent-gateway-admin"], role="admin"), SECRET, algorithm="HS256")
    assert (
        await refused(auth.authenticate(bearer(token)), token)
        == "an admin token is not accepted as an agent credential"
    )
    assert await refused(auth.verify_admin(token), token) == "an agent token is never accepted on the admin side"


# --- JWKS URL, rotation and refetch bounds -------------------------------------------------------


@dataclass
class JwksServer:
    keys: list[dict[str, Any]]
    requests: int = 0
    status: int = 200
    url: str = ""


@pytest.fixture
async def jwks_server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], rsa_key: KeyPair
) -> JwksServer:
    state = JwksServer(keys=[rsa_key.jwk])

    async def handler(request: web.Request) -> web.Response:
        state.requests += 1
        if state.status != 200:
            return web.Response(status=state.status, text="down")
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/jwks.json"))
    return state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_jwks_url_rotation_refetches_once(
    jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: KeyPair, ed_key: KeyPair
) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_url=jwks_server.url), session)
    assert jwks_server.requests == 1
    assert (await auth.authenticate(bearer(sign(rsa_key, claims())))).id == "invoice-bot"
    jwks_server.keys = [rsa_key.jwk, ed_key.jwk]
    assert (await auth.authenticate(bearer(sign(ed_key, claims())))).id == "invoice-bot"
    assert (await auth.authenticate(bearer(sign(ed_key, claims(sub="support-bot"))))).id == "support-bot"
    assert jwks_server.requests == 2


async def test_jwks_url_concurrent_new_kid_shares_one_fetch(
    jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: KeyPair, ec_key: KeyPair
) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_url=jwks_server.url), session)
    jwks_server.keys = [rsa_key.jwk, ec_key.jwk]
    tokens = [sign(ec_key, claims(jti=str(i))) for i in range(20)]
    agents = await asyncio.gather(*(auth.authenticate(bearer(t)) for t in tokens))
    assert [a.id for a in agents] == ["invoice-bot"] * 20
    assert jwks_server.requests == 2


async def test_jwks_url_burst_of_unknown_kids_fetches_at_most_once(
    jwks_server: JwksServer, session: aiohttp.ClientSession, ed_key: KeyPair
) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_url=jwks_server.url), session)
    tokens = [sign(ed_key, claims(), kid=f"u{i}") for i in range(20)]
    results = await asyncio.gather(*(auth.authenticate(bearer(t)) for t in tokens), return_exceptions=True)
    assert [r.message if isinstance(r, GatewayError) else r for r in results] == [
        f"unknown key id 'u{i}'" for i in range(20)
    ]
    assert jwks_server.requests == 2


async def test_jwks_url_second_unknown_kid_within_interval_not_fetched(
    jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: KeyPair, ec_key: KeyPair
) -> None:
    mono = [1000.0]
    cfg = settings(secret=None, jwks_url=jwks_server.url, jwks_refetch_interval=30)
    auth, _ = await make_auth(cfg, session, key_clock=lambda: mono[0])
    first = sign(ec_key, claims(), kid="k8")
    assert await refused(auth.authenticate(bearer(first)), first) == "unknown key id 'k8'"
    assert jwks_server.requests == 2
    jwks_server.keys = [rsa_key.jwk, ec_key.jwk]
    mono[0] += 29
    second = sign(ec_key, claims())
    assert await refused(auth.authenticate(bearer(second)), second) == "unknown key id 'ec-1'"
    assert jwks_server.requests == 2
    mono[0] += 1
    assert (await auth.authenticate(bearer(second))).id == "invoice-bot"
    assert jwks_server.requests == 3


async def test_jwks_url_refetch_failure_keeps_old_keys(
    jwks_server: JwksServer, session: aiohttp.ClientSession, rsa_key: KeyPair, ec_key: KeyPair
) -> None:
    auth, _ = await make_auth(settings(secret=None, jwks_url=jwks_server.url), session)
    jwks_server.status = 500
    unknown = sign(ec_key, claims())
    assert await refused(auth.authenticate(bearer(unknown)), unknown) == "unknown key id 'ec-1'"
    assert jwks_server.requests == 2
    assert (await auth.authenticate(bearer(sign(rsa_key, claims())))).id == "invoice-bot"


async def test_jwks_url_failing_at_startup_raises(jwks_server: JwksServer, session: aiohttp.ClientSession) -> None:
    jwks_server.status = 503
    with pytest.raises(ValueError, match=r"^JWKS URL .*/jwks.json answered HTTP 503$"):
        await KeySource.create(settings(secret=None, jwks_url=jwks_server.url), session)


# --- configuration errors ------------------------------------------------------------------------


async def test_keysource_requires_some_key() -> None:
    with pytest.raises(ValueError, match=r"^no JWT verification key configured: set AGENT_GATEWAY_JWT_SECRET"):
        await KeySource.create(settings(secret=None), None)


async def test_keysource_refuses_short_secret() -> None:
    with pytest.raises(ValueError, match=r"^the JWT secret is 6 bytes; HS256 needs at least 32$"):
        await KeySource.create(settings(secret=b"secret"), None)


async def test_keysource_refuses_jwks_without_usable_keys(tmp_path: Path) -> None:
    path = write_jwks(tmp_path, extra=[{"kty": "oct", "kid": "h", "k": b64(SECRET)}])
    with pytest.raises(ValueError, match=r"has no usable key .*keys\[0\] \(kid 'h'\): key type 'oct'"):
        await KeySource.create(settings(secret=None, jwks_file=path), None)


async def test_keysource_refuses_missing_jwks_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"^cannot read JWKS file .*nope.json: No such file or directory$"):
        await KeySource.create(settings(secret=None, jwks_file=missing), None)


# --- dev tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90.0), ("30m", 1800.0), ("1h", 3600.0), ("2d", 172800.0), ("45", 45.0)]
)
def test_parse_ttl_units(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "h", "-1h", "0s", "1h30m"])
def test_parse_ttl_refuses_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid TTL "):
        parse_ttl(text)


def test_issue_token_claims() -> None:
    token = issue_token("invoice-bot", SECRET, ttl=120, issuer="me", extra={"team": "ap"}, now=1_000_000)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_aud": False})
    assert payload == {
        "sub": "invoice-bot",
        "aud": "agent-gateway",
        "iat": 1_000_000,
        "exp": 1_000_120,
        "iss": "me",
        "team": "ap",
    }


def test_issue_token_refuses_reserved_extra_and_short_secret() -> None:
    with pytest.raises(ValueError, match=r"^extra claims cannot set exp, sub; use the named arguments$"):
        issue_token("a", SECRET, extra={"sub": "b", "exp": 1})
    with pytest.raises(ValueError, match=r"^the JWT secret is 5 bytes"):
        issue_token("a", b"short")
