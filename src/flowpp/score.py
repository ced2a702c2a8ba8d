"""Scoring image files: bits/dim of each image under a trained model."""

from __future__ import annotations

import numpy as np

from .data import DatasetError, read_images
from .evaluate import evaluate_bpd
from .images import to_nchw
from .model import FlowPlusPlus

__all__ = ["to_levels", "score_files"]


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
