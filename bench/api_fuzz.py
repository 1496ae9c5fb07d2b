"""Schemathesis over every operation of a running platform's ``/openapi.json``, with edge auth off and on.

    .venv/bin/python bench/api_fuzz.py [--examples 20] [--auth none,keys] [--json]

For each ``--auth`` mode it starts the whole platform as ``./cy up`` does (embedded nats-server,
the real default model SmolLM2-135M on the transformers engine, scheduler, edge; no trainer, so
fine-tuning jobs the fuzzer manages to create only queue), fetches the edge's own ``/openapi.json``
and runs up to ``--examples`` generated requests against every operation in it. With ``--auth keys``
it first makes an admin key with ``./cy keys create`` (unlimited rates, so the run measures answers,
not the rate limiter) and sends it as ``Authorization: Bearer``.

What a run prints: operations, requests sent, responses by status class, every 5xx with its request
(the goal is none: bad input is a 4xx with an OpenAI error body), answers that do not conform to
the document, and the duration. Two things are steered so the real model is exercised and a run
stays minutes long on a CPU: half the generated bodies that name a model name the served one, and
generation lengths (``max_tokens`` and friends, ``n``) are capped at 8 (and set to 8 where such a
body has none), since a generated 2**31-token request, or one left to run to the model's context,
would otherwise be an honest 504 or client timeout rather than a finding. A request the client
gave up on (120 s) is counted as "no answer", listed with the 5xx.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.model_store import DEFAULT_MODEL_ID, default_state_dir, ensure_default_model  # noqa: E402
from tests.support import CyUp, state_dir_with_models  # noqa: E402

# A WebSocket upgrade and a live stream that follows a training job until it ends: neither is a
# request/response a fuzzer can judge (tests/edge/test_edge_openapi.py leaves out the same two).
NOT_FUZZED = ("/api/v1/inference/ws", "/api/v1/training/{job_id}/stream")
LENGTH_FIELDS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "maxTokens": 8,
                 "max_new_tokens": 8, "n": 2, "best_of": 2, "top_logprobs": 5}
KEY_RE = re.compile(r"^cy-[0-9a-f]{12}\.[A-Za-z0-9_-]{40,}$", re.M)


# The length field a body without one gets, so the served model stops at 8 tokens, not at its context.
DEFAULT_LENGTH = {"/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens",
                  "/v1/responses": "max_output_tokens"}
NATIVE = ("/api/v1/inference", "/api/v1/inference/stream")


def _cap(fields: dict) -> None:
    for name, cap in LENGTH_FIELDS.items():
        value = fields.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            fields[name] = cap


def steer(body: object, index: int, path: str) -> None:
    """Every other body naming a model names the served one; generation lengths are capped in place."""
    if not isinstance(body, dict):
        return
    named = index % 2 == 0 and any(field in body for field in ("model", "modelId"))
    for field in ("model", "modelId"):
        if field in body and named:
            body[field] = DEFAULT_MODEL_ID
    _cap(body)
    if named and path in DEFAULT_LENGTH and not any(name in body for name in LENGTH_FIELDS if name != "n"):
        body[DEFAULT_LENGTH[path]] = 8
    if path in NATIVE:
        generation = body.setdefault("generation", {}) if named else body.get("generation")
        if isinstance(generation, dict):
            generation.setdefault("max_new_tokens", 8)
            _cap(generation)


class Tally:
    """What one run saw: requests, status classes, the 5xx answers and non-conforming ones."""

    def __init__(self) -> None:
        self.requests = 0
        self.classes: Counter[str] = Counter()
        self.server_errors: list[dict] = []
        self.nonconforming: Counter[str] = Counter()
        self.examples: list[str] = []

    def record(self, case, response, operation: str) -> None:
        """Count one answer; keep the request of any 5xx."""
        self.requests += 1
        self.classes[f"{response.status_code // 100}xx"] += 1
        if response.status_code >= 500:
            self.server_errors.append({"operation": operation, "status": response.status_code,
                                       "curl": case.as_curl_command(), "answer": response.text[:400]})


def fuzz(base_url: str, examples: int, headers: dict[str, str]) -> tuple[int, Tally]:
    """Run every documented operation ``examples`` times; the number of operations and what was seen."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    tally, operations = Tally(), 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in NOT_FUZZED:
            continue
        label = f"{operation.method.upper()} {operation.path}"
        counter = iter(range(10**9))

        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def one(case) -> None:
            steer(case.body, next(counter), operation.path)
            try:
                response = case.call(base_url=base_url, headers=headers, timeout=120)
            except requests.RequestException as exc:
                tally.requests += 1
                tally.classes["no answer"] += 1
                tally.server_errors.append({"operation": label, "status": None, "curl": case.as_curl_command(),
                                            "answer": repr(exc)})
                return
            tally.record(case, response, label)
            try:
                case.validate_response(response, checks=checks)
            except (AssertionError, BaseExceptionGroup) as exc:  # a schemathesis Failure, or a FailureGroup of them
                tally.nonconforming[label] += 1
                if len(tally.examples) < 10:
                    tally.examples.append(f"{label}: {str(exc).strip()[:600]}")

        one()
        operations += 1
    return operations, tally


