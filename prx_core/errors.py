"""Errors a run reports as one line (``prx-run`` prints the message, not a traceback)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to do."""
