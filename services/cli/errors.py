"""The one error type the operator CLI reports to the user (message + exit status)."""

from __future__ import annotations


class CliError(Exception):
    """A failure the user can act on: printed as ``cy: error: <message>``, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
