"""Image files: sample grids and display scaling (Pillow)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_write_bytes

__all__ = ["to_nchw", "to_nhwc", "to_display", "make_grid", "save_grid", "gather", "chw_shape"]


def to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images as stored, (N, H, W, C) numpy, -> the model's (N, C, H, W) tensor (tensors pass through)."""
    if isinstance(images, torch.Tensor):
        return images
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def chw_shape(images: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """(C, H, W) of (N, C, H, W) tensors or of (N, H, W, C) arrays (memory maps included)."""
    if isinstance(images, torch.Tensor):
        return tuple(images.shape[1:])
    n, h, w, c = images.shape
    return (c, h, w)


def gather(images: np.ndarray | torch.Tensor, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rows ``idx`` (in that order) of (N, C, H, W) tensors or (N, H, W, C) arrays, as an
    (B, C, H, W) tensor. Only those rows are read: a memory-mapped split stays on disk."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx)]
    rows = images[np.asarray(idx, dtype=np.int64)]  # fancy indexing: a copy of the rows only
    return torch.from_numpy(rows).permute(0, 3, 1, 2).contiguous()


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    """The model's (N, C, H, W) integer images -> (N, H, W, C) uint8 numpy, as stored."""
    return images.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.uint8)


def to_display(x: np.ndarray, num_levels: int) -> np.ndarray:
    """Integer images in [0, L) -> uint8 in [0, 255] (identity for L = 256)."""
    x = np.asarray(x)
    if num_levels == 256:
        return x.astype(np.uint8)
    return np.round(x.astype(np.float64) * 255.0 / (num_levels - 1)).astype(np.uint8)


def make_grid(images: torch.Tensor | np.ndarray, num_levels: int, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) integer images -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 grid."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, c, h, w = x.shape
    ncol = ncol or max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    disp = to_display(x, num_levels).transpose(0, 2, 3, 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = disp[i]
    return grid


def save_grid(
    images: torch.Tensor | np.ndarray, num_levels: int, path: str | os.PathLike, ncol: int | None = None, scale: int = 1
) -> tuple[int, int]:
    """Write a PNG grid atomically; returns its (width, height)."""
    grid = make_grid(images, num_levels, ncol)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return img.width, img.height
