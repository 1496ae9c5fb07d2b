"""``./cy backup DIR`` and ``./cy restore DIR``: all platform state, out of NATS and back in.

What is covered: every file-backed stream, KV bucket and object store in
``infra/nats/jetstream.toml`` (jobs and their events, the training queue with its consumers,
files, checkpoints and adapters, the model registry, API keys, idempotency records, the prompt
cache, scheduler settings, queued inference requests). Memory-backed ones (engine heartbeats,
rate-limit windows) are skipped by design: they rebuild themselves within seconds.

Each stream is copied with the server's own snapshot (``services.cli.snapshot`` says why), which
is consistent per stream. Across streams, a backup is a consistent cut only if no platform state
changed while it ran: the last sequence of every stream that holds references (a job names its
file, a registered model its adapter) is read before and after, and the whole backup is taken
again if one moved. Streams that are history or disposable (events, caches, queued inference
requests) are not waited for.

Layout of DIR: ``streams/<STREAM>.json`` (config and state as the server reported them),
``streams/<STREAM>.snapshot`` (the server's snapshot bytes), ``manifest.json`` (what is there,
with a SHA-256 and size per file; written last, so an interrupted backup has none) and
``manifest.json.sha256``. ``restore`` checks every checksum before it writes anything and
refuses a server that already holds any of the streams; if the server fails part-way, the streams
it had restored are deleted again, so nothing is left half restored.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from infra import provision
from schemas import names
from services.cli import pidfile
from services.cli.errors import CliError
from services.cli.infra import connect_once
from services.cli.nats_auth import add_operator_nats_arguments
from services.common.bus import NatsOptions, as_options, options_from_args
from services.cli.progress import TransferProgress, human_bytes
from services.cli.snapshot import SnapshotError, file_chunks, restore_stream, snapshot_stream

FORMAT = "cy-backup/1"
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.json.sha256"
# How long restore waits for the followers of a replicated stream to catch up.
REPLICATION_TIMEOUT = 120.0
# Changes to these never leave a dangling reference in another stream: history (events), queued
# inference requests (short-lived, refer to nothing backed up), caches, and stored responses (a response
# names only earlier ones, already written). A backup does not wait for them.
_NOT_AWAITED = frozenset({names.INFER_STREAM, names.TRAIN_EVENTS_STREAM, names.kv_stream(names.PROMPT_CACHE_BUCKET),
                          names.kv_stream(names.IDEMPOTENCY_BUCKET), names.kv_stream(names.RESPONSES_BUCKET)})


@dataclass(frozen=True)
class Target:
    """One JetStream stream to back up: its name, and what it is to the platform (kind, name)."""

    stream: str
    kind: str
    name: str


def plan(definitions: dict[str, Any] | None = None) -> tuple[list[Target], list[tuple[Target, str]]]:
    """The streams to back up, in snapshot order, and the skipped ones with the reason.

    Order: queues and streams, then KV buckets, then object stores last, so anything a job record
    or registry entry names was already written when its store is copied.
    """
    defs = definitions if definitions is not None else provision.load_definitions()
    kinds = (("streams", "stream", lambda n: n), ("kv", "kv", names.kv_stream),
             ("object_stores", "object_store", names.obj_stream))
    chosen, skipped = [], []
    for section, kind, stream_of in kinds:
        for name, d in defs.get(section, {}).items():
            target = Target(stream_of(name), kind, name)
            if d.get("storage", "file") == "memory":
                skipped.append((target, "memory storage: volatile by design, rebuilt by the services within seconds"))
            else:
                chosen.append(target)
    return chosen, skipped


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


# --- backup -------------------------------------------------------------------------------------

async def _last_seqs(nc: Client, targets: list[Target]) -> dict[str, int]:
    js = nc.jetstream()
    out = {}
    for t in targets:
        try:
            out[t.stream] = (await js.stream_info(t.stream)).state.last_seq
        except NotFoundError:
            raise CliError(f"{t.kind} {t.name} (stream {t.stream}) does not exist on the server: "
                           "is this a CY-LLM platform? (./cy infra apply creates it)") from None
    return out


async def _snapshot_all(nc: Client, out_dir: Path, targets: list[Target]) -> list[dict[str, Any]]:
    """Snapshot every target into ``out_dir/streams``; one manifest entry per stream."""
    streams_dir = out_dir / "streams"
    streams_dir.mkdir(parents=True, exist_ok=True)
    progress = TransferProgress("backup", len(targets))
    entries = []
    try:
        for t in targets:
            progress.begin(t.stream)
            data = streams_dir / f"{t.stream}.snapshot"
            with data.open("wb") as sink:
                meta = await snapshot_stream(nc, t.stream, sink, progress.advance)
            (streams_dir / f"{t.stream}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            state = meta["state"]
            entries.append({"stream": t.stream, "kind": t.kind, "name": t.name, "messages": state.get("messages", 0),
                            "bytes": state.get("bytes", 0), "consumers": state.get("consumer_count", 0),
                            "meta": f"streams/{t.stream}.json", "data": f"streams/{t.stream}.snapshot"})
            progress.end(f"{state.get('messages', 0)} messages, {human_bytes(state.get('bytes', 0))}, "
                         f"{state.get('consumer_count', 0)} consumers")
    finally:
        progress.close()
    return entries


async def take_backup(url: NatsOptions | str, out_dir: Path, attempts: int = 5, nkey: str = "") -> dict[str, Any]:
    """Write a backup of the platform at ``url`` (as the operator: ``nkey``) into ``out_dir``; its manifest."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CliError(f"{out_dir} is not empty: back up into a new directory")
    targets, skipped = plan()
    awaited = [t for t in targets if t.stream not in _NOT_AWAITED]
    nc = await connect_once(url, "cy-backup", nkey=nkey)
    try:
        for attempt in range(1, attempts + 1):
            before = await _last_seqs(nc, targets)
            entries = await _snapshot_all(nc, out_dir, targets)
            after = await _last_seqs(nc, awaited)
            moved = [s for s, seq in after.items() if seq != before[s]]
            if not moved:
                break
            print(f"cy: backup attempt {attempt}/{attempts}: {', '.join(moved)} changed while it ran; "
                  "taking it again for a consistent cut", flush=True)
        else:
            raise CliError(f"the platform kept changing ({', '.join(moved)}) during {attempts} attempts; "
                           "no consistent backup written: retry when jobs are not changing state, or raise --attempts")
        version = str(nc.connected_server_version)
    except (SnapshotError, nats.errors.Error, TimeoutError) as exc:
        raise CliError(f"backup failed: {exc or type(exc).__name__}; {out_dir} is not a backup") from None
    finally:
        await nc.close()
    return _write_manifest(out_dir, entries, skipped, version)


