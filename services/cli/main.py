"""Argument parsing of the operator CLI (``./cy``, ``python -m services.cli``, ``cy-llm``).

Each subcommand is a thin call into ``services.cli.up`` or ``services.cli.commands``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.cli import backup, batch, bus_tls, commands, keys, nats_auth, train
from services.cli.errors import CliError
from services.cli.up import ENGINES, UpOptions, run_up, worker_id
from services.common.bus import add_nats_arguments, options_from_args
from services.common.lifecycle import setup_logging
from services.common.model_store import DEFAULT_MODEL_ID, default_state_dir
from services.common.natsserver import SYNC_POLICIES

SERVICES = ("edge", "scheduler", "engine", "trainer")
EXAMPLES = """\
examples:
  ./cy up                          start everything on http://127.0.0.1:8080 (Ctrl-C stops it)
  ./cy down                        stop a running ./cy up
  ./cy up --nats-cluster 3         the same on three local NATS nodes (R3): survives losing one
  ./cy run scheduler --nats-url nats://a:4222,nats://b:4222,nats://c:4222   one service, on this host
  ./cy test                        run the whole test suite
  ./cy test tests/cli/test_cli_main.py -k help -x
  ./cy keys create --name alice --scope inference [--rpm 60 --tpm 100000 --max-streams 4]
  ./cy train start --model M --file data.jsonl --follow
  ./cy batch submit requests.jsonl --follow
  ./cy backup backups/today       snapshot all platform state while it runs
  ./cy restore backups/today       rebuild it into an empty state dir (then ./cy up)
  ./cy infra apply --replicas 3 --nats-url nats://127.0.0.1:14222,nats://127.0.0.1:14223
  ./cy nats permissions            what each service's NATS user may publish and subscribe to
  ./cy nats site tokyo --worker tokyo-gpu0 --hub nats-leaf://hub:7422   a site's leaf node config
