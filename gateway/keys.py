"""JWT verification keys: the HS256 shared secret and asymmetric keys from a JWKS file or URL, cached.

The URL's key set is fetched once at startup and refetched, single-flight and at a bounded rate, when a
token names a key id we do not know (key rotation). A failed refetch keeps the keys we had.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from .errors import unauthenticated

log = logging.getLogger(__name__)

HS_ALGORITHM = "HS256"
# The only asymmetric algorithms we accept, and the key shape each needs; oct keys never come from a JWKS.
JWKS_ALGORITHMS = ("RS256", "ES256", "EdDSA")
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key must be at least as long as the hash (256 bits)
MIN_RSA_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 5.0


@dataclass(frozen=True)
class JwtSettings:
    """How agent and admin JWTs are verified. The caller resolves env vars and files into these values."""

    secret: bytes | None
    jwks_file: str | None
    jwks_url: str | None
    audience: str = "agent-gateway"
    issuer: str | None = None
    leeway: float = 30.0
    jwks_refetch_interval: float = 30.0


def _algorithm_for(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm we accept for this JWK's key type, or None if we accept none."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    return None


def _usable_key(jwk: Any) -> tuple[jwt.PyJWK | None, str]:
    """Build a verification key from one JWK member, or return why it is skipped."""
    if not isinstance(jwk, dict):
        return None, "not a JSON object"
    alg = _algorithm_for(jwk)
    if alg is None:
        return None, f"key type {jwk.get('kty')!r} / curve {jwk.get('crv')!r} is not accepted"
    if jwk.get("alg") not in (None, alg):
        return None, f"alg {jwk.get('alg')!r} is not accepted for this key (expected {alg!r})"
    if jwk.get("use") not in (None, "sig"):
        return None, f"use {jwk.get('use')!r} is not 'sig'"
    if jwk.get("kid") is not None and not isinstance(jwk.get("kid"), str):
        return None, "kid is not a string"
    try:
        key = jwt.PyJWK.from_dict(jwk, algorithm=alg)
    except jwt.PyJWTError as exc:
        return None, f"unusable: {exc}"
    if alg == "RS256" and key.key.key_size < MIN_RSA_BITS:
        return None, f"RSA key is {key.key.key_size} bits, below {MIN_RSA_BITS}"
    return key, ""


def parse_jwks(document: Any, source: str) -> list[jwt.PyJWK]:
    """Parse a JWKS document into its RS256/ES256/EdDSA keys; ValueError naming `source` if none is usable."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"JWKS from {source} must be a JSON object with a 'keys' list")
    keys: list[jwt.PyJWK] = []
    skipped: list[str] = []
    for index, member in enumerate(document["keys"]):
        key, why = _usable_key(member)
        if key is None:
            kid = member.get("kid") if isinstance(member, dict) else None
            skipped.append(f"keys[{index}] (kid {kid!r}): {why}")
        else:
            keys.append(key)
    if not keys:
        detail = "; ".join(skipped) or "the key set is empty"
        raise ValueError(
            f"JWKS from {source} has no usable key (accepted: RSA >= {MIN_RSA_BITS} bits for RS256, "
            f"EC P-256 for ES256, OKP Ed25519 for EdDSA): {detail}"
        )
    kids = [k.key_id for k in keys if k.key_id is not None]
    if len(kids) != len(set(kids)):
        raise ValueError(f"JWKS from {source} has duplicate key ids")
    return keys


def _decode_json(data: bytes, source: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"JWKS from {source} is not valid JSON: {exc}") from exc


