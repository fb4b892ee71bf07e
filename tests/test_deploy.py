"""The deployment files (Dockerfile, deploy/) and docs/operations.md against the real CLI.

No Docker or Kubernetes here: every gateway command line in them is run through `serve --check`, and their ports,
paths and environment variable names are compared with the argument parser's own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES_IN_IMAGE = "/etc/agent-gateway/rules"
# The ${VAR}s of the example rules/upstreams.yaml without a default: whoever runs the gateway must provide them.
UPSTREAM_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ERP_TOKEN", "CRM_MCP_TOKEN")
DUMMY = {"AGENT_GATEWAY_JWT_SECRET": "j" * 40, "AGENT_GATEWAY_ADMIN_TOKEN": "admin-dummy",
         "AGENT_GATEWAY_REDIS_URL": "redis://redis.invalid:6379/0"}


# -- the CLI's own names --------------------------------------------------------------------------------------------


def serve_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = build_parser(env or {})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = sub.choices["serve"]
    return serve


def serve_options() -> list[argparse.Action]:
    return [a for a in serve_parser()._actions if a.option_strings and a.dest != "help"]


def env_name(action: argparse.Action) -> str | None:
    return None if action.dest == "check" else f"AGENT_GATEWAY_{action.dest.upper()}"


def cli_env_vars() -> set[str]:
    """Every AGENT_GATEWAY_* variable `serve` reads: one per flag, plus the secrets read from the environment only."""
    names = {name for action in serve_options() if (name := env_name(action))}
    source = (ROOT / "gateway" / "cli.py").read_text()
    return names | set(re.findall(r'env\.get\("(AGENT_GATEWAY_[A-Z_]+)"\)', source))


def test_every_serve_flag_reads_its_environment_variable() -> None:
    for action in serve_options():
        name = env_name(action)
        if name is None:
            continue
        value = str(list(action.choices)[-1]) if action.choices else ("7" if action.type in (int, float) else "x")
        assert serve_parser({name: value}).get_default(action.dest) == value, name
    assert {"AGENT_GATEWAY_JWT_SECRET", "AGENT_GATEWAY_ADMIN_TOKEN"} <= cli_env_vars()


def parse_serve(args: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    assert args[0] == "serve", args
    return build_parser(env).parse_args(args)


# -- running `serve --check` ----------------------------------------------------------------------------------------


def run_check(args: list[str], env: Mapping[str, str], rules: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m gateway <args> --check` with only `env` (no AGENT_GATEWAY_* leaks in from the test's own
    environment), the image's rules path mapped to `rules` (default: the repository's rules/)."""
    local = str(rules or ROOT / "rules")
    args = [local if arg == RULES_IN_IMAGE else arg for arg in args]
    env = {k: (local if v == RULES_IN_IMAGE else v) for k, v in env.items()}
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--check"], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def assert_check_ok(args: list[str], env: Mapping[str, str], rules: Path | None = None) -> str:
    result = run_check(args, env, rules)
    assert result.returncode == 0, f"{args} {sorted(env)}\n{result.stdout}{result.stderr}"
    assert result.stdout.startswith("config OK: "), result.stdout
    return result.stdout


def test_check_mode_reports_errors_and_opens_nothing() -> None:
    with socket.socket() as busy:  # a port in use does not matter: --check binds nothing
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        started = time.monotonic()
        out = assert_check_ok(["serve", "--port", port, "--redis-url", "redis://10.255.255.1:6379/0"],
                              {**DUMMY, **dict.fromkeys(UPSTREAM_KEYS, "k")})
    assert time.monotonic() - started < 30 and "store redis" in out  # no Redis was dialled
    bad = run_check(["serve", "--redis-url", "http://redis:6379", "--tls-key", "k.pem", "--workers", "0"],
                    {**dict.fromkeys(UPSTREAM_KEYS, "k")})
    assert bad.returncode == 2
    for text in ("--redis-url: store URL scheme 'http'", "need --tls-cert", "--workers must be at least 1",
                 "no JWT verification key"):
        assert text in bad.stderr, bad.stderr
    missing_key = run_check(["serve"], {"AGENT_GATEWAY_JWT_SECRET": "j" * 40})
    assert missing_key.returncode == 1 and "OPENAI_API_KEY" in missing_key.stderr
    usage = run_check(["serve", "--port", "eighty"], {})
    assert usage.returncode == 2 and "invalid int value" in usage.stderr


