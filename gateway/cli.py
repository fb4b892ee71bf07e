"""The `agent-gateway` command: serve, token, rules check|test|diff|schema, demo, and the admin API's approvals,
pause|resume, tail."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from .approvals import CATEGORIES
from .policy.spec import RuleSetInvalid
from .settings import DEFAULT_MAX_BODY, Settings, process_env, read_secret


def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return env.get(f"AGENT_GATEWAY_{name}", default)


# Defaults are strings on purpose: argparse applies `type` to a string default, so a malformed
# AGENT_GATEWAY_PORT gets the same clear usage error as a malformed --port.
def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    p = sub.add_parser("serve", help="run the gateway",
                       description="Run the gateway. Every flag also reads AGENT_GATEWAY_<FLAG> "
                                   "(e.g. AGENT_GATEWAY_ADMIN_PORT).")
    p.add_argument("--rules", default=_env(env, "RULES", "rules"), help="rules directory (default: rules)")
    p.add_argument("--host", default=_env(env, "HOST", "127.0.0.1"), help="agents' listener address")
    p.add_argument("--port", type=int, default=_env(env, "PORT", "8080"), help="agents' port (8080)")
    p.add_argument("--admin-host", default=_env(env, "ADMIN_HOST", "127.0.0.1"),
                   help="admin listener address (default loopback)")
    p.add_argument("--admin-port", type=int, default=_env(env, "ADMIN_PORT", "8081"),
                   help="admin port (8081)")
    p.add_argument("--trace", default=_env(env, "TRACE", "-"), help="trace output: '-' for stdout, or a file path")
    p.add_argument("--max-body", type=int, default=_env(env, "MAX_BODY", str(DEFAULT_MAX_BODY)),
                   help="largest request body in bytes (16 MiB)")
    p.add_argument("--jwt-secret-file", default=_env(env, "JWT_SECRET_FILE"),
                   help="file holding the HS256 secret (or set AGENT_GATEWAY_JWT_SECRET)")
    p.add_argument("--jwks-file", default=_env(env, "JWKS_FILE"), help="JWKS file with agents' public keys")
    p.add_argument("--jwks-url", default=_env(env, "JWKS_URL"), help="JWKS URL with agents' public keys")
    p.add_argument("--jwt-audience", default=_env(env, "JWT_AUDIENCE", "agent-gateway"), help="required token aud")
    p.add_argument("--jwt-issuer", default=_env(env, "JWT_ISSUER"), help="required token iss, if set")
    p.add_argument("--admin-token-file", default=_env(env, "ADMIN_TOKEN_FILE"),
                   help="file holding the admin token (or set AGENT_GATEWAY_ADMIN_TOKEN)")
    p.add_argument("--hold-timeout", type=float, default=_env(env, "HOLD_TIMEOUT", "900"),
                   help="seconds a held call waits when its rule names no timeout (900)")
    p.add_argument("--drain-timeout", type=float, default=_env(env, "DRAIN_TIMEOUT", "30"),
                   help="seconds SIGTERM waits for in-flight calls (30)")
    p.add_argument("--redis-url", default=_env(env, "REDIS_URL"),
                   help="shared store for limits, approvals and the kill switch (redis://, rediss://, "
                        "redis+sentinel://, redis+cluster://, rediss+cluster://); none: in-memory, one process")
    p.add_argument("--store-timeout", type=float, default=_env(env, "STORE_TIMEOUT", "1"),
                   help="seconds any store operation may take before the call fails closed (1)")
    p.add_argument("--alert-webhook", default=_env(env, "ALERT_WEBHOOK"),
                   help="URL that budget alerts are POSTed to (JSON), retried with back-off")
    p.add_argument("--workers", type=int, default=_env(env, "WORKERS", "1"),
                   help="processes sharing the ports (SO_REUSEPORT); more than 1 needs --redis-url")
    p.add_argument("--approval-webhook", default=_env(env, "APPROVAL_WEBHOOK"),
                   help="URL that each new pending approval is POSTed to (JSON, with a console link)")
    p.add_argument("--console-url", default=_env(env, "CONSOLE_URL"),
                   help="the console's address as approvers reach it, for links (default: the admin listener)")
    p.add_argument("--rules-watch", type=float, default=_env(env, "RULES_WATCH", "1"),
                   help="seconds between checks of the rules directory for changes; 0 turns watching off (1)")
    p.add_argument("--approval-lease", type=float, default=_env(env, "APPROVAL_LEASE", "15"),
                   help="seconds until a held call whose gateway process died reads as abandoned (Redis; 15)")
    p.add_argument("--tls-cert", default=_env(env, "TLS_CERT"),
                   help="PEM certificate (chain) for the agents' port: serve HTTPS (needs --tls-key)")
    p.add_argument("--tls-key", default=_env(env, "TLS_KEY"), help="PEM private key of --tls-cert")
    p.add_argument("--client-ca", default=_env(env, "CLIENT_CA"),
                   help="CA bundle that agents' client certificates are verified against (mTLS)")
    p.add_argument("--client-cert", choices=("none", "optional", "required"),
                   default=_env(env, "CLIENT_CERT", "none"),
                   help="ask agents for a client certificate: none (default), optional, or required (then the "
                        "certificate alone identifies an agent that sends no JWT)")
    p.add_argument("--identity-binding", choices=("required", "off"),
                   default=_env(env, "IDENTITY_BINDING", "required"),
                   help="required (default): a client certificate and a JWT must name the same agent; off: JWT wins")
    p.add_argument("--check", action="store_true",
                   help="validate the flags, keys and rules (as serve would), print a summary and exit; binds no "
                        "port and connects to nothing (exit 0 valid, 1 rule errors, 2 other errors)")


def settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    admin = read_secret(env.get("AGENT_GATEWAY_ADMIN_TOKEN"), args.admin_token_file)
    return Settings(
        rules=args.rules, host=args.host, port=args.port, admin_host=args.admin_host, admin_port=args.admin_port,
        trace=args.trace, max_body=args.max_body,
        jwt_secret=read_secret(env.get("AGENT_GATEWAY_JWT_SECRET"), args.jwt_secret_file),
        jwks_file=args.jwks_file, jwks_url=args.jwks_url, jwt_audience=args.jwt_audience,
        jwt_issuer=args.jwt_issuer, admin_token=admin.decode() if admin else None,
        hold_timeout=args.hold_timeout, drain_timeout=args.drain_timeout, redis_url=args.redis_url,
        store_timeout=args.store_timeout, alert_webhook=args.alert_webhook, workers=args.workers,
        approval_webhook=args.approval_webhook, console_url=args.console_url, approval_lease=args.approval_lease,
        rules_watch=args.rules_watch, tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
        client_cert=args.client_cert, identity_binding=args.identity_binding,
        env=env)


def _serve_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`serve --check`: every check serve makes before it opens a port, without opening one or connecting
    anywhere (the Redis URL is parsed and the JWKS URL's scheme checked; neither is dialled)."""
    from urllib.parse import urlsplit

    from .keys import MIN_SECRET_BYTES, _decode_json, parse_jwks
    from .redis_urls import redis_client
    from .server import WORKERS_NEED_REDIS, load_policy
    from .tls import server_context

    errors: list[str] = []
    try:
        settings = settings_from(args, env)
    except OSError as exc:
        print(f"agent-gateway serve --check: cannot read a secret file: {exc}", file=sys.stderr)
        return 2
    for flag, port in (("--port", settings.port), ("--admin-port", settings.admin_port)):
        if not 0 <= port <= 65535:
            errors.append(f"{flag} {port} is not a TCP port")
    for flag, value in (("--max-body", settings.max_body), ("--workers", settings.workers)):
        if value < 1:
            errors.append(f"{flag} must be at least 1")
    for flag, seconds in (("--hold-timeout", settings.hold_timeout), ("--drain-timeout", settings.drain_timeout),
                          ("--store-timeout", settings.store_timeout), ("--rules-watch", settings.rules_watch),
                          ("--approval-lease", settings.approval_lease)):
        if seconds < 0:
            errors.append(f"{flag} must not be negative")
    if settings.jwt_secret is None and not settings.jwks_file and not settings.jwks_url:
        errors.append("no JWT verification key configured: set AGENT_GATEWAY_JWT_SECRET (HS256), --jwks-file or "
                      "--jwks-url")
    elif settings.jwt_secret is not None and len(settings.jwt_secret) < MIN_SECRET_BYTES:
        errors.append(f"the JWT secret is {len(settings.jwt_secret)} bytes; HS256 needs at least {MIN_SECRET_BYTES}")
    if settings.jwks_file:
        try:
            with open(settings.jwks_file, "rb") as handle:
                parse_jwks(_decode_json(handle.read(), settings.jwks_file), settings.jwks_file)
        except (OSError, ValueError) as exc:
            errors.append(f"--jwks-file: {exc}")
    for flag, url in (("--jwks-url", settings.jwks_url), ("--alert-webhook", settings.alert_webhook),
                      ("--approval-webhook", settings.approval_webhook), ("--console-url", settings.console_url)):
        if url and urlsplit(url).scheme.lower() not in ("http", "https"):
            errors.append(f"{flag} {url!r} is not an http:// or https:// URL")
    if settings.redis_url:
        try:  # parsed exactly as at start-up (scheme, hosts, TLS options); a client connects only when used
            redis_client(settings.redis_url, socket_timeout=settings.store_timeout,
                         connect_timeout=settings.store_timeout)
        except ValueError as exc:
            errors.append(f"--redis-url: {exc}")
    if settings.workers > 1 and not settings.redis_url:
        errors.append(WORKERS_NEED_REDIS.format(n=settings.workers))
    try:
        server_context(settings)
    except (OSError, ValueError) as exc:
        errors.append(f"TLS: {exc}")
    rule_errors: list[str] = []
    try:
        policy = load_policy(settings)
    except RuleSetInvalid as invalid:
        rule_errors = [str(error) for error in invalid.errors]
    for error in errors + rule_errors:
        print(error, file=sys.stderr)
    if errors or rule_errors:
        print(f"agent-gateway serve --check: {len(errors) + len(rule_errors)} error(s)", file=sys.stderr)
        return 2 if errors else 1
    print(f"config OK: agents on {settings.host}:{settings.port}, admin on {settings.admin_host}:"
          f"{settings.admin_port}, rules {settings.rules} (policy {policy.version}), "
          f"store {'redis' if settings.redis_url else 'memory'}, workers {settings.workers}")
    return 0


