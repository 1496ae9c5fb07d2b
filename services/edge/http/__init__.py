"""HTTP plumbing shared by the edge's routes.

- ``admission``: the one admission path of every generation request (rate limits, cache hits,
  ``Idempotency-Key``, publishing).
- ``sse``: the event pump's HTTP writers: one JSON body, or SSE (OpenAI or native chunks).
- ``cors``: CORS for the origins ``--cors-origins`` names.
- ``parser_refusals``: what aiohttp's HTTP parser refuses, as OpenAI error bodies.
- ``json_depth``: a bound on JSON nesting, checked before decoding. Pure.
"""