@pytest.mark.parametrize("url", ["rediss://r:6380/0", "redis+sentinel://s1:26379,s2:26379/mymaster/0",
                                 "redis+cluster://n1:7000,n2:7001", "rediss+cluster://n1:7000"])
def test_check_mode_accepts_every_store_url_serve_accepts(url: str) -> None:
    assert_check_ok(["serve", "--redis-url", url], {**DUMMY, **dict.fromkeys(UPSTREAM_KEYS, "k")})


@pytest.mark.parametrize(("url", "error"), [("redis+cluster://n1:7000/3", "only database 0"),
                                            ("redis+sentinel://s1:26379", "expected redis+sentinel://")])
def test_check_mode_refuses_a_store_url_serve_would_refuse(url: str, error: str) -> None:
    bad = run_check(["serve", "--redis-url", url], {**DUMMY, **dict.fromkeys(UPSTREAM_KEYS, "k")})
    assert bad.returncode == 2 and error in bad.stderr, bad.stderr


# -- Dockerfile -----------------------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in dockerfile_final_stage():
        if op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(op: str) -> list[str]:
    values = [rest for name, rest in dockerfile_final_stage() if name == op]
    assert len(values) == 1, f"one {op} in the final stage"
    parsed = json.loads(values[0])  # exec form (a JSON array): the gateway is PID 1 and gets SIGTERM
    assert isinstance(parsed, list)
    return [str(x) for x in parsed]


