"""Errors of a whole run (not of one input: those are ledger rows), shared by the run and its engines."""

from __future__ import annotations


class RunError(Exception):
    """The run cannot start or cannot continue (bad output folder, mismatched resume, a full disk)."""
