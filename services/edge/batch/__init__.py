"""OpenAI's Batch API on the low-priority lane: batches are durable work on JetStream, not edge memory.

- ``lines``: the input file's JSONL (validated at upload), the endpoint table of what a line may
  call, and the output, error and batch objects. Pure.
- ``store``: the bus side: batch state and line outcomes in KV ``llm_batches``, work on ``LLM_BATCH``.
- ``execute``: runs one line as an ordinary inference request on the low lane.
- ``runner``: the batch runner every edge runs (a share of the durable consumer ``batch_runners``).
- ``routes``: ``/v1/batches`` (create, retrieve, list, cancel); ``add_routes`` registers them.
"""
