"""Prepared datasets: decoded once into plain uint8 arrays that every process memory-maps.

Decoding ImageNet 64x64 (1.28M PNGs, or ten npz batches) takes minutes and 15.7 GB; doing it
in every process at every start does not scale. :func:`prepare` decodes a dataset once into::

    <data dir>/prepared/<key>/trainvalid.npy   (N, H, W, C) uint8: the train split, then the valid split
                              test.npy         (M, H, W, C) uint8
                              manifest.json    shapes, split ranges, source files (size, mtime,
                                               SHA-256), digests of the arrays, flowpp version

NHWC, as the sources are stored: a batch is gathered by row (one contiguous run of bytes per
image) and permuted to NCHW as a tensor, which costs little next to the gather
(``benchmarks/bench_data.py``). ``train``, ``valid`` and ``train+valid`` are slices of one
memory map, so no split is ever copied; the OS page cache is shared by all processes.

Every use checks, cheaply, that the preparation is whole and current: the manifest's format
version and types, that its files and split ranges are the layout written here (train then valid
in trainvalid.npy, test all of test.npy, inside the folder), each array's header and size, a
digest of 16 blocks spread over each array, and the sources' sizes and modification times. A
stale or damaged preparation is rebuilt (and says why), never silently used. The cheap check
misses a source rewritten in place with the same size and modification time, and damage between
the sampled blocks; ``flowpp prepare --verify`` reads every byte: the arrays' and the sources'
SHA-256 and the pixel values' range. Preparing takes an exclusive lock, so the processes of one
launch prepare once while the others wait.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..atomic import atomic_write_text, file_sha256, fsync_dir, json_text
from .datasets import ImageSet, default_data_dir, load_dataset, match_levels
from .errors import DatasetError
from .formats import ALLOCATE, PROGRESS
from .manifest import PREPARED_VERSION, SPLIT_FILES, read_manifest
from .registry import find_dataset, shares_folder

__all__ = ["prepare", "load_prepared", "prepared_path", "verify_prepared", "existing_preparation", "PREPARED_VERSION"]

_SPOT_BLOCKS, _SPOT_BYTES = 16, 1 << 16
_COPY_ROWS = 4096  # images copied per chunk while writing an array
_MAX_LISTED = 64  # files of a source subfolder recorded one by one

Log = Optional[Callable[[str], object]]


def _quiet(_msg: str) -> None:
    return None


def _key(dataset, num_levels: int | None) -> tuple[str, Path | None]:
    """(folder name under prepared/, the user path or None for a named dataset)."""
    spec = find_dataset(dataset)
    suffix = "" if num_levels in (None, 256) else f"-L{num_levels}"
    if spec is not None:
        return spec.name + suffix, None
    path = Path(os.fspath(dataset)).expanduser().resolve()
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    return f"{path.stem or 'images'}-{tag}{suffix}", path


def prepared_path(dataset, data_dir=None, num_levels: int | None = None) -> Path:
    """Where the prepared form of ``dataset`` (on ``num_levels`` levels) lives."""
    base = Path(os.fspath(data_dir)).expanduser() if data_dir is not None else default_data_dir()
    return base / "prepared" / _key(dataset, num_levels)[0]


def _sources(dataset, data_dir) -> list[Path]:
    """The files and folders a dataset is read from: files directly in its folder and one level
    down, and the folders themselves (a folder's mtime changes when an entry is added or removed)."""
    spec = find_dataset(dataset)
    base = Path(os.fspath(data_dir)).expanduser() if data_dir is not None else default_data_dir()
    if spec is not None and shares_folder(spec):  # the folder's other files belong to other datasets
        return [base / spec.folder_name / f.path for f in spec.files]
    root = base / spec.folder_name if spec is not None else Path(os.fspath(dataset)).expanduser().resolve()
    if root.is_file():
        return [root]
    found = [root]
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        found.append(p)
        if p.is_dir():  # a few files (npz batches) are listed; a folder of many images only by its mtime
            with os.scandir(p) as entries:
                names = [e.name for _, e in zip(range(_MAX_LISTED + 1), entries)]
            if len(names) <= _MAX_LISTED:
                found.extend(q for q in sorted(p / n for n in names) if q.is_file())
    return found


def _signature(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size if p.is_file() else None, "mtime_ns": st.st_mtime_ns})
    return out


