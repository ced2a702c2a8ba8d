"""Safe readers for the file formats the datasets come in, and one image parser per format.

Everything here reads untrusted bytes and must either return well-formed numpy
arrays or raise :class:`DatasetError` naming the file.  The readers:

* tar archives (read in place, never extracted; absolute paths, ``..``, links
  and device/FIFO members refuse the whole archive),
* CIFAR-10 python batches (pickles read by an unpickler that admits only the
  numpy names an ndarray needs),
* gzip and IDX (MNIST) files with full header validation,
* ``.npy`` members of ``.npz`` zip files, header-checked before any allocation,
  never unpickled,
* PNG / JPEG images through Pillow with size and mode checks.

On them, the image parsers the datasets are read with, each format in one place:
:func:`read_idx` (IDX, plain or gzip), :func:`read_cifar` (the CIFAR python
tarball or its extracted batches), :class:`PngImages` (PNG archives and folders),
:class:`NpzBatches` (downsampled-ImageNet npz batches), :class:`NpyImages`
(``.npy`` arrays) and :func:`npz_images` (an array of a user's ``.npz``).

All image arrays are ``uint8`` in NHWC (or HWC for one image) layout, pixel
values in ``0..num_levels-1``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import pickle
import pickletools
import re
import tarfile
import warnings
import zipfile
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence, Union

import numpy as np

from .errors import DatasetError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "SafeTar",
    "read_tar_stream",
    "check_tar_member",
    "tar_member_name",
    "restricted_loads",
    "cifar_batch_images",
    "read_gzip",
    "parse_idx_images",
    "NpzReader",
    "decode_image",
    "probe_image",
    "ALLOCATE",
    "PROGRESS",
    "new_images",
    "read_file",
    "read_idx",
    "read_cifar",
    "PngImages",
    "decode_pngs",
    "NpzBatches",
    "NpyImages",
    "npz_images",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Largest image (width * height) that is decoded.  Far above anything a flow
#: model trains on; it stops decompression bombs before Pillow allocates.
MAX_IMAGE_PIXELS = 1 << 26

#: Largest single ``.npy`` array read from an ``.npz`` (bytes).  The largest real
#: input (a Chrabaszcz et al. ImageNet64 training batch) is about 1.6 GB.
MAX_NPY_BYTES = 8 << 30

# Chunk size for streaming reads (bytes).
_CHUNK = 1 << 22


def _fail(source: object, what: str, cause: Optional[BaseException] = None) -> DatasetError:
    """Build the DatasetError for `source` (a path or 'archive:member')."""
    msg = f"{source}: {what}"
    if cause is not None:
        detail = str(cause) or type(cause).__name__
        msg += f" ({type(cause).__name__}: {detail})"
    err = DatasetError(msg)
    err.__cause__ = cause
    return err


# ---------------------------------------------------------------------------
# tar archives
# ---------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def tar_member_name(name: str) -> str:
    """Normalise a member name for lookups: '/' separators, no './' parts."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def check_tar_member(member: tarfile.TarInfo, archive: PathLike) -> None:
    """Refuse a tar member that would be unsafe to extract or read.

    Refused: absolute names (``/x``, ``C:x``, ``\\x``), any ``..`` component,
    symbolic and hard links, and everything that is neither a regular file nor
    a directory (character/block devices, FIFOs).  We never extract, but an
    archive that carries such members is not one of the official archives, so
    the whole archive is refused rather than silently skipping the member.
    """
    name = member.name
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise _fail(archive, f"refusing tar member {name!r}: absolute path")
    if ".." in norm.split("/"):
        raise _fail(archive, f"refusing tar member {name!r}: '..' path component (path traversal)")
    if member.issym() or member.islnk():
        raise _fail(archive, f"refusing tar member {name!r}: it is a link (to {member.linkname!r})")
    if not (member.isreg() or member.isdir()):
        raise _fail(
            archive,
            f"refusing tar member {name!r}: not a regular file or directory (device, FIFO or other special file)",
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo that remembers why header reading stopped.

    ``tarfile`` silently treats a truncated, missing or corrupted header after
    the first member as the end of the archive.  Recording the reason lets
    :func:`_check_tar_end` tell a proper end-of-archive block (all zeros) from
    a truncated or damaged archive.
    """

    @classmethod
    def fromtarfile(cls, tarfile_obj):
        try:
            return super().fromtarfile(tarfile_obj)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError) as exc:
            tarfile_obj._flowpp_stop = (tarfile_obj.offset, exc)
            raise


def _check_tar_end(tar: tarfile.TarFile, path: PathLike) -> None:
    stop = getattr(tar, "_flowpp_stop", None)
    if stop is None:
        return
    offset, exc = stop
    if isinstance(exc, tarfile.EmptyHeaderError):
        what = "it ends without the end-of-archive marker (truncated)"
    elif isinstance(exc, tarfile.TruncatedHeaderError):
        what = "it ends inside a member header (truncated)"
    else:
        what = "a member header is corrupted (bad checksum)"
    raise _fail(path, f"cannot read the tar archive: {what} at byte {offset}; delete it and fetch it again")


_TAR_ERRORS = (
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    UnicodeError,
    MemoryError,
    __import__("zlib").error,
)


def read_tar_stream(path: PathLike, wanted: Collection[str], max_member_bytes: int) -> dict:
    """Read the members named in `wanted` from a (possibly compressed) tar in one pass.

    Streams the archive (``tarfile`` mode ``'r|*'``), so a ``.tar.gz`` is
    decompressed exactly once.  Every member is checked with
    :func:`check_tar_member`, including those not wanted.  Names are compared
    after :func:`tar_member_name` normalisation.  Returns ``{name: bytes}`` for
    the wanted members found; a wanted member that appears twice is refused.
    Missing members are simply absent from the result (the caller names them).
    """
    wanted = {tar_member_name(w) for w in wanted}
    found: dict = {}
    try:
        with tarfile.open(os.fspath(path), mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for member in tar:
                check_tar_member(member, path)
                key = tar_member_name(member.name)
                if key not in wanted or not member.isreg():
                    continue
                if key in found:
                    raise _fail(path, f"tar member {member.name!r} appears twice")
                if member.size > max_member_bytes:
                    raise _fail(
                        path,
                        f"tar member {member.name!r} is {member.size} bytes, "
                        f"more than the {max_member_bytes} expected at most",
                    )
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise _fail(path, f"tar member {member.name!r} is truncated ({len(data)} of {member.size} bytes)")
                found[key] = data
            _check_tar_end(tar, path)
    except DatasetError:
        raise
    except _TAR_ERRORS as exc:
        raise _fail(
            path, "cannot read the tar archive: it is truncated or corrupted; delete it and fetch it again", exc
        ) from exc
    return found


class _Closing:
    """A reader that is its own context manager: ``with Reader(path) as r: ...`` closes it."""

    def close(self) -> None:  # pragma: no cover - every reader defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafeTar(_Closing):
    """An uncompressed or compressed tar opened for random access to its files.

    Opening scans every header (cheap for an uncompressed tar: it only seeks)
    and checks each member with :func:`check_tar_member`.  ``files`` maps the
    normalised name of each regular file to its ``TarInfo``.  Use as a context
    manager; :meth:`read` returns a member's bytes.
    """

    def __init__(self, path: PathLike):
        self.path = path
        self._tar = None
        try:
            self._tar = tarfile.open(os.fspath(path), mode="r:*", tarinfo=_CheckedTarInfo)
            self.files: dict = {}
            for member in self._tar:
                check_tar_member(member, path)
                if member.isreg():
                    key = tar_member_name(member.name)
                    if key in self.files:
                        raise _fail(path, f"tar member {member.name!r} appears twice")
                    self.files[key] = member
            _check_tar_end(self._tar, path)
        except DatasetError:
            self.close()
            raise
        except _TAR_ERRORS as exc:
            self.close()
            raise _fail(path, "cannot read the tar archive: it is truncated or corrupted", exc) from exc

    def read(self, key: str, max_bytes: int) -> bytes:
        """Return the bytes of regular-file member `key` (at most `max_bytes`)."""
        member = self.files[key]
        if member.size > max_bytes:
            raise _fail(
                self.path,
                f"tar member {member.name!r} is {member.size} bytes, more than the {max_bytes} expected at most",
            )
        try:
            fobj = self._tar.extractfile(member)
            data = fobj.read() if fobj is not None else b""
        except _TAR_ERRORS as exc:
            raise _fail(self.path, f"cannot read tar member {member.name!r}", exc) from exc
        if len(data) != member.size:
            raise _fail(self.path, f"tar member {member.name!r} is truncated ({len(data)} of {member.size} bytes)")
        return data

    def close(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except _TAR_ERRORS:
                pass
            self._tar = None


# ---------------------------------------------------------------------------
# CIFAR-10 python batches: restricted unpickling
# ---------------------------------------------------------------------------

# How numpy pickles an array (all numpy versions, protocols 2-4):
#
#     _reconstruct(ndarray, (0,), b'b')               -> empty array
#     .__setstate__((1, shape, dtype, is_fortran, raw_bytes))
#     dtype('u1', False, True)                          -> the dtype
#     .__setstate__((3, '|', None, None, None, -1, -1, 0))
#
# The unpickler below resolves these names to small stand-in objects instead of
# numpy's own callables.  Their __setstate__ checks the state against the
# simple form above and only then builds the array with np.frombuffer, so
# untrusted state never reaches numpy's C-level __setstate__ (which can be
# driven into internal errors by crafted states) and no array is allocated
# from a size the pickle merely claims.


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle; cannot be called."""

    __slots__ = ()


_NDARRAY_TOKEN = _NdarrayToken()

# Simple numeric dtype codes a batch array could have been saved with.
_SIMPLE_DTYPES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}


