"""Token events that skip nats-server when the edge and the engine share a host: the reply socket.

On a bus, every token of every answer crosses nats-server twice (engine to server, server to the
edge). On a small host that CPU comes out of the decode itself (``docs/benchmarks.md``). So an
edge listens on a Unix socket as well as its NATS inbox, and names it in every request it
publishes (``InferenceRequest.reply_socket``). An engine that can open that socket (it runs on the
same host, as the same OS user) writes the request's events there instead of to ``reply_to``;
one that cannot (another host, ``--no-reply-socket``) publishes them to ``reply_to`` as always.
All of a request's events go one way, chosen before its ``StreamStart``, so their order holds.

Nothing else changes: the events are the same bytes with the same ``seq`` numbers (a gap still
ends an attempt, which the edge continues elsewhere), a dead engine is still found by its
heartbeats, and the scheduler's own errors still come on ``reply_to``.

The socket lives in a directory only its owner may open (``0700``), which is the whole of its
access control: an engine must run as the edge's OS user on the edge's host. A request names only
the socket (a token), never a path, so a producer cannot point an engine at any other socket; the
scheduler clears the name on an API key's NATS-native request.

Frame: a 4-byte little-endian length, then one byte holding the length of the request id, the
request id (the last token of ``reply_to``), and the event as published on NATS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

# What a socket name may be: an edge id as ``names.token`` leaves it, short enough for a socket path.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEADER = 4
MAX_FRAME = 16 << 20  # an event is far smaller; a longer length means a broken writer


def default_dir() -> Path:
    """Where edges and engines of this OS user meet unless told otherwise."""
    return Path(tempfile.gettempdir()) / f"cy-llm-{os.getuid()}-replies"


def socket_dir(configured: str) -> Path:
    """The directory of reply sockets, created ``0700``; ``OSError`` if it is not this user's alone."""
    path = Path(configured) if configured else default_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{path} must be a directory only this user may open (mode 0700, owner uid "
                              f"{os.getuid()})")
    return path


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a reply socket (no path, no dots)."""
    return _NAME.fullmatch(name) is not None


def socket_path(directory: Path, name: str) -> Path:
    """The socket called ``name`` in ``directory``."""
    return directory / f"{name}.sock"


def remove_stale(directory: Path, keep: str) -> list[str]:
    """Remove the sockets in ``directory`` nobody listens on (edges killed before they could), but ``keep``'s.

    A socket refusing a connection has no listener; a live edge's socket accepts it (and sees it close at
    once, no frame sent). Returns the names removed.
    """
    removed = []
    for path in directory.glob("*.sock"):
        if path.stem == keep:
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.stem)
        except OSError:  # not ours to judge (another user's, not a socket): left alone
            pass
        finally:
            probe.close()
    return removed


def frame(request_id: bytes, event: bytes) -> bytes:
    """One event for ``request_id`` (ASCII, at most 255 bytes) as written to the socket."""
    return b"".join(((1 + len(request_id) + len(event)).to_bytes(_HEADER, "little"),
                     len(request_id).to_bytes(1, "little"), request_id, event))


def split_frames(buf: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """The whole frames at the start of ``buf`` as ``(request id, event)``, and the bytes left over.

    ``ValueError`` for a frame no writer of this module makes (a stranger on the socket).
    """
    out = []
    pos, end = 0, len(buf)
    while end - pos >= _HEADER:
        size = int.from_bytes(buf[pos:pos + _HEADER], "little")
        if not 1 <= size <= MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        if end - pos - _HEADER < size:
            break
        start = pos + _HEADER
        id_len = buf[start]
        if id_len == 0 or id_len >= size:
            raise ValueError("a frame without a request id")
        out.append((buf[start + 1:start + 1 + id_len].decode("ascii"), buf[start + 1 + id_len:start + size]))
        pos = start + size
    return out, buf[pos:]


def add_arguments(p: argparse.ArgumentParser, off_help: str) -> argparse._ArgumentGroup:
    """``--no-reply-socket`` (``off_help`` says what it does for this service) and ``--reply-socket-dir``, in
    the group returned."""
    g = p.add_argument_group("reply socket", "token events from engines to edges on the same host skip nats-server")
    g.add_argument("--no-reply-socket", dest="reply_socket", action="store_false", default=True, help=off_help)
    g.add_argument("--reply-socket-dir", default="", metavar="DIR",
                   help=f"directory of the edges' reply sockets, mode 0700 (default: {default_dir()})")
    return g