def _write_manifest(out_dir: Path, entries: list[dict[str, Any]], skipped: list[tuple[Target, str]],
                    server_version: str) -> dict[str, Any]:
    files = {}
    for e in entries:
        for rel in (e["meta"], e["data"]):
            path = out_dir / rel
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "server_version": server_version, "streams": entries,
                "skipped": [{"stream": t.stream, "kind": t.kind, "name": t.name, "why": why} for t, why in skipped],
                "files": files}
    text = json.dumps(manifest, indent=1)
    (out_dir / MANIFEST).write_text(text)
    (out_dir / MANIFEST_SUM).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}\n")
    return manifest


# --- verification -------------------------------------------------------------------------------

def verify(backup_dir: Path) -> dict[str, Any]:
    """The manifest of ``backup_dir`` once every file matches its checksum; else ``CliError`` naming the first bad one."""
    manifest_path = backup_dir / MANIFEST
    if not manifest_path.is_file():
        raise CliError(f"{backup_dir} holds no {MANIFEST}: not a backup, or an interrupted one; nothing restored")
    text = manifest_path.read_bytes()
    try:
        expected = (backup_dir / MANIFEST_SUM).read_text().split()[0]
    except (FileNotFoundError, IndexError):
        raise CliError(f"{backup_dir / MANIFEST_SUM} is missing or empty; nothing restored") from None
    if hashlib.sha256(text).hexdigest() != expected:
        raise CliError(f"{manifest_path} is corrupted (its SHA-256 differs from {MANIFEST_SUM}); nothing restored")
    manifest = json.loads(text)
    if manifest.get("format") != FORMAT:
        raise CliError(f"{manifest_path}: unknown format {manifest.get('format')!r} (this cy reads {FORMAT})")
    files: dict[str, dict[str, Any]] = manifest["files"]
    for e in manifest["streams"]:
        for rel in (e["meta"], e["data"]):
            if rel not in files:
                raise CliError(f"{manifest_path} lists no checksum for {rel}; nothing restored")
    progress = TransferProgress("verify", len(files), sum(f["bytes"] for f in files.values()))
    try:
        for rel, want in files.items():
            progress.begin(rel)
            path = backup_dir / rel
            if not path.is_file():
                raise CliError(f"{path} is missing from the backup; nothing restored")
            size = path.stat().st_size
            if size != want["bytes"] or sha256_file(path) != want["sha256"]:
                raise CliError(f"{path} is corrupted (size {size}, expected {want['bytes']}; or its SHA-256 differs "
                               "from the manifest); nothing restored")
            progress.advance(size)
            progress.end("sha256 ok")
    finally:
        progress.close()
    return manifest


