"""The parts of ./cy up that need no running platform: child commands, readiness, banner, pid file."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from aiohttp import web

from services.cli import pidfile
from services.cli.banner import ready_banner
from services.cli.errors import CliError
from services.cli.readiness import NotReady, wait_until_ready
from services.cli.up import UpOptions, child_specs, http_url, metrics_ports
from services.common.model_store import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_ID, default_model_gguf

REPO = Path(__file__).resolve().parents[2]


def test_children_get_the_flags_their_clis_take(tmp_path: Path):
    opts = UpOptions(state_dir=tmp_path, port=8099, host="127.0.0.1", slots=4, engine="transformers")

    specs = child_specs(opts, "nats://127.0.0.1:4999", tmp_path / "model", python="py")

    assert [s.name for s in specs] == ["engine", "scheduler", "trainer", "edge"]
    engine, scheduler, trainer, edge = (list(s.argv) for s in specs)
    assert engine[:3] == ["py", "-m", "services.engine"]
    for flag, value in (("--nats-url", "nats://127.0.0.1:4999"), ("--engine", "transformers"),
                        ("--model-path", str(tmp_path / "model")), ("--model-id", DEFAULT_MODEL_ID),
                        ("--slots", "4")):
        assert engine[engine.index(flag) + 1] == value
    assert [engine[i + 1] for i, a in enumerate(engine) if a == "--alias"] == DEFAULT_MODEL_ALIASES
    worker = engine[engine.index("--worker-id") + 1]
    assert worker and all(c.isalnum() or c in "-_" for c in worker)
    assert scheduler == ["py", "-m", "services.scheduler", "--nats-url", "nats://127.0.0.1:4999",
                         "--drain-timeout", "10.0"]
    assert edge == ["py", "-m", "services.edge", "--nats-url", "nats://127.0.0.1:4999",
                    "--host", "127.0.0.1", "--port", "8099", "--shutdown-timeout", "10.0"]
    assert trainer == ["py", "-m", "services.trainer", "--nats-url", "nats://127.0.0.1:4999",
                       "--state-dir", str(tmp_path), "--data-dir", str(tmp_path / "datasets")]
    # Every graceful-stop budget is shorter than the supervisor's SIGKILL deadline.
    assert float(engine[engine.index("--drain-timeout") + 1]) < opts.stop_timeout


def test_metrics_ports_go_to_the_services_that_get_them(tmp_path: Path):
    specs = child_specs(UpOptions(state_dir=tmp_path), "nats://x:1", tmp_path,
                        metrics={"scheduler": 9101, "engine": 9102, "trainer": 9103})
    argv = {s.name: list(s.argv) for s in specs}
    for name, port in (("scheduler", "9101"), ("engine", "9102"), ("trainer", "9103")):
        assert argv[name][argv[name].index("--metrics-port") + 1] == port
    assert "--metrics-port" not in argv["edge"]  # the edge serves /metrics on its HTTP port


def test_a_busy_metrics_port_is_skipped_and_zero_turns_them_off(tmp_path: Path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        base = busy.getsockname()[1]
        ports = metrics_ports(UpOptions(state_dir=tmp_path, metrics_port=base, trainer=False))
    assert "scheduler" not in ports and "trainer" not in ports
    assert f"port {base} is busy" in capsys.readouterr().err
    assert metrics_ports(UpOptions(state_dir=tmp_path, metrics_port=0)) == {}


def test_the_llamacpp_engine_gets_the_shipped_gguf(tmp_path: Path):
    engine = list(child_specs(UpOptions(state_dir=tmp_path, engine="llamacpp"), "nats://x:1", tmp_path)[0].argv)
    assert engine[engine.index("--engine") + 1] == "llamacpp"
    assert engine[engine.index("--model-path") + 1] == str(default_model_gguf())


def test_the_trainer_can_be_left_out(tmp_path: Path):
    specs = child_specs(UpOptions(state_dir=tmp_path, trainer=False), "nats://x:1", tmp_path)

    assert [s.name for s in specs] == ["engine", "scheduler", "edge"]


def test_slots_are_left_to_the_engine_unless_given(tmp_path: Path):
    engine = child_specs(UpOptions(state_dir=tmp_path), "nats://x:1", tmp_path)[0]

    assert "--slots" not in engine.argv


def test_a_wildcard_bind_is_reached_through_loopback():
    assert http_url("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert http_url("::", 8080) == "http://[::1]:8080"
    assert http_url("127.0.0.1", 9000) == "http://127.0.0.1:9000"


def test_banner_shows_urls_examples_and_the_missing_auth():
    text = ready_banner("http://127.0.0.1:8080", "nats://127.0.0.1:4222", DEFAULT_MODEL_ID, DEFAULT_MODEL_ALIASES,
                        "127.0.0.1", ".cy/logs")

    assert "http://127.0.0.1:8080/v1" in text and "nats://127.0.0.1:4222" in text
    assert "curl -s http://127.0.0.1:8080/v1/chat/completions" in text
    assert f'"model": "{DEFAULT_MODEL_ID}"' in text
    assert 'OpenAI(base_url="http://127.0.0.1:8080/v1"' in text
    assert "loopback" in text and "no authentication" in text


def test_banner_warns_when_listening_beyond_loopback():
    text = ready_banner("http://127.0.0.1:8080", "nats://127.0.0.1:4222", DEFAULT_MODEL_ID, [], "0.0.0.0", "logs")

    assert "WARNING: listening on 0.0.0.0 with no authentication" in text


@pytest.fixture
async def fake_edge():
    """An HTTP server standing in for the edge: unhealthy, then healthy without the model, then ready."""
    state = {"healthy": False, "models": [], "auth": False}

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": state["healthy"], "models": state["models"]},
                                 status=200 if state["healthy"] else 503)

    async def models(request: web.Request) -> web.Response:
        if state["auth"]:
            return web.json_response({"error": {"code": "invalid_api_key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in state["models"]]})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


async def test_ready_only_once_healthy_and_the_model_is_listed(fake_edge):
    url, state = fake_edge
    with pytest.raises(NotReady, match="GET /healthz answered 503"):
        await wait_until_ready(url, [DEFAULT_MODEL_ID], timeout=0.3, interval=0.05)
    state["healthy"] = True
    with pytest.raises(NotReady, match=re.escape(f"does not list '{DEFAULT_MODEL_ID}'")):
        await wait_until_ready(url, [DEFAULT_MODEL_ID], timeout=0.3, interval=0.05)
    state["models"] = [DEFAULT_MODEL_ID]

    await wait_until_ready(url, [DEFAULT_MODEL_ID], timeout=5, interval=0.05)


async def test_with_auth_on_the_open_health_list_decides(fake_edge):
    """``./cy up --auth keys``: the launcher holds no key, so /v1/models answers 401; /healthz lists the models."""
    url, state = fake_edge
    state.update(healthy=True, auth=True)
    with pytest.raises(NotReady, match=re.escape(f"does not list '{DEFAULT_MODEL_ID}'")):
        await wait_until_ready(url, [DEFAULT_MODEL_ID], timeout=0.3, interval=0.05)
    state["models"] = [DEFAULT_MODEL_ID]

    await wait_until_ready(url, [DEFAULT_MODEL_ID], timeout=5, interval=0.05)


async def test_not_ready_when_nothing_answers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connections are refused

        with pytest.raises(NotReady, match=re.escape(f"no HTTP answer at {url}")):
            await wait_until_ready(url, [DEFAULT_MODEL_ID], timeout=0.2, interval=0.05)


@pytest.fixture
def lookalike_launcher():
    """A process whose command line looks like a running ``python -m services.cli up``."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "services.cli", "up"])
    deadline = time.monotonic() + 10
    while pidfile.running_launcher(proc.pid) is None:  # its cmdline shows once exec is done
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_up_with_the_same_state_dir_is_refused(tmp_path: Path, lookalike_launcher):
    pidfile.pid_file(tmp_path).write_text(f"{lookalike_launcher.pid}\n")

    refused = rf"already running .* \(pid {lookalike_launcher.pid}\)"
    with pytest.raises(CliError, match=refused), pidfile.claim(tmp_path):
        pass


