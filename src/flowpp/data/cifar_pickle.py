"""CIFAR-10 python batches: pickles read by an unpickler that admits only the numpy names an
ndarray needs, after a scan of the opcodes."""

from __future__ import annotations

import math
import pickle
import pickletools

import numpy as np

from .safety import PathLike, fail

__all__ = ["restricted_loads", "cifar_batch_images"]

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
        raise fail(source, "not a valid CIFAR-10 python batch (refused or broken pickle)", exc) from exc


def cifar_batch_images(data: bytes, source: PathLike) -> np.ndarray:
    """Decode one CIFAR-10 python batch file to images.

    `data` is the pickled dict; its ``b'data'`` entry is a ``uint8`` array of
    shape ``(n, 3072)``, each row 1024 red, 1024 green, 1024 blue values of a
    32x32 image in row-major order.  Returns ``(n, 32, 32, 3)`` uint8 (HWC).
    """
    batch = restricted_loads(data, source)
    if not isinstance(batch, dict):
        raise fail(source, f"expected a pickled dict, found {type(batch).__name__}")
    arr = None
    for key, value in batch.items():
        if key in (b"data", "data"):
            arr = value
    if arr is None:
        raise fail(source, "the batch dict has no 'data' entry")
    if isinstance(arr, _PickledArray):
        if arr.array is None:
            raise fail(source, "'data' is an incomplete numpy array pickle")
        arr = arr.array
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072:
        desc = f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise fail(source, f"'data' must be a uint8 array of shape (n, 3072), found {desc}")
    if arr.shape[0] == 0:
        raise fail(source, "'data' holds no images")
    # CHW-flat rows -> NHWC, as a fresh contiguous array.
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
