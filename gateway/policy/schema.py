"""JSON Schemas (draft 2020-12) for rule files, generated from the loader's own key tables and enums.

Editors use them for completion and early errors; the loader stays the authority (cross-file checks such as
unknown upstreams and duplicate ids are beyond a schema). Regenerate: `agent-gateway rules schema --write DIR`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.policy.load import (
    BUDGET_WINDOWS,
    CAPTURE_MODES,
    HTTP_METHODS,
    KEYS,
    NAME,
    RATE_WINDOWS,
    STORE_ERROR_POLICIES,
)
from gateway.policy.spec import ENFORCEMENTS, MODES, UPSTREAM_KINDS
from gateway.policy.yamlsource import _DURATION, _PLAIN_NUMBER

__all__ = ["SCHEMA_FILES", "SchemaDrift", "agent_schema", "render", "schemas", "upstreams_schema", "write_schemas"]

Schema = dict[str, Any]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILES = {"upstreams": "upstreams.schema.json", "agent": "agent.schema.json"}

# A plain `${VAR}` or `${VAR:-default}` is typed after expansion, so a number or an enum may be written as one.
_VAR_REF: Schema = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}
_TEXT: Schema = {"type": "string", "minLength": 1}
_TEXTS: Schema = {"type": "array", "items": _TEXT, "minItems": 1}
_COUNT: Schema = {"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, _VAR_REF]}
_FLAG: Schema = {"anyOf": [{"type": "boolean"}, _VAR_REF]}
_DURATION_SCHEMA: Schema = {"anyOf": [
    {"type": "number", "exclusiveMinimum": 0},
    {"type": "string", "pattern": rf"^\s*(?:{_PLAIN_NUMBER.pattern}|{_DURATION.pattern})\s*$"},
    _VAR_REF,
]}


class SchemaDrift(KeyError):
    """A loader key that this module has no schema or description for: add one here."""


def _enum(options: tuple[str, ...]) -> Schema:
    return {"anyOf": [{"enum": list(options)}, _VAR_REF]}


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else "\\" + c if c == "*" else c for c in word)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/$defs/{name}"}


_NAME_PATTERN = f"^{NAME.pattern}$"
_HTTP_URL = r"^([Hh][Tt][Tt][Pp][Ss]?://[^?#\s]+|.*\$\{.*)$"  # or built from ${VAR}s, checked once expanded
_HTTPS_URL = r"^([Hh][Tt][Tt][Pp][Ss]://|.*\$\{)"

# (section, key) -> (schema, description). Every key of `load.KEYS` needs an entry; `_object` raises otherwise.
_PROPERTIES: Mapping[tuple[str, str], tuple[Schema, str]] = {
    ("upstreams_file", "upstreams"): (
        {"type": "object", "propertyNames": {"pattern": _NAME_PATTERN}, "additionalProperties": _ref("upstream")},
        "The upstreams agents may call, by name; the name is the first path segment agents use "
        "(`/openai/chat/completions`)."),
    ("upstream", "kind"): (_enum(UPSTREAM_KINDS), "Which classifier turns requests into actions: "
                                                  "`openai`, `anthropic`, `mcp` or `http`."),
    ("upstream", "url"): ({"type": "string", "pattern": _HTTP_URL},
                          "Base URL (http:// or https://, no query or fragment); the agent's path below "
                          "`/<name>` is appended."),
    ("upstream", "credential"): (_ref("credential"), "Header injected upstream; the agent's own credential is "
                                                     "always removed."),
    ("upstream", "prices"): ({"type": "object", "additionalProperties": _ref("price")},
                             "Prices per model in USD per million tokens, for `cost_usd` and `usd` budgets."),
    ("upstream", "routes"): ({"type": "array", "items": _ref("route")},
                             "`http` only: method + path pattern -> verb/resource, first match wins. Unmatched "
                             "requests get the method's verb and the first path segment as resource."),
    ("upstream", "tools"): ({"type": "array", "items": _ref("tool")},
                            "`mcp` only: tool name -> verb/resource. Unlisted tools get verb `call` and the tool "
                            "name as resource."),
    ("upstream", "connect_timeout"): (_DURATION_SCHEMA, "Connect timeout, a duration like `5s` (default 5s)."),
    ("upstream", "read_timeout"): (_DURATION_SCHEMA, "Longest pause between bytes from the upstream, a duration "
                                                     "like `300s` (default 300s)."),
    ("upstream", "on_store_error"): (_enum(STORE_ERROR_POLICIES),
                                     "When the limits store is unreachable: `deny` (fail closed, the default) or "
                                     "`allow` (admit unmetered, traced)."),
    ("upstream", "tls"): (_ref("tls"), "https only: the upstream's own CA bundle and a client certificate to "
                                       "present (mTLS); omitted: verified against the system's CAs."),
    ("tls", "ca_file"): (_TEXT, "PEM CA bundle the upstream's certificate is verified against, instead of the "
                                "system's CAs."),
    ("tls", "cert_file"): (_TEXT, "PEM client certificate (chain) presented to the upstream; the private key too "
                                  "unless `key_file` is set."),
    ("tls", "key_file"): (_TEXT, "PEM private key of `cert_file` (unencrypted)."),
    ("credential", "header"): ({"type": "string", "pattern": r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
                               "Header name, e.g. `Authorization` or `x-api-key`."),
    ("credential", "value"): ({"type": "string"}, "Header value; use `${VAR}` so the secret stays out of the file."),
    ("price", "input_per_mtok"): ({"anyOf": [{"type": "number", "minimum": 0}, _VAR_REF]},
                                  "USD per million input tokens."),
    ("price", "output_per_mtok"): ({"anyOf": [{"type": "number", "minimum": 0}, _VAR_REF]},
                                   "USD per million output tokens."),
    ("route", "method"): ({"type": "string", "pattern": "^(" + "|".join(_any_case(m) for m in HTTP_METHODS) + ")$",
                           "examples": list(HTTP_METHODS)}, "HTTP method (any case), or `*` for every method."),
    ("route", "path"): ({"type": "string", "pattern": "^/"},
                        "Path pattern below the upstream: `*` matches one segment, `**` the rest; matched "
                        "case-insensitively."),
    ("route", "verb"): (_TEXT, "The action's verb, e.g. `read`, `create`, `delete`."),
    ("route", "resource"): (_TEXT, "The action's resource, e.g. `payments`."),
    ("tool", "name"): (_TEXT, "MCP tool name as `tools/call` names it."),
    ("tool", "verb"): (_TEXT, "The action's verb, e.g. `read`, `send`."),
    ("tool", "resource"): (_TEXT, "The action's resource, e.g. `accounts`."),
    ("agent_file", "agent"): ({"type": "string", "pattern": _NAME_PATTERN},
                              "Agent id: the `sub` of the agent's JWT."),
    ("agent_file", "owner"): (_TEXT, "Who answers for the agent, e.g. a team address."),
    ("agent_file", "purpose"): (_TEXT, "What the agent is for, in a sentence."),
    ("agent_file", "mode"): (_enum(MODES), "Progressive autonomy: `audit` (every action that is not a `read` is "
                                           "held), `assist` (the default) or `automate` (rules as written)."),
    ("agent_file", "allow"): ({"type": "array", "items": _ref("allow_rule")},
                              "Rules that allow matching calls. Precedence: deny > hold > allow > default deny."),
    ("agent_file", "hold"): ({"type": "array", "items": _ref("hold_rule")},
                             "Rules that hold matching calls for a human approval."),
    ("agent_file", "deny"): ({"type": "array", "items": _ref("deny_rule")}, "Rules that deny matching calls."),
    ("agent_file", "budgets"): ({"type": "array", "items": _ref("budget")},
                                "Token or USD budgets per window, reserved before forwarding and settled after."),
    ("agent_file", "rate_limits"): ({"type": "array", "items": _ref("rate_limit")},
                                    "Request or token rate limits per window."),
    ("agent_file", "loop_detection"): ({"oneOf": [{"const": False}, _ref("loop_detection")]},
                                       "The same call repeated more than `max_repeats` per `per` is refused "
                                       "(default 20 per minute); `false` turns it off."),
    ("agent_file", "capture"): (_ref("capture"), "What each call's trace keeps of the request body, for `replay`."),
    ("rule", "upstream"): (_TEXT, "Upstream name from upstreams.yaml."),
    ("rule", "verbs"): (_TEXTS, "Verbs the rule matches; `*` matches any verb."),
    ("rule", "resources"): (_TEXTS, "Resources the rule matches, globs allowed (`claude-haiku-*`); "
                                    "omitted: any resource."),
    ("rule", "when"): (_TEXT, "CEL condition over `agent`, `action` and `request`, compiled at load. A condition "
                              "that errors fails closed."),
    ("rule", "reason"): (_TEXT, "Why, shown to the agent and the approver and kept in the trace."),
    ("rule", "id"): (_TEXT, "Stable rule id cited by traces (default `<file>#<effect>[<index>]`); unique across "
                            "the rule set."),
    ("rule", "timeout"): (_DURATION_SCHEMA, "How long a held call waits for a decision, e.g. `15m` (hold rules "
                                            "only; default --hold-timeout)."),
    ("rule", "enforce"): (_enum(ENFORCEMENTS), "Staged rollout of deny and hold rules: `enforce` (the default), "
                                               "`warn` (let through with a warning) or `shadow` (only traced)."),
    ("budget", "id"): (_TEXT, "Stable budget id (default `<file>#budgets[<index>]`)."),
    ("budget", "tokens"): (_COUNT, "Tokens per window (set either tokens or usd)."),
    ("budget", "usd"): ({"anyOf": [{"type": "number", "exclusiveMinimum": 0}, _VAR_REF]},
                        "US dollars per window, priced from the upstream's `prices` (set either tokens or usd)."),
    ("budget", "per"): (_enum(BUDGET_WINDOWS), "Budget window."),
    ("budget", "alert_at"): ({"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                             "Fractions of the budget that fire an alert once per window (default 0.5, 0.8, 1.0)."),
    ("budget", "default_output_tokens"): (_COUNT, "Output tokens reserved when a chat request sets no max_tokens."),
    ("budget", "allow_unestimated"): (_FLAG, "Admit calls whose cost cannot be estimated, reserving input only."),
    ("budget", "clamp_max_tokens"): (_FLAG, "Lower the request's max_tokens to what the budget can still pay for."),
    ("rate_limit", "id"): (_TEXT, "Stable rate limit id (default `<file>#rate_limits[<index>]`)."),
    ("rate_limit", "upstream"): (_TEXT, "Upstream the limit counts; omitted: every upstream together."),
    ("rate_limit", "requests"): (_COUNT, "Requests per window (set either requests or tokens)."),
    ("rate_limit", "tokens"): (_COUNT, "Tokens per window (set either requests or tokens)."),
    ("rate_limit", "per"): (_enum(RATE_WINDOWS), "Rate limit window."),
    ("rate_limit", "default_output_tokens"): (_COUNT, "Output tokens reserved when a request sets no max_tokens."),
    ("rate_limit", "allow_unestimated"): (_FLAG, "Admit calls whose token count cannot be estimated."),
    ("loop_detection", "max_repeats"): (_COUNT, "Identical calls allowed per window before the next is refused."),
    ("loop_detection", "per"): (_enum(RATE_WINDOWS), "Loop detection window."),
    ("capture", "json"): ({"anyOf": [_enum(CAPTURE_MODES), _TEXTS]},
                          "`referenced` (body fields the agent's conditions read; the default), `all`, `none`, or "
                          "a list of dotted paths."),
    ("capture", "sensitive"): (_TEXTS, "Dotted body paths always redacted from traces."),
}

_DESCRIPTIONS = {
    "upstream": "One upstream the gateway forwards to.",
    "credential": "`{header, value}` injected upstream.",
    "tls": "`{ca_file, cert_file, key_file}`: files read when the rules load and again when they change on disk.",
    "price": "Prices of one model, USD per million tokens.",
    "route": "An `http` route: method + path pattern -> verb/resource.",
    "tool": "An `mcp` tool: name -> verb/resource.",
    "allow_rule": "An allow rule (allow rules always enforce and take no timeout).",
    "hold_rule": "A hold rule: matching calls wait for a human decision.",
    "deny_rule": "A deny rule.",
    "budget": "A token or USD budget: set exactly one of `tokens` and `usd`.",
    "rate_limit": "A rate limit: set exactly one of `requests` and `tokens`.",
    "loop_detection": "`{max_repeats, per}`.",
    "capture": "`{json, sensitive}`.",
}


def _object(section: str, overrides: Mapping[str, Schema] | None = None) -> Schema:
    """A closed object with exactly the loader's keys for `section`, each with its type and description."""
    keys = KEYS[section]
    properties: Schema = {}
    for key in (*keys.required, *keys.optional):
        try:
            schema, description = _PROPERTIES[(section, key)]
        except KeyError:
            raise SchemaDrift(f"the loader reads {section}.{key} but gateway/policy/schema.py has no schema for "
                              "it; add one to _PROPERTIES") from None
        properties[key] = {**(overrides or {}).get(key, schema), "description": description}
    result: Schema = {"type": "object"}
    if section in _DESCRIPTIONS:
        result["description"] = _DESCRIPTIONS[section]
    result["properties"] = properties
    if keys.required:
        result["required"] = list(keys.required)
    result["additionalProperties"] = False
    return result


