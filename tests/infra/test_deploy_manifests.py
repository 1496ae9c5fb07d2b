"""``deploy/``: the Kubernetes manifests, the NATS chart values and the compose file ask only for what the code has.

Nothing in ``deploy/`` runs on a cluster here, so these tests keep it honest: every flag a
container passes is in that service's ``--help``; every environment variable is named in that
``--help``, read by the code, or only expanded into the container's own arguments; every port a
flag opens is the container port that probes, Services and health checks use; every probe path
is a route the service serves; every seed file is the one its identity gets from ``./cy``.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from services.common import bus_auth, bus_permissions, metrics_http
from services.edge.system.routes import add_routes
from tests.support import REPO

DEPLOY = REPO / "deploy"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
# Variables read by the code for every process (not per service, so no --help names them).
PROCESS_ENV = {"CY_LOG_LEVEL": REPO / "services" / "common" / "lifecycle.py"}
# The flag that opens each service's HTTP port (the edge: its API; the others: metrics and health).
PORT_FLAG = {"services.edge": "--port", "services.scheduler": "--metrics-port", "services.engine": "--metrics-port",
             "services.trainer": "--metrics-port"}
HOST_FLAG = {"services.edge": "--host"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


K8S = [d for path in K8S_FILES for d in _docs(path)]
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@functools.cache
def help_text(module: str, *subcommand: str) -> str:
    """``python -m module [subcommand] --help``, as an operator reads it."""
    out = subprocess.run([sys.executable, "-m", module, *subcommand, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@functools.cache
def edge_routes() -> set[str]:
    """The GET paths the edge's operator surface serves."""
    app = web.Application()
    add_routes(app)
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET"}


def served_paths(module: str) -> set[str]:
    """What a probe of ``module``'s HTTP port may ask for."""
    return edge_routes() if module == "services.edge" else {metrics_http.HEALTH_PATH, metrics_http.METRICS_PATH}


def invocation(argv: list[str]) -> tuple[str, tuple[str, ...], list[str]]:
    """``(module, subcommand, options)`` of a ``python -m services.<x> [sub...] options`` command line."""
    assert argv[:2] == ["python", "-m"], argv
    module, rest = argv[2], argv[3:]
    sub: list[str] = []
    while module == "services.cli" and rest and not rest[0].startswith("-"):
        sub.append(rest.pop(0))
    return module, tuple(sub), rest


def flag_values(options: list[str]) -> dict[str, str]:
    """Each ``--flag`` with the token after it (or "" when the next is another flag)."""
    out = {}
    for i, token in enumerate(options):
        if token.startswith("--"):
            nxt = options[i + 1] if i + 1 < len(options) else ""
            out[token] = "" if nxt.startswith("--") else nxt
    return out


def check_flags(module: str, sub: tuple[str, ...], options: list[str]) -> None:
    text = help_text(module, *sub)
    for flag in flag_values(options):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
            f"{module} {' '.join(sub)}: {flag} is not in its --help"


def check_env(module: str, sub: tuple[str, ...], names: set[str], argv: list[str]) -> None:
    text = help_text(module, *sub)
    expanded = {m for arg in argv for m in re.findall(r"\$\((\w+)\)", arg)}
    for name in names:
        if name in PROCESS_ENV:
            assert f'"{name}"' in PROCESS_ENV[name].read_text(), f"{name} is no longer read by {PROCESS_ENV[name]}"
            continue
        assert f"${name}" in text or name in expanded, \
            f"{module}: environment variable {name} is neither in its --help nor expanded into its arguments"


def seed_names(workers: list[str]) -> set[str]:
    """The seed file names ``./cy nats permissions --worker W...`` writes."""
    return {bus_auth.seed_path(Path("."), ident).name for ident in bus_permissions.identities(workers)}


# --- Kubernetes ---

def _workloads() -> list[dict]:
    return [d for d in K8S if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers():
    for workload in _workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def _config_maps() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["data"] for d in K8S if d["kind"] == "ConfigMap"}