def _text(value):
    # Python-2 str arrives as bytes (encoding='bytes'); Python-3 str as str.
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _PickledDtype:
    """A dtype named by a pickle; ``dtype`` is the checked numpy dtype."""

    __slots__ = ("dtype",)

    def __init__(self, spec):
        spec = _text(spec)
        if not isinstance(spec, str) or spec not in _SIMPLE_DTYPES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {spec!r}")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        ok = (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[2] is None
            and state[3] is None
            and state[4] is None
            and state[5] == -1
            and state[6] == -1
            and isinstance(state[7], int)
        )
        order = _text(state[1]) if ok else None
        if not ok or order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError("unexpected numpy dtype state")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


class _PickledArray:
    """An array named by a pickle; ``array`` is set by a valid __setstate__."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("unexpected numpy array state")
        shape, dtype, fortran, raw = state
        if not (
            isinstance(shape, tuple)
            and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise pickle.UnpicklingError(f"bad array shape {shape!r}")
        if (
            not isinstance(dtype, _PickledDtype)
            or not isinstance(fortran, (bool, int))
            or not isinstance(raw, (bytes, bytearray))
        ):
            raise pickle.UnpicklingError("unexpected numpy array state")
        dt = dtype.dtype
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise pickle.UnpicklingError(
                f"array data is {len(raw)} bytes, shape {shape} of {dt} needs {math.prod(shape) * dt.itemsize}"
            )
        self.array = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")


def _pickled_reconstruct(subtype, shape, typecode):
    # ndarray.__reduce__ always emits _reconstruct(ndarray, (0,), b'b').
    if subtype is not _NDARRAY_TOKEN or tuple(shape) != (0,) or _text(typecode) != "b":
        raise pickle.UnpicklingError("unexpected arguments to numpy _reconstruct")
    return _PickledArray()


def _pickled_dtype(spec, align=False, copy=True):
    return _PickledDtype(spec)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 batches that admits only numpy array pickles.

    The real batches are protocol-2 pickles (written by Python 2) of a dict
    with str keys, a str, a list of ints, a list of str and one numpy array.
    Plain containers, strings and numbers need no global; a numpy array needs
    exactly ``_reconstruct``, ``ndarray`` and ``dtype``, which resolve to the
    checking stand-ins above.  Every other global (``os.system``,
    ``builtins.eval``, ``_codecs.encode`` ...) is refused before it is looked
    up, so nothing it names can run.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _pickled_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _pickled_reconstruct,
        ("numpy", "ndarray"): _NDARRAY_TOKEN,
        ("numpy", "dtype"): _pickled_dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only "
                "dicts, lists, strings, numbers and numpy arrays"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent id in pickle")


class _BoundedReader:
    """Minimal file object over `data` for the unpickler.

    It has no ``readinto``/``peek``, so the C unpickler asks for every chunk by
    ``read(n)``; a corrupted length field that asks for more than is left is
    refused here instead of making the unpickler allocate that many bytes.
    """

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes):
        self._data = bytes(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        left = len(self._data) - self._pos
        if n is None or n < 0:
            n = left
        if n > left:
            raise pickle.UnpicklingError(f"pickle data was truncated (wants {n} bytes, {left} left)")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def readline(self) -> bytes:
        end = self._data.find(b"\n", self._pos)
        end = len(self._data) if end < 0 else end + 1
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk


# Opcodes a CIFAR-10 batch (or a Python-3 re-pickle of one at protocols 2-4)
# never contains: out-of-band buffers and bytearrays (protocol 5), persistent
# ids, the extension registry and the INST/OBJ class-instantiation forms.
_FORBIDDEN_OPCODES = {
    "BYTEARRAY8",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
    "PERSID",
    "BINPERSID",
    "EXT1",
    "EXT2",
    "EXT4",
    "INST",
    "OBJ",
}


def _prescan_pickle(data: bytes) -> None:
    """Walk the opcode stream before unpickling.

    ``pickletools.genops`` checks every length field against the bytes that
    are really there, so the C unpickler afterwards never sees a length that
    would make it allocate more than the file holds.
    """
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name in _FORBIDDEN_OPCODES:
            raise pickle.UnpicklingError(f"refusing pickle opcode {opcode.name} at byte {pos}")
        if opcode.name == "PROTO" and arg > pickle.HIGHEST_PROTOCOL:
            raise pickle.UnpicklingError(f"refusing pickle protocol {arg}")


def restricted_loads(data: bytes, source: PathLike):
    """Unpickle `data` with :class:`_BatchUnpickler`.

    Python-2 strings become ``bytes`` (``encoding='bytes'``, as the CIFAR-10
    page prescribes), so dict keys are ``b'data'`` etc.  Numpy arrays come back
    as :class:`_PickledArray` holders (their ``array`` attribute).  Any failure
    (including a refused global) is a DatasetError naming `source`.
    """
    try:
        _prescan_pickle(data)
        return _BatchUnpickler(_BoundedReader(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - hostile bytes raise anything
        raise _fail(source, "not a valid CIFAR-10 python batch (refused or broken pickle)", exc) from exc


def cifar_batch_images(data: bytes, source: PathLike) -> np.ndarray:
    """Decode one CIFAR-10 python batch file to images.

    `data` is the pickled dict; its ``b'data'`` entry is a ``uint8`` array of
    shape ``(n, 3072)``, each row 1024 red, 1024 green, 1024 blue values of a
    32x32 image in row-major order.  Returns ``(n, 32, 32, 3)`` uint8 (HWC).
    """
    batch = restricted_loads(data, source)
    if not isinstance(batch, dict):
        raise _fail(source, f"expected a pickled dict, found {type(batch).__name__}")
    arr = None
    for key, value in batch.items():
        if key in (b"data", "data"):
            arr = value
    if arr is None:
        raise _fail(source, "the batch dict has no 'data' entry")
    if isinstance(arr, _PickledArray):
        if arr.array is None:
            raise _fail(source, "'data' is an incomplete numpy array pickle")
        arr = arr.array
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072:
        desc = f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise _fail(source, f"'data' must be a uint8 array of shape (n, 3072), found {desc}")
    if arr.shape[0] == 0:
        raise _fail(source, "'data' holds no images")
    # CHW-flat rows -> NHWC, as a fresh contiguous array.
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------
# gzip and IDX
# ---------------------------------------------------------------------------


def read_gzip(path: PathLike, max_bytes: int) -> bytes:
    """Return the decompressed contents of gzip file `path`.

    Refuses (DatasetError) a file that is not gzip, is truncated, fails its CRC
    or decompresses to more than `max_bytes` (a gzip bomb).
    """
    try:
        with gzip.open(os.fspath(path), "rb") as f:
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise _fail(path, f"decompresses to more than {max_bytes} bytes; not the expected file")
            # Reading to the end makes gzip check the CRC and length trailer
            # (and notice concatenated junk members).
            if f.read(1):
                raise _fail(path, f"decompresses to more than {max_bytes} bytes; not the expected file")
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, EOFError, zlib.error, ...
        raise _fail(
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
        raise _fail(source, f"too short for an IDX header ({len(data)} bytes)")
    magic, n, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != _IDX_UBYTE_3D:
        raise _fail(
            source, f"bad IDX magic number 0x{magic:08x}; expected 0x{_IDX_UBYTE_3D:08x} (unsigned-byte 3-D image file)"
        )
    if n == 0 or rows == 0 or cols == 0:
        raise _fail(source, f"IDX header declares an empty array ({n} x {rows} x {cols})")
    if expect_hw is not None and (rows, cols) != tuple(expect_hw):
        raise _fail(source, f"images are {rows}x{cols}, expected {expect_hw[0]}x{expect_hw[1]}")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        raise _fail(
            source,
            f"IDX header declares {n} images of {rows}x{cols} ({expected} bytes) but the file holds {len(data)} bytes",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols, 1).copy()


# ---------------------------------------------------------------------------
# npz (zip of .npy), read without pickle
# ---------------------------------------------------------------------------


class NpzReader(_Closing):
    """Read arrays from an ``.npz`` without unpickling and without trusting it.

    Each ``.npy`` header is parsed first; object dtypes are refused and the
    declared size must fit in the zip member before any memory is allocated.
    Use as a context manager.  ``keys`` lists the array names in file order.
    """

    def __init__(self, path: PathLike):
        self.path = path
        self._zip = None
        try:
            self._zip = zipfile.ZipFile(os.fspath(path))
            self._members = {}
            for info in self._zip.infolist():
                if info.filename.endswith(".npy") and not info.is_dir():
                    key = info.filename[:-4]
                    if key in self._members:
                        raise _fail(path, f"array {key!r} appears twice")
                    self._members[key] = info
        except DatasetError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - BadZipFile, OSError, ValueError, ...
            self.close()
            raise _fail(path, "cannot open the .npz: not a zip file, truncated or corrupted", exc) from exc

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
            raise _fail(f"{self.path}[{key}]", f"unsupported .npy format version {version}")
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
            raise _fail(self.path, f"has no array {key!r} (arrays: {', '.join(self.keys) or 'none'})")
        info = self._members[key]
        source = f"{self.path}[{key}]"
        try:
            with self._zip.open(info) as fp:
                shape, fortran, dtype = self._header(fp, key)
                if dtype.hasobject:
                    raise _fail(
                        source,
                        "holds Python objects (object dtype); refusing to unpickle. "
                        "Save plain numeric arrays (np.savez with uint8 arrays)",
                    )
                count = math.prod(shape)
                nbytes = count * dtype.itemsize
                if nbytes > info.file_size or nbytes > MAX_NPY_BYTES:
                    raise _fail(
                        source,
                        f"header declares {shape} {dtype} ({nbytes} bytes) but the member holds {info.file_size} bytes",
                    )
                if not read:
                    return shape, fortran, dtype, None
                # Fill the array in place (no second copy of the data).
                target = np.empty(shape[::-1] if fortran else shape, dtype=dtype)
                view = memoryview(target.reshape(-1).view(np.uint8)) if nbytes else memoryview(b"")
                pos = 0
                while pos < nbytes:
                    chunk = fp.read(min(_CHUNK, nbytes - pos))
                    if not chunk:
                        raise _fail(source, f"array data is truncated ({pos} of {nbytes} bytes)")
                    view[pos : pos + len(chunk)] = chunk
                    pos += len(chunk)
                # Read to the end so that zipfile checks the member's CRC.
                while fp.read(_CHUNK):
                    pass
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, ValueError, ...
            raise _fail(source, "cannot read the array: the .npz is truncated or corrupted", exc) from exc
        arr = target.T if fortran else target
        return shape, fortran, dtype, arr

    def close(self) -> None:
        if self._zip is not None:
            try:
                self._zip.close()
            except Exception:  # noqa: BLE001
                pass
            self._zip = None


# ---------------------------------------------------------------------------
# PNG / JPEG through Pillow
# ---------------------------------------------------------------------------


def _pil():
    from PIL import Image

    return Image


@contextlib.contextmanager
def _open_image(src: Union[PathLike, bytes], formats: Sequence[str]):
    """Pillow's image of a path or of bytes, trying only ``formats``, its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fobj = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)
        with _pil().open(fobj, formats=list(formats)) as im:
            yield im


