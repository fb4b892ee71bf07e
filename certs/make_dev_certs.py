#!/usr/bin/env python3
"""Development PKI for agent-gateway: a CA, a gateway server certificate and agent client certificates.

    python certs/make_dev_certs.py [--out certs/out] [--trust-domain example.org] [AGENT_ID ...]

Writes into --out (default certs/out, git-ignored): ca.pem, ca.key, server.pem, server.key (SAN DNS localhost,
IP 127.0.0.1) and, per agent, <id>.pem and <id>.key whose SAN URI is spiffe://<trust-domain>/agent/<id>
(default agents: invoice-bot, support-bot, ops-bot). For development only: see certs/README.md for real PKI.
Needs only the `cryptography` package. The functions are importable (the tests make their certificates here).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "example.org"
DEFAULT_AGENTS = ("invoice-bot", "support-bot", "ops-bot")
DEFAULT_DAYS = 365


@dataclass
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.key_pem)
        return cert_path, key_path


def _window(days: int, not_before: datetime.datetime | None,
            not_after: datetime.datetime | None) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    start = not_before or now - datetime.timedelta(minutes=5)
    return start, not_after or now + datetime.timedelta(days=days)


def make_ca(name: str = "agent-gateway development CA", days: int = DEFAULT_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _window(days, None, None)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def _leaf(ca: Issued, common_name: str, names: list[x509.GeneralName], usage: x509.ObjectIdentifier, days: int,
          not_before: datetime.datetime | None, not_after: datetime.datetime | None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _window(days, not_before, not_after)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(cert, key)


def make_server(ca: Issued, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = DEFAULT_DAYS) -> Issued:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _leaf(ca, hosts[0], names, ExtendedKeyUsageOID.SERVER_AUTH, days, None, None)


def spiffe_id(trust_domain: str, agent: str) -> str:
    return f"spiffe://{trust_domain}/agent/{agent}"


def make_agent(ca: Issued, agent: str, trust_domain: str = DEFAULT_TRUST_DOMAIN, days: int = DEFAULT_DAYS, *,
               not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None) -> Issued:
    """A client certificate with SAN URI spiffe://<trust_domain>/agent/<agent> and CN <agent>."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(trust_domain, agent))]
    return _leaf(ca, agent, names, ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before, not_after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a development CA, gateway server and agent certificates.")
    parser.add_argument("agents", nargs="*", default=list(DEFAULT_AGENTS), metavar="AGENT_ID",
                        help=f"agent ids (default: {' '.join(DEFAULT_AGENTS)})")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (example.org)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                        help="output directory (default certs/out, git-ignored)")
    parser.add_argument("--host", action="append", dest="hosts",
                        help="server certificate name (DNS or IP; repeatable; default localhost and 127.0.0.1)")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days ({DEFAULT_DAYS})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    ca = make_ca(days=args.days)
    ca.write(out, "ca")
    make_server(ca, tuple(args.hosts or ("localhost", "127.0.0.1")), args.days).write(out, "server")
    for agent in args.agents:
        if not agent or "/" in agent:
            print(f"make_dev_certs: bad agent id {agent!r}", file=sys.stderr)
            return 2
        make_agent(ca, agent, args.trust_domain, args.days).write(out, agent)
        print(f"{out / agent}.pem  {spiffe_id(args.trust_domain, agent)}")
    print(f"CA: {out / 'ca.pem'}  server: {out / 'server.pem'} (keys alongside, mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
