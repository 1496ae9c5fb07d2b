"""``./cy train start|list|status|follow|cancel``: fine-tuning jobs through an edge's HTTP API.

``start`` uploads the dataset (``POST /v1/files``) and creates the job
(``POST /v1/fine_tuning/jobs``); ``follow`` reads the native progress stream
(``/api/v1/training/{id}/stream``) and draws one progress line. Exit status of ``follow`` (and
``start --follow``): 0 when the job succeeded, 1 when it failed, 3 when it was cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from schemas.training import DATASET_FORMATS, METHODS
from services.cli.errors import CliError
from services.cli.train_client import DEFAULT_URL, EdgeClient

EXIT_FAILED = 1
EXIT_CANCELLED = 3
_BAR = 24


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cy train`` and its actions."""
    actions = sub.add_parser("train", help="fine-tuning jobs (through the edge's HTTP API)",
                             description="Start, watch and cancel fine-tuning jobs on a running edge.").add_subparsers(
        dest="train_command", required=True, metavar="ACTION")
    p = actions.add_parser("start", help="upload a dataset and start a fine-tuning job",
                           description="Upload PATH (POST /v1/files, purpose fine-tune), then create the job "
                           "(POST /v1/fine_tuning/jobs) and print its id. With --follow, show its progress "
                           "until it ends (exit status 0 succeeded, 1 failed, 3 cancelled).")
    p.add_argument("--model", required=True, help="base model to fine-tune (one the platform serves or registers)")
    p.add_argument("--file", required=True, type=Path, metavar="PATH", help="training data (e.g. a .jsonl file)")
    p.add_argument("--method", choices=METHODS, default="lora", help="adaptation method (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="epochs (default: the trainer's)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="batch size (default: the trainer's)")
    p.add_argument("--learning-rate-multiplier", type=float, default=None, metavar="X",
                   help="scales the base learning rate 2e-4 (default: 1)")
    p.add_argument("--format", choices=DATASET_FORMATS, default="auto", dest="dataset_format",
                   help="dataset format (default: detect from name and content)")
    p.add_argument("--suffix", default=None, help="suffix of the fine-tuned model's name (a-z, 0-9, - and _)")
    p.add_argument("--follow", action="store_true", help="show progress until the job ends")
    lst = actions.add_parser("list", help="list jobs, newest first: id, model, status, progress, fine-tuned model")
    st = actions.add_parser("status", help="show one job's status and progress")
    st.add_argument("job_id", metavar="ID")
    fo = actions.add_parser("follow", help="show a job's live progress until it ends",
                            description="Replay the job's events and follow them live. Exit status: 0 succeeded, "
                            "1 failed, 3 cancelled.")
    fo.add_argument("job_id", metavar="ID")
    ca = actions.add_parser("cancel", help="cancel a queued or running job")
    ca.add_argument("job_id", metavar="ID")
    for q in (p, lst, st, fo, ca):
        q.add_argument("--url", default=os.environ.get("CY_EDGE_URL", DEFAULT_URL), metavar="URL",
                       help="the edge (default: $CY_EDGE_URL or %(default)s, where ./cy up serves)")
        q.add_argument("--api-key", default=os.environ.get("CY_API_KEY"), metavar="KEY",
                       help="API key with scope 'training' (default: $CY_API_KEY; not needed with ./cy up --auth none)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed ``cy train`` action; its exit status."""
    out = out or sys.stdout
    match args.train_command:
        case "start":
            return asyncio.run(_start(args, out))
        case "list":
            return asyncio.run(_list(args, out))
        case "status":
            return asyncio.run(_status(args, out))
        case "follow":
            return asyncio.run(_with(args, lambda edge: follow(edge, args.job_id, out)))
        case "cancel":
            return asyncio.run(_cancel(args, out))
    raise AssertionError(f"unhandled train command {args.train_command!r}")


async def _with(args: argparse.Namespace, action):
    async with EdgeClient(args.url, args.api_key) as edge:
        return await action(edge)


def job_body(args: argparse.Namespace, file_id: str) -> dict:
    """The ``POST /v1/fine_tuning/jobs`` body of ``cy train start``."""
    hyper = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                               ("learning_rate_multiplier", args.learning_rate_multiplier)) if v is not None}
    body: dict = {"model": args.model, "training_file": file_id, "peft": {"method": args.method},
                  "dataset_format": args.dataset_format}
    if hyper:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    if args.suffix:
        body["suffix"] = args.suffix
    return body