"""


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="models, NATS store, logs and pid file (default: $CY_STATE_DIR or .cy in the repo)")


def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start NATS, scheduler, engine and edge; serve until Ctrl-C",
                       description="Start the platform on this machine: the default model "
                       f"({DEFAULT_MODEL_ID}), an embedded nats-server, then engine, scheduler, trainer and edge "
                       "as separate processes. Waits until the edge answers, prints how to call it, "
                       "and serves until Ctrl-C/SIGTERM (or ./cy down). The bus authenticates every service "
                       "(--nats-auth nkeys); the HTTP edge is open on loopback, no authentication, "
                       "unless --auth keys (required for any other --host).")
    p.add_argument("--port", type=int, default=8080, help="HTTP port of the edge (default: 8080)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address of the edge (default: 127.0.0.1)")
    p.add_argument("--auth", choices=("none", "keys"), default="none",
                   help="edge authentication: none (loopback only) or API keys from ./cy keys (default: none)")
    p.add_argument("--nats-port", type=int, default=4222, metavar="PORT",
                   help="client port of the embedded nats-server (default: 4222; -1: any free port)")
    p.add_argument("--nats-cluster", type=int, choices=(1, 3, 5), default=1, metavar="N",
                   help="start N routed nats-server nodes (3 or 5) instead of one, on client ports --nats-port, "
                        "+1, +2 (any free ones with --nats-port -1), a store each under the state dir, every "
                        "stream and bucket at R3: losing a node loses nothing (default: 1)")
    add_nats_arguments(p, url_from_env=False, nkey_help="with --nats-url and --nats-auth none: the nkey seed "
                       "to provision that server with (--nats-auth nkeys uses the state dir's operator seed)")
    p.add_argument("--nats-auth", choices=nats_auth.AUTH_MODES, default="nkeys",
                   help="the bus: nkeys (every service its own NATS user with least-privilege permissions; seeds "
                        "under <state dir>/nats/nkeys, created on first run; on every node of --nats-cluster) or "
                        "none (no authentication: a development bus on loopback only) (default: nkeys)")
    p.add_argument("--nats-tls", choices=bus_tls.TLS_MODES, default="auto",
                   help="TLS on the embedded nats-server(s), for clients and between nodes (verified routes): "
                        "auto (on with --nats-cluster, off for a single loopback node), on, or off (default: auto). "
                        "The CA and node certificate are generated under <state dir>/nats/tls on first run; bring "
                        "your own with --nats-tls-ca CA --nats-tls-cert CERT --nats-tls-key KEY (without "
                        "--nats-url these are the embedded nodes' CA, certificate and key; see docs/security.md)")
    p.add_argument("--nats-tls-san", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP address the generated node certificate is valid for (repeatable; "
                        "localhost, 127.0.0.1, ::1 and this host's name always are)")
    p.add_argument("--nats-encrypt", action="store_true",
                   help="encrypt the embedded JetStream store at rest (ChaCha20-Poly1305) with the key in "
                        "$CY_NATS_JS_KEY, else one generated into <state dir>/nats/jetstream.key (0600); a store once "
                        "encrypted stays so (see docs/security.md)")
    p.add_argument("--fsync", choices=SYNC_POLICIES, default="always",
                   help="when the embedded nats-server flushes JetStream to disk: always (before acknowledging "
                        "a write: no acknowledged write lost on an OS crash or power failure) or interval (every "
                        "two minutes, the nats-server default: about twice as fast per publish; see "
                        "docs/reliability.md) (default: always)")
    _state_dir_arg(p)
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="engine backend (default: auto, the same on CUDA and other hosts: llamacpp when the model "
                        "ships a GGUF and llama-cpp-python is installed; otherwise transformers, and when only "
                        "llama-cpp-python is missing, up builds it in the background (log: <state dir>/logs/"
                        "llamacpp-build.log) and then switches to llamacpp without losing a request; transformers, "
                        "llamacpp or vllm: that engine, never switched; ./cy installs the llamacpp or vllm extra "
                        "first when asked for one)")
    p.add_argument("--slots", type=int, default=None, metavar="N",
                   help="concurrent generations of the engine (default: the engine's own)")
    p.add_argument("--ready-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait for the edge to answer (default: 120)")
    p.add_argument("--quiet", action="store_true", help="do not echo the services' output (it still goes to the logs)")
    p.add_argument("--metrics-port", type=int, default=9101, metavar="PORT",
                   help="Prometheus metrics of the scheduler on PORT, the engine on PORT+1, the trainer on "
                        "PORT+2, as infra/prometheus/prometheus.yml expects (default: 9101; 0: none; the edge "
                        "serves /metrics on its HTTP port)")
    p.add_argument("--no-trainer", dest="trainer", action="store_false",
                   help="do not start a trainer (fine-tuning jobs then wait in the queue)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``cy`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="cy", description="CY-LLM operator CLI: run the platform, provision NATS, run the tests.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(sub)

    p = sub.add_parser("down", help="stop a running ./cy up", description="SIGTERM the ./cy up named in "
                       "<state dir>/cy-up.pid and wait until it has stopped everything.")
    _state_dir_arg(p)
    p.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS",
                   help="how long to wait for it to exit (default: 90)")

    infra = sub.add_parser("infra", help="NATS JetStream provisioning").add_subparsers(
        dest="infra_command", required=True, metavar="ACTION")
    p = infra.add_parser("apply", help="create missing streams, consumers and buckets; verify the rest",
                         description="Apply infra/nats/jetstream.toml idempotently. A definition that "
                         "differs from the server is refused (exit status 2) unless --update, which applies "
                         "only changes that keep all data.")
    nats_auth.add_operator_nats_arguments(p)
    p.add_argument("--update", action="store_true",
                   help="apply changed limits and replica counts instead of refusing them (no data is lost)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="replicas of every stream, KV bucket and the object store (3 on a 3-node cluster); "
                        "a different count on the server is refused unless --update (default: keep what the "
                        "server has, 1 for new objects)")

    nats = sub.add_parser("nats", help="the bus's users and permissions").add_subparsers(
        dest="nats_command", required=True, metavar="ACTION")
    p = nats.add_parser("permissions", help="print what each bus identity may publish and subscribe to",
                        description="Print the NATS permissions of every identity (edge, scheduler, one per engine "
                        "worker, trainer, operator, producer), derived from schemas/names.py: what ./cy up "
                        "enforces. --format conf prints the server's authorization block for the seeds of "
                        "--state-dir (for a nats-server you run yourself).")
    _state_dir_arg(p)
    p.add_argument("--worker", action="append", default=None, metavar="ID",
                   help="an engine worker id (repeatable; default: the one ./cy up starts on this machine)")
    p.add_argument("--engine", choices=[e for e in ENGINES if e != "auto"], default="transformers",
                   help="the engine whose ./cy up worker id is the default (default: transformers)")
    p.add_argument("--format", choices=("table", "conf"), default="table",
                   help="table: subjects per identity; conf: nats-server authorization block (default: table)")
    p = nats.add_parser("rotate", help="give one bus identity a new nkey seed",
                        description="Replace IDENTITY's seed under <state dir>/nats/nkeys and rewrite the embedded "
                        "server's config: from the next ./cy up the old key is refused. Refused while ./cy up "
                        "runs (a running service cannot switch seeds): ./cy down first.")
    _state_dir_arg(p)
    p.add_argument("identity", metavar="IDENTITY",
                   help="edge, scheduler, trainer, operator, producer or engine.<worker> (see ./cy nats permissions)")

    p = nats.add_parser("site", help="write the NATS leaf node config of a site; print the hub's user for it",
                        description="A site's engines connect only to its own NATS leaf node, which joins the hub "
                        "(JetStream, edges, schedulers) as the site's user: exactly what the site's engines may do. "
                        "Writes <state dir>/nats/site-SITE.conf (mode 0600) with the engines' users and the leaf "
                        "remote, creates the seeds (site.SITE, engine.WORKER) under <state dir>/nats/nkeys, and "
                        "prints the user every hub node adds to its authorization block. See docs/scaling.md.")
    _state_dir_arg(p)
    p.add_argument("site", metavar="SITE", help="the site's name (a subject token: letters, digits, - and _)")
    p.add_argument("--worker", action="append", required=True, metavar="ID",
                   help="an engine worker id at the site (repeatable; each engine runs with --worker-id ID)")
    p.add_argument("--hub", required=True, metavar="URL[,URL...]",
                   help="the hub nodes' leaf node listeners, e.g. nats-leaf://hub-a:7422,nats-leaf://hub-b:7422")
    p.add_argument("--hub-domain", default="hub", metavar="DOMAIN",
                   help="the hub's JetStream domain (jetstream { domain: DOMAIN } on every hub node) (default: hub)")
    p.add_argument("--listen", default="0.0.0.0:4222", metavar="HOST:PORT",
                   help="where the leaf node takes the site's engines (default: 0.0.0.0:4222)")

    keys.add_parser(sub)
    train.add_parser(sub)
    batch.add_parser(sub)
    backup.add_parsers(sub, _state_dir_arg)

    model = sub.add_parser("model", help="the local model store").add_subparsers(
        dest="model_command", required=True, metavar="ACTION")
    p = model.add_parser("install", help=f"convert the default model ({DEFAULT_MODEL_ID}) once; print its path")
    _state_dir_arg(p)

    p = sub.add_parser("run", help="run one service in the foreground (one host of a multi-host deployment)",
                       usage="cy run {edge,scheduler,engine,trainer} [service options...]",
                       description="Become python -m services.<service> with the given options, e.g. "
                       "'cy run scheduler --nats-url nats://a:4222,nats://b:4222'. No NATS is started and "
                       "nothing is provisioned (run ./cy infra apply once). 'cy run edge --help' lists its options.")
    p.add_argument("service", choices=SERVICES, help="the service to run")
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="its options")

    p = sub.add_parser("test", help="run the test suite (pytest); extra arguments go to pytest",
                       usage="cy test [pytest args...]",
                       description="Convert the default model if needed, then run python -m pytest with the "
                       "given arguments (default: the whole suite) and exit with its status. "
                       "Use 'cy test -- --help' for pytest's own help.")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; everything after ``test`` goes to pytest untouched."""
    # argparse would claim pytest's options (-x, -k) as its own; hand them over verbatim.
    if argv[:1] == ["test"] and argv[1:2] not in (["-h"], ["--help"]):
        return argparse.Namespace(command="test", pytest_args=list(argv[1:]))
    if argv[:1] == ["run"] and argv[1:2] and argv[1] in SERVICES:  # its --help too is the service's own
        return argparse.Namespace(command="run", service=argv[1], service_args=list(argv[2:]))
    return build_parser().parse_args(argv)


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    state_dir = getattr(args, "state_dir", None) or default_state_dir()
    if args.command != "up" and hasattr(args, "nats_tls_ca") and not args.nats_tls_ca:
        args.nats_tls_ca = bus_tls.state_ca(state_dir)  # a TLS ./cy up's nodes are trusted without the flag
    match args.command:
        case "up":
            return run_up(UpOptions(state_dir=state_dir, port=args.port, host=args.host, nats_port=args.nats_port,
                                    nats=options_from_args(args) if args.nats_url else None,
                                    nats_cluster=args.nats_cluster, engine=args.engine, slots=args.slots,
                                    ready_timeout=args.ready_timeout, quiet=args.quiet, auth=args.auth,
                                    nats_auth=args.nats_auth,
                                    trainer=args.trainer, metrics_port=args.metrics_port, fsync=args.fsync,
                                    nats_tls=args.nats_tls, nats_tls_files=bus_tls.own_files(args),
                                    nats_tls_sans=tuple(args.nats_tls_san), nats_encrypt=args.nats_encrypt))
        case "down":
            return commands.down(state_dir, args.timeout)
        case "infra":
            return commands.infra_apply(options_from_args(args), args.update, args.replicas)
        case "nats" if args.nats_command == "site":
            return commands.nats_site(state_dir, args.site, args.worker, args.hub, args.hub_domain, args.listen)
        case "nats" if args.nats_command == "rotate":
            return commands.nats_rotate(state_dir, args.identity)
        case "nats":
            return commands.nats_permissions(state_dir, args.worker or [worker_id(args.engine)], args.format)
        case "keys":
            return keys.run(args)
        case "train":
            return train.run(args)
        case "batch":
            return batch.run(args)
        case "backup":
            return backup.run_backup(args)
        case "restore":
            return backup.run_restore(args, state_dir)
        case "model":
            return commands.model_install(state_dir)
        case "test":
            return commands.run_tests(args.pytest_args)
        case "run":
            return commands.run_service(args.service, args.service_args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse only lets known commands through


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn a ``CliError`` into ``cy: error: ...`` and its exit status."""
    args = parse(list(sys.argv[1:] if argv is None else argv))
    setup_logging("cy")
    try:
        return dispatch(args)
    except CliError as exc:
        print(f"cy: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
