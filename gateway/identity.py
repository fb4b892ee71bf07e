"""The identify stage: turn a request's agent credential (a JWT) into an `Agent`, or refuse it.

Verified tokens are cached until they expire, so the hot path is a dictionary lookup and a clock read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jwt
from cachetools import LRUCache
from jwt.exceptions import InvalidSubjectError
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import GatewayError, unauthenticated
from .keys import JwtSettings, KeySource
from .models import Agent

__all__ = ["ADMIN_AUDIENCE", "ADMIN_ROLES", "Authenticator", "JwtSettings", "KeySource"]

ADMIN_AUDIENCE = "agent-gateway-admin"
ADMIN_ROLES = ("admin", "approver")
MAX_TOKEN_BYTES = 8192


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return list(headers.getall(name, []))
    lowered = name.lower()
    return [value for key, value in headers.items() if key.lower() == lowered]


def _one_header(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    if len(values) > 1:
        raise unauthenticated(f"more than one {name} header")
    return values[0] if values else None


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


class Authenticator:
    """Authenticates agents (and admin JWTs) against a `KeySource`, caching verified agent tokens."""

    def __init__(
        self,
        keys: KeySource,
        settings: JwtSettings,
        agent_exists: Callable[[str], bool],
        cache_size: int = 10000,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._settings = settings
        self._agent_exists = agent_exists
        self._clock = clock
        self._cache: LRUCache[str, Agent] = LRUCache(maxsize=cache_size)

    def credential(self, headers: Mapping[str, str]) -> str:
        """The agent's JWT from `Authorization: Bearer` or `x-api-key` (never the query string)."""
        bearer: str | None = None
        authorization = _one_header(headers, "Authorization")
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer":
                raise unauthenticated("the Authorization header must use the Bearer scheme")
            bearer = value.strip()
            if not bearer:
                raise unauthenticated("the Authorization header has an empty Bearer token")
        api_key = _one_header(headers, "x-api-key")
        if api_key is not None:
            api_key = api_key.strip()
            if not api_key:
                raise unauthenticated("the x-api-key header is empty")
        if bearer is not None and api_key is not None and bearer != api_key:
            raise unauthenticated("conflicting credentials: Authorization and x-api-key carry different tokens")
        token = bearer or api_key
        if token is None:
            raise unauthenticated("no credential: send 'Authorization: Bearer <agent JWT>' or 'x-api-key'")
        return token

    async def authenticate(self, headers: CIMultiDictProxy[str] | Mapping[str, str]) -> Agent:
        """The identify stage: the agent named by a valid, unexpired token whose `sub` is in the rules."""
        token = self.credential(headers)
        agent = self._cache.get(token)
        if agent is not None:
            # A hit was fully verified once; only time and the rule set can have changed since.
            if self._clock() >= agent.expires_at + self._settings.leeway:
                self._cache.pop(token, None)
                raise unauthenticated("token expired")
            self._check_exists(agent.id)
            return agent
        claims = await self._verify(token, self._settings.audience)
        if ADMIN_AUDIENCE in _audiences(claims):
            raise unauthenticated("an admin token is not accepted as an agent credential")
        sub = claims["sub"]
        self._check_exists(sub)
        agent = Agent(id=sub, claims=MappingProxyType(claims), expires_at=float(claims["exp"]))
        self._cache[token] = agent
        return agent

    async def authenticate_peer(self, headers: CIMultiDictProxy[str] | Mapping[str, str], peer: str | None, *,
                                binding: bool = True, cert_alone: bool = False) -> Agent:
        """Identify with a verified client certificate's agent id (`peer`) as well as the JWT.

        No certificate: the JWT alone. Both: with `binding`, they must name the same agent. A certificate and no
        JWT: the certificate alone identifies the agent only when `cert_alone` (client certificates required).
        """
        if peer is None:
            return await self.authenticate(headers)
        if cert_alone and _one_header(headers, "Authorization") is None and _one_header(headers, "x-api-key") is None:
            self._check_exists(peer)
            return Agent(id=peer, claims=MappingProxyType({"sub": peer, "cnf": "x509"}), expires_at=float("inf"))
        agent = await self.authenticate(headers)
        if binding and agent.id != peer:
            raise unauthenticated(f"the client certificate names agent {peer[:128]!r} but the token names "
                                  f"{agent.id[:128]!r}")
        return agent

    async def verify_admin(self, token: str) -> dict[str, Any]:
        """Verify an admin/approver JWT (audience `agent-gateway-admin`) and return its claims."""
        claims = await self._verify(token, ADMIN_AUDIENCE)
        if self._settings.audience in _audiences(claims):
            raise unauthenticated("an agent token is never accepted on the admin side")
        role = claims.get("role")
        if role not in ADMIN_ROLES:
            raise unauthenticated("admin token 'role' claim must be 'admin' or 'approver'")
        return claims

    def _check_exists(self, agent_id: str) -> None:
        if not self._agent_exists(agent_id):
            raise unauthenticated(f"agent {agent_id[:128]!r} is not in the rules")

    async def _verify(self, token: str, audience: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES:
            raise unauthenticated(f"token is larger than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise unauthenticated("token is not a well-formed JWT") from exc
        key, alg = await self._keys.key_for(header)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway,
                options={"require": ["exp", "sub"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise self._translate(exc, audience) from exc
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise unauthenticated("token 'sub' claim must be a non-empty string")
        return claims

    def _translate(self, exc: jwt.PyJWTError, audience: str) -> GatewayError:
        """A pyjwt failure as an actionable message; never the token, never pyjwt's own text."""
        if isinstance(exc, jwt.ExpiredSignatureError):
            return unauthenticated("token expired")
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return unauthenticated(f"token has no {exc.claim!r} claim")
        if isinstance(exc, jwt.InvalidAudienceError):
            return unauthenticated(f"token audience must include {audience!r}")
        if isinstance(exc, jwt.InvalidIssuerError):
            return unauthenticated(f"token issuer must be {self._settings.issuer!r}")
        if isinstance(exc, jwt.ImmatureSignatureError):
            return unauthenticated("token is not valid yet ('nbf' or 'iat' is in the future)")
        if isinstance(exc, jwt.InvalidIssuedAtError):
            return unauthenticated("token 'iat' claim must be a number")
        if isinstance(exc, InvalidSubjectError):
            return unauthenticated("token 'sub' claim must be a non-empty string")
        if isinstance(exc, jwt.InvalidSignatureError):
            return unauthenticated("token signature is invalid")
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return unauthenticated("token algorithm is not allowed for this key")
        if isinstance(exc, jwt.InvalidKeyError):
            return unauthenticated("token cannot be verified with the configured key")
        if isinstance(exc, jwt.DecodeError):
            return unauthenticated("token is not a well-formed JWT")
        return unauthenticated("token is invalid")
