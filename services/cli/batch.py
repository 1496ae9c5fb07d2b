"""``./cy batch submit|list|status|follow|cancel|download``: OpenAI batches through an edge's HTTP API.

``submit`` uploads a JSONL file (``POST /v1/files``, purpose ``batch``) and creates the batch
(``POST /v1/batches``; the endpoint is the one the file's lines call). ``follow`` (and ``submit
--follow``) polls the batch and draws a progress bar of its lines until it ends. Exit status of
``follow``: 0 completed, 1 failed or expired, 3 cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from services.cli.errors import CliError
from services.cli.train_client import DEFAULT_URL, EdgeClient

EXIT_FAILED = 1
EXIT_CANCELLED = 3
_BAR = 28
_POLL = 0.5  # seconds between looks at a followed batch
_TERMINAL = ("completed", "failed", "expired", "cancelled")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cy batch`` and its actions."""
    actions = sub.add_parser("batch", help="OpenAI batches on the low-priority lane (through the edge's HTTP API)",
                             description="Submit, follow, cancel and download batches on a running edge.",
                             ).add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    p = actions.add_parser("submit", help="upload a JSONL file of requests and start a batch",
                           description="Upload FILE (POST /v1/files, purpose batch; one {custom_id, method, url, "
                           "body} per line), then create the batch (POST /v1/batches) and print its id. With "
                           "--follow, show its progress until it ends (exit status 0 completed, 1 failed or "
                           "expired, 3 cancelled).")
    p.add_argument("file", type=Path, metavar="FILE", help="the requests, one JSON object per line")
    p.add_argument("--window", default="24h", metavar="W",
                   help="completion window: 24h, or shorter like 30m (default: %(default)s)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="a metadata pair of the batch (repeatable)")
    p.add_argument("--follow", action="store_true", help="show progress until the batch ends")
    lst = actions.add_parser("list", help="list batches, newest first: id, status, lines done, endpoint")
    st = actions.add_parser("status", help="show one batch's status and counts")
    st.add_argument("batch_id", metavar="ID")
    fo = actions.add_parser("follow", help="show a batch's progress until it ends",
                            description="Poll the batch and draw its progress. Exit status: 0 completed, "
                            "1 failed or expired, 3 cancelled.")
    fo.add_argument("batch_id", metavar="ID")
    ca = actions.add_parser("cancel", help="cancel a batch (lines already answered are kept)")
    ca.add_argument("batch_id", metavar="ID")
    dl = actions.add_parser("download", help="save a finished batch's output and error files",
                            description="Write the output file to ID_output.jsonl and the error file (if any) to "
                            "ID_errors.jsonl, in --dir.")
    dl.add_argument("batch_id", metavar="ID")
    dl.add_argument("--dir", type=Path, default=Path("."), metavar="DIR", help="where to write (default: .)")
    for q in (p, lst, st, fo, ca, dl):
        q.add_argument("--url", default=os.environ.get("CY_EDGE_URL", DEFAULT_URL), metavar="URL",
                       help="the edge (default: $CY_EDGE_URL or %(default)s, where ./cy up serves)")
        q.add_argument("--api-key", default=os.environ.get("CY_API_KEY"), metavar="KEY",
                       help="API key with scope 'inference' (default: $CY_API_KEY; not needed with ./cy up)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed ``cy batch`` action; its exit status."""
    out = out or sys.stdout
    actions = {"submit": _submit, "list": _list, "status": _status, "follow": _follow, "cancel": _cancel,
               "download": _download}
    return asyncio.run(_with(args, lambda edge: actions[args.batch_command](edge, args, out)))


async def _with(args: argparse.Namespace, action):
    async with EdgeClient(args.url, args.api_key) as edge:
        return await action(edge)


def endpoint_of(path: Path) -> str:
    """The ``url`` of the file's first request line (every line of a batch calls the same endpoint)."""
    try:
        with path.open("rb") as handle:
            for raw in handle:
                if raw.strip():
                    return str(json.loads(raw).get("url", ""))
    except (OSError, ValueError, AttributeError) as exc:
        raise CliError(f"{path}: cannot read its first request line ({exc})") from None
    raise CliError(f"{path}: the file has no request lines")


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out or None


async def _submit(edge: EdgeClient, args: argparse.Namespace, out: TextIO) -> int:
    if not args.file.is_file():
        raise CliError(f"{args.file}: no such file")
    body = {"endpoint": endpoint_of(args.file), "completion_window": args.window}
    if (metadata := _metadata(args.metadata)) is not None:
        body["metadata"] = metadata
    uploaded = await edge.upload(args.file, purpose="batch")
    print(f"uploaded {args.file} as {uploaded['id']} ({uploaded['bytes']} bytes)", file=out, flush=True)
    batch = await edge.request("POST", "/v1/batches", {"input_file_id": uploaded["id"], **body})
    print(f"submitted {batch['id']}: {batch['request_counts']['total']} requests to {batch['endpoint']}",
          file=out, flush=True)
    if not args.follow:
        print(f"follow it with: ./cy batch follow {batch['id']}", file=out, flush=True)
        return 0
    return await follow(edge, batch["id"], out)


def progress_line(batch: dict) -> str:
    """One progress line: bar, lines done of total, percent, failed, status."""
    counts = batch["request_counts"]
    done, total = counts["completed"] + counts["failed"], counts["total"]
    fraction = min(done / total, 1.0) if total else 0.0
    filled = int(fraction * _BAR)
    return (f"[{'#' * filled}{'.' * (_BAR - filled)}]  {done}/{total}  {fraction * 100:5.1f}%  "
            f"failed {counts['failed']}  {batch['status']}")


async def follow(edge: EdgeClient, batch_id: str, out: TextIO) -> int:
    """Draw a batch's progress until it ends; 0 completed, 1 failed or expired, 3 cancelled."""
    tty, shown = out.isatty(), ""
    while True:
        batch = await edge.request("GET", f"/v1/batches/{batch_id}")
        line = progress_line(batch)
        if line != shown:
            out.write(("\r\x1b[2K" + line) if tty else line + "\n")
            out.flush()
            shown = line
        if batch["status"] in _TERMINAL:
            break
        await asyncio.sleep(_POLL)
    if tty:
        out.write("\n")
    status = batch["status"]
    files = ", ".join(f"{k} {batch[k]}" for k in ("output_file_id", "error_file_id") if batch.get(k))
    print(f"{batch_id} {status}{': ' + files if files else ''}", file=out, flush=True)
    if status == "completed":
        return 0
    return EXIT_CANCELLED if status == "cancelled" else EXIT_FAILED


async def _follow(edge: EdgeClient, args: argparse.Namespace, out: TextIO) -> int:
    return await follow(edge, args.batch_id, out)


def format_batches(batches: list[dict]) -> str:
    """A table of batches: id, status, lines done, failed, endpoint, created."""
    rows = [("ID", "STATUS", "DONE", "FAILED", "ENDPOINT", "CREATED")]
    for b in batches:
        c = b.get("request_counts") or {"completed": 0, "failed": 0, "total": 0}
        rows.append((b["id"], b["status"], f"{c['completed'] + c['failed']}/{c['total']}", str(c["failed"]),
                     b["endpoint"], time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


async def _list(edge: EdgeClient, args: argparse.Namespace, out: TextIO) -> int:
    body = await edge.request("GET", "/v1/batches?limit=100")
    print(format_batches(body["data"]) if body["data"] else "no batches (submit one with ./cy batch submit FILE)",
          file=out)
    return 0


async def _status(edge: EdgeClient, args: argparse.Namespace, out: TextIO) -> int:
    b = await edge.request("GET", f"/v1/batches/{args.batch_id}")
    c = b["request_counts"]
    print("\n".join([f"batch:     {b['id']}", f"status:    {b['status']}", f"endpoint:  {b['endpoint']}",
                     f"input:     {b['input_file_id']}", f"requests:  {c['total']} ({c['completed']} completed, "
                     f"{c['failed']} failed)", progress_line(b)]
                    + [f"{k.split('_')[0] + ':':<10} {b[k]}" for k in ("output_file_id", "error_file_id") if b.get(k)]),
          file=out)
    return 0


async def _cancel(edge: EdgeClient, args: argparse.Namespace, out: TextIO) -> int:
    b = await edge.request("POST", f"/v1/batches/{args.batch_id}/cancel")
    print(f"{b['id']}: {b['status']}", file=out)
    return 0


async def _download(edge: EdgeClient, args: argparse.Namespace, out: TextIO) -> int:
    b = await edge.request("GET", f"/v1/batches/{args.batch_id}")
    if b["status"] not in _TERMINAL:
        raise CliError(f"{b['id']} is {b['status']}; its files exist once it ends (./cy batch follow {b['id']})")
    for key, name in (("output_file_id", "output"), ("error_file_id", "errors")):
        if b.get(key):
            path = args.dir / f"{b['id']}_{name}.jsonl"
            data = await edge.download(f"/v1/files/{b[key]}/content")
            path.write_bytes(data)
            print(f"wrote {path} ({len(data.splitlines())} lines)", file=out)
    return 0
