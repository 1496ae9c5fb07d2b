"""JetStream encryption at rest (``./cy up --nats-encrypt``) on a real nats-server.

A prompt queued in ``LLM_INFER`` is not in the store's files in clear text when the store is
encrypted (and is, in a plain store: the check can fail); the encrypted store reads back after a
restart with its key; a config reload (new API key users) keeps the cipher.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import nats
import pytest

from infra import provision
from schemas import names
from schemas.events import encode
from schemas.inference import InferenceRequest
from services.cli import nats_auth, store_key
from services.cli.errors import CliError
from services.cli.up import NATS_CONFIG
from services.common.natsserver import EFFECTIVE_CONFIG, STORE_KEY_ENV, NatsServer, is_encrypted


def _server(tmp_path: Path, key: str | None) -> NatsServer:
    return NatsServer(tmp_path / "nats", config=NATS_CONFIG, log_file=tmp_path / "nats.log", sync="always",
                      store_key=key)


async def _queue_prompt(url: str, secret: str) -> None:
    nc = await nats.connect(url)
    try:
        await provision.apply(nc.jetstream())
        req = InferenceRequest(id=f"r-{uuid.uuid4().hex[:8]}", model="m", reply_to="_INBOX.t.r", prompt=secret)
        await nc.jetstream().publish(names.infer_submit("normal"), encode(req))
    finally:
        await nc.close()


def _files_holding(store: Path, secret: bytes) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.parametrize("encrypted", [True, False])
async def test_a_queued_prompt_is_not_in_the_store_files_in_clear_text(tmp_path: Path, encrypted: bool):
    secret = f"my-secret-prompt-{uuid.uuid4().hex}"
    key = "k" * 43 if encrypted else None
    with _server(tmp_path, key) as server:
        await _queue_prompt(server.url, secret)
    store = tmp_path / "nats" / "jetstream"
    holding = _files_holding(store, secret.encode())
    assert (holding == []) is encrypted, holding
    if not encrypted:
        return
    with _server(tmp_path, key) as server:  # with its key, the encrypted store reads back
        nc = await nats.connect(server.url)
        try:
            msg = await nc.jetstream().get_last_msg(names.INFER_STREAM, names.infer_submit("normal"))
            assert secret.encode() in msg.data
        finally:
            await nc.close()


async def test_a_reload_for_new_users_keeps_the_cipher(tmp_path: Path):
    with _server(tmp_path, "k" * 43) as server:
        copy = tmp_path / "nats" / EFFECTIVE_CONFIG
        assert is_encrypted(copy.read_text())
        node = nats_auth.RunningNode(server.proc.pid, tmp_path / "nats", tmp_path / "nats.log")
        nats_auth._refresh_copy(node, NATS_CONFIG)  # what ./cy keys create --nats does to a running node
        assert is_encrypted(copy.read_text())
        nats_auth._reload(node.pid, node.log)  # a dropped cipher is refused by nats-server: no "Reloaded"


def test_the_store_key_is_generated_once_private_and_kept_without_the_flag(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(STORE_KEY_ENV, raising=False)
    assert store_key.store_key(tmp_path, wanted=False) is None
    key = store_key.store_key(tmp_path, wanted=True)
    path = tmp_path / "nats" / store_key.KEY_FILE
    assert key and (path.stat().st_mode & 0o777) == 0o600
    assert store_key.store_key(tmp_path, wanted=False) == key  # encrypted once, encrypted after
    other = tmp_path / "other"
    monkeypatch.setenv(STORE_KEY_ENV, "from-a-secret-manager")
    assert store_key.store_key(other, wanted=True) == "from-a-secret-manager"
    assert not (other / "nats" / store_key.KEY_FILE).exists()
    monkeypatch.delenv(STORE_KEY_ENV)
    with pytest.raises(CliError, match=STORE_KEY_ENV):
        store_key.store_key(other, wanted=False)
