"""Issue development JWTs for agents (`agent-gateway token`), signed HS256 with the shared secret."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import jwt

from .keys import MIN_SECRET_BYTES

_TTL = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RESERVED = frozenset({"sub", "aud", "iat", "exp", "iss"})


def parse_ttl(text: str) -> float:
    """Seconds in a TTL such as '90s', '30m', '1h' or '2d' (a bare number is seconds)."""
    match = _TTL.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"invalid TTL {text!r}: use a number with a unit s, m, h or d, e.g. '30m' or '1h'")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid TTL {text!r}: must be more than zero")
    return seconds


def issue_token(
    agent: str,
    secret: bytes,
    ttl: float = 3600,
    audience: str = "agent-gateway",
    issuer: str | None = None,
    extra: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """An HS256 JWT with `sub`, `aud`, `iat`, `exp` (and `iss` if given) plus any `extra` claims."""
    if not agent:
        raise ValueError("agent id must not be empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the JWT secret is {len(secret)} bytes; HS256 needs at least {MIN_SECRET_BYTES}")
    if ttl <= 0:
        raise ValueError("ttl must be more than zero")
    clashing = sorted(_RESERVED.intersection(extra or {}))
    if clashing:
        raise ValueError(f"extra claims cannot set {', '.join(clashing)}; use the named arguments")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = dict(extra or {})
    claims.update(sub=agent, aud=audience, iat=int(issued), exp=int(issued + ttl))
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