# --- restore ------------------------------------------------------------------------------------

async def _existing(nc: Client, streams: list[str]) -> list[str]:
    js = nc.jetstream()
    found = []
    for stream in streams:
        try:
            await js.stream_info(stream)
            found.append(stream)
        except NotFoundError:
            pass
    return found


async def restore_backup(url: NatsOptions | str, backup_dir: Path, replicas: int = 1,
                         nkey: str = "") -> list[dict[str, Any]]:
    """Verify ``backup_dir``, then recreate each of its streams at ``replicas`` on the server at ``url``.

    Nothing is written unless every checksum matches and the server holds none of the streams.
    """
    if replicas < 1:
        raise CliError("--replicas must be at least 1")
    manifest = verify(backup_dir)
    entries = manifest["streams"]
    nc = await connect_once(url, "cy-restore", nkey=nkey)
    restored: list[str] = []
    try:
        if present := await _existing(nc, [e["stream"] for e in entries]):
            raise CliError(f"the server at {as_options(url).nats_url} already holds {', '.join(present)}: restore "
                           "needs an empty server (stop ./cy up, move its state dir's nats/ away, then ./cy restore "
                           "before ./cy up)")
        total = sum(manifest["files"][e["data"]]["bytes"] for e in entries)
        progress = TransferProgress("restore", len(entries), total)
        try:
            for e in entries:
                progress.begin(e["stream"])
                meta = json.loads((backup_dir / e["meta"]).read_text())
                restored.append(e["stream"])
                with (backup_dir / e["data"]).open("rb") as data:
                    info = await restore_stream(nc, meta, file_chunks(data), replicas, progress.advance)
                progress.end(f"{info.get('state', {}).get('messages', 0)} messages")
        finally:
            progress.close()
        if replicas > 1:
            await _until_replicated(nc, [e["stream"] for e in entries])
        return entries
    except (SnapshotError, CliError, nats.errors.Error, TimeoutError) as exc:
        await _undo(nc, restored)
        if isinstance(exc, CliError):
            raise
        raise CliError(f"{exc}; the streams restored so far were deleted again, nothing is half restored") from None
    finally:
        await nc.close()


