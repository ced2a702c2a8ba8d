"""The errors a user can cause: bad data, configs, checkpoints, run directories and flags.

Each is a :class:`FlowppError` whose message names the problem in one line; the command line
prints that line and exits with status 2. Any other exception is a bug and keeps its traceback.
They also derive from ``ValueError``, what such errors were before they had names.
"""

from __future__ import annotations

__all__ = ["FlowppError", "ConfigError", "InputError", "RunError", "UsageError"]


class FlowppError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(FlowppError, ValueError):
    """A config is invalid, unknown, or does not fit the data or model it is used with."""


class InputError(FlowppError, ValueError):
    """Images or tensors handed to the model have the wrong shape, type or values."""


class RunError(FlowppError, ValueError):
    """A run directory is missing, not writable, or already holds another run."""


class UsageError(FlowppError, ValueError):
    """A command-line option has a value that cannot work."""
