"""Named datasets, user files and folders, and their train/valid/test splits.

:func:`load_dataset` returns an :class:`ImageSet`: ``uint8`` images in NHWC
layout with values in ``0 .. num_levels-1``.  Splits are deterministic and
never shuffle:

=================  ==========================================  ==========================
dataset            train / valid                               test
=================  ==========================================  ==========================
cifar10            data_batch_1..5: first 45,000 / last 5,000   test_batch (10,000)
mnist,             train-images: first 55,000 / last 5,000      t10k-images (10,000)
fashion-mnist
imagenet32/64      training archive minus / its last 10,000     official validation archive
digits             first 1,437 rows: first 1,293 / last 144     last 360 rows
celeba64-5bit,     the release's .npy: all but the last 4,000 /  its last 3,000
celeba64-3bit,     the 1,000 before the last 3,000
celeba128-5bit
file.npz           x_train / x_valid, else last ceil(10%) of    x_test
                   x_train (at most 5,000)
folder of PNGs     train/ / valid/, else last ceil(10%) of      test/, else = valid
                   train/ (or of all images)
=================  ==========================================  ==========================

(The hold-out sizes come from :data:`VALID_SIZES`.)  The split ``"train+valid"`` is the
whole training source, train and valid together (e.g. the official CIFAR-10 protocol: all
50,000 training images, validated on the test set).  :func:`match_levels` reduces 8-bit
data to n bits (``x >> (8 - n)``) for models of 2^n levels.  Named datasets live in
``<data_dir>/<name>/``; ``data_dir`` defaults to ``$FLOWPP_DATA_DIR`` or
``~/.cache/flowpp/data``.  CIFAR-10, MNIST and Fashion-MNIST are downloaded
when absent (verified by MD5); nothing touches the network when the files are
present.  ImageNet and the release's pre-quantized CelebA files must be placed by hand.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .download import fetch
from .errors import DatasetError
from .formats import (
    NpzReader,
    SafeTar,
    cifar_batch_images,
    decode_image,
    parse_idx_images,
    probe_image,
    read_gzip,
    read_tar_stream,
)

__all__ = [
    "ImageSet",
    "load_dataset",
    "default_data_dir",
    "DATASET_NAMES",
    "SPLITS",
    "URLS",
    "MD5",
    "VALID_SIZES",
    "match_levels",
]

SPLITS = ("train", "valid", "test")
#: What :func:`load_dataset` accepts: the three splits and the whole training source.
ALL_SPLITS = SPLITS + ("train+valid",)

#: The named datasets :func:`load_dataset` knows.
DATASET_NAMES = (
    "cifar10",
    "mnist",
    "fashion-mnist",
    "imagenet32",
    "imagenet64",
    "digits",
    "celeba64-5bit",
    "celeba64-3bit",
    "celeba128-5bit",
)

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar": "cifar10",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "imagenet-32": "imagenet32",
    "imagenet-64": "imagenet64",
}

#: Base URLs (mirrors, tried in order) of the downloadable datasets.  A file's
#: URL is base + file name.  Module-level so that tests and users can point
#: them elsewhere (e.g. a local mirror).
URLS: dict = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}

#: Published MD5 checksums of the downloadable files (as listed by the
#: dataset authors and in torchvision).
MD5: dict = {
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    },
}

#: How many images at the end of the training file form the valid split.
VALID_SIZES: dict = {
    "cifar10": 5000,
    "mnist": 5000,
    "fashion-mnist": 5000,
    "imagenet32": 10000,
    "imagenet64": 10000,
}

# User .npz files: valid = last ceil(10%) of x_train, at most this many.
NPZ_MAX_VALID = 5000

Log = Optional[Callable[[str], object]]


@dataclass(frozen=True, eq=False)
class ImageSet:
    """One split of an image dataset.

    Attributes:
        images: ``(N, H, W, C)`` ``uint8`` array, values in ``0..num_levels-1``
            (C = 1 for grayscale, 3 for RGB).
        num_levels: number of discrete pixel values (256 for 8-bit data,
            17 for ``digits``).
        name: short dataset name (``"cifar10"``, or the file/folder stem).
        description: what was read and which part of it forms this split.
    """

    images: np.ndarray
    num_levels: int
    name: str
    description: str
    values_checked: bool = False  # the pixel values were checked when the images were prepared

    def __post_init__(self):
        x = self.images
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            desc = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise DatasetError(f"{self.name}: images must be a uint8 (N, H, W, C) array, got {desc}")
        if min(x.shape) <= 0:
            raise DatasetError(f"{self.name}: empty image array of shape {x.shape}")
        if (
            isinstance(self.num_levels, bool)
            or not isinstance(self.num_levels, (int, np.integer))
            or not 2 <= int(self.num_levels) <= 256
        ):
            raise DatasetError(f"{self.name}: num_levels must be an integer in 2..256, got {self.num_levels!r}")
        object.__setattr__(self, "num_levels", int(self.num_levels))
        if self.num_levels < 256 and not self.values_checked:  # (a memory map is not read in full)
            top = int(x.max())
            if top >= self.num_levels:
                raise DatasetError(
                    f"{self.name}: pixel value {top} is out of range for "
                    f"{self.num_levels} levels (0..{self.num_levels - 1})"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple:
        """``(H, W, C)`` of each image."""
        return tuple(int(s) for s in self.images.shape[1:])


def default_data_dir() -> Path:
    """``$FLOWPP_DATA_DIR`` if set, else ``~/.cache/flowpp/data``."""
    env = os.environ.get("FLOWPP_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flowpp" / "data"


def _quiet(_msg: str) -> None:
    return None


#: Where the large loaders (ImageNet, CelebA, PNG folders) put the images they decode: a new
#: array by default; flowpp.data.prepared sets it to write straight into a memory-mapped file.
ALLOCATE: ContextVar[Optional[Callable[[tuple], np.ndarray]]] = ContextVar("ALLOCATE", default=None)


#: Told (what, images done, images in all) as the slow loaders decode; `flowpp prepare` shows a bar.
PROGRESS: ContextVar[Optional[Callable[[str, int, int], None]]] = ContextVar("PROGRESS", default=None)


def _empty(shape: tuple) -> np.ndarray:
    allocate = ALLOCATE.get()
    return allocate(shape) if allocate is not None else np.empty(shape, dtype=np.uint8)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _hold_out_range(n: int, split: str, n_valid: int, what: str) -> tuple:
    """(start, stop, detail) of `split` when the last `n_valid` of `n` are valid."""
    if n <= n_valid:
        raise DatasetError(
            f"{what} holds {n} images; need more than {n_valid} to hold out {n_valid} for the valid split"
        )
    if split == "train+valid":
        return 0, n, f"train+valid = all {n} images of {what}"
    if split == "train":
        return 0, n - n_valid, f"train = first {n - n_valid} of the {n} images of {what}"
    return n - n_valid, n, f"valid = last {n_valid} of the {n} images of {what}"


def _hold_out(x: np.ndarray, split: str, n_valid: int, what: str) -> tuple:
    start, stop, detail = _hold_out_range(len(x), split, n_valid, what)
    part = x[start:stop]
    if split == "valid":
        part = part.copy()  # do not keep the whole training array alive
    return part, detail


def _ensure_file(dataset: str, root: Path, filename: str, download: bool, log: Log) -> Path:
    """Path of `root/filename`, downloading it first if absent and allowed."""
    path = root / filename
    if path.is_file():
        return path
    bases = URLS.get(dataset, [])
    urls = [b if b.endswith("/") else b + "/" for b in bases]
    urls = [b + filename for b in urls]
    md5 = MD5[dataset][filename]
    where = urls[0] if urls else "the dataset's site"
    if not download:
        raise DatasetError(
            f"{dataset}: {path} not found (download=False). Download {filename} "
            f"from {where} (MD5 {md5}) and place it in {root}/, or allow downloading."
        )
    return fetch(urls, path, md5, log=log)


def _read_plain(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DatasetError(f"{path}: {size} bytes, more than the {max_bytes} expected at most")
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc


def _log_progress(log: Log, what: str, done: int, total: int, step: int) -> None:
    report = PROGRESS.get()
    if report is not None:
        report(what, done, total)
    if log is not None and total >= 50000 and done % step == 0 and done:
        log(f"  {what}: {done}/{total} images")


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_MEMBER_MAX = 64 << 20  # a real batch is ~31 MB


def _load_cifar10(root: Path, split: str, download: bool, log: Log) -> tuple:
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    tar_path = root / _CIFAR_TAR
    folder = root / _CIFAR_DIR
    if not tar_path.is_file() and all((folder / n).is_file() for n in names):
        # Already extracted (e.g. by torchvision): read the batch files.
        blobs = {n: (_read_plain(folder / n, _CIFAR_MEMBER_MAX), folder / n) for n in names}
        origin = f"extracted batches in {folder}"
    else:
        tar_path = _ensure_file("cifar10", root, _CIFAR_TAR, download, log)
        wanted = [f"{_CIFAR_DIR}/{n}" for n in names]
        got = read_tar_stream(tar_path, wanted, _CIFAR_MEMBER_MAX)
        missing = [w for w in wanted if w not in got]
        if missing:
            raise DatasetError(
                f"{tar_path}: member(s) {', '.join(missing)} not found; this is not "
                "the official cifar-10-python.tar.gz (or it is truncated). Delete it "
                "and fetch it again."
            )
        blobs = {n: (got[w], f"{tar_path}:{w}") for n, w in zip(names, wanted)}
        origin = str(tar_path)
    arrays = [cifar_batch_images(data, src) for data, src in blobs.values()]
    x = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    title = f"CIFAR-10 (official python-version batches, {origin})"
    if split == "test":
        return x, f"{title}; test = test_batch ({len(x)} images)"
    part, detail = _hold_out(x, split, VALID_SIZES["cifar10"], "data_batch_1..5")
    return part, f"{title}; {detail}"


# ---------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# ---------------------------------------------------------------------------

_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
_IDX_MAX = 128 << 20  # decompressed; the real training file is 47 MB


def _load_mnist(name: str, root: Path, split: str, download: bool, log: Log) -> tuple:
    fname = _MNIST_FILES["test" if split == "test" else "train"]
    gz_path = root / fname
    raw_path = root / fname[:-3]
    if not gz_path.is_file() and raw_path.is_file():
        # Accept an already decompressed file too.
        data, source = _read_plain(raw_path, _IDX_MAX), raw_path
    else:
        source = _ensure_file(name, root, fname, download, log)
        data = read_gzip(source, _IDX_MAX)
    x = parse_idx_images(data, source, expect_hw=(28, 28))
    title = ("MNIST" if name == "mnist" else "Fashion-MNIST") + f" (official IDX files, {source})"
    if split == "test":
        return x, f"{title}; test = all {len(x)} images"
    part, detail = _hold_out(x, split, VALID_SIZES[name], Path(source).name)
    return part, f"{title}; {detail}"


# ---------------------------------------------------------------------------
# ImageNet 32x32 / 64x64
# ---------------------------------------------------------------------------

_PNG_MEMBER_MAX = 1 << 20


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


def _select(n: int, split: str, name: str, what: str) -> tuple:
    """Range of the `n` images of `what` that form `split` (train/valid hold out)."""
    if split == "test":
        return 0, n, f"test = all {n} images of {what}"
    return _hold_out_range(n, split, VALID_SIZES[name], what)


def _imagenet_vdo(name: str, size: int, src: Path, split: str, log: Log) -> tuple:
    """Read van den Oord et al. PNGs from a tar archive or an extracted folder."""
    shape = (size, size)
    if src.is_file():
        with SafeTar(src) as tar:
            keys = sorted(k for k in tar.files if k.lower().endswith(".png"))
            if not keys:
                raise DatasetError(f"{src}: the archive holds no PNG files")
            start, stop, detail = _select(len(keys), split, name, src.name)
            out = _empty((stop - start, size, size, 3))
            step = max(1, (stop - start) // 10)
            for j, key in enumerate(keys[start:stop]):
                out[j] = decode_image(
                    tar.read(key, _PNG_MEMBER_MAX), f"{src}:{key}", expect_size=shape, gray_to_rgb=True
                )
                _log_progress(log, src.name, j + 1, stop - start, step)
    else:
        files = _png_files(src)
        if not files:
            raise DatasetError(f"{src}/: the folder holds no PNG files")
        start, stop, detail = _select(len(files), split, name, f"{src.name}/")
        out = _empty((stop - start, size, size, 3))
        step = max(1, (stop - start) // 10)
        for j, f in enumerate(files[start:stop]):
            out[j] = decode_image(f, f, expect_size=shape, gray_to_rgb=True)
            _log_progress(log, src.name, j + 1, stop - start, step)
    return out, detail


def _imagenet_chrabaszcz(name: str, size: int, files: list, split: str, log: Log) -> tuple:
    """Read Chrabaszcz et al. npz batches: key 'data', (n, 3*size*size) CHW-flat rows."""
    row = 3 * size * size
    counts = []
    for f in files:
        with NpzReader(f) as z:
            shape, dtype = z.info("data")
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != row or shape[0] == 0:
            raise DatasetError(
                f"{f}: 'data' must be a non-empty uint8 array of shape (n, {row}), found {dtype} {shape}"
            )
        counts.append(shape[0])
    total = sum(counts)
    what = files[0].parent.name + "/" + (files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}")
    start, stop, detail = _select(total, split, name, what)
    out = _empty((stop - start, size, size, 3))
    offset = 0
    for f, c in zip(files, counts):
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
    return out, detail


def _load_imagenet(name: str, root: Path, split: str, log: Log) -> tuple:
    size = 32 if name == "imagenet32" else 64
    role = "valid" if split == "test" else "train"  # which official archive
    vdo_tar = {r: root / f"{r}_{size}x{size}.tar" for r in ("train", "valid")}
    vdo_dir = {r: root / f"{r}_{size}x{size}" for r in ("train", "valid")}
    ch_train = [root / f"Imagenet{size}_train_npz" / f"train_data_batch_{i}.npz" for i in range(1, 11)]
    ch_val = [root / f"Imagenet{size}_val_npz" / "val_data.npz"]
    has_vdo = any(p.is_file() for p in vdo_tar.values()) or any(p.is_dir() for p in vdo_dir.values())
    has_ch = any(p.is_file() for p in ch_train + ch_val)
    label = f"ImageNet{size}"
    if has_vdo:
        # Prefer the van den Oord et al. (2016) PNGs: the data Flow++ reports on.
        if vdo_tar[role].is_file():
            src = vdo_tar[role]
        elif vdo_dir[role].is_dir():
            src = vdo_dir[role]
        else:
            raise DatasetError(
                f"{name}: found van den Oord et al. files in {root}/ but not {vdo_tar[role].name} "
                f"(nor the extracted folder {vdo_dir[role].name}/). Place {vdo_tar[role].name} in "
                f"{root}/ (from the downsampled-ImageNet page of van den Oord et al. 2016)."
            )
        if log is not None:
            log(f"{name}: reading van den Oord et al. 2016 PNG archive {src}")
        x, detail = _imagenet_vdo(name, size, src, split, log)
        title = f"{label} (van den Oord et al. 2016 PNG archives, {src})"
    elif has_ch:
        files = ch_train if role == "train" else ch_val
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{name}: found Chrabaszcz et al. 2017 npz files in {root}/ but these are missing: "
                + ", ".join(missing)
                + ". Download the Imagenet"
                + str(size)
                + "_train / _val npz archives from image-net.org (login needed) and unpack them there."
            )
        if log is not None:
            log(f"{name}: reading Chrabaszcz et al. 2017 npz batches from {files[0].parent}")
        x, detail = _imagenet_chrabaszcz(name, size, files, split, log)
        title = f"{label} (Chrabaszcz et al. 2017 downsampled-ImageNet npz batches, {files[0].parent})"
    else:
        raise DatasetError(
            f"{name}: no ImageNet files in {root}/ and they cannot be downloaded automatically "
            "(the sites need a login). Place either\n"
            f"  (a) van den Oord et al. 2016 (what Flow++ used): {vdo_tar['train'].name} and "
            f"{vdo_tar['valid'].name} (or their extracted folders {vdo_dir['train'].name}/, "
            f"{vdo_dir['valid'].name}/), or\n"
            f"  (b) Chrabaszcz et al. 2017: Imagenet{size}_train_npz/train_data_batch_1.npz .. "
            f"train_data_batch_10.npz and Imagenet{size}_val_npz/val_data.npz\n"
            f"in {root}/."
        )
    return x, f"{title}; {detail}"


# ---------------------------------------------------------------------------
# CelebA, pre-quantized by the Flow++ release
# ---------------------------------------------------------------------------

#: name -> (file of the Flow++ release, image size, bits)
_CELEBA_FILES = {
    "celeba64-5bit": ("celeba_full_64x64_5bit.npy", 64, 5),
    "celeba64-3bit": ("celeba_full_64x64_3bit.npy", 64, 3),
    "celeba128-5bit": ("celeba_128pixels_5bit_full.npy", 128, 5),
}
#: The release trains on every image and reports no held-out set; flowpp holds these out.
CELEBA_TEST, CELEBA_VALID = 3000, 1000


def _load_celeba(name: str, root: Path, split: str) -> tuple:
    filename, size, bits = _CELEBA_FILES[name]
    path = root / filename
    if not path.is_file():
        raise DatasetError(
            f"{name}: {path} not found. The Flow++ release's pre-quantized CelebA files need a manual "
            f"download (links in the release's flows_celeba/README.md): place {filename} in {root}/."
        )
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npy array ({exc}); delete it and download it again") from exc
    if x.dtype != np.uint8 or x.shape[1:] != (size, size, 3):
        raise DatasetError(f"{path}: expected uint8 images of shape (N, {size}, {size}, 3), found {x.dtype} {x.shape}")
    n = len(x)
    if n <= CELEBA_TEST + CELEBA_VALID:
        raise DatasetError(
            f"{path}: holds {n} images; need more than {CELEBA_TEST + CELEBA_VALID} to hold out "
            f"the valid and test splits"
        )
    if split == "test":
        start, stop, detail = n - CELEBA_TEST, n, f"test = last {CELEBA_TEST} of {n} images"
    else:
        start, stop, detail = _hold_out_range(
            n - CELEBA_TEST, split, CELEBA_VALID, f"the first {n - CELEBA_TEST} of {n} images"
        )
    part, top = _empty((stop - start, size, size, 3)), 0
    for lo in range(0, stop - start, 4096):  # a chunk at a time: the file may be larger than memory
        chunk = x[start + lo : min(stop, start + lo + 4096)]
        part[lo : lo + len(chunk)] = chunk
        top = max(top, int(chunk.max()))
    if top >= 2**bits:
        raise DatasetError(
            f"{path}: pixel value {top} in the {split} split, but a {bits}-bit file holds values 0..{2**bits - 1}"
        )
    return part, 2**bits, f"CelebA {size}x{size}, {bits} bits (Flow++ release file {path}); {detail}"


def match_levels(data: ImageSet, num_levels: int, log: Log = None) -> ImageSet:
    """``data`` on ``num_levels`` levels: unchanged when they agree; 8-bit data reduced to n
    bits (``x >> (8 - n)``, as the Flow++ release does) when ``num_levels`` is 2^n < 256.

    Raises:
        DatasetError: for any other pair of level counts.
    """
    if data.num_levels == num_levels:
        return data
    bits = num_levels.bit_length() - 1
    if data.num_levels != 256 or num_levels != 2**bits or not 1 <= bits < 8:
        raise DatasetError(
            f"{data.name}: the data has {data.num_levels} levels but the model expects {num_levels}; "
            "only 8-bit data can be reduced, to 2^n levels (--bits n)"
        )
    if log is not None:
        log(f"{data.name}: reducing 8-bit pixels to {bits} bits (x >> {8 - bits}) for {num_levels} levels")
    return ImageSet(
        images=data.images >> (8 - bits),
        num_levels=num_levels,
        name=data.name,
        description=f"{data.description}; reduced to {bits} bits (x >> {8 - bits})",
    )


# ---------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------

_DIGITS_TEST = 360


def _load_digits(split: str) -> tuple:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetError(
            "the 'digits' dataset needs scikit-learn: pip install scikit-learn (or pip install 'flowpp[digits]')"
        ) from exc
    try:
        imgs = np.asarray(load_digits().images)
    except Exception as exc:  # noqa: BLE001 - a broken scikit-learn install
        raise DatasetError(f"digits: scikit-learn could not load its bundled digits ({exc})") from exc
    if (
        imgs.ndim != 3
        or imgs.shape[1:] != (8, 8)
        or len(imgs) <= _DIGITS_TEST
        or not np.all(imgs == np.round(imgs))
        or imgs.min() < 0
        or imgs.max() > 16
    ):
        raise DatasetError(f"digits: unexpected data from scikit-learn (shape {imgs.shape})")
    x = imgs.astype(np.uint8)[..., None]
    n_tv = len(x) - _DIGITS_TEST
    title = "scikit-learn digits (UCI optdigits 8x8, values 0..16)"
    if split == "test":
        return x[n_tv:].copy(), f"{title}; test = last {_DIGITS_TEST} of {len(x)} rows"
    n_valid = -(-n_tv // 10)
    part, detail = _hold_out(x[:n_tv], split, n_valid, f"the first {n_tv} rows")
    return part.copy(), f"{title}; {detail}"


# ---------------------------------------------------------------------------
# user .npz and PNG folders
# ---------------------------------------------------------------------------


def _npz_images(z: NpzReader, path: Path, key: str, expect_hwc: Optional[tuple] = None) -> np.ndarray:
    if expect_hwc is not None:  # from the header alone: a wrong (or bomb) array is never decompressed
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


def _load_npz(path: Path, split: str, expect_hwc: Optional[tuple] = None) -> tuple:
    with NpzReader(path) as z:
        num_levels = 256
        if "num_levels" in z:
            nl = z.read("num_levels")
            if nl.size != 1 or nl.dtype.kind not in "iu":
                raise DatasetError(
                    f"{path}: 'num_levels' must be one integer, found {nl.dtype} array of shape {nl.shape}"
                )
            num_levels = int(nl.reshape(-1)[0])
            if not 2 <= num_levels <= 256:
                raise DatasetError(f"{path}: 'num_levels' = {num_levels} is outside 2..256")
        need = "x_test" if split == "test" else ("x_valid" if split == "valid" and "x_valid" in z else "x_train")
        if need not in z:
            raise DatasetError(
                f"{path}: has no array {need!r} needed for the {split} split "
                f"(arrays: {', '.join(z.keys) or 'none'}); expected x_train, "
                "x_test and optionally x_valid, uint8 (N, H, W[, C])"
            )
        x = _npz_images(z, path, need, expect_hwc)
        if need != "x_train" and "x_train" in z:
            ref_shape, _ = z.info("x_train")
            ref = tuple(ref_shape[1:]) + ((1,) if len(ref_shape) == 3 else ())
            if tuple(x.shape[1:]) != ref:
                raise DatasetError(f"{path}: {need!r} images are {x.shape[1:]} but x_train images are {ref}")
        has_valid = "x_valid" in z
    title = f"npz file {path} ({num_levels} levels)"
    if split == "train+valid" and has_valid:
        with NpzReader(path) as z:
            x_valid = _npz_images(z, path, "x_valid", expect_hwc)
        if x_valid.shape[1:] != x.shape[1:]:
            raise DatasetError(f"{path}: 'x_valid' images are {x_valid.shape[1:]} but x_train images are {x.shape[1:]}")
        return (
            np.concatenate([x, x_valid]),
            num_levels,
            f"{title}; train+valid = x_train and x_valid ({len(x)} + {len(x_valid)} images)",
        )
    if need != "x_train" or has_valid:
        return x, num_levels, f"{title}; {split} = {need} ({len(x)} images)"
    n_valid = min(NPZ_MAX_VALID, -(-len(x) // 10))
    part, detail = _hold_out(x, split, n_valid, "x_train")
    return part, num_levels, f"{title}; {detail}"


def _load_folder(root: Path, split: str, log: Log) -> tuple:
    sub = {s: root / s for s in SPLITS}
    has = {s: p.is_dir() for s, p in sub.items()}
    pool = _png_files(sub["train"]) if has["train"] else _png_files(root, exclude_top=SPLITS)
    pool_name = f"{sub['train']}/" if has["train"] else f"{root}/"
    valid = _png_files(sub["valid"]) if has["valid"] else None
    test = _png_files(sub["test"]) if has["test"] else None
    if not pool:
        raise DatasetError(f"{pool_name}: no PNG images found (looked for *.png recursively)")
    for s, lst in (("valid", valid), ("test", test)):
        if lst is not None and not lst:
            raise DatasetError(f"{sub[s]}/: the {s}/ subfolder holds no PNG images")
    # Every image of every split must share one size and mode: read the headers
    # (cheap) of all of them, decode only the requested split.
    ref = None
    for f in pool + (valid or []) + (test or []):
        w, h, mode = probe_image(f, f)
        if mode not in ("RGB", "L"):
            raise DatasetError(
                f"{f}: image mode {mode!r} ({w}x{h}) is not supported; PNG folders "
                "must hold RGB or L (grayscale) images"
            )
        if ref is None:
            ref = (w, h, mode, f)
        elif (w, h, mode) != ref[:3]:
            raise DatasetError(
                f"{f}: image is {w}x{h} {mode} but {ref[3]} is "
                f"{ref[0]}x{ref[1]} {ref[2]}; all images must share size and mode"
            )
    if valid is not None:
        parts = {
            "train": (pool, f"train = {pool_name} ({len(pool)} images)"),
            "valid": (valid, f"valid = {sub['valid']}/ ({len(valid)} images)"),
        }
    else:
        if len(pool) < 2:
            raise DatasetError(
                f"{pool_name}: holds {len(pool)} PNG image; need at least 2 to "
                "split off a valid set (or add a valid/ subfolder)"
            )
        n_valid = -(-len(pool) // 10)
        parts = {}
        for s in ("train", "valid"):
            start, stop, detail = _hold_out_range(len(pool), s, n_valid, pool_name)
            parts[s] = (pool[start:stop], detail)
    if valid is not None:
        parts["train+valid"] = (
            pool + valid,
            f"train+valid = {pool_name} and {sub['valid']}/ ({len(pool)} + {len(valid)} images)",
        )
    else:
        parts["train+valid"] = (pool, f"train+valid = all {len(pool)} images of {pool_name}")
    if test is not None:
        parts["test"] = (test, f"test = {sub['test']}/ ({len(test)} images)")
    else:
        parts["test"] = (parts["valid"][0], "test = valid (no test/ subfolder): " + parts["valid"][1])
    files, detail = parts[split]
    w, h, mode = ref[:3]
    out = _empty((len(files), h, w, 3 if mode == "RGB" else 1))
    step = max(1, len(files) // 10)
    for j, f in enumerate(files):
        out[j] = decode_image(f, f, expect_size=(w, h), modes=(mode,))
        _log_progress(log, root.name, j + 1, len(files), step)
    return out, f"PNG folder {root} ({w}x{h} {mode}); {detail}"


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------


def _canonical(dataset) -> Optional[str]:
    if not isinstance(dataset, str):
        return None
    key = dataset.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in DATASET_NAMES else None


def load_dataset(
    dataset: Union[str, "os.PathLike[str]"],
    split: str = "train",
    data_dir: Union[str, "os.PathLike[str]", None] = None,
    download: bool = True,
    log: Log = print,
    expect_hwc: Optional[tuple] = None,
) -> ImageSet:
    """Load one split of a dataset as an :class:`ImageSet`.

    Args:
        dataset: one of :data:`DATASET_NAMES` (``"cifar10"``, ``"mnist"``,
            ``"fashion-mnist"``, ``"imagenet32"``, ``"imagenet64"``,
            ``"digits"``), or a path to an ``.npz`` file (arrays ``x_train``,
            ``x_test``, optional ``x_valid`` and ``num_levels``), or a path to
            a folder of PNG images.  Names win over paths; write ``./mnist``
            for a folder called ``mnist``.
        split: ``"train"``, ``"valid"``, ``"test"`` (see the module table) or
            ``"train+valid"`` (train and valid together).
        data_dir: where named datasets live (``<data_dir>/<name>/``); default
            :func:`default_data_dir`.
        download: fetch CIFAR-10 / MNIST / Fashion-MNIST when absent.
        log: called with one-line progress messages (``None`` for silence).
        expect_hwc: the image shape ``(H, W, C)`` the caller needs; an ``.npz``
            array of another shape is refused from its header, before it is
            decompressed (a small file can declare gigabytes).

    Raises:
        DatasetError: on any problem, with a message naming the file.
    """
    if split not in ALL_SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(ALL_SPLITS)}")
    say = log if log is not None else _quiet
    name = _canonical(dataset)
    if name is not None:
        base = Path(os.fspath(data_dir)).expanduser() if data_dir is not None else default_data_dir()
        root = base / name
        num_levels = 256
        if name == "cifar10":
            x, desc = _load_cifar10(root, split, download, say)
        elif name in ("mnist", "fashion-mnist"):
            x, desc = _load_mnist(name, root, split, download, say)
        elif name in ("imagenet32", "imagenet64"):
            x, desc = _load_imagenet(name, root, split, say)
        elif name in _CELEBA_FILES:
            root = base / "celeba"
            x, num_levels, desc = _load_celeba(name, root, split)
        else:
            x, desc = _load_digits(split)
            num_levels = 17
    else:
        try:
            path = Path(os.fspath(dataset)).expanduser()
        except TypeError:
            raise DatasetError(f"dataset must be a name or a path, got {type(dataset).__name__}") from None
        if path.is_dir():
            x, desc = _load_folder(path, split, say)
            name, num_levels = path.resolve().name or "images", 256
        elif path.is_file():
            if path.suffix.lower() != ".npz":
                raise DatasetError(
                    f"{path}: unsupported dataset file; expected an .npz file "
                    "(x_train, x_test, optional x_valid) or a folder of PNG images"
                )
            x, num_levels, desc = _load_npz(path, split, expect_hwc)
            name = path.stem
        else:
            raise DatasetError(
                f"unknown dataset {os.fspath(dataset)!r}: not one of {', '.join(DATASET_NAMES)} "
                "and no such .npz file or folder"
            )
    result = ImageSet(images=x, num_levels=num_levels, name=name, description=desc)
    n, h, w, c = result.images.shape
    say(f"{name} {split}: {n} images {h}x{w}x{c}, {result.num_levels} levels; {desc}")
    return result