def _spot_digest(path: Path) -> str:
    """SHA-256 of 16 blocks spread evenly over the file (the first and the last included)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(_SPOT_BLOCKS):
            f.seek(max(0, (size - _SPOT_BYTES) * i // (_SPOT_BLOCKS - 1)))
            h.update(f.read(_SPOT_BYTES))
    return h.hexdigest()


def _write_array(path: Path, images: np.ndarray) -> dict:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=images.shape)
    for lo in range(0, len(images), _COPY_ROWS):
        out[lo : lo + _COPY_ROWS] = images[lo : lo + _COPY_ROWS]
    out.flush()
    del out
    return _digests(path)


def _digests(path: Path) -> dict:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    return {"shape": list(shape), "sha256": file_sha256(path), "spot": _spot_digest(path)}


def _reduce_in_place(images: np.ndarray, levels: int, num_levels: int, dataset, say) -> int:
    """Reduce images on ``levels`` levels to ``num_levels`` in place, as match_levels does (8-bit
    to 2^n: x >> (8 - n)), a chunk at a time; the levels the images end up with."""
    if num_levels == levels:
        return levels
    probe = ImageSet(np.zeros((1, *images.shape[1:]), np.uint8), levels, str(dataset), "", values_checked=True)
    shift = 8 - int(np.log2(match_levels(probe, num_levels).num_levels))  # raises for a pair it cannot map
    say(f"{dataset}: reducing 8-bit images to {num_levels} levels (x >> {shift})")
    for lo in range(0, len(images), _COPY_ROWS):
        images[lo : lo + _COPY_ROWS] >>= shift
    return num_levels


def _largest_value(arr: np.ndarray) -> int:
    return max((int(arr[lo : lo + _COPY_ROWS].max()) for lo in range(0, len(arr), _COPY_ROWS)), default=0)


def _problem(folder: Path, dataset, data_dir, full: bool = False, num_levels: int | None = None) -> str | None:
    """Why the preparation in ``folder`` cannot be used as it is, or None when it can. ``full``
    also reads every byte: the arrays' and the sources' SHA-256, and the pixel values' range."""
    m, why = read_manifest(folder, dataset, num_levels)
    if why is not None:
        return why
    inside = folder.resolve()
    for name, info in m["files"].items():
        path = folder / name
        if path.is_symlink() or path.resolve().parent != inside:
            return f"{name} is not a file inside {folder}"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            return f"{name} is unreadable ({e})"
        if arr.dtype != np.uint8 or list(arr.shape) != info["shape"]:
            return f"{name} holds {arr.dtype} {tuple(arr.shape)}, the manifest says uint8 {tuple(info['shape'])}"
        if arr.offset + arr.size != path.stat().st_size:
            return f"{name} has {path.stat().st_size} bytes, its header needs {arr.offset + arr.size}"
        top = _largest_value(arr) if full and m["num_levels"] < 256 else 0
        del arr
        if _spot_digest(path) != info["spot"] or (full and file_sha256(path) != info["sha256"]):
            return f"{name} is damaged (its digest does not match the manifest)"
        if top >= m["num_levels"]:
            return f"{name} holds pixel value {top}, the manifest says {m['num_levels']} levels"
    recorded = [{k: s[k] for k in ("path", "size", "mtime_ns")} for s in m["sources"]]
    try:
        current = _signature(_sources(dataset, data_dir))
    except OSError:
        return None  # the sources are gone: the preparation is all there is
    if current != recorded:
        changed = next((c["path"] for c, r in zip(current, recorded) if c != r), "the list of source files")
        return f"its sources changed since it was prepared ({changed})"
    if full:  # a rewrite that kept the size and the modification time shows only in the contents
        digests = {s["path"]: s["sha256"] for s in m["sources"]}
        for path in (s["path"] for s in current if s["size"] is not None):
            if file_sha256(Path(path)) != digests[path]:
                return f"its sources changed since it was prepared ({path}: its SHA-256 differs from the manifest's)"
    return None


