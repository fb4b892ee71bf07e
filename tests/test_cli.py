"""Command-line settings: flags win, `AGENT_GATEWAY_*` environment variables fill in, defaults otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import build_parser, settings_from


def parse(argv: list[str], env: dict[str, str]):
    return settings_from(build_parser(env).parse_args(argv), env)


def test_serve_defaults_without_flags_or_environment() -> None:
    s = parse(["serve"], {})
    assert (s.rules, s.host, s.port, s.admin_host, s.admin_port, s.trace) == (
        "rules", "127.0.0.1", 8080, "127.0.0.1", 8081, "-")
    assert (s.max_body, s.jwt_secret, s.admin_token, s.jwt_audience) == (16 * 2**20, None, None, "agent-gateway")


def test_serve_reads_agent_gateway_environment_variables() -> None:
    env = {"AGENT_GATEWAY_RULES": "/etc/rules", "AGENT_GATEWAY_PORT": "9090", "AGENT_GATEWAY_ADMIN_PORT": "9091",
           "AGENT_GATEWAY_TRACE": "/var/log/trace.jsonl", "AGENT_GATEWAY_JWT_SECRET": "s" * 32,
           "AGENT_GATEWAY_ADMIN_TOKEN": "adm", "AGENT_GATEWAY_JWKS_URL": "https://idp.example/jwks",
           "AGENT_GATEWAY_JWT_ISSUER": "https://idp.example", "AGENT_GATEWAY_MAX_BODY": "1024",
           "AGENT_GATEWAY_HOLD_TIMEOUT": "60"}
    s = parse(["serve"], env)
    assert (s.rules, s.port, s.admin_port, s.trace) == ("/etc/rules", 9090, 9091, "/var/log/trace.jsonl")
    assert (s.jwt_secret, s.admin_token, s.jwks_url, s.jwt_issuer) == (
        b"s" * 32, "adm", "https://idp.example/jwks", "https://idp.example")
    assert (s.max_body, s.hold_timeout) == (1024, 60.0)
    assert s.env is env  # the same mapping expands ${VAR} in rule files


def test_serve_flags_win_over_environment() -> None:
    s = parse(["serve", "--port", "7000", "--rules", "mine"], {"AGENT_GATEWAY_PORT": "9090",
                                                               "AGENT_GATEWAY_RULES": "/etc/rules"})
    assert (s.port, s.rules) == (7000, "mine")


def test_secret_files_are_read_without_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "jwt").write_bytes(b"file-secret-0123456789abcdef0123456789\n")
    (tmp_path / "admin").write_bytes(b"admin-from-file\n")
    s = parse(["serve", "--jwt-secret-file", str(tmp_path / "jwt"), "--admin-token-file", str(tmp_path / "admin")],
              {"AGENT_GATEWAY_JWT_SECRET": "ignored", "AGENT_GATEWAY_ADMIN_TOKEN": "ignored"})
    assert (s.jwt_secret, s.admin_token) == (b"file-secret-0123456789abcdef0123456789", "admin-from-file")


def test_serve_rejects_a_non_numeric_port() -> None:
    with pytest.raises(SystemExit):
        parse(["serve", "--port", "eighty"], {})


def test_serve_rejects_a_non_numeric_port_from_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["serve"], {"AGENT_GATEWAY_PORT": "eighty"})
    assert exit_info.value.code == 2
    assert "argument --port: invalid int value: 'eighty'" in capsys.readouterr().err
