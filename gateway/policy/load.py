"""Load a rules directory (`upstreams.yaml` and `agents/*.yaml`) into validated specs.

Every problem in every file is collected and raised at once as `RuleSetInvalid`. CEL is compiled by
`compile`, which a failed load never reaches, so a failed load checks the conditions itself.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, NamedTuple, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from gateway.models import Mode
from gateway.policy.conditions import ConditionError, compile_condition
from gateway.policy.spec import (
    DEFAULT_CAPTURE,
    DEFAULT_LOOP,
    EFFECTS,
    ENFORCEMENTS,
    MODES,
    UPSTREAM_KINDS,
    AgentSpec,
    BudgetSpec,
    CaptureSpec,
    CredentialSpec,
    Effect,
    Enforcement,
    Loc,
    LoopSpec,
    PriceSpec,
    RateLimitSpec,
    RouteSpec,
    RuleSet,
    RuleSetInvalid,
    RuleSpec,
    ToolSpec,
    UpstreamKind,
    UpstreamSpec,
    UpstreamTlsSpec,
    Window,
)
from gateway.policy.yamlsource import Node, Reader, did_you_mean, parse_duration
from gateway.upstream_tls import tls_problem

__all__ = ["KEYS", "Keys", "load_rules", "parse_duration", "summary"]

T = TypeVar("T")

NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*")
BUDGET_WINDOWS = ("hour", "day", "week", "month")
RATE_WINDOWS = ("second", "minute", "hour", "day")
DEFAULT_ALERTS = (0.5, 0.8, 1.0)
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 300.0  # LLM streams can pause for minutes between tokens

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_UPSTREAM_OPTIONAL = ("credential", "prices", "routes", "tools", "connect_timeout", "read_timeout", "on_store_error",
                      "tls")
_TLS_FILES = ("ca_file", "cert_file", "key_file")
_AGENT_OPTIONAL = ("owner", "purpose", "mode", *EFFECTS, "budgets", "rate_limits", "loop_detection", "capture")
_RULE_OPTIONAL = ("id", "resources", "when", "reason", "timeout", "enforce")
_BUDGET_OPTIONAL = ("id", "tokens", "usd", "alert_at", "default_output_tokens", "allow_unestimated", "clamp_max_tokens")
_RATE_LIMIT_OPTIONAL = ("id", "upstream", "requests", "tokens", "default_output_tokens", "allow_unestimated")
CAPTURE_MODES = ("referenced", "all", "none")
STORE_ERROR_POLICIES = ("deny", "allow")


class Keys(NamedTuple):
    """The keys one kind of mapping takes; the loader rejects any other."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


# Every mapping the loader reads, by name. `schema` generates the JSON Schemas from this table, so the two agree.
KEYS: Mapping[str, Keys] = MappingProxyType({
    "upstreams_file": Keys(("upstreams",)),
    "upstream": Keys(("kind", "url"), _UPSTREAM_OPTIONAL),
    "credential": Keys(("header", "value")),
    "tls": Keys((), _TLS_FILES),
    "price": Keys(("input_per_mtok", "output_per_mtok")),
    "route": Keys(("method", "path", "verb"), ("resource",)),
    "tool": Keys(("name", "verb"), ("resource",)),
    "agent_file": Keys(("agent",), _AGENT_OPTIONAL),
    "rule": Keys(("upstream", "verbs"), _RULE_OPTIONAL),
    "budget": Keys(("per",), _BUDGET_OPTIONAL),
    "rate_limit": Keys(("per",), _RATE_LIMIT_OPTIONAL),
    "loop_detection": Keys(("max_repeats", "per")),
    "capture": Keys((), ("json", "sensitive")),
})


