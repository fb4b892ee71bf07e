"""TLS towards an upstream: the client context built from an upstream's `tls:` settings, and why one fails.

Messages never carry a path or anything read from the files: paths may come from the environment, like any value.
"""

from __future__ import annotations

import os
import ssl

from .policy.spec import UpstreamTlsSpec


def tls_context(tls: UpstreamTlsSpec | None) -> ssl.SSLContext:
    """A client context that verifies the upstream (system CAs, or its own bundle) and may present a certificate.

    Raises OSError or ssl.SSLError for files that are missing or are not PEM certificates and keys.
    """
    context = ssl.create_default_context(cafile=tls.ca_file if tls is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if tls is not None and tls.cert_file is not None:
        # An encrypted key fails to load rather than OpenSSL prompting for a passphrase on the terminal.
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    return context


def _no_passphrase() -> bytes:
    return b""


def file_times(tls: UpstreamTlsSpec | None) -> tuple[float, ...]:
    """Files' modification times: a certificate rotated in place makes a new context (and new connections)."""
    if tls is None:
        return ()
    times: list[float] = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        try:
            times.append(os.stat(path).st_mtime if path is not None else 0.0)
        except OSError:
            times.append(-1.0)
    return tuple(times)


def tls_problem(spec: UpstreamTlsSpec) -> tuple[str, str] | None:
    """None if a context builds from `spec`; else the field at fault and why, for the rule-file error."""
    try:
        tls_context(spec)
    except (OSError, ssl.SSLError) as exc:
        return _culprit(spec, exc)
    return None


def _culprit(spec: UpstreamTlsSpec, exc: OSError | ssl.SSLError) -> tuple[str, str]:
    """Which tls field made `tls_context` fail, and why, in words that carry nothing read from the files."""
    if spec.ca_file is not None:
        try:
            tls_context(UpstreamTlsSpec(ca_file=spec.ca_file))
        except (OSError, ssl.SSLError) as ca_exc:
            return "ca_file", "cannot be loaded: " + _ssl_problem(ca_exc, "not a PEM CA certificate bundle")
    problem = _ssl_problem(exc, "not a PEM certificate and its unencrypted private key")
    if spec.key_file is not None:
        return "key_file", "cannot be loaded with cert_file: " + problem
    return "cert_file", "cannot be loaded: " + problem


def _ssl_problem(exc: OSError | ssl.SSLError, default: str) -> str:
    if isinstance(exc, ssl.SSLError):
        return "the private key does not match the certificate" if exc.reason == "KEY_VALUES_MISMATCH" else default
    return os.strerror(exc.errno).lower() if exc.errno else default