def create_key(up: CyUp) -> str:
    """An admin API key with no rate limits, through ``./cy keys create`` as an operator would."""
    out = subprocess.run([sys.executable, "-m", "services.cli", "keys", "create", "--name", "fuzz", "--scope",
                          "admin", "--rpm", "0", "--tpm", "0", "--max-streams", "0", "--state-dir",
                          str(up.state_dir), "--nats-url", up.nats_url, "--nats-nkey", up.nkey("operator")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"keys create failed: {out.stderr}")
    return KEY_RE.findall(out.stdout)[0]


def run_one(auth: str, examples: int, model_dir: Path) -> dict:
    """Start a platform with ``--auth auth``, fuzz it, stop it; the figures."""
    with tempfile.TemporaryDirectory(prefix="cy-fuzz-") as tmp:
        state = state_dir_with_models(Path(tmp), model_dir)
        with CyUp(state, "--auth", auth, "--no-trainer") as up:
            headers = {"Authorization": f"Bearer {create_key(up)}"} if auth == "keys" else {}
            started = time.monotonic()
            operations, tally = fuzz(up.url, examples, headers)
            seconds = time.monotonic() - started
    return {"auth": auth, "engine": "transformers", "model": DEFAULT_MODEL_ID, "examples_per_operation": examples,
            "operations": operations, "requests": tally.requests, "by_status": dict(sorted(tally.classes.items())),
            "server_errors": tally.server_errors, "nonconforming": dict(tally.nonconforming),
            "nonconforming_examples": tally.examples, "seconds": round(seconds, 1)}


def main() -> None:
    """Fuzz once per auth mode; print each run's figures (JSON lines with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=20, help="generated requests per operation (default: 20)")
    p.add_argument("--auth", default="none,keys", help="edge auth modes to run, comma-separated (default: both)")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of a summary")
    args = p.parse_args()
    model_dir = ensure_default_model(default_state_dir())
    failed = False
    for auth in [a.strip() for a in args.auth.split(",") if a.strip()]:
        figures = run_one(auth, args.examples, model_dir)
        failed |= bool(figures["server_errors"])
        if args.json:
            print(json.dumps(figures), flush=True)
            continue
        print(f"auth={auth}: {figures['operations']} operations, {figures['requests']} requests in "
              f"{figures['seconds']} s; by status {figures['by_status']}; 5xx/no answer: "
              f"{len(figures['server_errors'])}; non-conforming answers: {sum(figures['nonconforming'].values())}",
              flush=True)
        for error in figures["server_errors"]:
            print(f"  5xx {error['operation']} -> {error['status']}: {error['answer']}\n    {error['curl']}")
        for example in figures["nonconforming_examples"]:
            print(f"  non-conforming: {example}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