def load_rules(directory: str | Path, env: Mapping[str, str]) -> RuleSet:
    """Load and validate a rules directory; raise RuleSetInvalid with every error at once."""
    root = Path(directory)
    reader = Reader()
    sources: dict[str, bytes] = {}  # relative path -> raw bytes, for the version hash
    upstreams: dict[str, UpstreamSpec] = {}
    names: frozenset[str] | None = None
    raw, node = reader.read(root, "upstreams.yaml", env)
    if raw is not None:
        sources["upstreams.yaml"] = raw
    if node is not None:
        upstreams, names = _upstreams(reader, node)
    ctx = _Context(reader, names)
    agents: dict[str, AgentSpec] = {}
    for rel in _agent_files(root):
        raw, node = reader.read(root, rel, env)
        if raw is not None:
            sources[rel] = raw
        agent = _agent(ctx, node, Path(rel).name) if node is not None else None
        if agent is not None:
            agents.setdefault(agent.id, agent)
    if reader.errors:
        _check_conditions(reader, ctx.conditions)
        raise RuleSetInvalid(sorted(set(reader.errors)))  # an aliased node can report the same error twice
    return RuleSet(
        upstreams=MappingProxyType(upstreams),
        agents=MappingProxyType(agents),
        version=_version(sources),
        directory=str(directory),
        files=tuple(str(root / rel) for rel in sources),
    )


def summary(ruleset: RuleSet) -> str:
    """One line for `agent-gateway rules check`."""
    rules = sum(len(agent.rules) for agent in ruleset.agents.values())
    return (
        f"rules OK: {_plural(len(ruleset.agents), 'agent')}, {_plural(len(ruleset.upstreams), 'upstream')}, "
        f"{_plural(rules, 'rule')}, version {ruleset.version}"
    )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass
class _Context:
    """What checks across files need: the error sink, the upstream names, and every id claimed so far."""

    reader: Reader
    upstreams: frozenset[str] | None  # None: upstreams.yaml is unusable, so references are not checked
    ids: dict[str, Loc] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)  # agent id -> file that defines it
    conditions: list[Node] = field(default_factory=list)  # every `when:` read, for `_check_conditions`


def _check_conditions(reader: Reader, conditions: list[Node]) -> None:
    """Compile each `when:` of a load that failed, so CEL errors come in the same report as the rest
    (as `compile` words them); a value that already has an error, such as an unset ${VAR}, is skipped."""
    failed = {(e.file, e.line, e.col) for e in reader.errors}
    for node in conditions:
        if (node.loc.file, node.loc.line, node.loc.col) in failed:
            continue
        try:
            compile_condition(str(node.value))
        except ConditionError as exc:
            reader.error(node.loc, "rule_error", node.path, str(exc))


# -- files -----------------------------------------------------------------------------------------------------


def _agent_files(root: Path) -> list[str]:
    folder = root / "agents"
    if not folder.is_dir():
        return []
    return [
        f"agents/{path.name}"
        for path in sorted(folder.iterdir())
        if path.suffix in (".yaml", ".yml") and not path.name.startswith(".") and path.is_file()
    ]


