"""Who may call the edge, and how much.

- ``authenticator``: API key / JWT authentication and scope checks, as one middleware.
- ``policy``: which scope each endpoint needs (one table).
- ``jwt_tokens``: verifying bearer JWTs.
- ``key_cache``: API key records looked up lately, trusted for a TTL.
- ``rate_limit``: per-caller limits shared by every edge replica (``LLM_RATE`` counters; the
  arithmetic and counters themselves are ``services.common.rate_window`` / ``rate_counters``).
"""
