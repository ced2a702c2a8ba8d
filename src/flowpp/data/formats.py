"""The image parsers the datasets are read with, one per file format.

:func:`read_idx` (IDX, plain or gzip), :func:`read_cifar` (the CIFAR python tarball or its
extracted batches), :class:`PngImages` (PNG archives and folders), :class:`NpzBatches`
(downsampled-ImageNet npz batches), :class:`NpyImages` (``.npy`` arrays) and :func:`npz_images`
(an array of a user's ``.npz``). They stand on the safe readers of untrusted bytes beside this
module (``tar_files``, ``cifar_pickle``, ``idx_files``, ``npz_files``, ``image_files``), which
return well-formed numpy arrays or raise :class:`DatasetError` naming the file.

All image arrays are ``uint8`` in NHWC (or HWC for one image) layout, pixel values in
``0..num_levels-1``."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .cifar_pickle import cifar_batch_images
from .errors import DatasetError
from .idx_files import parse_idx_images, read_gzip
from .image_files import decode_image, probe_image
from .npz_files import NpzReader
from .safety import Closing, PathLike
from .tar_files import SafeTar, read_tar_stream

__all__ = [
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


class PngImages(Closing):
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
