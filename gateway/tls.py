"""TLS and mTLS on the agents' port, and the agent identity a client certificate carries.

The identity comes from the certificate's SAN URI `spiffe://<trust-domain>/agent/<id>` (-> `<id>`), else from its
subject CN. The peer certificate is read once per connection and cached against the connection's SSL object.
"""

from __future__ import annotations

import ssl
import weakref
from typing import Any

from .http_server import Request
from .models import Agent
from .runtime import Runtime
from .settings import Settings

__all__ = ["CLIENT_CERT_MODES", "IDENTITY_BINDINGS", "cert_agent_id", "identify", "peer_agent_id", "server_context"]

CLIENT_CERT_MODES = ("none", "optional", "required")
IDENTITY_BINDINGS = ("required", "off")
SPIFFE_AGENT_PATH = "/agent/"

# ssl.SSLObject (one per connection) -> the agent id its verified peer certificate names (None: no certificate).
_PEERS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The agents' listener's TLS context, or None for plain HTTP. Raises ValueError on an inconsistent set-up."""
    if settings.client_cert not in CLIENT_CERT_MODES:
        raise ValueError(f"--client-cert must be one of {', '.join(CLIENT_CERT_MODES)}")
    if settings.identity_binding not in IDENTITY_BINDINGS:
        raise ValueError(f"--identity-binding must be one of {', '.join(IDENTITY_BINDINGS)}")
    if not settings.tls_cert:
        if settings.tls_key or settings.client_ca or settings.client_cert != "none":
            raise ValueError("--tls-key, --client-ca and --client-cert need --tls-cert")
        return None
    if not settings.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    if settings.client_cert != "none" and not settings.client_ca:
        raise ValueError(f"--client-cert {settings.client_cert} needs --client-ca (the CA agents' certificates "
                         "are checked against)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.client_ca:
        context.load_verify_locations(cafile=settings.client_ca)
    context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                           "required": ssl.CERT_REQUIRED}[settings.client_cert]
    return context


def cert_agent_id(cert: dict[str, Any]) -> str | None:
    """The agent a verified certificate (`SSLObject.getpeercert()` form) names: SPIFFE SAN URI, else CN."""
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith("spiffe://"):
            _, _, path = value[len("spiffe://"):].partition("/")
            path = "/" + path
            if path.startswith(SPIFFE_AGENT_PATH):
                agent = path[len(SPIFFE_AGENT_PATH):]
                if agent and "/" not in agent:
                    return agent
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None


def peer_agent_id(request: Request) -> str | None:
    """The agent id in this connection's client certificate, parsed once per connection; None without one."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    try:
        return _PEERS[ssl_object]
    except KeyError:
        pass
    cert = ssl_object.getpeercert()
    agent = cert_agent_id(cert) if cert else None
    _PEERS[ssl_object] = agent
    return agent


async def identify(request: Request, rt: Runtime) -> Agent:
    """The identify stage on the agents' port: the JWT, the client certificate, or both bound together."""
    settings = rt.settings
    peer = peer_agent_id(request) if settings.client_ca else None
    return await rt.authenticator.authenticate_peer(
        request.headers, peer, binding=settings.identity_binding == "required",
        cert_alone=settings.client_cert == "required")
