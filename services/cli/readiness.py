"""Is the platform ready? The edge answers ``GET /healthz`` with 200 and lists the model.

Only what a user would try first is checked, through the same HTTP front door they use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

import aiohttp

_REQUEST_TIMEOUT_S = 3.0


class NotReady(Exception):
    """The edge did not become ready in time; the message says what it answered last."""


def listed_model_ids(body: object) -> set[str]:
    """Model ids in an OpenAI ``GET /v1/models`` body (``{"data": [{"id": ...}, ...]}``)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return set()
    return {m["id"] for m in body["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)}


async def probe(session: aiohttp.ClientSession, base_url: str, model_ids: Sequence[str]) -> str | None:
    """One readiness check: ``None`` when ready, else what is missing (for the timeout message).

    Ready means any of ``model_ids`` (the model id first, then its aliases) is listed. With auth on
    (``/v1/models`` answers 401: the launcher holds no key), the open ``/healthz`` list of the live
    engines' models is read instead.
    """
    try:
        async with session.get(f"{base_url}/healthz") as resp:
            if resp.status != 200:
                return f"GET /healthz answered {resp.status}"
            health = await resp.json(content_type=None)
        async with session.get(f"{base_url}/v1/models") as resp:
            if resp.status == 401 and isinstance(health, dict) and isinstance(health.get("models"), list):
                body = {"data": [{"id": m} for m in health["models"]]}
            elif resp.status != 200:
                return f"GET /v1/models answered {resp.status}"
            else:
                body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"no HTTP answer at {base_url} ({exc.__class__.__name__}: {exc})"
    except ValueError as exc:  # a body that is not JSON
        return f"GET /v1/models did not answer JSON ({exc})"
    if listed_model_ids(body) & set(model_ids):
        return None
    return f"GET /v1/models does not list {model_ids[0]!r} yet"


async def wait_until_ready(base_url: str, model_ids: Iterable[str], timeout: float, interval: float = 0.5) -> None:
    """Poll ``probe`` until it passes; raise ``NotReady`` with the last answer after ``timeout`` s."""
    ids = list(model_ids)
    deadline = time.monotonic() + timeout
    client_timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        while True:
            missing = await probe(session, base_url, ids)
            if missing is None:
                return
            if time.monotonic() >= deadline:
                raise NotReady(f"not ready after {timeout:g} s: {missing}")
            await asyncio.sleep(interval)