def _version(sources: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(sources):
        raw = sources[rel]
        digest.update(f"{rel}\0{len(raw)}\0".encode())  # length-prefixed, so file boundaries are unambiguous
        digest.update(raw)
    return "sha256:" + digest.hexdigest()[:16]


# -- shared value checks ---------------------------------------------------------------------------------------


def _name(reader: Reader, node: Node | None, what: str) -> str:
    value = reader.text(node, "")
    if node is not None and value and not NAME.fullmatch(value):
        reader.bad_value(node, f"{what} '{value}' must match {NAME.pattern}")
    return value


def _upstream_ref(ctx: _Context, node: Node | None, default: T) -> str | T:
    name = ctx.reader.text(node, None)
    if node is None or name is None:
        return default
    if ctx.upstreams is not None and name not in ctx.upstreams:
        known = sorted(ctx.upstreams)
        hint = did_you_mean(name, known) or "upstreams.yaml defines: " + (", ".join(known) or "none")
        ctx.reader.error(node.loc, "unknown_upstream", node.path, f"unknown upstream '{name}'; {hint}")
    return name


def _claim_id(ctx: _Context, fields: Mapping[str, Node], node: Node, default: str) -> str:
    """The explicit `id:` or `default`; ids are unique across the whole rule set."""
    explicit = fields.get("id")
    value = ctx.reader.text(explicit, None)
    where = explicit if explicit is not None and value is not None else node
    rule_id = value if value is not None else default
    first = ctx.ids.get(rule_id)
    if first is None:
        ctx.ids[rule_id] = where.loc
    else:
        ctx.reader.error(
            where.loc,
            "duplicate_id",
            where.path,
            f"id '{rule_id}' is already used at {first.file}:{first.line}:{first.col}",
        )
    return rule_id


# -- upstreams.yaml --------------------------------------------------------------------------------------------


def _upstreams(reader: Reader, root: Node) -> tuple[dict[str, UpstreamSpec], frozenset[str] | None]:
    top = reader.fields(root, *KEYS["upstreams_file"])
    if top is None or "upstreams" not in top:
        return {}, None
    node = top["upstreams"]
    if not isinstance(node.value, dict):
        reader.bad_type(node, "a mapping")
        return {}, None
    specs: dict[str, UpstreamSpec] = {}
    for name, item in node.value.items():
        if not NAME.fullmatch(name):
            reader.error(
                node.key_locs[name], "bad_value", item.path, f"upstream name '{name}' must match {NAME.pattern}"
            )
        spec = _upstream(reader, name, item)
        if spec is not None:
            specs[name] = spec
    # Names that failed validation still count as known, so one bad upstream does not cascade into every rule.
    return specs, frozenset(node.value)


def _upstream(reader: Reader, name: str, node: Node) -> UpstreamSpec | None:
    mark = reader.mark()
    fields = reader.fields(node, *KEYS["upstream"])
    if fields is None:
        return None
    kind = reader.choice(fields.get("kind"), UPSTREAM_KINDS, "kind", None)
    url = _url(reader, fields.get("url"))
    credential = _credential(reader, fields.get("credential"))
    tls = _tls(reader, fields.get("tls"), url)
    prices = _prices(reader, fields.get("prices"))
    routes = tuple(r for item in reader.items(fields.get("routes")) if (r := _route(reader, item)) is not None)
    tools = _tools(reader, fields.get("tools"))
    for key, wanted in (("routes", "http"), ("tools", "mcp")):
        if key in fields and kind is not None and kind != wanted:
            reader.error(
                node.key_locs[key], "bad_value", fields[key].path, f"{key} are only for kind {wanted}, not {kind}"
            )
    connect_timeout = reader.duration(fields.get("connect_timeout"), DEFAULT_CONNECT_TIMEOUT)
    read_timeout = reader.duration(fields.get("read_timeout"), DEFAULT_READ_TIMEOUT)
    on_store_error = reader.choice(fields.get("on_store_error"), STORE_ERROR_POLICIES, "on_store_error", "deny")
    if reader.failed_since(mark) or kind is None:
        return None
    return UpstreamSpec(
        name=name,
        kind=cast(UpstreamKind, kind),
        url=url,
        credential=credential,
        prices=MappingProxyType(prices),
        routes=routes,
        tools=tools,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        loc=node.loc,
        on_store_error=cast(Literal["deny", "allow"], on_store_error),
        tls=tls,
    )


def _url(reader: Reader, node: Node | None) -> str:
    text = reader.text(node, None)
    if node is None or text is None:
        return ""
    parts: SplitResult | None
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises on a bad port
    except ValueError:
        parts = None
    # The value is not echoed: it may carry credentials expanded from the environment.
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        reader.bad_value(node, "must be an http:// or https:// URL with a host")
    elif parts.query or parts.fragment:
        reader.bad_value(node, "must not have a query or fragment (request paths are appended to it)")
    return text.rstrip("/")


def _credential(reader: Reader, node: Node | None) -> CredentialSpec | None:
    fields = reader.fields(node, *KEYS["credential"]) if node is not None else None
    if fields is None:
        return None
    header = reader.text(fields.get("header"), "")
    if header and not _HEADER_NAME.fullmatch(header):
        reader.bad_value(fields["header"], f"'{header}' is not a valid HTTP header name")
    return CredentialSpec(header=header, value=reader.text(fields.get("value"), "", empty=True))


def _tls(reader: Reader, node: Node | None, url: str) -> UpstreamTlsSpec | None:
    fields = reader.fields(node, *KEYS["tls"]) if node is not None else None
    if node is None or fields is None:
        return None
    if url and urlsplit(url).scheme != "https":
        reader.bad_value(node, "is only for an https:// url")
        return None
    files = {key: reader.text(fields.get(key), None) for key in _TLS_FILES}
    if files["key_file"] is not None and files["cert_file"] is None:
        reader.bad_value(fields["key_file"], "needs cert_file (the client certificate the key belongs to)")
        return None
    mark = reader.mark()
    for key, path in files.items():
        if path is not None and not os.path.isfile(path):
            # Paths are not echoed: they may be expanded from the environment, like every other value.
            problem = "is not a file" if os.path.exists(path) else "file not found"
            reader.bad_value(fields[key], problem)
    if reader.failed_since(mark):
        return None
    spec = UpstreamTlsSpec(**files)
    # Built once here so a bad file stops the load, not the first call; the pool builds its own at connect time.
    failure = tls_problem(spec)
    if failure is not None:
        key, problem = failure
        reader.bad_value(fields[key], problem)
        return None
    return spec


def _prices(reader: Reader, node: Node | None) -> dict[str, PriceSpec]:
    if node is None:
        return {}
    if not isinstance(node.value, dict):
        reader.bad_type(node, "a mapping of model name to prices")
        return {}
    prices: dict[str, PriceSpec] = {}
    for model, item in node.value.items():
        fields = reader.fields(item, *KEYS["price"])
        if fields is None:
            continue
        amounts = []
        for key in ("input_per_mtok", "output_per_mtok"):
            amount = reader.number(fields.get(key), 0.0)
            if amount < 0:
                reader.bad_value(fields[key], f"must not be negative, got {amount}")
            amounts.append(amount)
        prices[model] = PriceSpec(input_per_mtok=amounts[0], output_per_mtok=amounts[1])
    return prices


def _route(reader: Reader, node: Node) -> RouteSpec | None:
    fields = reader.fields(node, *KEYS["route"])
    if fields is None:
        return None
    method = reader.text(fields.get("method"), "").upper()
    if method and method not in HTTP_METHODS:
        reader.bad_value(
            fields["method"], f"unknown HTTP method '{method}'; expected one of: " + ", ".join(HTTP_METHODS)
        )
    path = reader.text(fields.get("path"), "")
    if path and not path.startswith("/"):
        reader.bad_value(fields["path"], "must start with '/'")
    verb = reader.text(fields.get("verb"), "")
    resource = reader.text(fields.get("resource"), None)
    return RouteSpec(method=method, path=path, verb=verb, resource=resource, loc=node.loc)


def _tools(reader: Reader, node: Node | None) -> tuple[ToolSpec, ...]:
    tools: dict[str, ToolSpec] = {}
    for item in reader.items(node):
        fields = reader.fields(item, *KEYS["tool"])
        if fields is None:
            continue
        name = reader.text(fields.get("name"), "")
        if name in tools:
            reader.bad_value(fields["name"], f"tool '{name}' is already listed at line {tools[name].loc.line}")
            continue
        verb = reader.text(fields.get("verb"), "")
        resource = reader.text(fields.get("resource"), None)
        tools[name] = ToolSpec(name=name, verb=verb, resource=resource, loc=item.loc)
    return tuple(tools.values())


# -- agents/*.yaml ---------------------------------------------------------------------------------------------


def _agent(ctx: _Context, root: Node, file_name: str) -> AgentSpec | None:
    reader = ctx.reader
    mark = reader.mark()
    fields = reader.fields(root, *KEYS["agent_file"])
    if fields is None:
        return None
    agent_id = _name(reader, fields.get("agent"), "agent id")
    if agent_id:
        first = ctx.agents.setdefault(agent_id, root.loc.file)
        if first != root.loc.file:
            node = fields["agent"]
            reader.error(node.loc, "duplicate_agent", node.path, f"agent '{agent_id}' is already defined in {first}")
    owner = reader.text(fields.get("owner"), None)
    purpose = reader.text(fields.get("purpose"), None)
    mode = reader.choice(fields.get("mode"), MODES, "mode", "assist")
    rules: list[RuleSpec] = []
    for effect in EFFECTS:
        for index, item in enumerate(reader.items(fields.get(effect))):
            rule = _rule(ctx, item, cast(Effect, effect), f"{file_name}#{effect}[{index}]")
            if rule is not None:
                rules.append(rule)
    budget_nodes = enumerate(reader.items(fields.get("budgets")))
    budgets = [_budget(ctx, item, f"{file_name}#budgets[{i}]") for i, item in budget_nodes]
    limit_nodes = enumerate(reader.items(fields.get("rate_limits")))
    rate_limits = [_rate_limit(ctx, item, f"{file_name}#rate_limits[{i}]") for i, item in limit_nodes]
    loop = _loop(reader, fields["loop_detection"]) if "loop_detection" in fields else DEFAULT_LOOP
    capture = _capture(reader, fields["capture"]) if "capture" in fields else DEFAULT_CAPTURE
    if reader.failed_since(mark):
        return None
    return AgentSpec(
        id=agent_id,
        owner=owner,
        purpose=purpose,
        mode=cast(Mode, mode),
        rules=tuple(rules),
        budgets=tuple(b for b in budgets if b is not None),
        rate_limits=tuple(r for r in rate_limits if r is not None),
        file=root.loc.file,
        loop_detection=loop,
        capture=capture,
    )


def _capture(reader: Reader, node: Node) -> CaptureSpec:
    """`capture: {json: referenced | all | none | [paths], sensitive: [paths]}`."""
    fields = reader.fields(node, *KEYS["capture"])
    if fields is None:
        return DEFAULT_CAPTURE
    json_node = fields.get("json")
    json: str | tuple[str, ...] = "referenced"
    if json_node is not None:
        if isinstance(json_node.value, str):
            json = reader.choice(json_node, CAPTURE_MODES, "capture mode", "referenced")
        else:
            json = reader.strings(json_node, ())
    sensitive = reader.strings(fields.get("sensitive"), ())
    return CaptureSpec(json=json, sensitive=sensitive)


def _loop(reader: Reader, node: Node) -> LoopSpec | None:
    """`loop_detection: {max_repeats: 20, per: minute}`, or `loop_detection: off` (YAML false)."""
    if node.value is False:
        return None
    fields = reader.fields(node, *KEYS["loop_detection"])
    if fields is None:
        return None
    repeats = reader.count(fields.get("max_repeats"), None)
    per = reader.choice(fields.get("per"), RATE_WINDOWS, "loop window", None)
    if repeats is None or per is None:
        return None
    return LoopSpec(max_repeats=repeats, per=cast(Window, per))


def _rule(ctx: _Context, node: Node, effect: Effect, default_id: str) -> RuleSpec | None:
    reader = ctx.reader
    mark = reader.mark()
    fields = reader.fields(node, *KEYS["rule"])
    if fields is None:
        return None
    rule_id = _claim_id(ctx, fields, node, default_id)
    upstream = _upstream_ref(ctx, fields.get("upstream"), "")
    verbs = reader.strings(fields.get("verbs"), ())
    resources = reader.strings(fields.get("resources"), None)
    when_node = fields.get("when")
    when = reader.text(when_node, None)
    if when_node is not None and when is not None:
        ctx.conditions.append(when_node)
    reason = reader.text(fields.get("reason"), None)
    enforce = reader.choice(fields.get("enforce"), ENFORCEMENTS, "enforcement", "enforce")
    if "enforce" in fields and effect == "allow" and enforce != "enforce":
        reader.bad_value(fields["enforce"], "only deny and hold rules can be staged (shadow or warn)")
    timeout = None
    if "timeout" in fields:
        if effect == "hold":
            timeout = reader.duration(fields["timeout"], None)
        else:
            path = fields["timeout"].path
            reader.error(node.key_locs["timeout"], "bad_value", path, "timeout is only valid on hold rules")
    if reader.failed_since(mark):
        return None
    return RuleSpec(
        id=rule_id,
        effect=effect,
        upstream=upstream,
        verbs=verbs,
        resources=resources,
        when=when,
        reason=reason,
        timeout=timeout,
        loc=node.loc,
        when_loc=when_node.loc if when_node is not None else None,
        enforce=cast(Enforcement, enforce),
    )


def _budget(ctx: _Context, node: Node, default_id: str) -> BudgetSpec | None:
    reader = ctx.reader
    mark = reader.mark()
    fields = reader.fields(node, *KEYS["budget"])
    if fields is None:
        return None
    budget_id = _claim_id(ctx, fields, node, default_id)
    tokens = reader.count(fields.get("tokens"), None)
    usd = reader.number(fields.get("usd"), None)
    if usd is not None and usd <= 0:
        reader.bad_value(fields["usd"], f"must be greater than 0, got {usd}")
    reader.one_of(node, fields, "tokens", "usd", "a budget")
    per = reader.choice(fields.get("per"), BUDGET_WINDOWS, "budget window", "")
    alert_at = DEFAULT_ALERTS if "alert_at" not in fields else _alerts(reader, fields["alert_at"])
    default_output = reader.count(fields.get("default_output_tokens"), None)
    allow_unestimated = reader.flag(fields.get("allow_unestimated"), False)
    clamp = reader.flag(fields.get("clamp_max_tokens"), False)
    if reader.failed_since(mark):
        return None
    return BudgetSpec(id=budget_id, per=cast(Window, per), tokens=tokens, usd=usd, alert_at=alert_at, loc=node.loc,
                      default_output_tokens=default_output, allow_unestimated=allow_unestimated,
                      clamp_max_tokens=clamp)


def _alerts(reader: Reader, node: Node) -> tuple[float, ...]:
    fractions: set[float] = set()
    for item in reader.items(node):
        fraction = reader.number(item, None)
        if fraction is not None and not 0 < fraction <= 1:
            reader.bad_value(item, f"must be a fraction in (0, 1], got {fraction}")
        elif fraction is not None:
            fractions.add(fraction)
    return tuple(sorted(fractions))


def _rate_limit(ctx: _Context, node: Node, default_id: str) -> RateLimitSpec | None:
    reader = ctx.reader
    mark = reader.mark()
    fields = reader.fields(node, *KEYS["rate_limit"])
    if fields is None:
        return None
    limit_id = _claim_id(ctx, fields, node, default_id)
    upstream = _upstream_ref(ctx, fields.get("upstream"), None)
    requests = reader.count(fields.get("requests"), None)
    tokens = reader.count(fields.get("tokens"), None)
    reader.one_of(node, fields, "requests", "tokens", "a rate limit")
    per = reader.choice(fields.get("per"), RATE_WINDOWS, "rate limit window", "")
    default_output = reader.count(fields.get("default_output_tokens"), None)
    allow_unestimated = reader.flag(fields.get("allow_unestimated"), False)
    if reader.failed_since(mark):
        return None
    return RateLimitSpec(
        id=limit_id, per=cast(Window, per), upstream=upstream, requests=requests, tokens=tokens, loc=node.loc,
        default_output_tokens=default_output, allow_unestimated=allow_unestimated,
    )
