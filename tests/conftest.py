"""Shared fixtures: a real nats-server per test, provisioned with infra/nats/jetstream.toml."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest

from infra import provision
from services.common.model_store import default_state_dir, ensure_default_model
from services.common.natsserver import NatsServer

REPO = Path(__file__).resolve().parents[1]

# A `./cy up` started by a test on a machine without llama-cpp-python would compile it into the shared venv in
# the background (--engine auto): tests never install anything, so there the "build" fails at once and the
# platform stays on transformers. The engine-switch test sets its own command.
os.environ.setdefault("CY_LLAMACPP_INSTALL", "echo 'tests do not install llama-cpp-python' >&2; exit 1")


@pytest.fixture
def nats_server(tmp_path: Path):
    """A fresh nats-server with JetStream on a free loopback port, its store in ``tmp_path``."""
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer):
    """A client connected to ``nats_server``, with every stream, consumer and bucket applied."""
    client = await nats.connect(nats_server.url, name="pytest")
    await provision.apply(client.jetstream())
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def js(nc):
    """JetStream context of ``nc``."""
    return nc.jetstream()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's safetensors copy (converted once into the state directory, then reused)."""
    return ensure_default_model(default_state_dir())
