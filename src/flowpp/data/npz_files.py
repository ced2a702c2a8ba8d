"""``.npy`` members of ``.npz`` zip files, header-checked before any allocation, never unpickled."""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

from .errors import DatasetError
from .safety import (
    MAX_NPY_BYTES,
    MAX_NPZ_EXPANSION,
    NPZ_EXPANSION_FREE_BYTES,
    READ_CHUNK,
    Closing,
    PathLike,
    fail,
)

__all__ = ["NpzReader"]


class NpzReader(Closing):
    """Read arrays from an ``.npz`` without unpickling and without trusting it.

    Each ``.npy`` header is parsed first; object dtypes are refused and the
    declared size must fit in the zip member before any memory is allocated:
    within its uncompressed size, and within what its compressed bytes (as
    found in the file, not as the zip directory claims) can plausibly expand
    to (MAX_NPZ_EXPANSION).
    Use as a context manager.  ``keys`` lists the array names in file order.
    """

    def __init__(self, path: PathLike):
        self.path = path
        self._zip = None
        try:
            self._zip = zipfile.ZipFile(os.fspath(path))
            self._archive_bytes = os.path.getsize(os.fspath(path))
            self._members = {}
            for info in self._zip.infolist():
                if info.filename.endswith(".npy") and not info.is_dir():
                    key = info.filename[:-4]
                    if key in self._members:
                        raise fail(path, f"array {key!r} appears twice")
                    self._members[key] = info
        except DatasetError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - BadZipFile, OSError, ValueError, ...
            self.close()
            raise fail(path, "cannot open the .npz: not a zip file, truncated or corrupted", exc) from exc

    @property
    def keys(self) -> list:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def _header(self, fp, key: str):
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise fail(f"{self.path}[{key}]", f"unsupported .npy format version {version}")
        return tuple(int(s) for s in shape), bool(fortran), dtype

    def info(self, key: str) -> tuple:
        """Return ``(shape, dtype)`` of array `key` from its header only."""
        shape, _, dtype, _ = self._open_checked(key, read=False)
        return shape, dtype

    def read(self, key: str) -> np.ndarray:
        """Return array `key` (a fresh, writable numpy array)."""
        return self._open_checked(key, read=True)[3]

    def _open_checked(self, key: str, read: bool):
        if key not in self._members:
            raise fail(self.path, f"has no array {key!r} (arrays: {', '.join(self.keys) or 'none'})")
        info = self._members[key]
        source = f"{self.path}[{key}]"
        try:
            with self._zip.open(info) as fp:
                shape, fortran, dtype = self._header(fp, key)
                if dtype.hasobject:
                    raise fail(
                        source,
                        "holds Python objects (object dtype); refusing to unpickle. "
                        "Save plain numeric arrays (np.savez with uint8 arrays)",
                    )
                count = math.prod(shape)
                nbytes = count * dtype.itemsize
                if nbytes > info.file_size or nbytes > MAX_NPY_BYTES:
                    raise fail(
                        source,
                        f"header declares {shape} {dtype} ({nbytes} bytes) but the member holds {info.file_size} bytes",
                    )
                # The directory's sizes are the file's own claims: the compressed bytes cannot
                # exceed the archive, and only so much can come out of them.
                compressed = min(info.compress_size, self._archive_bytes)
                stored = info.compress_type == zipfile.ZIP_STORED
                most = compressed if stored else max(compressed * MAX_NPZ_EXPANSION, NPZ_EXPANSION_FREE_BYTES)
                if nbytes > most:
                    held = "bytes" if stored else f"compressed bytes: over {MAX_NPZ_EXPANSION}x expansion, a zip bomb"
                    raise fail(
                        source,
                        f"header declares {shape} {dtype} ({nbytes:,} bytes) in a member of {compressed:,} {held}",
                    )
                if not read:
                    return shape, fortran, dtype, None
                # Fill the array in place (no second copy of the data).
                target = np.empty(shape[::-1] if fortran else shape, dtype=dtype)
                view = memoryview(target.reshape(-1).view(np.uint8)) if nbytes else memoryview(b"")
                pos = 0
                while pos < nbytes:
                    chunk = fp.read(min(READ_CHUNK, nbytes - pos))
                    if not chunk:
                        raise fail(source, f"array data is truncated ({pos} of {nbytes} bytes)")
                    view[pos : pos + len(chunk)] = chunk
                    pos += len(chunk)
                # Read to the end so that zipfile checks the member's CRC.
                while fp.read(READ_CHUNK):
                    pass
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, ValueError, ...
            raise fail(source, "cannot read the array: the .npz is truncated or corrupted", exc) from exc
        arr = target.T if fortran else target
        return shape, fortran, dtype, arr

    def close(self) -> None:
        if self._zip is not None:
            try:
                self._zip.close()
            except Exception:  # noqa: BLE001
                pass
            self._zip = None
