"""Errors that mean *bad input*: the CLI prints them as one line and exits non-zero (no traceback)."""


class LmlabError(Exception):
    """Base class for user-facing errors (missing file, bad config, budget too small ...)."""
