"""HTTP plumbing shared by the edge's routes.

- ``sse``: answering one in-flight request as one JSON body or as SSE.
- ``cors``: CORS for the origins ``--cors-origins`` names.
- ``parser_refusals``: what aiohttp's HTTP parser refuses, as OpenAI error bodies.
- ``json_depth``: a bound on JSON nesting, checked before decoding. Pure.
"""
