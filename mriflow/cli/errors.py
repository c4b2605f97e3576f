"""Exit codes and the usage error of every ``mriflow`` command (imported by all of cli/).

Exit codes follow the BIDS App convention: 0 when every selected subject
succeeded, 1 when any failed (the others are still written), 2 on usage errors
(bad command line or paths), reported in one line before any work.
"""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line or paths: one line, exit 2."""