async def _until_replicated(nc: Client, streams: list[str], timeout: float = REPLICATION_TIMEOUT) -> None:
    """Wait until every replica of every restored stream is current (followers catch up after a restore).

    Until then a read served by a follower (KV and object store reads are direct gets, which any
    replica answers) could see part of a stream: restore is done when all replicas hold it.
    """
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    for stream in streams:
        while True:
            cluster = (await js.stream_info(stream)).cluster
            peers = (cluster.replicas or []) if cluster is not None else []
            if cluster is None or (cluster.leader and all(p.current and not p.offline and not p.lag for p in peers)):
                break
            if time.monotonic() > deadline:
                raise CliError(f"{stream} was restored but its replicas did not catch up within {timeout:g} s")
            await asyncio.sleep(0.2)
    print(f"cy: restore: every replica of {len(streams)} streams is current", flush=True)


async def _undo(nc: Client, streams: list[str]) -> None:
    """Delete the streams a failed restore created (so a retry finds an empty server again)."""
    js = nc.jetstream()
    for stream in streams:
        try:
            await js.delete_stream(stream)
        except NotFoundError:
            pass


# --- command line -------------------------------------------------------------------------------

def add_parsers(sub: argparse._SubParsersAction, state_dir_arg) -> None:
    """``backup`` and ``restore`` subcommands."""
    p = sub.add_parser("backup", help="snapshot every platform stream, KV bucket and the object store into DIR",
                       description="Write a consistent backup of all platform state (jobs, events, files, adapters, "
                       "model registry, API keys, idempotency records...) while the platform runs. DIR must be new "
                       "or empty; its manifest.json lists every file with its SHA-256.")
    p.add_argument("dir", type=Path, metavar="DIR")
    add_operator_nats_arguments(p)
    p.add_argument("--attempts", type=int, default=5, metavar="N",
                   help="how often to retake the backup when platform state changed while it ran (default: 5)")
    p = sub.add_parser("restore", help="rebuild the platform's streams, buckets and object store from a backup",
                       description="Check every checksum in DIR, then recreate its streams on an empty server: the "
                       "nats-server of --state-dir (started for the restore, as ./cy up would; run ./cy up after) or "
                       "the server at --nats-url. A corrupted backup or a non-empty server is refused before "
                       "anything is written.")
    p.add_argument("dir", type=Path, metavar="DIR")
    # Given: restore into that server or cluster, not the state dir's.
    add_operator_nats_arguments(p, url_from_env=False)
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="replicas of every restored stream (3 on the 3-node cluster; default: 1)")
    state_dir_arg(p)


def run_backup(args: argparse.Namespace) -> int:
    """``./cy backup``: take it and say what it holds."""
    manifest = asyncio.run(take_backup(options_from_args(args), args.dir, max(1, args.attempts)))
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"backup of {len(manifest['streams'])} streams ({human_bytes(total)}) written to {args.dir}; "
          f"skipped: {', '.join(s['stream'] for s in manifest['skipped']) or 'none'}")
    return 0


def run_restore(args: argparse.Namespace, state_dir: Path) -> int:
    """``./cy restore``: into ``--nats-url``, or into the state dir's own nats-server started for it."""
    if args.nats_url is not None:
        entries = asyncio.run(restore_backup(options_from_args(args), args.dir, args.replicas))
    else:
        entries = _restore_into_state_dir(args.dir, state_dir.resolve(), args.replicas)
    print(f"restored {len(entries)} streams from {args.dir}")
    return 0


def _restore_into_state_dir(backup_dir: Path, state_dir: Path, replicas: int) -> list[dict[str, Any]]:
    from services.cli.up import NATS_CONFIG
    from services.common.natsserver import NatsServer

    if replicas != 1:
        raise CliError("a state dir's nats-server is a single node: --replicas above 1 needs --nats-url of a cluster")
    verify(backup_dir)  # before starting anything
    with pidfile.claim(state_dir):  # refuses while ./cy up runs on this state dir
        server = NatsServer(state_dir / "nats", port=-1, config=NATS_CONFIG, sync="always",
                            log_file=state_dir / "logs" / "nats.log")
        server.log_file.parent.mkdir(parents=True, exist_ok=True)
        with server:
            return asyncio.run(restore_backup(server.url, backup_dir, replicas))
