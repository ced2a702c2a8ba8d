"""What every reader of untrusted files shares: the size limits, the error that names the file, and
the readers' context-manager protocol."""

from __future__ import annotations

import os
from typing import Optional, Union

from .errors import DatasetError

__all__ = [
    "PathLike",
    "MAX_IMAGE_PIXELS",
    "MAX_NPY_BYTES",
    "MAX_NPZ_EXPANSION",
    "NPZ_EXPANSION_FREE_BYTES",
    "READ_CHUNK",
    "fail",
    "Closing",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Largest image (width * height) that is decoded.  Far above anything a flow
#: model trains on; it stops decompression bombs before Pillow allocates.
MAX_IMAGE_PIXELS = 1 << 26

#: Largest single ``.npy`` array read from an ``.npz`` (bytes).  The largest real
#: input (a Chrabaszcz et al. ImageNet64 training batch) is about 1.6 GB.
MAX_NPY_BYTES = 8 << 30

#: A compressed ``.npy`` member may declare at most this many times its compressed bytes (beyond
#: NPZ_EXPANSION_FREE_BYTES): image data compresses a few times at most, while an array of zeros
#: compresses ~1000x, which would let a 2 MB file make flowpp allocate 2 GB.
MAX_NPZ_EXPANSION = 256
NPZ_EXPANSION_FREE_BYTES = 64 << 20

# Chunk size for streaming reads (bytes).
READ_CHUNK = 1 << 22


def fail(source: object, what: str, cause: Optional[BaseException] = None) -> DatasetError:
    """Build the DatasetError for `source` (a path or 'archive:member')."""
    msg = f"{source}: {what}"
    if cause is not None:
        detail = str(cause) or type(cause).__name__
        msg += f" ({type(cause).__name__}: {detail})"
    err = DatasetError(msg)
    err.__cause__ = cause
    return err


class Closing:
    """A reader that is its own context manager: ``with Reader(path) as r: ...`` closes it."""

    def close(self) -> None:  # pragma: no cover - every reader defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
