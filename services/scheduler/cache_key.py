"""The prompt cache's key and eligibility rule now live in ``services.common.cache_key`` (the edge
answers hits too); this name stays for the scheduler's existing imports."""

from services.common.cache_key import CacheKeyInput, cache_key, is_cacheable, is_deterministic, key_input

__all__ = ["CacheKeyInput", "cache_key", "is_cacheable", "is_deterministic", "key_input"]
