"""The edge: OpenAI-compatible HTTP in front of the NATS JetStream inference queue.

``create_app(config)`` builds the aiohttp application (tests run it in-process);
``python -m services.edge`` serves it. Nothing here is state that must survive the process.
"""

from services.edge.app import create_app
from services.edge.config import EdgeConfig, parse_args

__all__ = ["EdgeConfig", "create_app", "parse_args"]