def test_claim_writes_and_removes_the_pid_file(tmp_path: Path):
    with pidfile.claim(tmp_path / "state") as path:
        assert pidfile.read_pid(path) == os.getpid()
    assert not path.exists()


def test_down_stops_the_launcher_and_waits_for_it(tmp_path: Path, lookalike_launcher):
    pidfile.pid_file(tmp_path).write_text(f"{lookalike_launcher.pid}\n")

    message = pidfile.stop_launcher(tmp_path, timeout=10)

    assert message == f"stopped ./cy up (pid {lookalike_launcher.pid})"
    # stop_launcher waited for (and, the process being ours here, reaped) it: it is gone.
    assert not psutil.pid_exists(lookalike_launcher.pid)


def test_an_unrelated_process_in_the_pid_file_is_left_alone(tmp_path: Path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile.pid_file(tmp_path).write_text(f"{other.pid}\n")

        message = pidfile.stop_launcher(tmp_path, timeout=1)

        assert "nothing is running" in message
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_crashed_runs_trainer_scratch_is_removed_and_a_live_ones_kept(tmp_path: Path):
    from schemas.names import slug

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process (unless reused, which the function would respect)
    host = socket.gethostname()
    scratch = {name: tmp_path / "trainer" / slug(f"trainer-{host}-{pid}")
               for name, pid in (("dead", dead.pid), ("alive", os.getpid()))}
    scratch["named"] = tmp_path / "trainer" / "my-trainer-1"  # --trainer-id: not ours to judge
    for path in scratch.values():
        (path / "ftjob-x" / "checkpoint-2").mkdir(parents=True)

    removed = pidfile.remove_dead_trainer_scratch(tmp_path)

    assert removed == [scratch["dead"]] and not scratch["dead"].exists()
    assert scratch["alive"].exists() and scratch["named"].exists()
    assert pidfile.remove_dead_trainer_scratch(tmp_path / "no-such-state") == []


def test_up_passes_auth_to_the_edge_and_says_how_to_get_a_key(tmp_path: Path):
    edge = list(child_specs(UpOptions(state_dir=tmp_path, host="0.0.0.0", auth="keys"), "nats://x:1", tmp_path)[-1].argv)
    assert edge[edge.index("--auth") + 1] == "keys"
    text = ready_banner("http://127.0.0.1:8080", "nats://127.0.0.1:4222", DEFAULT_MODEL_ID, [], "0.0.0.0", "logs",
                        auth="keys")
    assert "./cy keys create" in text and "Authorization: Bearer" in text and "no authentication" not in text


def test_up_refuses_to_serve_beyond_loopback_without_auth(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--host", "0.0.0.0", "--state-dir",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "refusing to serve on 0.0.0.0 without authentication: add --auth keys" in result.stderr
    assert not (tmp_path / "cy-up.pid").exists()