def _admin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-url", default=_env(env, "ADMIN_URL", "http://127.0.0.1:8081"),
                        help="the gateway's admin API (default http://127.0.0.1:8081; AGENT_GATEWAY_ADMIN_URL)")
    common.add_argument("--token", help="admin or approver token (default AGENT_GATEWAY_ADMIN_TOKEN)")
    common.add_argument("--token-file", default=_env(env, "ADMIN_TOKEN_FILE"),
                        help="file holding the token (AGENT_GATEWAY_ADMIN_TOKEN_FILE)")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of text for people")

    approvals = sub.add_parser("approvals", help="list, approve and deny held calls")
    approvals_sub = approvals.add_subparsers(dest="approvals_command", required=True)
    listing = approvals_sub.add_parser("list", parents=[common], help="the approval queue, newest first")
    listing.add_argument("--status", default="pending", choices=[*STATUSES, "all"],
                         help="which approvals (default pending)")
    listing.add_argument("--agent", help="only this agent's")
    for verdict, help_text in (("approve", "let a held call through"), ("deny", "refuse a held call")):
        p = approvals_sub.add_parser(verdict, parents=[common], help=help_text)
        p.add_argument("id", help="approval id, or a prefix of it that matches one approval")
        p.add_argument("--reason", required=True, help="why (kept with the decision)")
        p.add_argument("--category", choices=CATEGORIES, help="for the feedback loop")
        if verdict == "approve":
            p.add_argument("--remember", type=_duration,
                           help="also let this agent do the same action without a hold for this long (e.g. 8h)")

    pause = sub.add_parser("pause", parents=[common], help="turn an agent's kill switch on (admin)")
    pause.add_argument("agent")
    pause.add_argument("--reason", required=True)
    resume = sub.add_parser("resume", parents=[common], help="turn an agent's kill switch off (admin)")
    resume.add_argument("agent")
    resume.add_argument("--reason")

    tail = sub.add_parser("tail", parents=[common], help="follow trace events live (Ctrl-C stops)")
    tail.add_argument("--agent", help="only this agent's events")
    tail.add_argument("--decision", help="only events with this decision (allow, deny, hold)")


