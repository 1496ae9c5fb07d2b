"""What ``./cy up`` prints once the platform answers: where it is and how to call it."""

from __future__ import annotations

import json

from services.common.hosts import is_loopback

__all__ = ["is_loopback", "ready_banner"]


def ready_banner(http_url: str, nats_url: str, model_id: str, aliases: list[str], host: str, log_dir: str,
                 auth: str = "none", metrics: dict[str, int] | None = None, replicas: int | None = None) -> str:
    """The ready message: URLs, a curl and an OpenAI SDK example, and the (absent) security.

    ``replicas``: the embedded cluster's replica count, shown with its nodes (one per line).
    """
    nodes = nats_url.split(",")
    nats = nats_url if len(nodes) == 1 else "\n".join(
        [f"{len(nodes)}-node cluster" + (f", streams and buckets R{replicas}" if replicas else "") + ":"]
        + [f"{'':28}{node}" for node in nodes])
    scrape = ", ".join([f"edge {http_url}/metrics"] + [f"{name} :{port}" for name, port in (metrics or {}).items()])
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Say hello in five words."}],
                       "max_tokens": 32})
    if auth != "none":
        exposure = (f"Authentication: --auth {auth}. Create a key with ./cy keys create --name NAME --scope inference "
                    f"--nats-url {nats_url} and send it as 'Authorization: Bearer <key>' (the examples below "
                    "need it: curl -H 'Authorization: Bearer <key>', OpenAI(api_key=<key>)).")
    elif is_loopback(host):
        exposure = f"Open on loopback ({host}), no authentication: only this machine can reach it."
    else:
        exposure = (f"WARNING: listening on {host} with no authentication: anyone who can reach this address "
                    "can use it.")
    return f"""
CY-LLM is up.
  HTTP (OpenAI-compatible)  {http_url}/v1
  NATS                      {nats}
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
