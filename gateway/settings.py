"""Settings: read once, from flags with `AGENT_GATEWAY_*` environment fallbacks; nothing else reads env."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_MAX_BODY = 16 * 2**20


@dataclass(frozen=True)
class Settings:
    rules: str = "rules"
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    trace: str = "-"
    max_body: int = DEFAULT_MAX_BODY
    jwt_secret: bytes | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwt_audience: str = "agent-gateway"
    jwt_issuer: str | None = None
    admin_token: str | None = None
    hold_timeout: float = 900.0
    drain_timeout: float = 30.0
    redis_url: str | None = None  # None: the in-memory store (one process)
    store_timeout: float = 1.0  # seconds for any one store operation
    alert_webhook: str | None = None  # budget alerts are POSTed here (JSON), retried in the background
    workers: int = 1
    approval_webhook: str | None = None  # new pending approvals are POSTed here (JSON), with a console link
    approval_lease: float = 15.0  # seconds until a held call whose process died reads as abandoned (Redis)
    console_url: str | None = None  # the console's address as approvers reach it (default: the admin listener)
    rules_watch: float = 1.0  # seconds between checks of the rules directory for changes; 0: no watching
    tls_cert: str | None = None  # PEM certificate (chain) for the agents' port; None: plain HTTP
    tls_key: str | None = None
    client_ca: str | None = None  # CA bundle that agents' client certificates are verified against
    client_cert: str = "none"  # none | optional | required
    identity_binding: str = "required"  # required: a certificate and a JWT must name the same agent; off
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # for ${VAR} in rule files


def read_secret(value: str | None, file: str | None) -> bytes | None:
    """A secret given directly or as a file path (file content, trailing newline stripped)."""
    if file:
        with open(file, "rb") as handle:
            return handle.read().rstrip(b"\r\n")
    return value.encode() if value else None


def env_default(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return env.get(f"AGENT_GATEWAY_{name}", default)


def process_env() -> Mapping[str, str]:
    """The one read of the process environment; everything downstream takes a mapping."""
    return dict(os.environ)