def probe_image(src: Union[PathLike, bytes], source: PathLike, formats: Sequence[str] = ("PNG",)) -> tuple:
    """Return ``(width, height, mode)`` of an image from its header only."""
    try:
        with _open_image(src, formats) as im:
            return im.size[0], im.size[1], im.mode
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
        names = "/".join(formats)
        raise _fail(source, f"cannot read as {names} image: not an image or corrupted", exc) from exc


def decode_image(
    src: Union[PathLike, bytes],
    source: PathLike,
    *,
    formats: Sequence[str] = ("PNG",),
    modes: Collection[str] = ("L", "RGB"),
    expect_size: Optional[tuple] = None,
    gray_to_rgb: bool = False,
) -> np.ndarray:
    """Decode one image to ``(H, W, C)`` uint8 (C = 1 for mode L, 3 for RGB).

    `src` is a path or the file's bytes; `source` names it in errors.  Only
    the Pillow `formats` listed are tried; the image's mode must be in
    `modes`; with `expect_size` = ``(width, height)`` other sizes are refused.
    With `gray_to_rgb`, an L image is returned as 3 equal channels.  The size
    is checked from the header before decoding (decompression bombs).
    """
    try:
        with _open_image(src, formats) as im:
            w, h = im.size
            if expect_size is not None and (w, h) != tuple(expect_size):
                raise _fail(source, f"image is {w}x{h}, expected {expect_size[0]}x{expect_size[1]}")
            if w * h > MAX_IMAGE_PIXELS or w <= 0 or h <= 0:
                raise _fail(source, f"image size {w}x{h} is out of range")
            if im.mode not in modes:
                raise _fail(
                    source,
                    f"image mode {im.mode!r} is not supported (expected "
                    f"{' or '.join(sorted(modes))}); convert it first, "
                    "e.g. PIL Image.convert('RGB')",
                )
            im.load()
            arr = np.asarray(im, dtype=np.uint8)
            mode = im.mode
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, zlib.error, ...
        names = "/".join(formats)
        raise _fail(source, f"cannot decode as {names} image: not an image, truncated or corrupted", exc) from exc
    if mode == "L":
        arr = arr[:, :, None]
        if gray_to_rgb:
            arr = np.repeat(arr, 3, axis=2)
    if arr.shape[:2] != (h, w) or arr.ndim != 3:
        raise _fail(source, f"decoded to an unexpected array shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------
# image parsers: one per format the datasets come in
# ---------------------------------------------------------------------------

#: Where the large parsers (PNG archives and folders, npz batches, .npy) put the images they decode:
#: a new array by default; flowpp.data.prepared sets it to write straight into a memory-mapped file.
ALLOCATE: ContextVar[Optional[Callable[[tuple], np.ndarray]]] = ContextVar("ALLOCATE", default=None)

#: Told (what, images done, images in all) as the slow parsers decode; `flowpp prepare` shows a bar.
PROGRESS: ContextVar[Optional[Callable[[str, int, int], None]]] = ContextVar("PROGRESS", default=None)

Log = Optional[Callable[[str], object]]

_IDX_MAX = 128 << 20  # decompressed; the real MNIST training file is 47 MB
_CIFAR_MEMBER_MAX = 64 << 20  # a real batch is ~31 MB
_PNG_MEMBER_MAX = 1 << 20
_NPY_CHUNK = 4096  # images copied at a time out of a memory-mapped .npy


def new_images(shape: tuple) -> np.ndarray:
    """An uninitialised ``uint8`` array of ``shape`` to decode into (see :data:`ALLOCATE`)."""
    allocate = ALLOCATE.get()
    return allocate(shape) if allocate is not None else np.empty(shape, dtype=np.uint8)


def report_progress(log: Log, what: str, done: int, total: int, step: int) -> None:
    report = PROGRESS.get()
    if report is not None:
        report(what, done, total)
    if log is not None and total >= 50000 and done % step == 0 and done:
        log(f"  {what}: {done}/{total} images")


def read_file(path: PathLike, max_bytes: int) -> bytes:
    """The bytes of the plain file ``path``, refused when it holds more than ``max_bytes``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DatasetError(f"{path}: {size} bytes, more than the {max_bytes} expected at most")
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc


def read_idx(path: PathLike, expect_hw: Optional[tuple] = None) -> np.ndarray:
    """The images of the IDX file ``path`` (gzip-compressed when its name ends in ``.gz``)."""
    path = Path(path)
    data = read_gzip(path, _IDX_MAX) if path.suffix == ".gz" else read_file(path, _IDX_MAX)
    return parse_idx_images(data, path, expect_hw=expect_hw)


def read_cifar(source: PathLike, members: Sequence[str]) -> np.ndarray:
    """The images of the CIFAR python batches ``members``, in order: members of the tarball
    ``source`` (read in one pass, never extracted) or, when ``source`` is a folder, the files
    they were extracted to under it."""
    source = Path(source)
    if source.is_dir():
        blobs = [(read_file(source / m, _CIFAR_MEMBER_MAX), source / m) for m in members]
    else:
        got = read_tar_stream(source, members, _CIFAR_MEMBER_MAX)
        missing = [m for m in members if m not in got]
        if missing:
            raise DatasetError(
                f"{source}: member(s) {', '.join(missing)} not found; this is not "
                f"the official {source.name} (or it is truncated). Delete it "
                "and fetch it again."
            )
        blobs = [(got[m], f"{source}:{m}") for m in members]
    arrays = [cifar_batch_images(data, src) for data, src in blobs]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


def _png_files(folder: Path, exclude_top: tuple = ()) -> list:
    """PNG files under `folder` (recursively, no symlinked dirs), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        rel_dir = os.path.relpath(dirpath, folder)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in exclude_top]
        for f in filenames:
            if f.lower().endswith(".png"):
                rel = f if rel_dir == "." else f"{rel_dir}/{f}".replace(os.sep, "/")
                found.append((rel, Path(dirpath) / f))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


