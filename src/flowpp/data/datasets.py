"""Loading datasets: named ones through their registry entries, user files and folders.

:func:`load_dataset` returns an :class:`ImageSet`: ``uint8`` images in NHWC layout with values
in ``0 .. num_levels-1``.  A named dataset (:mod:`flowpp.data.registry`) is read by its entry's
loader, from ``<data_dir>/<folder>/``; ``data_dir`` defaults to ``$FLOWPP_DATA_DIR`` or
``~/.cache/flowpp/data``.  Anything else is a path:

=================  ==========================================  ==========================
source             train / valid                               test
=================  ==========================================  ==========================
file.npz           x_train / x_valid, else last ceil(10%) of    x_test
                   x_train (at most 5,000)
folder of PNGs     train/ / valid/, else last ceil(10%) of      test/, else = valid
                   train/ (or of all images)
=================  ==========================================  ==========================

Every split is carved by :func:`flowpp.data.splits.carve`; ``"train+valid"`` is train and valid
together.  :func:`match_levels` reduces 8-bit data to n bits (``x >> (8 - n)``) for models of
2^n levels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .errors import DatasetError
from .formats import PngImages, decode_pngs, npz_images
from .npz_files import NpzReader
from .registry import DATASET_NAMES, find_dataset
from .splits import ALL_SPLITS, SPLITS, Holdout, carve, take

__all__ = ["ImageSet", "load_dataset", "default_data_dir", "match_levels"]

# User .npz files: valid = last ceil(10%) of x_train, at most this many.
NPZ_MAX_VALID = 5000
_NPZ_HOLDOUT = Holdout(valid=Fraction(1, 10), max_valid=NPZ_MAX_VALID)
_FOLDER_HOLDOUT = Holdout(valid=Fraction(1, 10))

Log = Optional[Callable[[str], object]]


@dataclass(frozen=True, eq=False)
class ImageSet:
    """One split of an image dataset.

    Attributes:
        images: ``(N, H, W, C)`` ``uint8`` array, values in ``0..num_levels-1``
            (C = 1 for grayscale, 3 for RGB).
        num_levels: number of discrete pixel values (256 for 8-bit data).
        name: short dataset name (a registry name, or the file/folder stem).
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
# user .npz files and PNG folders
# ---------------------------------------------------------------------------


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
        x = npz_images(z, path, need, expect_hwc)
        if need != "x_train" and "x_train" in z:
            ref_shape, _ = z.info("x_train")
            ref = tuple(ref_shape[1:]) + ((1,) if len(ref_shape) == 3 else ())
            if tuple(x.shape[1:]) != ref:
                raise DatasetError(f"{path}: {need!r} images are {x.shape[1:]} but x_train images are {ref}")
        has_valid = "x_valid" in z
    title = f"npz file {path} ({num_levels} levels)"
    if split == "train+valid" and has_valid:
        with NpzReader(path) as z:
            x_valid = npz_images(z, path, "x_valid", expect_hwc)
        if x_valid.shape[1:] != x.shape[1:]:
            raise DatasetError(f"{path}: 'x_valid' images are {x_valid.shape[1:]} but x_train images are {x.shape[1:]}")
        return (
            np.concatenate([x, x_valid]),
            num_levels,
            f"{title}; train+valid = x_train and x_valid ({len(x)} + {len(x_valid)} images)",
        )
    if need != "x_train" or has_valid:
        return x, num_levels, f"{title}; {split} = {need} ({len(x)} images)"
    part, detail = take(x, split, _NPZ_HOLDOUT, "x_train")
    return part, num_levels, f"{title}; {detail}"


def _all(png: PngImages) -> list:
    return [(png, i) for i in range(len(png))]


def _load_folder(root: Path, split: str, log: Log) -> tuple:
    sub = {s: root / s for s in SPLITS}
    has = {s: p.is_dir() for s, p in sub.items()}
    pool = PngImages(sub["train"]) if has["train"] else PngImages(root, exclude_top=SPLITS)
    pool_name = f"{sub['train']}/" if has["train"] else f"{root}/"
    valid = PngImages(sub["valid"]) if has["valid"] else None
    test = PngImages(sub["test"]) if has["test"] else None
    if not len(pool):
        raise DatasetError(f"{pool_name}: no PNG images found (looked for *.png recursively)")
    for s, png in (("valid", valid), ("test", test)):
        if png is not None and not len(png):
            raise DatasetError(f"{sub[s]}/: the {s}/ subfolder holds no PNG images")
    # Every image of every split must share one size and mode: read the headers
    # (cheap) of all of them, decode only the requested split.
    ref = None
    for png, i in _all(pool) + (_all(valid) if valid else []) + (_all(test) if test else []):
        w, h, mode = png.probe(i)
        f = png.source(i)
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
            "train": (_all(pool), f"train = {pool_name} ({len(pool)} images)"),
            "valid": (_all(valid), f"valid = {sub['valid']}/ ({len(valid)} images)"),
            "train+valid": (
                _all(pool) + _all(valid),
                f"train+valid = {pool_name} and {sub['valid']}/ ({len(pool)} + {len(valid)} images)",
            ),
        }
    else:
        if len(pool) < 2:
            raise DatasetError(
                f"{pool_name}: holds {len(pool)} PNG image; need at least 2 to "
                "split off a valid set (or add a valid/ subfolder)"
            )
        parts = {}
        for s in ("train", "valid", "train+valid"):
            start, stop, detail = carve(len(pool), s, _FOLDER_HOLDOUT, pool_name)
            parts[s] = ([(pool, i) for i in range(start, stop)], detail)
    if test is not None:
        parts["test"] = (_all(test), f"test = {sub['test']}/ ({len(test)} images)")
    else:
        parts["test"] = (parts["valid"][0], "test = valid (no test/ subfolder): " + parts["valid"][1])
    images, detail = parts[split]
    w, h, mode = ref[:3]
    out = decode_pngs(images, (h, w, 3 if mode == "RGB" else 1), root.name, log, expect_size=(w, h), modes=(mode,))
    return out, f"PNG folder {root} ({w}x{h} {mode}); {detail}"


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------


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
        dataset: one of :data:`DATASET_NAMES` (see :mod:`flowpp.data.registry`), or a path to an
            ``.npz`` file (arrays ``x_train``, ``x_test``, optional ``x_valid`` and
            ``num_levels``), or a path to a folder of PNG images.  Names win over paths; write
            ``./mnist`` for a folder called ``mnist``.
        split: ``"train"``, ``"valid"``, ``"test"`` or ``"train+valid"`` (train and valid
            together); see :mod:`flowpp.data.splits`.
        data_dir: where named datasets live (``<data_dir>/<folder>/``); default
            :func:`default_data_dir`.
        download: fetch a named dataset's downloadable files when absent.
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
    spec = find_dataset(dataset)
    if spec is not None:
        base = Path(os.fspath(data_dir)).expanduser() if data_dir is not None else default_data_dir()
        x, desc = spec.loader(spec, base / spec.folder_name, split, download, say)
        name, num_levels = spec.name, spec.num_levels
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