def test_dockerfile_shape() -> None:
    instructions = dockerfile()
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert any(op == "ARG" and rest == "PYTHON_IMAGE=python:3.11-slim" for op, rest in instructions)
    text = (ROOT / "Dockerfile").read_text()
    assert "docker buildx imagetools inspect python:3.11-slim" in text and "@sha256:" in text
    final = dockerfile_final_stage()
    user = [rest for op, rest in final if op == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    copies = [rest for op, rest in final if op == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert not any("gcc" in rest or "build-essential" in rest for op, rest in final if op == "RUN")
    assert exec_form("ENTRYPOINT") == ["agent-gateway"]


def test_dockerfile_command_passes_check() -> None:
    env = dockerfile_env()
    assert env["AGENT_GATEWAY_RULES"] == RULES_IN_IMAGE
    args = exec_form("CMD")
    assert_check_ok(args, {**env, "AGENT_GATEWAY_JWT_SECRET": "j" * 40, **dict.fromkeys(UPSTREAM_KEYS, "k")})
    parsed = parse_serve(args, env)
    exposed = {int(port) for op, rest in dockerfile_final_stage() if op == "EXPOSE" for port in rest.split()}
    assert exposed == {parsed.port, parsed.admin_port} == {8080, 8081}
    assert parsed.admin_host == "127.0.0.1"  # the admin API leaves the container only when asked (--admin-host)
    health = [rest for op, rest in dockerfile_final_stage() if op == "HEALTHCHECK"]
    assert len(health) == 1
    command = json.loads(health[0].split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"] and "urllib" in command[2] and "/healthz" in command[2]
    assert "AGENT_GATEWAY_ADMIN_PORT" in command[2] and "127.0.0.1" in command[2]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    kept = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    for op, rest in dockerfile():
        if op == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source in kept and (ROOT / source).exists(), source


# -- YAML and kustomize ---------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_parses() -> None:
    files = yaml_files()
    assert len(files) >= 10
    for path in files:
        assert load_all(path), path


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_kustomizations_list_existing_files() -> None:
    assert {p.parent.name for p in kustomizations()} == {"base", "sidecar", "central"}
    for kustomization in kustomizations():
        spec = load_all(kustomization)[0]
        assert spec["kind"] == "Kustomization"
        listed = list(spec.get("resources", [])) + [p["path"] for p in spec.get("patches", [])]
        for entry in listed:
            target = (kustomization.parent / entry).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{kustomization}: {entry}"
        # every manifest beside a kustomization is used by it
        used = {(kustomization.parent / e).resolve() for e in listed}
        for path in kustomization.parent.glob("*.yaml"):
            assert path == kustomization or path.resolve() in used, path


def strategic_merge(base: Any, patch: Any) -> Any:
    """Enough of kustomize's strategic merge for these files: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x
                                                                   for x in base + patch):
        by_name = {x["name"]: x for x in base}
        out = [strategic_merge(by_name[x["name"]], x) if x["name"] in by_name else copy.deepcopy(x) for x in patch]
        return out + [x for x in base if x["name"] not in {p["name"] for p in patch}]
    return copy.deepcopy(patch)


def json6902(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [part for part in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert op["op"] in ("add", "replace"), op
        if isinstance(node, list):
            if last == "-":
                node.append(op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in node, op["path"]
            node[last] = op["value"]
    return doc


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` would print (names without prefixes)."""
    spec = load_all(directory / "kustomization.yaml")[0]
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        objects += build(path) if path.is_dir() else load_all(path)
    for patch in spec.get("patches", []):
        content = load_all(directory / patch["path"])[0]
        for i, obj in enumerate(objects):
            if isinstance(content, list):
                if obj["kind"] == patch["target"]["kind"] and obj["metadata"]["name"] == patch["target"]["name"]:
                    objects[i] = json6902(obj, content)
            elif obj["kind"] == content["kind"] and obj["metadata"]["name"] == content["metadata"]["name"]:
                objects[i] = strategic_merge(obj, content)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def gateway_container(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = find(objects, "Deployment", "agent-gateway")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "gateway")


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment with secrets replaced by dummies (the real ones are created out of band)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        env[item["name"]] = item["value"] if "value" in item else DUMMY.get(item["name"], "dummy")
    for source in container.get("envFrom", []):
        assert source["secretRef"]["name"] == "agent-gateway-upstream-keys"
        env.update(dict.fromkeys(UPSTREAM_KEYS, "dummy"))  # the keys the Secret must hold (deployment.yaml)
    return env


def materialise_rules(objects: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any],
                      into: Path) -> Path:
    """The rules directory as the kubelet would mount it from the ConfigMap."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == RULES_IN_IMAGE)
    assert "subPath" not in mount  # a subPath mount would never see ConfigMap edits: no hot reload
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
    assert {item["key"] for item in items} == set(data)  # no rule file left out of the volume
    for item in items:
        target = into / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]])
    return into


def test_rules_configmap_is_the_repository_rules() -> None:
    data = find(build(K8S / "base"), "ConfigMap", "agent-gateway-rules")["data"]
    expected = {"upstreams.yaml": ROOT / "rules" / "upstreams.yaml",
                **{f"agents.{p.name}": p for p in (ROOT / "rules" / "agents").glob("*.yaml")}}
    assert set(data) == set(expected)
    for key, path in expected.items():
        body = [line for line in path.read_text().splitlines() if not line.startswith("# yaml-language-server")]
        assert data[key].splitlines() == body, key


@pytest.mark.parametrize("overlay", ["sidecar", "central"])
def test_kubernetes_gateway_command_passes_check(overlay: str, tmp_path: Path) -> None:
    objects = build(K8S / overlay)
    pod, container = gateway_container(objects)
    assert "command" not in container  # the image's ENTRYPOINT (agent-gateway) runs the args
    args, env = container["args"], container_env(container)
    rules = materialise_rules(objects, pod, container, tmp_path / "rules")
    out = assert_check_ok(args, env, rules)
    parsed = parse_serve(args, env)
    assert parsed.rules == RULES_IN_IMAGE and parsed.workers == 1 and "--workers" not in args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == parsed.port == 8080
    assert pod["terminationGracePeriodSeconds"] > parsed.drain_timeout
    resources = container["resources"]
    assert resources == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
    if overlay == "sidecar":
        assert parsed.host == parsed.admin_host == "127.0.0.1" and "admin" not in ports
        assert not [o for o in objects if o["kind"] == "Service"]
        assert "store memory" in out
        agent = next(c for c in pod["containers"] if c["name"] == "agent")
        urls = [e["value"] for e in agent["env"] if e.get("value", "").startswith("http")]
        assert urls and all(u.startswith(f"http://127.0.0.1:{parsed.port}/") for u in urls)
        assert not agent.get("envFrom") and not any(e["name"] in UPSTREAM_KEYS and "value" in e
                                                    for e in agent["env"])
        for probe in ("readinessProbe", "livenessProbe"):  # loopback admin: probed from inside the pod
            assert f"127.0.0.1:{parsed.admin_port}/" in " ".join(container[probe]["exec"]["command"])
    else:
        deployment = find(objects, "Deployment", "agent-gateway")
        assert deployment["spec"]["replicas"] == 3
        assert parsed.admin_host == "0.0.0.0" and ports["admin"] == parsed.admin_port == 8081
        assert parsed.redis_url == DUMMY["AGENT_GATEWAY_REDIS_URL"] and "store redis" in out
        redis_env = next(e for e in container["env"] if e["name"] == "AGENT_GATEWAY_REDIS_URL")
        assert "secretKeyRef" in redis_env["valueFrom"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdb = find(objects, "PodDisruptionBudget", "agent-gateway")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert 0 < pdb["spec"]["minAvailable"] < 3
        for service in (o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].startswith(
                "agent-gateway") and "redis" not in o["metadata"]["name"]):
            assert service["spec"]["selector"].items() <= labels.items()
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
        redis_service = find(objects, "Service", "agent-gateway-redis")
        assert redis_service["spec"]["ports"][0]["port"] == 6379


# -- docker compose -------------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = load_all(DEPLOY / "docker-compose.yml")[0]
    return spec


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default}, with dummies for the variables."""
    return re.sub(r"\$\{(\w+)[^}]*\}", lambda m: DUMMY.get(m.group(1), "dummy"), value)


def test_compose_gateway_command_passes_check() -> None:
    spec = compose()
    assert set(spec["services"]) >= {"gateway", "redis", "upstreams", "agent"}
    gateway = spec["services"]["gateway"]
    env = {k: interpolate(str(v)) for k, v in gateway["environment"].items()}
    mounts = dict(m.rsplit(":", 2)[:2][::-1] for m in gateway["volumes"])
    assert (DEPLOY / mounts[RULES_IN_IMAGE]).resolve() == ROOT / "rules"  # the repository's rules are mounted
    assert_check_ok(gateway["command"], env)
    parsed = parse_serve(gateway["command"], {**dockerfile_env(), **env})
    assert parsed.redis_url == "redis://redis:6379/0" and "redis" in gateway["depends_on"]
    published = {int(p.rsplit(":", 1)[1]): p.rsplit(":", 1)[0] for p in gateway["ports"]}
    assert set(published) == {parsed.port, parsed.admin_port}
    assert all(host.startswith("127.0.0.1:") for host in published.values())  # only the host's loopback
    # the fakes' ports in demo_upstreams.py are the ones the rules' ${..._URL}s point at
    source = (DEPLOY / "demo_upstreams.py").read_text()
    for name in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "CRM_MCP_URL", "ERP_URL"):
        port = re.search(r"upstreams:(\d+)", env[name])
        assert port and f"({port.group(1)}," in source, name
    for service in ("upstreams", "agent"):
        entry = spec["services"][service]["entrypoint"]
        script = next(Path(a) for a in entry if a.endswith(".py"))
        mounted = dict(m.rsplit(":", 2)[:2][::-1] for m in spec["services"][service]["volumes"])
        assert (DEPLOY / mounted[str(script)]).is_file()
    assert spec["services"]["agent"]["environment"]["GATEWAY_URL"] == f"http://gateway:{parsed.port}"


# -- names across all files -----------------------------------------------------------------------------------------


def deploy_texts() -> dict[str, str]:
    files = [ROOT / "Dockerfile", *yaml_files(), *DEPLOY.rglob("*.md")]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_every_agent_gateway_variable_is_one_the_cli_reads() -> None:
    known = cli_env_vars()
    used: set[str] = set()
    for name, text in deploy_texts().items():
        for var in re.findall(r"AGENT_GATEWAY_[A-Z_]+", text):
            assert var in known, f"{name}: {var} is not read by agent-gateway serve"
            used.add(var)
    assert {"AGENT_GATEWAY_RULES", "AGENT_GATEWAY_JWT_SECRET", "AGENT_GATEWAY_REDIS_URL"} <= used


# -- docs/operations.md ---------------------------------------------------------------------------------------------


def test_operations_flag_table_matches_the_parser() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    header = "| flag | environment variable | default | what it does |"
    assert header in text
    rows: list[tuple[str, str, str]] = []
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows.append((cells[0], cells[1], cells[2]))
    expected = []
    for action in serve_options():
        env = env_name(action)
        default = "—" if action.default in (None, False) else f"`{action.default}`"
        expected.append((f"`{action.option_strings[0]}`", f"`{env}`" if env else "—", default))
    assert rows == expected
    for var in ("AGENT_GATEWAY_JWT_SECRET", "AGENT_GATEWAY_ADMIN_TOKEN"):
        assert f"| `{var}` |" in text
    assert "(performance.md)" in text
