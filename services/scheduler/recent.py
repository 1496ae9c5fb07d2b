"""Request ids remembered for a while (the class lives in ``services.common.recent``; engines use it too)."""

from services.common.recent import RecentIds

__all__ = ["RecentIds"]