async def _start(args: argparse.Namespace, out: TextIO) -> int:
    if not args.file.is_file():
        raise CliError(f"{args.file}: no such file")
    async with EdgeClient(args.url, args.api_key) as edge:
        uploaded = await edge.upload(args.file)
        print(f"uploaded {args.file} as {uploaded['id']} ({uploaded['bytes']} bytes)", file=out, flush=True)
        job = await edge.request("POST", "/v1/fine_tuning/jobs", job_body(args, uploaded["id"]))
        print(f"started {job['id']} ({job['model']}, {job['peft']['method']}); status {job['status']}",
              file=out, flush=True)
        if not args.follow:
            print(f"follow it with: ./cy train follow {job['id']}", file=out, flush=True)
            return 0
        return await follow(edge, job["id"], out)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(data: dict) -> str:
    """One progress line from a ``metrics`` event's data: bar, step/total, percent, loss, ETA."""
    step, total = int(data.get("step", 0)), int(data.get("total_steps", 0))
    fraction = min(step / total, 1.0) if total else 0.0
    filled = int(fraction * _BAR)
    loss = data.get("train_loss", data.get("loss"))
    parts = [f"[{'#' * filled}{'.' * (_BAR - filled)}]", f"step {step}/{total or '?'}", f"{fraction * 100:5.1f}%"]
    if data.get("epoch") is not None:
        parts.append(f"epoch {float(data['epoch']):.2f}")
    if loss is not None:
        parts.append(f"loss {float(loss):.4f}")
    parts.append(f"ETA {_clock(data.get('eta_s'))}")
    return "  ".join(parts)


class _ProgressLine:
    """Draws progress in place on a terminal, one line per update elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.open = False

    def update(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            self.open = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def message(self, line: str) -> None:
        if self.open:
            self.out.write("\n")
            self.open = False
        self.out.write(line + "\n")
        self.out.flush()


async def follow(edge: EdgeClient, job_id: str, out: TextIO) -> int:
    """Show a job's events until it ends; 0 succeeded, 1 failed, 3 cancelled."""
    progress = _ProgressLine(out)
    async for event in edge.events(f"/api/v1/training/{job_id}/stream"):
        if event.get("done"):
            return _final(event, progress)
        if event.get("type") == "metrics":
            progress.update(progress_line(event.get("data") or {}))
        elif event.get("message"):
            level = event.get("level", "info")
            progress.message(f"{time.strftime('%H:%M:%S', time.localtime(event.get('createdAt', 0)))} "
                             f"{'' if level == 'info' else level.upper() + ' '}{event['message']}")
    raise CliError(f"the progress stream of {job_id} ended before the job did; resume with ./cy train follow {job_id}")


def _final(status: dict, progress: _ProgressLine) -> int:
    state = status.get("status")
    if state == "succeeded":
        progress.message(f"{status['jobId']} succeeded: fine-tuned model {status.get('fineTunedModel')}")
        return 0
    if state == "cancelled":
        progress.message(f"{status['jobId']} was cancelled")
        return EXIT_CANCELLED
    error = status.get("error") or {}
    progress.message(f"{status['jobId']} {state}: {error.get('message', 'no error message')}")
    return EXIT_FAILED


def format_jobs(jobs: list[dict]) -> str:
    """A table of jobs: id, model, method, status, progress, fine-tuned model."""
    rows = [("ID", "MODEL", "METHOD", "STATUS", "PROGRESS", "CREATED", "FINE-TUNED MODEL")]
    for j in jobs:
        rows.append((j["jobId"], j["baseModel"], j["method"], j["status"],
                     f"{j['step']}/{j['totalSteps'] or '?'} {j['percent']:.0f}%",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(j["createdAt"])), j.get("fineTunedModel") or "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


async def _list(args: argparse.Namespace, out: TextIO) -> int:
    body = await _with(args, lambda edge: edge.request("GET", "/api/v1/training/jobs"))
    print(format_jobs(body["jobs"]) if body["jobs"] else "no fine-tuning jobs (start one with ./cy train start)",
          file=out)
    return 0


def format_status(s: dict) -> str:
    """A job's status as ``name: value`` lines."""
    lines = [f"job:         {s['jobId']}", f"status:      {s['status']}", f"model:       {s['baseModel']}",
             f"method:      {s['method']}", f"training:    {s['trainingFile']}",
             f"epoch:       {s['epoch']:.2f} of {s['totalEpochs']}",
             f"step:        {s['step']} of {s['totalSteps'] or '?'} ({s['percent']:.1f}%)"]
    if s.get("loss") is not None:
        lines.append(f"loss:        {s['loss']:.4f}")
    if s.get("learningRate") is not None:
        lines.append(f"lr:          {s['learningRate']:.3g}")
    if s.get("memoryBytes"):
        lines.append(f"memory:      {s['memoryBytes'] / 2**30:.2f} GiB")
    lines.append(f"elapsed:     {_clock(s.get('elapsedSeconds'))}   ETA {_clock(s.get('etaSeconds'))}")
    if s.get("fineTunedModel"):
        lines.append(f"fine-tuned:  {s['fineTunedModel']}")
    if s.get("error"):
        lines.append(f"error:       {s['error'].get('code')}: {s['error'].get('message')}")
    return "\n".join(lines)


async def _status(args: argparse.Namespace, out: TextIO) -> int:
    status = await _with(args, lambda edge: edge.request("GET", f"/api/v1/training/status/{args.job_id}"))
    print(format_status(status), file=out)
    return 0


async def _cancel(args: argparse.Namespace, out: TextIO) -> int:
    status = await _with(args, lambda edge: edge.request("POST", f"/api/v1/training/{args.job_id}/cancel"))
    print(f"{status['jobId']}: {status['status']}", file=out)
    return 0