def _env_names(container: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(_config_maps()[source["configMapRef"]["name"]])
    return names


def _engine_pods() -> list[str]:
    engines = [d for d in K8S if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "cy-engine"]
    return [f"cy-engine-{i}" for d in engines for i in range(d["spec"]["replicas"])]


def test_the_manifests_cover_the_four_services_and_provisioning():
    modules = {invocation(c["command"] + c.get("args", []))[:2] for _, c in _containers()}
    assert modules == {("services.edge", ()), ("services.scheduler", ()), ("services.engine", ()),
                       ("services.trainer", ()), ("services.cli", ("infra", "apply"))}


@pytest.mark.parametrize("name", [c["name"] for _, c in _containers()])
def test_every_flag_and_env_variable_exists_in_the_services_help(name):
    container = next(c for _, c in _containers() if c["name"] == name)
    argv = container["command"] + container.get("args", [])
    module, sub, options = invocation(argv)
    check_flags(module, sub, options)
    check_env(module, sub, _env_names(container), argv)


@pytest.mark.parametrize("name", [c["name"] for _, c in _containers() if c["name"] != "provision"])
def test_ports_and_probes_match_what_the_service_opens_and_serves(name):
    container = next(c for _, c in _containers() if c["name"] == name)
    module, _, options = invocation(container["command"] + container["args"])
    flags = flag_values(options)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    opened = int(flags[PORT_FLAG[module]]) if PORT_FLAG[module] in flags else 8080
    assert set(ports.values()) == {opened}, f"{name} opens {opened}, declares {ports}"
    # The kubelet probes the pod IP: the port must not be bound to loopback.
    assert flags.get(HOST_FLAG.get(module, "--metrics-host")) == "0.0.0.0"
    probes = [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container]
    assert any("httpGet" in p for p in probes), f"{name} has no HTTP health probe"
    for probe in probes:
        action = probe.get("httpGet") or probe["tcpSocket"]
        assert ports.get(action["port"], action["port"]) == opened
        if "httpGet" in probe:
            assert action["path"] in served_paths(module), f"{name} probes {action['path']}, not served"


def test_services_target_the_ports_their_pods_declare():
    for service in (d for d in K8S if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [c for w, c in _containers()
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            declared = {p["name"] for c in pods for p in c["ports"]} | {p["containerPort"] for c in pods
                                                                       for p in c["ports"]}
            assert port["targetPort"] in declared


def test_every_seed_a_pod_mounts_is_the_one_cy_writes_for_its_identity():
    seeds = seed_names(_engine_pods())
    for workload, container in _containers():
        paths = [e["value"] for e in container.get("env", []) if e["name"] == "CY_NATS_NKEY"]
        paths += [v for f, v in flag_values(container.get("args", [])).items() if f == "--nats-nkey"]
        assert paths, f"{container['name']} has no nkey seed"
        pod_names = _engine_pods() if workload["kind"] == "StatefulSet" else [""]
        for path in paths:
            for pod in pod_names:
                assert Path(path.replace("$(POD_NAME)", pod)).name in seeds, path
        items = [i["key"] for v in workload["spec"]["template"]["spec"]["volumes"] if "secret" in v
                 for i in v["secret"].get("items", [])]
        assert items and set(items) <= seeds, items


def test_nats_values_run_three_nodes_with_jetstream_and_provisioning_asks_for_r3():
    values = yaml.safe_load((DEPLOY / "nats-values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True
    job = next(c for w, c in _containers() if w["kind"] == "Job")
    assert flag_values(job["command"])["--replicas"] == "3"
    # The services reach the chart's client Service of release "nats".
    assert _config_maps()["cy-bus"]["CY_NATS_URL"] == "nats://nats:4222"


# --- docker compose ---

def _compose_commands(service: dict) -> list[list[str]]:
    """Each ``python -m ...`` command line a compose service runs (also inside ``sh -c``)."""
    command = service.get("command") or []
    if command[:2] != ["sh", "-c"]:
        return [command] if command[:2] == ["python", "-m"] else []
    lines = []
    for part in command[2].split("&&"):
        tokens = shlex.split(part)
        if tokens[:2] == ["python", "-m"]:
            lines.append(tokens[:tokens.index(">")] if ">" in tokens else tokens)
    return lines


def test_compose_commands_and_environment_exist_in_each_services_help():
    checked = 0
    for name, service in COMPOSE["services"].items():
        for argv in _compose_commands(service):
            module, sub, options = invocation(argv)
            check_flags(module, sub, options)
            check_env(module, sub, set(service.get("environment") or {}), argv)
            checked += 1
    assert checked >= 6  # bus users, provisioning and the four services


def test_compose_health_checks_and_seeds_match_the_code():
    workers = [flag_values(_compose_commands(COMPOSE["services"]["engine"])[0])["--worker-id"]]
    seeds = seed_names(workers)
    for name in ("edge", "scheduler", "engine", "trainer"):
        service = COMPOSE["services"][name]
        module, _, options = invocation(service["command"])
        flags = flag_values(options)
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(service["healthcheck"]["test"]))
        assert url and int(url.group(1)) == int(flags[PORT_FLAG[module]]), name
        assert url.group(2) in served_paths(module)
        assert flags.get(HOST_FLAG.get(module, "--metrics-host")) == "0.0.0.0"
        assert Path(service["environment"]["CY_NATS_NKEY"]).name in seeds
    assert Path(COMPOSE["services"]["provision"]["environment"]["CY_NATS_NKEY"]).name in seeds
