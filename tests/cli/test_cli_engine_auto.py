"""``./cy up --engine auto``: the rules, the probe and install commands, and what a switch would start."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from services.cli import engine_auto, engine_switch
from services.cli.engine_auto import AutoChoice, LlamaCppSetup, choose
from services.cli.main import build_parser
from services.cli.nats_auth import prepare
from services.cli.supervisor import ChildSpec, Supervisor
from services.cli.up import UpOptions, resolve_engine, switch_spec, worker_id
from services.common.bus import NatsOptions
from services.common.model_store import default_model_gguf

REPO = Path(__file__).resolve().parents[2]


def test_a_gguf_and_llamacpp_choose_llamacpp_else_transformers():
    assert choose(has_gguf=True, llamacpp_usable=True).engine == "llamacpp"
    assert choose(has_gguf=False, llamacpp_usable=True) == AutoChoice(
        "transformers", "the model ships no GGUF file, which llama.cpp needs")
    assert not choose(has_gguf=False, llamacpp_usable=False).build_llamacpp


def test_a_gguf_without_llamacpp_serves_transformers_and_builds_llamacpp():
    choice = choose(has_gguf=True, llamacpp_usable=False)
    assert choice.engine == "transformers" and choice.build_llamacpp
    assert "building llama.cpp in the background" in choice.reason


def test_the_install_pins_what_the_llamacpp_extra_pins():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["llamacpp"] == [engine_auto.LLAMACPP_REQUIREMENT]
    setup = LlamaCppSetup.from_env({}, python="/venv/bin/python")
    assert setup.install.startswith("nice -n 19 /venv/bin/python -m pip install")
    assert engine_auto.LLAMACPP_REQUIREMENT in setup.install


def test_the_probe_and_install_commands_can_be_replaced(tmp_path: Path):
    flag = tmp_path / "built"
    setup = LlamaCppSetup.from_env({engine_auto.PROBE_ENV: f"test -e {flag}",
                                    engine_auto.INSTALL_ENV: f"touch {flag}"})
    assert not setup.usable()
    flag.touch()
    assert setup.usable()
    real = LlamaCppSetup.from_env({}, python=sys.executable)
    assert real.usable() == (__import__("importlib").util.find_spec("llama_cpp") is not None)


def test_auto_is_the_default_and_resolves_before_anything_starts(tmp_path: Path, capsys):
    assert build_parser().parse_args(["up"]).engine == "auto"
    missing = LlamaCppSetup(probe="false", install="true")
    opts, switching = resolve_engine(UpOptions(state_dir=tmp_path), missing)
    assert (opts.engine, switching) == ("transformers", True)
    assert "engine auto: transformers, because llama-cpp-python is not installed yet" in capsys.readouterr().err
    opts, switching = resolve_engine(UpOptions(state_dir=tmp_path), LlamaCppSetup(probe="true", install="true"))
    assert (opts.engine, switching) == ("llamacpp", False)
    pinned = UpOptions(state_dir=tmp_path, engine="transformers")
    assert resolve_engine(pinned, missing) == (pinned, False)  # an engine asked for by name never switches


def test_the_switched_in_engine_has_its_own_worker_and_nats_user(tmp_path: Path):
    workers = [worker_id("transformers"), worker_id("llamacpp")]
    identities = prepare("nkeys", tmp_path, workers)
    spec = switch_spec(UpOptions(state_dir=tmp_path, engine="transformers"), "nats://x:1", tmp_path / "model",
                       identities=identities)
    argv = list(spec.argv)
    assert spec.name == engine_switch.SWITCH_CHILD
    assert argv[argv.index("--engine") + 1] == "llamacpp"
    assert argv[argv.index("--worker-id") + 1] == worker_id("llamacpp") != worker_id("transformers")
    assert argv[argv.index("--model-path") + 1] == str(default_model_gguf())
    assert argv[argv.index("--nats-nkey") + 1] == identities.nkey(f"engine.{worker_id('llamacpp')}")
    assert "--metrics-port" not in argv and "--metrics-port-takeover" not in argv


def test_the_switched_in_engine_takes_over_the_engines_metrics_port(tmp_path: Path):
    argv = list(switch_spec(UpOptions(state_dir=tmp_path, engine="transformers"), "nats://x:1", tmp_path / "model",
                            metrics_port=9102).argv)
    assert argv[argv.index("--metrics-port") + 1] == "9102" and "--metrics-port-takeover" in argv


@pytest.mark.parametrize("locate_raises", [True, False])
def test_a_model_package_without_its_gguf_has_none(tmp_path: Path, locate_raises: bool):
    def locate() -> Path:
        if locate_raises:
            raise FileNotFoundError("no package")
        return tmp_path / "absent.gguf"
    assert not engine_auto.has_gguf(locate)
    assert engine_auto.has_gguf(default_model_gguf)


async def test_a_failed_build_keeps_the_running_engine(tmp_path: Path):
    sup = Supervisor(tmp_path / "logs", console=None, report=lambda m: None)
    serving = await sup.start(ChildSpec("engine", (sys.executable, "-c", "import time; time.sleep(60)")))
    reports: list[str] = []
    switch = engine_switch.Switch(
        setup=LlamaCppSetup(probe="false", install="echo compiling; echo 'error: no compiler' >&2; exit 3"),
        build_log=tmp_path / "logs" / engine_switch.BUILD_LOG, spec=ChildSpec(engine_switch.SWITCH_CHILD, ("true",)),
        worker="w-llamacpp", model="m", retire="engine", retire_worker="w-transformers", nats=NatsOptions())
    try:
        assert not await engine_switch.build_and_switch(switch, sup, reports.append)
        assert serving.returncode is None and set(sup.children) == {"engine"}
    finally:
        await sup.stop_all()
    assert any("llama.cpp build [" in r and "error: no compiler" in r for r in reports), reports
    assert "the build failed (exit 3" in reports[-1] and "staying on transformers" in reports[-1]
    assert "error: no compiler" in switch.build_log.read_text()
