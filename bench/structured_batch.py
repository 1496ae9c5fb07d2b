"""What constrained rows cost the free rows decoded in the same batch.

    .venv/bin/python bench/structured_batch.py [--engine llamacpp|transformers] [--rounds N] [--max-tokens N]
                                               [--constraint schema|tools|tools-auto]

Runs the default model in-process and times 4 free requests (greedy, ``max_tokens`` tokens each,
no stop) decoded together with 4 other requests that are either free too or constrained (a
JSON schema, or with ``--constraint tools`` a ``tool_choice: required`` tool-call grammar, or
``tools-auto`` the lazy ``auto`` one; temperature 1.0). Reports the free requests' tokens/s in both
cases, alternating the two cases for ``--rounds`` rounds so drift of a noisy machine hits both alike. A constrained row
costs its own mask per step (``grammar.RowConstraint``); free rows share only the step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.inference import ChatMessage, InferenceRequest, SamplingParams, StructuredOutput  # noqa: E402
from services.common import tool_format  # noqa: E402
from services.common.model_store import default_model_gguf, default_state_dir, ensure_default_model  # noqa: E402
from services.engine.backend import Chunk  # noqa: E402
from services.engine.backends import backend_class  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 200},
                                           "story": {"type": "string"}}, "required": ["name", "story"]}
FUNCTIONS = [tool_format.Function("tell_story", "tell a story", SCHEMA)]


def constraint(kind: str) -> StructuredOutput:
    """The constrained rows' constraint: a JSON schema, or a tool-call grammar (required or auto)."""
    if kind == "schema":
        return StructuredOutput(kind="json_schema", json=json.dumps(SCHEMA))
    grammar = tool_format.tool_grammar(FUNCTIONS, required=kind == "tools", parallel=True)
    return StructuredOutput(kind="grammar", grammar=grammar)


def request(i: int, max_tokens: int, structured: StructuredOutput | None) -> InferenceRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0 if structured else 0.0, seed=i)
    return InferenceRequest(id=uuid.uuid4().hex, model="m", reply_to="unused", structured=structured, sampling=sampling,
                            messages=[ChatMessage(role="user", content=f"Tell a long story about person {i}.")])


async def tokens(engine, req: InferenceRequest) -> int:
    n = 0
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            n += len(ev.token_ids)
    return n


async def round_(engine, max_tokens: int, constrained: bool, kind: str = "schema") -> float:
    """Tokens/s of the 4 free requests, next to 4 free or 4 constrained ones."""
    other = constraint(kind) if constrained else None
    start = time.perf_counter()
    free = [asyncio.ensure_future(tokens(engine, request(i, max_tokens, None))) for i in range(4)]
    rest = [asyncio.ensure_future(tokens(engine, request(10 + i, max_tokens, other))) for i in range(4)]
    counts = await asyncio.gather(*free)
    elapsed = time.perf_counter() - start
    await asyncio.gather(*rest)
    return sum(counts) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="llamacpp", choices=["llamacpp", "transformers"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--constraint", default="schema", choices=["schema", "tools", "tools-auto"])
    args = parser.parse_args()
    if args.engine == "llamacpp":
        engine = backend_class("llamacpp")(model_path=default_model_gguf(), model_id="m", slots=8)
    else:
        engine = backend_class("transformers")(model_path=ensure_default_model(default_state_dir()), model_id="m",
                                               slots=8, device="cpu")
    await engine.start()
    try:
        await round_(engine, 4, True, args.constraint)  # warm-up: the grammar tokenizer and the first compile
        results: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for constrained in (False, True):
                results[constrained].append(await round_(engine, args.max_tokens, constrained, args.constraint))
    finally:
        await engine.close()
    free, mixed = statistics.median(results[False]), statistics.median(results[True])
    print(f"{args.engine}: free rows' tokens/s, next to 4 free rows: {free:.1f}; next to 4 {args.constraint} rows: "
          f"{mixed:.1f} (ratio {mixed / free:.3f}; medians of {args.rounds} rounds)")


if __name__ == "__main__":
    asyncio.run(main())