STATUSES = ("pending", "approved", "denied", "timeout", "abandoned")


def _duration(text: str) -> str:
    """Checked here with the server's own parser, and sent as written."""
    from .policy.load import parse_duration

    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-gateway", description="Policy-enforcement gateway for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub, env)

    token = sub.add_parser("token", help="print a development JWT for an agent (HS256)")
    token.add_argument("--agent", required=True, help="agent id (the token's sub)")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 2d (default 1h)")
    token.add_argument("--role", choices=["admin", "approver"],
                       help="issue an admin-side token with this role instead of an agent token")
    token.add_argument("--jwt-secret-file", default=_env(env, "JWT_SECRET_FILE"))
    token.add_argument("--jwt-audience", default=None, help="audience (default agent-gateway, or "
                                                            "agent-gateway-admin with --role)")
    token.add_argument("--jwt-issuer", default=_env(env, "JWT_ISSUER"))

    _rules_parser(sub, env)

    demo = sub.add_parser("demo", help="run the gateway with fake upstreams and a scripted agent (no API keys)")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=8081)
    demo.add_argument("--rules", default="rules")
    demo.add_argument("--exit", action="store_true", help="exit after the scripted agent instead of serving")

    replay = sub.add_parser("replay", help="backtest a rule set against recorded traces: which calls would change",
                            description="Re-decide every recorded call (trace events with a capture) under the "
                                        "given rules and report what would flip, per agent and rule.")
    replay.add_argument("--rules", required=True, help="the candidate rules directory")
    replay.add_argument("--traces", required=True, nargs="+", metavar="FILE", help="trace files (JSON lines)")
    replay.add_argument("--format", default="table", choices=["table", "json", "markdown"],
                        help="table for people (default), json for CI, markdown for pull requests")
    replay.add_argument("--examples", type=int, default=3, metavar="N", help="example trace ids per change (3)")
    replay.add_argument("--agent", help="only this agent's calls")
    _admin_parsers(sub, env)
    return parser