def _rule(effect: str) -> Schema:
    overrides: dict[str, Schema] = {}
    if effect != "hold":
        overrides["timeout"] = {"not": {}}  # the loader refuses it: "timeout is only valid on hold rules"
    if effect == "allow":
        overrides["enforce"] = {"const": "enforce"}  # only deny and hold rules can be staged
    return _object("rule", overrides)


def _one_of(schema: Schema, one: str, other: str) -> Schema:
    return {**schema, "oneOf": [{"required": [one]}, {"required": [other]}]}


def upstreams_schema() -> Schema:
    upstream = _object("upstream")
    # The loader refuses routes on a non-http upstream and tools on a non-mcp one.
    upstream["allOf"] = [
        {"if": {"required": ["routes"]}, "then": {"properties": {"kind": {"const": "http"}}}},
        {"if": {"required": ["tools"]}, "then": {"properties": {"kind": {"const": "mcp"}}}},
        # ... and tls on an upstream whose url is not https://.
        {"if": {"required": ["tls"]}, "then": {"properties": {"url": {"pattern": _HTTPS_URL}}}},
    ]
    tls = _object("tls")
    tls["dependentRequired"] = {"key_file": ["cert_file"]}
    return {
        "$schema": DRAFT,
        "title": "agent-gateway upstreams.yaml",
        "description": "The upstreams the gateway may forward to (rules/upstreams.yaml). Generated from the loader "
                       "by `agent-gateway rules schema`.",
        **_object("upstreams_file"),
        "$defs": {name: _object(name) for name in ("credential", "price", "route", "tool")}
        | {"tls": tls, "upstream": upstream},
    }


def agent_schema() -> Schema:
    return {
        "$schema": DRAFT,
        "title": "agent-gateway agent rule file",
        "description": "What one agent may do (rules/agents/<agent>.yaml). Generated from the loader by "
                       "`agent-gateway rules schema`.",
        **_object("agent_file"),
        "$defs": {
            "allow_rule": _rule("allow"),
            "hold_rule": _rule("hold"),
            "deny_rule": _rule("deny"),
            "budget": _one_of(_object("budget"), "tokens", "usd"),
            "rate_limit": _one_of(_object("rate_limit"), "requests", "tokens"),
            "loop_detection": _object("loop_detection"),
            "capture": _object("capture"),
        },
    }


def schemas() -> dict[str, Schema]:
    """File name -> schema, for every shipped schema."""
    return {SCHEMA_FILES["upstreams"]: upstreams_schema(), SCHEMA_FILES["agent"]: agent_schema()}


def render(schema: Schema) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Write the schemas (all, or those `names`) into `directory`, created if missing; the paths written."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        if names is not None and name not in names:
            continue
        path = folder / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written
