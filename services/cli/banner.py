"""What ``./cy up`` prints once the platform answers: where it is and how to call it."""

from __future__ import annotations

import json
from pathlib import Path

from services.common import bus_auth, bus_permissions
from services.common.hosts import is_loopback

__all__ = ["is_loopback", "ready_banner"]


def bus_line(nats_url: str, nats_seeds: Path | None, tls_ca: str = "") -> str:
    """How the bus is protected: one nkey user per service, or not at all (development, loopback); TLS.

    ``nats_url`` may be several lines (a cluster's nodes): the note then goes on a line of its own.
    """
    gap = f"\n{'':28}" if "\n" in nats_url else "  "
    tls = (f"\n{'':28}TLS: clients verify the nodes with --nats-tls-ca {tls_ca}" if tls_ca else "")
    if nats_seeds is None:
        return f"{nats_url}{gap}(unauthenticated bus: --nats-auth none, for development on loopback only){tls}"
    return (f"{nats_url}{gap}(authenticated: one nkey user per service, least privilege, see ./cy nats permissions;"
            f"\n                            seeds in {nats_seeds}; ./cy keys and ./cy infra take --nats-nkey "
            f"{_operator_seed(nats_seeds)}){tls}")


def _operator_seed(nats_seeds: Path) -> Path:
    return bus_auth.seed_path(nats_seeds, bus_permissions.OPERATOR)


def ready_banner(http_url: str, nats_url: str, model_id: str, aliases: list[str], host: str, log_dir: str,
                 auth: str = "none", metrics: dict[str, int] | None = None, replicas: int | None = None,
                 nats_seeds: Path | None = None, tls_ca: str = "") -> str:
    """The ready message: URLs, a curl and an OpenAI SDK example, and how edge and bus are protected.

    ``replicas``: the embedded cluster's replica count, shown with its nodes (one per line);
    ``nats_seeds`` is the directory of the bus users' seeds (None: an unauthenticated bus); ``tls_ca``
    the CA clients verify the nodes with ("" when the bus is plain TCP).
    """
    nodes = nats_url.split(",")
    nats = nats_url if len(nodes) == 1 else "\n".join(
        [f"{len(nodes)}-node cluster" + (f", streams and buckets R{replicas}" if replicas else "") + ":"]
        + [f"{'':28}{node}" for node in nodes])
    scrape = ", ".join([f"edge {http_url}/metrics"] + [f"{name} :{port}" for name, port in (metrics or {}).items()])
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Say hello in five words."}],
                       "max_tokens": 32})
    if auth != "none":
        operator = f" --nats-nkey {_operator_seed(nats_seeds)}" if nats_seeds is not None else ""
        exposure = (f"Authentication: --auth {auth}. Create a key with ./cy keys create --name NAME --scope inference "
                    f"--nats-url {nats_url}{operator} and send it as 'Authorization: Bearer <key>' (the examples below "
                    "need it: curl -H 'Authorization: Bearer <key>', OpenAI(api_key=<key>)).")
    elif is_loopback(host):
        exposure = f"Open on loopback ({host}), no authentication: only this machine can reach it."
    else:
        exposure = (f"WARNING: listening on {host} with no authentication: anyone who can reach this address "
                    "can use it.")
    return f"""
CY-LLM is up.
  HTTP (OpenAI-compatible)  {http_url}/v1
  NATS                      {bus_line(nats, nats_seeds, tls_ca)}
  model                     {model_id}  (aliases: {", ".join(aliases)})
  logs                      {log_dir}
  Prometheus metrics        {scrape}
  {exposure}

Try it with curl:
  curl -s {http_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{body}'

Or with the OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{http_url}/v1", api_key="unused")
  reply = client.chat.completions.create(
      model="{model_id}", messages=[{{"role": "user", "content": "Say hello in five words."}}])
  print(reply.choices[0].message.content)

Stop with Ctrl-C (or ./cy down from another terminal).
"""