def _rules_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], env: Mapping[str, str]) -> None:
    rules = sub.add_parser("rules", help="check, test, diff rule files offline; print their JSON Schemas")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rules directory; exit 1 with every error")
    check.add_argument("directory", nargs="?", default=_env(env, "RULES", "rules"))
    test = rules_sub.add_parser("test", help="run golden cases (request -> expected decision) offline")
    test.add_argument("directory", nargs="?", default=_env(env, "RULES", "rules"))
    test.add_argument("cases", nargs="*", help="case files or directories (default DIR/tests)")
    test.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report (Jenkins, GitLab) to FILE")
    diff = rules_sub.add_parser(
        "diff", help="what changed between two rule sets, rule by rule",
        description="Compare two rule sets rule by rule. Each side is a rules directory or a git revision as "
                    "REV:PATH (e.g. HEAD~1:rules, main:rules), read with git from the repository holding PATH. "
                    "Unset ${VAR}s read as placeholders; credential values are never printed. Exit 0 when "
                    "identical, 1 when they differ, 2 on errors.")
    diff.add_argument("old", help="rules directory or REV:PATH")
    diff.add_argument("new", help="rules directory or REV:PATH")
    diff.add_argument("--format", choices=("text", "json", "markdown"), default="text",
                      help="text for people (default), json for tools, markdown for pull-request comments")
    diff.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour the text format (auto: when stdout is a terminal and NO_COLOR is unset)")
    schema = rules_sub.add_parser(
        "schema", help="print or write the JSON Schemas of rule files (for editors)",
        description="Print the JSON Schema of upstreams.yaml or of agent files, or write both with --write. "
                    "They are generated from the loader, so they match what `rules check` accepts.")
    schema.add_argument("which", nargs="?", choices=("upstreams", "agent"), help="the schema to print")
    schema.add_argument("--write", metavar="DIR", help="write the schema files into DIR (both, unless one is named)")


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .tokens import issue_token, parse_ttl

    secret = read_secret(env.get("AGENT_GATEWAY_JWT_SECRET"), args.jwt_secret_file)
    if not secret:
        print("agent-gateway token: set AGENT_GATEWAY_JWT_SECRET or --jwt-secret-file", file=sys.stderr)
        return 2
    audience = args.jwt_audience or ("agent-gateway-admin" if args.role else "agent-gateway")
    extra = {"role": args.role} if args.role else None
    try:
        print(issue_token(args.agent, secret, parse_ttl(args.ttl), audience=audience, issuer=args.jwt_issuer,
                          extra=extra))
    except ValueError as exc:
        print(f"agent-gateway token: {exc}", file=sys.stderr)
        return 2
    return 0


