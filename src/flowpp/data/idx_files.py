"""gzip and IDX (MNIST) files, with the headers checked against the sizes before anything is allocated."""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

from .errors import DatasetError
from .safety import PathLike, fail

__all__ = ["read_gzip", "parse_idx_images"]


def read_gzip(path: PathLike, max_bytes: int) -> bytes:
    """Return the decompressed contents of gzip file `path`.

    Refuses (DatasetError) a file that is not gzip, is truncated, fails its CRC
    or decompresses to more than `max_bytes` (a gzip bomb).
    """
    try:
        with gzip.open(os.fspath(path), "rb") as f:
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise fail(path, f"decompresses to more than {max_bytes} bytes; not the expected file")
            # Reading to the end makes gzip check the CRC and length trailer
            # (and notice concatenated junk members).
            if f.read(1):
                raise fail(path, f"decompresses to more than {max_bytes} bytes; not the expected file")
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, EOFError, zlib.error, ...
        raise fail(
            path, "cannot decompress: not a gzip file, truncated or corrupted; delete it and fetch it again", exc
        ) from exc
    return data


_IDX_UBYTE_3D = 0x00000803


def parse_idx_images(data: bytes, source: PathLike, expect_hw: Optional[tuple] = None) -> np.ndarray:
    """Parse an IDX3 unsigned-byte image file (the MNIST format).

    Layout: big-endian uint32 magic ``0x00000803`` (two zero bytes, type 0x08 =
    unsigned byte, 3 dimensions), then uint32 N, rows, cols, then exactly
    N*rows*cols pixel bytes.  Returns ``(N, rows, cols, 1)`` uint8.
    """
    if len(data) < 16:
        raise fail(source, f"too short for an IDX header ({len(data)} bytes)")
    magic, n, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != _IDX_UBYTE_3D:
        raise fail(
            source, f"bad IDX magic number 0x{magic:08x}; expected 0x{_IDX_UBYTE_3D:08x} (unsigned-byte 3-D image file)"
        )
    if n == 0 or rows == 0 or cols == 0:
        raise fail(source, f"IDX header declares an empty array ({n} x {rows} x {cols})")
    if expect_hw is not None and (rows, cols) != tuple(expect_hw):
        raise fail(source, f"images are {rows}x{cols}, expected {expect_hw[0]}x{expect_hw[1]}")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        raise fail(
            source,
            f"IDX header declares {n} images of {rows}x{cols} ({expected} bytes) but the file holds {len(data)} bytes",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols, 1).copy()