def existing_preparation(dataset, data_dir=None, num_levels: int | None = None) -> tuple[Path, str | None] | None:
    """(folder, why it cannot be used as it is, or None when it is current) of a preparation of
    ``dataset`` made before, by the cheap check; None when there is none. Prepares nothing."""
    folder = prepared_path(dataset, data_dir, num_levels)
    if not (folder / "manifest.json").exists():
        return None
    return folder, _problem(folder, dataset, data_dir, num_levels=num_levels)


class _Lock:
    """An exclusive flock on ``path`` (blocking): one process prepares, the others wait for it."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): concurrent preparations are not prevented
            pass
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False


def prepare(
    dataset,
    data_dir=None,
    *,
    num_levels: int | None = None,
    download: bool = True,
    force: bool = False,
    verify: bool = False,
    log: Log = print,
    expect_hwc: tuple | None = None,
    progress_bar: bool = False,
) -> Path:
    """Make sure ``dataset`` (reduced to ``num_levels`` levels when given) is prepared and
    current, decoding it when it is not; return its folder.

    ``force`` rebuilds in any case; ``verify`` also checks the full digests of a preparation
    that would otherwise be used (slow: it reads every byte). ``progress_bar`` shows the
    decoding of the large sources (ImageNet, PNG folders) as a bar on stderr.
    """
    say = log or _quiet
    folder = prepared_path(dataset, data_dir, num_levels)
    with _Lock(folder.parent / f".{folder.name}.lock"):
        why = "asked to rebuild" if force else _problem(folder, dataset, data_dir, full=verify, num_levels=num_levels)
        if why is None:
            return folder
        if why != "not prepared yet":
            say(f"{folder}: rebuilding, {why}")
        sources = _sources(dataset, data_dir) if _exists(dataset, data_dir) else []
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        bars = _Bars() if progress_bar else None
        token = PROGRESS.set(bars)
        try:
            _build(tmp, dataset, data_dir, num_levels, download, sources, say, expect_hwc)
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                folder.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(folder)
            fsync_dir(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            PROGRESS.reset(token)
            if bars is not None:
                bars.close()
    return folder


class _Bars:
    """One tqdm bar per source being decoded (told (what, done, total) by the loaders)."""

    def __init__(self):
        self.bar, self.key = None, None

    def __call__(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.key != (what, total):
            self.close()
            self.bar, self.key = tqdm(total=total, desc=what, unit="img", dynamic_ncols=True), (what, total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.key = None, None


def _exists(dataset, data_dir) -> bool:
    try:
        return all(p.exists() for p in _sources(dataset, data_dir))
    except OSError:
        return False


def _build(tmp: Path, dataset, data_dir, num_levels, download, sources, say, expect_hwc) -> None:
    t0 = time.monotonic()
    load = dict(data_dir=data_dir, download=download, log=say, expect_hwc=expect_hwc)
    path = tmp / "trainvalid.npy"

    def allocate(shape: tuple) -> np.ndarray:  # the large loaders decode straight into the file
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)

    token = ALLOCATE.set(allocate)
    try:
        whole = load_dataset(dataset, "train+valid", **load)
    finally:
        ALLOCATE.reset(token)
    images, trainvalid_description, source_levels = whole.images, whole.description, whole.num_levels
    if not isinstance(images, np.memmap):  # a small loader (CIFAR-10, MNIST, .npz) kept it in memory
        images = allocate(images.shape)
        images[:] = whole.images
    del whole
    levels = _reduce_in_place(images, source_levels, num_levels or source_levels, dataset, say)
    images.flush()
    valid = load_dataset(dataset, "valid", **load)
    n, n_valid = len(images), len(valid)
    if num_levels is not None:
        valid = match_levels(valid, num_levels)
    if not np.array_equal(images[n - n_valid :], valid.images):  # the layout every split relies on
        raise DatasetError(f"{dataset}: its valid split is not the end of train+valid; it cannot be prepared")
    n_train = n - n_valid
    del images
    files = {"trainvalid.npy": _digests(path)}
    test_split, missing = None, None
    descriptions = {
        "train+valid": trainvalid_description,
        "train": f"{trainvalid_description}; train = its first {n_train} (the last {n_valid} are valid)",
        "valid": valid.description,
    }
    try:
        test = load_dataset(dataset, "test", **load)
        test = match_levels(test, num_levels) if num_levels is not None else test
        files["test.npy"] = _write_array(tmp / "test.npy", test.images)
        test_split, descriptions["test"] = ["test.npy", 0, len(test)], test.description
        del test
    except DatasetError as e:  # e.g. an .npz without x_test: train and valid are still usable
        missing = str(e)
        say(f"no test split: {e}")
    manifest = {
        "format": "flowpp-prepared",
        "version": PREPARED_VERSION,
        "flowpp_version": _version(),
        "dataset": str(dataset),
        "name": valid.name,
        "num_levels": levels,
        "splits": {
            "train": ["trainvalid.npy", 0, n_train],
            "valid": ["trainvalid.npy", n_train, n],
            "train+valid": ["trainvalid.npy", 0, n],
            "test": test_split,
        },
        "missing": missing,
        "descriptions": descriptions,
        "files": files,
        "sources": [
            dict(s, sha256=file_sha256(Path(s["path"])) if s["size"] is not None else None) for s in _signature(sources)
        ],  # fmt: skip
        "seconds": round(time.monotonic() - t0, 1),
    }
    atomic_write_text(tmp / "manifest.json", json_text(manifest))
    tests = f"{test_split[2]:,} test images" if test_split else "no test split"
    say(f"prepared {dataset} in {manifest['seconds']:.0f} s: {n_train:,} train, {n_valid:,} valid images, {tests}")


def _version() -> str:
    from .. import __version__

    return __version__


def load_prepared(
    dataset,
    split: str,
    data_dir=None,
    *,
    num_levels: int | None = None,
    download: bool = True,
    log: Log = print,
    expect_hwc: tuple | None = None,
) -> ImageSet:
    """One split of ``dataset``, memory-mapped from its preparation (made or rebuilt first when
    needed). The images are a read-only view: nothing is copied or read until used."""
    if split not in SPLIT_FILES:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_FILES)}")
    folder = prepare(dataset, data_dir, num_levels=num_levels, download=download, log=log, expect_hwc=expect_hwc)
    m, why = read_manifest(folder, dataset, num_levels)
    if why is not None:  # it passed the check inside prepare(): someone changed it since
        raise DatasetError(f"{folder}: {why}; it changed while being read, run again to rebuild it")
    if m["splits"][split] is None:
        raise DatasetError(m["missing"] or f"{dataset} has no {split} split")
    name, lo, hi = m["splits"][split]
    whole = np.load(folder / name, mmap_mode="r", allow_pickle=False)
    if list(whole.shape) != m["files"][name]["shape"]:
        raise DatasetError(f"{folder / name}: it changed while being read, run again to rebuild it")
    return ImageSet(whole[lo:hi], m["num_levels"], m["name"], m["descriptions"][split], values_checked=True)


def verify_prepared(dataset, data_dir=None, num_levels: int | None = None) -> str | None:
    """Why the preparation of ``dataset`` is not whole and current (full digests), or None."""
    return _problem(prepared_path(dataset, data_dir, num_levels), dataset, data_dir, full=True, num_levels=num_levels)
