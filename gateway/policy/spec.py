"""Parsed rule files: plain frozen specs, with the source location of everything a rule error may cite."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

UpstreamKind = Literal["openai", "anthropic", "mcp", "http"]
Effect = Literal["allow", "deny", "hold"]
Window = Literal["second", "minute", "hour", "day", "week", "month"]

UPSTREAM_KINDS: tuple[str, ...] = ("openai", "anthropic", "mcp", "http")
MODES: tuple[str, ...] = ("audit", "assist", "automate")
EFFECTS: tuple[str, ...] = ("allow", "hold", "deny")
ENFORCEMENTS: tuple[str, ...] = ("enforce", "warn", "shadow")
Enforcement = Literal["enforce", "warn", "shadow"]


@dataclass(frozen=True, slots=True)
class Loc:
    """Where a value was written: file path as given, 1-based line and column."""

    file: str
    line: int
    col: int


@dataclass(frozen=True, slots=True, order=True)
class RuleError:
    """One problem in a rule set; prints as `file:line:col: code: path: message`."""

    file: str
    line: int
    col: int
    code: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.code}: {self.path}: {self.message}"


class RuleSetInvalid(Exception):
    """A rule set that did not load or compile; carries every error, sorted."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = sorted(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True, slots=True)
class CredentialSpec:
    header: str
    value: str  # already ${VAR}-expanded; a secret: never logged or traced


@dataclass(frozen=True, slots=True)
class UpstreamTlsSpec:
    """An https upstream's own trust and identity: a CA bundle to verify it with, a client certificate for it."""

    ca_file: str | None = None  # PEM bundle; None: the system's trusted CAs
    cert_file: str | None = None  # PEM client certificate (chain) presented to the upstream
    key_file: str | None = None  # its private key; None: in cert_file


@dataclass(frozen=True, slots=True)
class PriceSpec:
    input_per_mtok: float
    output_per_mtok: float


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """An `http` upstream route: method + path pattern (`*` one segment, `**` the rest) -> verb/resource."""

    method: str
    path: str
    verb: str
    resource: str | None
    loc: Loc


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """An `mcp` upstream tool: tool name -> verb/resource."""

    name: str
    verb: str
    resource: str | None
    loc: Loc


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    kind: UpstreamKind
    url: str
    credential: CredentialSpec | None
    prices: Mapping[str, PriceSpec]
    routes: tuple[RouteSpec, ...]
    tools: tuple[ToolSpec, ...]
    connect_timeout: float  # seconds
    read_timeout: float  # seconds between bytes from the upstream
    loc: Loc
    # When the limits store is unreachable: `deny` (fail closed, the default) or `allow` (traced as such).
    on_store_error: Literal["deny", "allow"] = "deny"
    tls: UpstreamTlsSpec | None = None


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One allow/hold/deny rule of an agent file."""

    id: str  # explicit `id:` or `<file name>#<effect>[<index>]`
    effect: Effect
    upstream: str
    verbs: tuple[str, ...]  # "*" matches any verb
    resources: tuple[str, ...] | None  # None: any resource; entries may use `*` globs
    when: str | None  # CEL source
    reason: str | None
    timeout: float | None  # hold only, seconds
    loc: Loc  # the rule itself
    when_loc: Loc | None = None  # the `when:` value, for CEL errors
    # Staged rollout of deny/hold rules: `shadow` is only traced (would_deny/would_hold), `warn` lets the call
    # through with a warning, `enforce` decides. Allow rules always enforce.
    enforce: Enforcement = "enforce"


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    id: str
    per: Window
    tokens: int | None
    usd: float | None
    alert_at: tuple[float, ...]
    loc: Loc
    default_output_tokens: int | None = None  # reserved when a chat request sets no max_tokens
    allow_unestimated: bool = False  # admit calls whose cost cannot be estimated (reserving input only)
    clamp_max_tokens: bool = False  # lower the request's max_tokens to what the budget can still pay for


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    id: str
    per: Window
    upstream: str | None  # None: every upstream
    requests: int | None
    tokens: int | None
    loc: Loc
    default_output_tokens: int | None = None
    allow_unestimated: bool = False


@dataclass(frozen=True, slots=True)
class LoopSpec:
    """The same call (agent, method, path, query, body) more than `max_repeats` times per `per` is a loop."""

    max_repeats: int
    per: Window


DEFAULT_LOOP = LoopSpec(max_repeats=20, per="minute")


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What each call's trace keeps of the request, so `replay` can re-decide it under other rules.

    `json`: "referenced" (the body fields any of the agent's conditions read), "all", "none", or a list of dotted
    paths. `sensitive`: dotted paths always redacted. Credentials and secret-looking keys are always redacted.
    """

    json: str | tuple[str, ...] = "referenced"
    sensitive: tuple[str, ...] = ()


DEFAULT_CAPTURE = CaptureSpec()


@dataclass(frozen=True, slots=True)
class AgentSpec:
    id: str
    owner: str | None
    purpose: str | None
    mode: Literal["audit", "assist", "automate"]
    rules: tuple[RuleSpec, ...]  # in file order: allow, hold, deny as written
    budgets: tuple[BudgetSpec, ...]
    rate_limits: tuple[RateLimitSpec, ...]
    file: str
    loop_detection: LoopSpec | None = DEFAULT_LOOP  # None: off
    capture: CaptureSpec = DEFAULT_CAPTURE


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A whole loaded rule directory; `version` is a content hash of every file in it."""

    upstreams: Mapping[str, UpstreamSpec]
    agents: Mapping[str, AgentSpec]
    version: str
    directory: str
    files: tuple[str, ...] = field(default_factory=tuple)
