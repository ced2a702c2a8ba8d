"""Scoring image files: bits/dim of each image under a trained model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .data import DatasetError
from .data.image_files import decode_image
from .data.npz_files import NpzReader
from .evaluate import evaluate_bpd
from .images import to_nchw
from .model import FlowPlusPlus

__all__ = ["read_images", "to_levels", "score_files"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_images(paths: Iterable, log: Optional[Callable[[str], object]] = None) -> list:
    """Read images from PNG/JPEG files and ``.npz`` arrays.

    Each PNG or JPEG (mode L or RGB) gives ``(basename, array)`` with the array
    ``(H, W, C)`` uint8, C = 1 for grayscale, 3 for RGB.  An ``.npz`` gives one
    entry per image of its first uint8 array that is 4-D ``(N, H, W, C)`` or
    3-D ``(N, H, W)`` (a channel axis of 1 is added), named ``"file.npz[i]"``.
    Order is the order of `paths`, then of images in each file.  Any problem
    (missing file, directory, other format or mode, broken file, npz without
    such an array) is a DatasetError naming the file.
    """
    out: list = []
    for p in paths:
        path = Path(os.fspath(p))
        if not path.exists():
            raise DatasetError(f"{path}: no such file")
        if path.is_dir():
            raise DatasetError(f"{path}: is a directory; pass image or .npz files")
        if not path.is_file():  # a FIFO, socket or device: reading it could block forever or never end
            raise DatasetError(f"{path}: is not a regular file; pass image or .npz files")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            with NpzReader(path) as npz:
                chosen = None
                for key in npz.keys:
                    shape, dtype = npz.info(key)
                    if dtype == np.uint8 and len(shape) in (3, 4) and shape[0] > 0:
                        chosen = key
                        break
                if chosen is None:
                    raise DatasetError(
                        f"{path}: has no uint8 array of shape (N,H,W,C) or (N,H,W) "
                        f"(arrays: {', '.join(npz.keys) or 'none'})"
                    )
                arr = npz.read(chosen)
            if arr.ndim == 3:
                arr = arr[..., None]
            arr = np.ascontiguousarray(arr)
            out.extend((f"{path.name}[{i}]", arr[i]) for i in range(arr.shape[0]))
            if log is not None:
                log(
                    f"read {arr.shape[0]} images {arr.shape[1]}x{arr.shape[2]}x{arr.shape[3]} "
                    f"from {path} (array {chosen!r})"
                )
        elif suffix in _IMAGE_SUFFIXES:
            arr = decode_image(path, path, formats=("PNG", "JPEG"))
            out.append((path.name, arr))
            if log is not None:
                log(f"read {path} ({arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]})")
        else:
            raise DatasetError(
                f"{path}: unsupported file type {suffix or '(none)'!r}; expected .png, .jpg, .jpeg or .npz"
            )
    return out


def to_levels(image: np.ndarray, num_levels: int, *, eight_bit: bool) -> np.ndarray:
    """An (H, W, C) uint8 image -> integer levels in [0, L).

    8-bit files (PNG/JPEG) are rescaled to L levels, the inverse of the display scaling used for
    sample grids; for L = 2^n that is ``x >> (8 - n)``, the reduction the n-bit models were
    trained with. Arrays from .npz files are taken as levels already.
    """
    if num_levels == 256 or not eight_bit:
        return image.astype(np.int64)
    if num_levels & (num_levels - 1) == 0:
        return image.astype(np.int64) >> (8 - (num_levels.bit_length() - 1))
    return np.round(image.astype(np.float64) * (num_levels - 1) / 255.0).astype(np.int64)


def score_files(
    model: FlowPlusPlus, paths: list[str], samples: int = 16, seed: int = 0, batch_size: int = 256
) -> list[dict]:
    """One row per image: {"image": name, "bpd": importance-weighted bits/dim (single-sample for S = 1)}."""
    cfg = model.config
    c, h, w = cfg.image_shape
    named = read_images(paths)
    arrays = []
    for name, img in named:
        if img.shape != (h, w, c):
            raise DatasetError(
                f"{name}: image is {img.shape[1]}x{img.shape[0]} with {img.shape[2]} channel(s), "
                f"but config {cfg.name!r} expects {w}x{h} with {c} channel(s)"
            )
        eight_bit = not name.endswith("]")  # npz entries are named "file.npz[i]"
        lv = to_levels(img, cfg.num_levels, eight_bit=eight_bit)
        if lv.max() >= cfg.num_levels:
            raise DatasetError(f"{name}: values up to {lv.max()}, but config {cfg.name!r} has {cfg.num_levels} levels")
        arrays.append(lv)
    if not arrays:
        return []
    res = evaluate_bpd(
        model, to_nchw(np.stack(arrays)), samples=samples, batch_size=batch_size, seed=seed, per_image=True
    )
    values = res["per_image_iw_bpd"] if samples > 1 else res["per_image_bpd"]
    return [{"image": name, "bpd": v} for (name, _), v in zip(named, values)]