class PngImages(_Closing):
    """The PNG images of a tar archive (read in place, never extracted) or of a folder tree (no
    symlinked folders, top-level subfolders in ``exclude_top`` left out), in the order of their
    sorted relative paths.  Use as a context manager."""

    def __init__(self, src: PathLike, exclude_top: tuple = ()):
        self.src = Path(src)
        self._tar = None
        if self.src.is_file():
            self._tar = SafeTar(self.src)
            keys = sorted(k for k in self._tar.files if k.lower().endswith(".png"))
            self._items = [(f"{self.src}:{k}", k) for k in keys]
        else:
            self._items = [(p, p) for p in _png_files(self.src, exclude_top)]

    def __len__(self) -> int:
        return len(self._items)

    def source(self, i: int):
        """How errors name image ``i``: its path, or ``archive:member``."""
        return self._items[i][0]

    def _image(self, i: int) -> tuple:
        source, item = self._items[i]
        return (self._tar.read(item, _PNG_MEMBER_MAX) if self._tar is not None else item), source

    def probe(self, i: int) -> tuple:
        """``(width, height, mode)`` of image ``i``, from its header."""
        return probe_image(*self._image(i))

    def decode(self, i: int, **checks) -> np.ndarray:
        """Image ``i`` decoded (``checks``: those of :func:`decode_image`)."""
        return decode_image(*self._image(i), **checks)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def decode_pngs(images: Sequence[tuple], shape: tuple, what: str, log: Log, **checks) -> np.ndarray:
    """``images``, pairs (:class:`PngImages`, index), decoded into one new ``(N, *shape)`` array;
    progress is reported as ``what``."""
    out = new_images((len(images), *shape))
    step = max(1, len(images) // 10)
    for j, (png, i) in enumerate(images):
        out[j] = png.decode(i, **checks)
        report_progress(log, what, j + 1, len(images), step)
    return out


class NpzBatches:
    """The images of npz batches whose array ``'data'`` holds one CHW-flat ``uint8`` row per image
    of ``size`` x ``size`` x 3 (the downsampled-ImageNet layout of Chrabaszcz et al. 2017).  Opening
    reads only the headers; :meth:`read` decompresses only the batches its range touches."""

    def __init__(self, files: Sequence[PathLike], size: int):
        self.files, self.size, row = [Path(f) for f in files], size, 3 * size * size
        self.counts = []
        for f in self.files:
            with NpzReader(f) as z:
                shape, dtype = z.info("data")
            if dtype != np.uint8 or len(shape) != 2 or shape[1] != row or shape[0] == 0:
                raise DatasetError(
                    f"{f}: 'data' must be a non-empty uint8 array of shape (n, {row}), found {dtype} {shape}"
                )
            self.counts.append(shape[0])

    def __len__(self) -> int:
        return sum(self.counts)

    def read(self, start: int, stop: int, what: str, log: Log) -> np.ndarray:
        """Images ``start .. stop-1`` (across the batches, in order) in a new NHWC array."""
        size, row, total = self.size, 3 * self.size * self.size, len(self)
        out = new_images((stop - start, size, size, 3))
        offset = 0
        for f, c in zip(self.files, self.counts):
            lo, hi = max(start, offset), min(stop, offset + c)
            if lo < hi:
                with NpzReader(f) as z:
                    arr = z.read("data")
                if arr.shape != (c, row):
                    raise DatasetError(f"{f}: 'data' changed shape while reading")
                rows = arr[lo - offset : hi - offset]
                out[lo - start : hi - start] = rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
                del arr, rows
                if PROGRESS.get() is not None:
                    PROGRESS.get()(what, hi - start, stop - start)
                elif log is not None and total >= 50000:
                    log(f"  read {f.name}")
            offset += c
        return out


class NpyImages:
    """The images of a ``uint8`` ``.npy`` array of shape ``(N, *shape)``, memory-mapped, never
    unpickled; :meth:`read` copies a range a chunk at a time (the file may be larger than memory)."""

    def __init__(self, path: PathLike, shape: tuple):
        self.path = Path(path)
        try:
            self._x = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DatasetError(f"{path}: not a readable .npy array ({exc}); delete it and download it again") from exc
        x = self._x
        if x.dtype != np.uint8 or x.shape[1:] != tuple(shape):
            want = ", ".join(str(s) for s in shape)
            raise DatasetError(f"{path}: expected uint8 images of shape (N, {want}), found {x.dtype} {x.shape}")

    def __len__(self) -> int:
        return len(self._x)

    def read(self, start: int, stop: int) -> tuple:
        """(images ``start .. stop-1`` in a new array, the largest value among them)."""
        part, top = new_images((stop - start, *self._x.shape[1:])), 0
        for lo in range(0, stop - start, _NPY_CHUNK):
            chunk = self._x[start + lo : min(stop, start + lo + _NPY_CHUNK)]
            part[lo : lo + len(chunk)] = chunk
            top = max(top, int(chunk.max()))
        return part, top


def npz_images(z: NpzReader, path: PathLike, key: str, expect_hwc: Optional[tuple] = None) -> np.ndarray:
    """Array ``key`` of an ``.npz`` as ``(N, H, W, C)`` ``uint8`` images (``(N, H, W)`` gets C = 1).
    With ``expect_hwc`` an array of another image shape is refused from its header alone, so a
    wrong (or bomb) array is never decompressed."""
    if expect_hwc is not None:
        shape, _ = z.info(key)
        hwc = tuple(shape[1:]) + ((1,) if len(shape) == 3 else ())
        if hwc != tuple(expect_hwc):
            h, w, c = expect_hwc
            raise DatasetError(f"{path}: array {key!r} holds images of shape (H, W, C) = {hwc}, but the model "
                               f"expects {tuple(expect_hwc)}, i.e. (C, H, W) = {(c, h, w)}; nothing was "
                               "decompressed")  # fmt: skip
    arr = z.read(key)
    if arr.dtype != np.uint8:
        raise DatasetError(
            f"{path}: array {key!r} has dtype {arr.dtype}; it must be uint8 (save it with .astype(np.uint8))"
        )
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise DatasetError(f"{path}: array {key!r} has shape {arr.shape}; expected (N, H, W, C) or (N, H, W)")
    if min(arr.shape) == 0:
        raise DatasetError(f"{path}: array {key!r} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)