def _rules_check(directory: str, env: Mapping[str, str]) -> int:
    from .policy.compile import compile_policy
    from .policy.load import load_rules, summary

    try:
        ruleset = load_rules(directory, env)
        compile_policy(ruleset)
    except RuleSetInvalid as invalid:
        for error in invalid.errors:
            print(error)
        print(f"{len(invalid.errors)} error(s) in {directory}", file=sys.stderr)
        return 1
    print(summary(ruleset))
    return 0


def _rules_test(directory: str, cases: Sequence[str], env: Mapping[str, str], junit: str | None) -> int:
    from .policy.cases import run_case_files, write_load_failure

    try:
        return int(run_case_files(directory, cases, env, out=sys.stdout, junit=junit))
    except RuleSetInvalid as invalid:
        for error in invalid.errors:
            print(error)
        if junit is not None:
            write_load_failure(junit, directory, invalid.errors)
        return 1


def _rules_diff(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .policy.diff import compare
    from .policy.diffreport import render
    from .policy.revision import SourceError

    try:
        diff = compare(args.old, args.new, env)
    except SourceError as exc:
        print(f"agent-gateway rules diff: {exc}", file=sys.stderr)
        return 2
    except RuleSetInvalid as invalid:
        for error in invalid.errors:
            print(error, file=sys.stderr)
        print(f"agent-gateway rules diff: {len(invalid.errors)} error(s); nothing compared", file=sys.stderr)
        return 2
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in env)
    sys.stdout.write(render(diff, args.format, colour=colour))
    return 0 if diff.identical else 1


def _rules_schema(which: str | None, write: str | None) -> int:
    from .policy.schema import SCHEMA_FILES, render, schemas, write_schemas

    if write is not None:
        for path in write_schemas(write, [SCHEMA_FILES[which]] if which else None):
            print(f"wrote {path}")
        return 0
    if which is None:
        print("agent-gateway rules schema: name a schema (upstreams or agent), or write both with --write DIR",
              file=sys.stderr)
        return 2
    sys.stdout.write(render(schemas()[SCHEMA_FILES[which]]))
    return 0


def _admin(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .admin import commands

    prog = f"agent-gateway {args.command}"
    try:
        secret = args.token.encode() if args.token else read_secret(env.get("AGENT_GATEWAY_ADMIN_TOKEN"),
                                                                    args.token_file)
    except OSError as exc:
        print(f"{prog}: cannot read --token-file: {exc}", file=sys.stderr)
        return 2
    if not secret:
        print(f"{prog}: needs an admin token: --token, --token-file or AGENT_GATEWAY_ADMIN_TOKEN", file=sys.stderr)
        return 2
    command: commands.Command
    if args.command == "approvals" and args.approvals_command == "list":
        status = None if args.status == "all" else args.status
        command = commands.list_approvals(status, args.agent, args.json)
    elif args.command == "approvals":
        command = commands.decide(args.id, args.approvals_command, args.reason, args.category,
                                  getattr(args, "remember", None), args.json)
    elif args.command in ("pause", "resume"):
        command = commands.set_paused(args.agent, args.command == "pause", args.reason, args.json)
    else:
        command = commands.tail(args.agent, args.decision, args.json)
    return commands.run(prog, args.admin_url, secret.decode(), command, interrupt_ok=args.command == "tail")


def main(argv: Sequence[str] | None = None) -> int:
    env = process_env()
    args = build_parser(env).parse_args(argv)
    if args.command == "serve" and args.check:
        return _serve_check(args, env)
    if args.command == "serve":
        from .server import serve, serve_workers

        settings = settings_from(args, env)
        try:
            if settings.workers > 1:
                return serve_workers(settings)
            serve(settings)
        except RuleSetInvalid as invalid:
            for error in invalid.errors:
                print(error, file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"agent-gateway serve: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "token":
        return _token(args, env)
    if args.command == "rules":
        if args.rules_command == "check":
            return _rules_check(args.directory, env)
        if args.rules_command == "diff":
            return _rules_diff(args, env)
        if args.rules_command == "schema":
            return _rules_schema(args.which, args.write)
        return _rules_test(args.directory, args.cases, env, args.junit)
    if args.command == "demo":
        from .demo.run import run_demo

        return int(run_demo(args.rules, args.port, args.admin_port, serve_after=not args.exit, env=env))
    if args.command == "replay":
        from .replay import main as replay

        return replay(args.rules, args.traces, args.format, max(args.examples, 0), args.agent, env)
    if args.command in ("approvals", "pause", "resume", "tail"):
        return _admin(args, env)
    return 2


if __name__ == "__main__":
    sys.exit(main())
