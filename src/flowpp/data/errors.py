"""The one exception type of :mod:`flowpp.data`."""

from __future__ import annotations

from ..errors import FlowppError

__all__ = ["DatasetError"]


class DatasetError(FlowppError, ValueError):
    """A dataset could not be found, fetched, or read.

    Every refusal of :mod:`flowpp.data` is a ``DatasetError``: missing files,
    failed downloads, wrong checksums, truncated or corrupted archives, unsafe
    archive members, pickles that name forbidden objects, images of the wrong
    size or mode.  The message names the file and says what is wrong and, where
    there is something to do, what to do.  Low-level exceptions are chained as
    ``__cause__``.
    """