def _short(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


class KeySource:
    """Verification keys: HS256 secret and/or asymmetric keys from a JWKS file or URL, cached."""

    def __init__(
        self,
        settings: JwtSettings,
        session: aiohttp.ClientSession | None,
        file_keys: list[jwt.PyJWK],
        url_keys: list[jwt.PyJWK],
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._session = session
        self._file_keys = file_keys
        self._url_keys = url_keys
        self._clock = clock
        self._last_refetch: float | None = None
        self._inflight: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        settings: JwtSettings,
        session: aiohttp.ClientSession | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> KeySource:
        """Load the JWKS file and fetch the JWKS URL once; ValueError if nothing usable is configured."""
        if settings.secret is None and not settings.jwks_file and not settings.jwks_url:
            raise ValueError(
                "no JWT verification key configured: set AGENT_GATEWAY_JWT_SECRET (HS256), --jwks-file or --jwks-url"
            )
        if settings.secret is not None and len(settings.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret is {len(settings.secret)} bytes; HS256 needs at least {MIN_SECRET_BYTES}")
        file_keys: list[jwt.PyJWK] = []
        if settings.jwks_file:
            try:
                data = await asyncio.to_thread(Path(settings.jwks_file).read_bytes)
            except OSError as exc:
                raise ValueError(f"cannot read JWKS file {settings.jwks_file}: {exc.strerror}") from exc
            file_keys = parse_jwks(_decode_json(data, settings.jwks_file), settings.jwks_file)
        url_keys: list[jwt.PyJWK] = []
        if settings.jwks_url:
            if session is None:
                raise ValueError("a JWKS URL is configured but no HTTP session was given to fetch it")
            url_keys = await _fetch_jwks(session, settings.jwks_url)
        return cls(settings, session, file_keys, url_keys, clock)

    async def key_for(self, header: Mapping[str, Any]) -> tuple[Any, str]:
        """The (key, algorithm) to verify a token with this header; `unauthenticated` if there is none."""
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise unauthenticated("token header has no 'alg'")
        if alg == HS_ALGORITHM:
            # An HS256 token is only ever checked against the shared secret, never a public key.
            if self._settings.secret is None:
                raise unauthenticated("algorithm 'HS256' is not accepted: no shared secret is configured")
            return self._settings.secret, HS_ALGORITHM
        if alg.lower() == "none":
            raise unauthenticated("algorithm 'none' is not allowed")
        if alg not in JWKS_ALGORITHMS:
            raise unauthenticated(f"algorithm {_short(alg)!r} is not allowed (accepted: HS256, RS256, ES256, EdDSA)")
        if not self._settings.jwks_file and not self._settings.jwks_url:
            raise unauthenticated(f"algorithm {alg!r} is not accepted: no JWKS is configured")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise unauthenticated("token header 'kid' must be a string")
        key = self._find(kid)
        if key is None and kid is not None and self._settings.jwks_url:
            await self._refetch()
            key = self._find(kid)
        if key is None:
            if kid is None:
                raise unauthenticated("token has no 'kid' header and the JWKS holds more than one key")
            raise unauthenticated(f"unknown key id {_short(kid)!r}")
        if key.algorithm_name != alg:
            raise unauthenticated(f"algorithm {alg!r} does not match key {key.key_id!r}, which is {key.algorithm_name}")
        return key.key, alg

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        keys = self._file_keys + self._url_keys
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        for key in keys:
            if key.key_id == kid:
                return key
        return None

    async def _refetch(self) -> None:
        """Refetch the URL's key set: concurrent callers share one fetch, at most one per interval."""
        if self._inflight is None:
            now = self._clock()
            last = self._last_refetch
            if last is not None and now - last < self._settings.jwks_refetch_interval:
                return
            self._last_refetch = now
            self._inflight = asyncio.create_task(self._replace_url_keys())
            self._inflight.add_done_callback(self._fetch_done)
        # Shielded: a waiter that is cancelled must not cancel the fetch the others are waiting on.
        await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _replace_url_keys(self) -> None:
        assert self._session is not None and self._settings.jwks_url is not None
        try:
            self._url_keys = await _fetch_jwks(self._session, self._settings.jwks_url)
        except Exception as exc:  # any failure keeps the old keys; the unknown kid is then refused
            log.warning("JWKS refetch failed, keeping the previous keys: %s", exc)


async def _fetch_jwks(session: aiohttp.ClientSession, url: str) -> list[jwt.PyJWK]:
    """GET and parse a JWKS URL; every failure is a ValueError naming the URL."""
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT), headers={"Accept": "application/json"}
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"JWKS URL {url} answered HTTP {resp.status}")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                data += chunk
                if len(data) > MAX_JWKS_BYTES:
                    raise ValueError(f"JWKS from {url} is larger than {MAX_JWKS_BYTES} bytes")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ValueError(f"cannot fetch JWKS URL {url}: {exc or type(exc).__name__}") from exc
    return parse_jwks(_decode_json(bytes(data), url), url)
