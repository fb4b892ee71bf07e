"""The rule-file JSON Schemas: generated from the loader's key tables, shipped in the package, and in agreement
with the loader on the example rules and on broken files."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from gateway.policy import load, schema
from gateway.policy.load import KEYS, load_rules
from gateway.policy.spec import RuleSetInvalid

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "gateway" / "policy" / "schemas"
RULES = ROOT / "rules"
REGENERATE = ".venv/bin/python -m gateway rules schema --write gateway/policy/schemas"

# Which loader table each object of the schemas is: (file, JSON pointer-ish path) -> KEYS section.
SECTIONS = {
    ("upstreams", ""): "upstreams_file",
    ("upstreams", "upstream"): "upstream",
    ("upstreams", "credential"): "credential",
    ("upstreams", "tls"): "tls",
    ("upstreams", "price"): "price",
    ("upstreams", "route"): "route",
    ("upstreams", "tool"): "tool",
    ("agent", ""): "agent_file",
    ("agent", "allow_rule"): "rule",
    ("agent", "hold_rule"): "rule",
    ("agent", "deny_rule"): "rule",
    ("agent", "budget"): "budget",
    ("agent", "rate_limit"): "rate_limit",
    ("agent", "loop_detection"): "loop_detection",
    ("agent", "capture"): "capture",
}

UPSTREAMS = "upstreams:\n  erp: {kind: http, url: 'http://erp:9000'}\n  llm: {kind: openai, url: 'https://llm'}\n"


def shipped(name: str) -> dict[str, Any]:
    return dict(json.loads((SHIPPED / schema.SCHEMA_FILES[name]).read_text()))


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(shipped(name))


def objects(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    document = shipped(name)
    yield "", document
    yield from document["$defs"].items()


def test_shipped_schemas_equal_the_generated_ones() -> None:
    for file, generated in schema.schemas().items():
        on_disk = (SHIPPED / file).read_text() if (SHIPPED / file).exists() else ""
        assert on_disk == schema.render(generated), f"{file} is stale; regenerate it with: {REGENERATE}"


def test_schemas_are_valid_draft_2020_12() -> None:
    for name in schema.SCHEMA_FILES:
        Draft202012Validator.check_schema(shipped(name))
        assert shipped(name)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_key_sets_equal_the_loader_key_tables() -> None:
    seen = set()
    for name in schema.SCHEMA_FILES:
        for path, obj in objects(name):
            section = SECTIONS[(name, path)]
            seen.add(section)
            assert set(obj["properties"]) == {*KEYS[section].required, *KEYS[section].optional}, section
            assert obj.get("required", []) == list(KEYS[section].required), section
            assert obj["additionalProperties"] is False, section
    assert seen == set(KEYS)


def test_loader_reads_every_mapping_through_the_key_tables() -> None:
    # A key list written inline in load.py would escape the schema; every `reader.fields` call must use KEYS.
    tree = ast.parse(Path(load.__file__).read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "fields"]
    assert len(calls) == len(KEYS)
    for call in calls:
        [_, keys] = call.args
        assert isinstance(keys, ast.Starred) and ast.unparse(keys.value).startswith("KEYS["), ast.unparse(call)


def test_every_property_has_a_description() -> None:
    for name in schema.SCHEMA_FILES:
        for path, obj in objects(name):
            for key, prop in obj["properties"].items():
                assert prop.get("description"), f"{name} {path or '(root)'}.{key}"


def test_schema_generation_fails_when_the_loader_gains_an_undescribed_key(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = dict(KEYS)
    keys["budget"] = load.Keys(("per",), (*KEYS["budget"].optional, "rollover"))
    monkeypatch.setattr(schema, "KEYS", keys)
    with pytest.raises(schema.SchemaDrift, match=r"budget\.rollover"):
        schema.agent_schema()


def test_example_rule_files_name_their_schema_on_the_first_line() -> None:
    assert (RULES / "upstreams.yaml").read_text().splitlines()[0] == (
        "# yaml-language-server: $schema=../gateway/policy/schemas/upstreams.schema.json")
    agent_files = sorted((RULES / "agents").glob("*.yaml"))
    assert agent_files
    for file in agent_files:
        assert file.read_text().splitlines()[0] == (
            "# yaml-language-server: $schema=../../gateway/policy/schemas/agent.schema.json"), file.name
        target = (file.parent / "../../gateway/policy/schemas/agent.schema.json").resolve()
        assert target == SHIPPED / "agent.schema.json"


def test_example_rule_files_validate_against_their_schemas() -> None:
    assert list(validator("upstreams").iter_errors(yaml.safe_load((RULES / "upstreams.yaml").read_text()))) == []
    for file in sorted((RULES / "agents").glob("*.yaml")):
        errors = [e.message for e in validator("agent").iter_errors(yaml.safe_load(file.read_text()))]
        assert errors == [], file.name


def test_schemas_are_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gateway"]
    assert "policy/schemas/*.json" in data


def test_schema_accepts_variables_where_the_loader_types_them_after_expansion(tmp_path: Path) -> None:
    text = "agent: x\nmode: ${MODE:-audit}\nbudgets:\n  - tokens: ${DAILY_TOKENS:-2000}\n    per: day\n"
    assert list(validator("agent").iter_errors(yaml.safe_load(text))) == []
    write_rules(tmp_path, text)
    assert load_rules(tmp_path, {}).agents["x"].budgets[0].tokens == 2000


# -- the schema and the loader refuse the same broken files --------------------------------------------------------


def write_rules(root: Path, agent: str, upstreams: str = UPSTREAMS) -> None:
    (root / "agents").mkdir(parents=True, exist_ok=True)
    (root / "upstreams.yaml").write_text(upstreams)
    (root / "agents" / "x.yaml").write_text(agent)


BROKEN_AGENTS = {
    "unknown key": ("agent: x\nallow:\n  - {upstream: erp, verb: [read]}\n", "unknown_key"),
    "unknown top-level key": ("agent: x\ncolour: red\n", "unknown_key"),
    "bad mode": ("agent: x\nmode: autopilot\n", "bad_value"),
    "bad enforcement": ("agent: x\ndeny:\n  - {upstream: erp, verbs: [delete], enforce: maybe}\n", "bad_value"),
    "staged allow rule": ("agent: x\nallow:\n  - {upstream: erp, verbs: [read], enforce: shadow}\n", "bad_value"),
    "timeout on a deny rule": ("agent: x\ndeny:\n  - {upstream: erp, verbs: [delete], timeout: 5m}\n", "bad_value"),
    "bad duration": ("agent: x\nhold:\n  - {upstream: erp, verbs: [create], timeout: 15 minutes}\n", "bad_value"),
    "tokens and usd": ("agent: x\nbudgets:\n  - {tokens: 100, usd: 5, per: day}\n", "bad_value"),
    "neither tokens nor usd": ("agent: x\nbudgets:\n  - {per: day}\n", "missing_key"),
    "requests and tokens": ("agent: x\nrate_limits:\n  - {requests: 5, tokens: 5, per: minute}\n", "bad_value"),
    "bad budget window": ("agent: x\nbudgets:\n  - {tokens: 100, per: minute}\n", "bad_value"),
    "missing agent": ("mode: assist\n", "missing_key"),
    "loop detection on": ("agent: x\nloop_detection: true\n", "bad_type"),
    "empty verbs": ("agent: x\nallow:\n  - {upstream: erp, verbs: []}\n", "bad_value"),
    "zero tokens": ("agent: x\nbudgets:\n  - {tokens: 0, per: day}\n", "bad_value"),
}

BROKEN_UPSTREAMS = {
    "unknown key": ("upstreams:\n  erp: {kind: http, url: 'http://erp', read_timout: 5s}\n", "unknown_key"),
    "bad kind": ("upstreams:\n  erp: {kind: grpc, url: 'http://erp'}\n", "bad_value"),
    "routes on openai": ("upstreams:\n  llm:\n    kind: openai\n    url: https://llm\n    routes:\n"
                         "      - {method: GET, path: /x, verb: read}\n", "bad_value"),
    "tools on http": ("upstreams:\n  erp:\n    kind: http\n    url: http://erp\n    tools:\n"
                      "      - {name: t, verb: read}\n", "bad_value"),
    "bad method": ("upstreams:\n  erp:\n    kind: http\n    url: http://erp\n    routes:\n"
                   "      - {method: FETCH, path: /x, verb: read}\n", "bad_value"),
    "bad store policy": ("upstreams:\n  erp: {kind: http, url: 'http://erp', on_store_error: retry}\n", "bad_value"),
    "ftp url": ("upstreams:\n  erp: {kind: http, url: 'ftp://erp'}\n", "bad_value"),
    "bad upstream name": ("upstreams:\n  ERP: {kind: http, url: 'http://erp'}\n", "bad_value"),
}


@pytest.mark.parametrize("case", BROKEN_AGENTS, ids=list(BROKEN_AGENTS))
def test_broken_agent_file_fails_schema_and_loader(tmp_path: Path, case: str) -> None:
    text, code = BROKEN_AGENTS[case]
    assert list(validator("agent").iter_errors(yaml.safe_load(text))) != []
    write_rules(tmp_path, text)
    with pytest.raises(RuleSetInvalid) as caught:
        load_rules(tmp_path, {})
    assert code in {e.code for e in caught.value.errors}


@pytest.mark.parametrize("case", BROKEN_UPSTREAMS, ids=list(BROKEN_UPSTREAMS))
def test_broken_upstreams_file_fails_schema_and_loader(tmp_path: Path, case: str) -> None:
    text, code = BROKEN_UPSTREAMS[case]
    assert list(validator("upstreams").iter_errors(yaml.safe_load(text))) != []
    write_rules(tmp_path, "agent: x\n", upstreams=text)
    with pytest.raises(RuleSetInvalid) as caught:
        load_rules(tmp_path, {})
    assert code in {e.code for e in caught.value.errors}


def test_valid_variants_pass_schema_and_loader(tmp_path: Path) -> None:
    agent = ("agent: x\nloop_detection: false\ncapture: {json: [a.b], sensitive: [card]}\n"
             "hold:\n  - {upstream: erp, verbs: ['*'], timeout: 90, enforce: warn}\n"
             "rate_limits:\n  - {tokens: 100, per: second}\n")
    upstreams = ("upstreams:\n  erp:\n    kind: http\n    url: HTTPS://erp\n    connect_timeout: 1h30m\n"
                 "    routes:\n      - {method: get, path: /x/**, verb: read}\n")
    assert list(validator("agent").iter_errors(yaml.safe_load(agent))) == []
    assert list(validator("upstreams").iter_errors(yaml.safe_load(upstreams))) == []
    write_rules(tmp_path, agent, upstreams=upstreams)
    assert load_rules(tmp_path, {}).agents["x"].loop_detection is None


# -- the command line ----------------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "rules", "schema", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                          check=False)


def test_cli_schema_prints_and_writes_the_shipped_schemas(tmp_path: Path) -> None:
    result = cli("agent")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (SHIPPED / "agent.schema.json").read_text()
    result = cli("--write", str(tmp_path / "out"))
    assert result.returncode == 0
    assert result.stdout.splitlines() == [f"wrote {tmp_path / 'out' / f}" for f in schema.SCHEMA_FILES.values()]
    for file in schema.SCHEMA_FILES.values():
        assert (tmp_path / "out" / file).read_text() == (SHIPPED / file).read_text()


def test_cli_schema_without_a_name_or_write_exits_2() -> None:
    result = cli()
    assert result.returncode == 2
    assert "name a schema (upstreams or agent), or write both with --write DIR" in result.stderr


def test_schema_refuses_tls_where_the_loader_does() -> None:
    def errors(upstream: dict[str, Any]) -> list[str]:
        return [e.message for e in validator("upstreams").iter_errors({"upstreams": {"erp": upstream}})]

    tls = {"ca_file": "/etc/pki/erp-ca.pem", "cert_file": "/etc/erp.pem", "key_file": "/etc/erp.key"}
    assert errors({"kind": "http", "url": "https://erp.internal", "tls": tls}) == []
    assert errors({"kind": "http", "url": "${ERP_URL}", "tls": tls}) == []
    assert errors({"kind": "http", "url": "http://erp.internal", "tls": tls}) != []
    assert errors({"kind": "http", "url": "https://erp.internal", "tls": {"key_file": "/etc/erp.key"}}) != []
    assert errors({"kind": "http", "url": "https://erp.internal", "tls": {"ca_fle": "x"}}) != []
