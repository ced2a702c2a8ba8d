"""Scoring image files: bits/dim of each image under a trained model."""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import DatasetError, read_images
from .evaluate import iw_log_prob
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


@torch.no_grad()
def score_files(model: FlowPlusPlus, paths: list[str], samples: int = 16, seed: int = 0,
                device: torch.device | str = "cpu", batch_size: int = 32) -> list[dict]:
    """One row per image: {"image": name, "bpd": importance-weighted bits/dim}."""
    cfg = model.config
    c, h, w = cfg.image_shape
    named = read_images(paths)
    arrays = []
    for name, img in named:
        if img.shape != (h, w, c):
            raise DatasetError(f"{name}: image is {img.shape[1]}x{img.shape[0]} with {img.shape[2]} channel(s), "
                               f"but config {cfg.name!r} expects {w}x{h} with {c} channel(s)")
        eight_bit = not name.endswith("]")  # npz entries are named "file.npz[i]"
        lv = to_levels(img, cfg.num_levels, eight_bit=eight_bit)
        if lv.max() >= cfg.num_levels:
            raise DatasetError(f"{name}: values up to {lv.max()}, but config {cfg.name!r} has {cfg.num_levels} levels")
        arrays.append(lv.transpose(2, 0, 1))
    x_all = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, c, h, w), dtype=torch.long)
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = -1.0 / (cfg.num_dims * math.log(2.0))
    bpd = []
    for i in range(0, x_all.shape[0], batch_size):
        x = x_all[i: i + batch_size].to(device)
        _, iw = iw_log_prob(model, x, samples, generator=gen)
        bpd.append((iw * scale).cpu())
    values = torch.cat(bpd).tolist() if bpd else []
    return [{"image": name, "bpd": v} for (name, _), v in zip(named, values)]
