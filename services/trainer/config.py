"""Trainer configuration, parsed once at start-up."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import msgspec

from schemas.names import slug
from services.common.bus import NatsOptions, add_nats_arguments, option_problems
from services.common.metrics_http import DEFAULT_METRICS_HOST, METRICS_HOST_HELP
from services.common.model_store import default_state_dir


class TrainerConfig(NatsOptions, forbid_unknown_fields=True, kw_only=True):
    """Everything a trainer process needs, from flags (with ``CY_*`` env defaults)."""

    trainer_id: str
    state_dir: str
    data_dirs: list[str] = []
    device: str = "auto"
    keepalive: float = 10.0
    metrics_port: int = 0
    metrics_host: str = DEFAULT_METRICS_HOST
    allow_scripts: bool = False
    script_timeout: float = 3600.0
    script_memory_bytes: int = 16 << 30

    @property
    def work_dir(self) -> Path:
        """Scratch space for this trainer's jobs (downloads, checkpoints before upload)."""
        return Path(self.state_dir) / "trainer" / self.trainer_id

    @property
    def allowed_data_dirs(self) -> list[Path]:
        """Directories a job may name a dataset path in (uploaded files need none)."""
        return [Path(d).resolve() for d in self.data_dirs]


def parse_args(argv: list[str] | None = None) -> TrainerConfig:
    """Build the config from the command line."""
    p = argparse.ArgumentParser(prog="python -m services.trainer",
                                description="CY-LLM trainer: runs fine-tuning jobs from the LLM_TRAIN queue.")
    add_nats_arguments(p)
    p.add_argument("--trainer-id", default="", help="unique trainer id (default: <host>-<pid>)")
    p.add_argument("--state-dir", default=os.environ.get("CY_STATE_DIR", str(default_state_dir())),
                   help="this trainer's own state directory: the model store (models/) and its scratch space "
                        "(default: $CY_STATE_DIR or .cy in the repository)")
    p.add_argument("--data-dir", action="append", default=[], dest="data_dirs",
                   help="a directory jobs may read dataset paths from (repeatable; default: none, "
                        "only uploaded files)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--keepalive", type=float, default=10.0,
                   help="seconds between in-progress acks of the running job (below the consumer's ack_wait)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics (/metrics) and health (/healthz) on this port (0 = off)")
    p.add_argument("--metrics-host", default=DEFAULT_METRICS_HOST, help=METRICS_HOST_HELP)
    p.add_argument("--allow-scripts", action="store_true",
                   help="run user-supplied training scripts (jobs with 'script', admin scope only); off by default")
    p.add_argument("--script-timeout", type=float, default=3600.0, help="seconds a training script may run")
    p.add_argument("--script-memory-bytes", type=int, default=16 << 30,
                   help="address-space limit of a training script's process (bytes)")
    args = p.parse_args(argv)
    if not args.trainer_id:
        args.trainer_id = slug(f"trainer-{socket.gethostname()}-{os.getpid()}")
    config = msgspec.convert({k: v for k, v in vars(args).items()}, TrainerConfig)
    if problems := option_problems(config):
        p.error("; ".join(problems))
    return config
