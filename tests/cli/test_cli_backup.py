"""``./cy backup`` / ``./cy restore`` against real nats-servers: what comes back is what was there
(values, revisions, headers, consumer positions, objects), and a corrupted backup writes nothing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from infra import provision
from schemas import names
from services.cli.backup import MANIFEST, plan, restore_backup, take_backup
from services.cli.errors import CliError
from services.cli.progress import TransferProgress
from services.common.natsserver import NatsServer
from tests.infra.test_infra_nats_config import _apply_when_cluster_is_up, cluster  # noqa: F401 - fixture
from tests.support import REPO


async def _fill(js) -> None:
    """Some of everything: KV entries with history, an object, a queued job half consumed, events."""
    models = await js.key_value(names.MODELS_BUCKET)
    await models.put("m1", b'{"id": "m1"}')
    await models.put("m1", b'{"id": "m1", "v": 2}')
    keys = await js.key_value(names.API_KEYS_BUCKET)
    await keys.put("abc123abc123", b'{"name": "alice"}')
    objects = await js.object_store(names.ARTIFACTS_STORE)
    await objects.put("files/file-1", b"x" * 300_000)  # several chunks
    for i in range(3):
        await js.publish(names.TRAIN_SUBMIT, f'{{"id": "job-{i}"}}'.encode(), headers={"Nats-Msg-Id": f"job-{i}"})
    await js.publish(names.train_job_events("job-0"), b'{"type": "status"}')
    sub = await js.pull_subscribe(names.TRAIN_SUBMIT, durable=names.TRAIN_DURABLE, stream=names.TRAIN_STREAM)
    (first,) = await sub.fetch(1)
    await first.ack_sync()  # the trainers' consumer has taken job-0


async def _picture(js) -> dict:
    """What a user of the platform would see of the state _fill wrote."""
    models = await js.key_value(names.MODELS_BUCKET)
    m1 = await models.get("m1")
    objects = await js.object_store(names.ARTIFACTS_STORE)
    train = await js.stream_info(names.TRAIN_STREAM)
    first_left = await js.get_msg(names.TRAIN_STREAM, train.state.first_seq)
    consumer = await js.consumer_info(names.TRAIN_STREAM, names.TRAIN_DURABLE)
    return {"m1": (m1.value, m1.revision), "m1_history": len(await models.history("m1")),
            "key": (await (await js.key_value(names.API_KEYS_BUCKET)).get("abc123abc123")).value,
            "object": (await objects.get("files/file-1")).data,
            "queue": (train.state.messages, first_left.data, first_left.headers.get("Nats-Msg-Id")),
            "consumer_acked": consumer.ack_floor.stream_seq,
            "events": (await js.stream_info(names.TRAIN_EVENTS_STREAM)).state.messages}


async def test_restore_gives_back_what_the_backup_saw(nc, js, nats_server, tmp_path: Path):
    await _fill(js)
    before = await _picture(js)
    backup_dir = tmp_path / "backup"

    manifest = await take_backup(nats_server.url, backup_dir)
    with NatsServer(tmp_path / "other", log_file=tmp_path / "other.log") as empty:
        await restore_backup(empty.url, backup_dir)
        client = await nats.connect(empty.url)
        try:
            after = await _picture(client.jetstream())
            # ./cy up provisions on start: the restored streams match their definitions.
            actions = await provision.apply(client.jetstream())
        finally:
            await client.close()

    assert after == before
    assert before["queue"][0] == 2 and before["consumer_acked"] == 1
    # Every stream and consumer came back as defined; only the skipped memory-backed ones were missing.
    skipped = {names.RATE_STREAM, names.kv_stream(names.WORKERS_BUCKET)}
    assert {a.name for a in actions if a.action != "unchanged"} == skipped
    assert {a.action for a in actions} == {"unchanged", "created"}
    assert [e["stream"] for e in manifest["streams"]] == [t.stream for t in plan()[0]]
    assert {s["stream"] for s in manifest["skipped"]} == {names.RATE_STREAM, names.kv_stream(names.WORKERS_BUCKET)}
    assert manifest["streams"][-1]["stream"] == names.obj_stream(names.ARTIFACTS_STORE)  # referents last


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "remove", "edit_manifest"])
async def test_a_corrupted_backup_is_refused_and_nothing_is_restored(nc, js, nats_server, tmp_path: Path, damage):
    await _fill(js)
    backup_dir = tmp_path / "backup"
    manifest = await take_backup(nats_server.url, backup_dir)
    # The object store is restored last: damage it, so every stream before it would have gone in.
    victim = backup_dir / manifest["streams"][-1]["data"]
    match damage:
        case "flip_a_byte":
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0x01
            victim.write_bytes(bytes(data))
        case "truncate":
            victim.write_bytes(victim.read_bytes()[:-10])
        case "remove":
            victim.unlink()
        case "edit_manifest":
            text = (backup_dir / MANIFEST).read_text()
            (backup_dir / MANIFEST).write_text(text.replace('"messages": 2', '"messages": 3'))

    with NatsServer(tmp_path / "other", log_file=tmp_path / "other.log") as empty:
        with pytest.raises(CliError, match="nothing restored"):
            await restore_backup(empty.url, backup_dir)
        client = await nats.connect(empty.url)
        try:
            streams = await client.jetstream().streams_info()
        finally:
            await client.close()

    assert streams == []


async def test_restore_refuses_a_server_that_already_holds_platform_state(nc, js, nats_server, tmp_path: Path):
    await _fill(js)
    await take_backup(nats_server.url, tmp_path / "backup")

    with pytest.raises(CliError, match="already holds LLM_INFER"):
        await restore_backup(nats_server.url, tmp_path / "backup")
    assert (await _picture(js))["queue"][0] == 2  # untouched


def test_cli_backs_up_and_restores_into_a_state_dir(nc, js, nats_server, tmp_path: Path):
    """The commands as an operator types them; without a terminal, progress is one line per stream."""
    backup_dir = tmp_path / "backup"
    cy = [sys.executable, "-m", "services.cli"]

    done = subprocess.run([*cy, "backup", str(backup_dir), "--nats-url", nats_server.url], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cy: backup ")]
    assert len(lines) == len(plan()[0]) and lines[-1].startswith(f"cy: backup {len(lines)}/{len(lines)} OBJ_")

    state = tmp_path / "state"
    done = subprocess.run([*cy, "restore", str(backup_dir), "--state-dir", str(state)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"restored {len(plan()[0])} streams" in done.stdout and "cy: verify " in done.stderr
    assert (state / "nats" / "jetstream").is_dir()

    again = subprocess.run([*cy, "restore", str(backup_dir), "--state-dir", str(state)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already holds" in again.stderr
    assert json.loads((backup_dir / MANIFEST).read_text())["format"] == "cy-backup/1"


@pytest.mark.slow
async def test_restore_onto_the_three_node_cluster_at_three_replicas(nc, js, nats_server, cluster, tmp_path: Path):
    await _fill(js)
    before = await _picture(js)
    await take_backup(nats_server.url, tmp_path / "backup")
    urls, _ = cluster
    await _apply_when_cluster_is_up(urls[0])  # waits for a meta leader (then clears the server again)
    client = await nats.connect(urls)
    try:
        for info in await client.jetstream().streams_info():
            await client.jetstream().delete_stream(info.config.name)
    finally:
        await client.close()

    await restore_backup(",".join(urls), tmp_path / "backup", replicas=3)
    client = await nats.connect(urls)
    try:
        after = await _picture(client.jetstream())
        replicas = {(await client.jetstream().stream_info(t.stream)).config.num_replicas for t in plan()[0]}
    finally:
        await client.close()

    assert after == before and replicas == {3}


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for out in (Terminal(), io.StringIO()):
        progress = TransferProgress("restore", 2, total_bytes=200, out=out)
        for name in ("A", "B"):
            progress.begin(name)
            progress.advance(100)
            progress.end("ok")
        progress.close()
        text = out.getvalue()
        if isinstance(out, Terminal):
            assert "\r" in text and f"[{'#' * 28}] 100%" in text
        else:
            assert text.splitlines() == ["cy: restore 1/2 A: ok", "cy: restore 2/2 B: ok"]
