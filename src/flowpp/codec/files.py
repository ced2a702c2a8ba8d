"""Images in and out of archives on disk: PNG files (by name), .npz arrays, dataset splits."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_write_bytes
from ..data import DatasetError
from ..data.image_files import decode_image
from ..data.npz_files import NpzReader
from ..images import to_display
from .entropy import CodecError

__all__ = ["read_inputs", "check_outputs", "write_outputs", "NPZ_NAME"]

NPZ_NAME = "images.npz"


def read_inputs(paths: list[str], shape: tuple[int, int, int], levels: int) -> tuple[np.ndarray, list[str] | None]:
    """(images (N, H, W, C) uint8 in levels, names) from PNG files or one ``.npz`` with key ``x``.

    PNG files keep their names; an 8-bit PNG for a model of L < 256 levels must hold exactly the
    display values of those levels (what ``flowpp sample`` writes), so that it round-trips.
    """
    if not paths:
        raise CodecError("no images given: pass PNG files, an .npz with key 'x', or --data")
    c, h, w = shape
    npz = [p for p in paths if Path(p).suffix.lower() == ".npz"]
    if npz:
        if len(paths) != 1:
            raise CodecError("pass either PNG files or one .npz file, not both or several .npz files")
        x = _read_npz(Path(paths[0]))
        if x.shape[1:] != (h, w, c):
            raise CodecError(f"{paths[0]}: images are {x.shape[1:]} (H, W, C), the model takes {(h, w, c)}")
        if x.size and int(x.max()) >= levels:
            raise CodecError(f"{paths[0]}: values up to {int(x.max())}, but the model has {levels} levels")
        return x, None
    names, images = [], []
    for p in paths:
        path = Path(p)
        if path.suffix.lower() != ".png":
            raise CodecError(f"{p}: only PNG files (lossless) or an .npz can be compressed")
        if not path.is_file():
            raise CodecError(f"{p}: no such file" if not path.exists() else f"{p}: not a regular file")
        try:
            img = decode_image(path, path, formats=("PNG",))
        except DatasetError as e:
            raise CodecError(str(e)) from None
        if img.shape != (h, w, c):
            raise CodecError(f"{p}: image is {img.shape} (H, W, C), the model takes {(h, w, c)}")
        images.append(_png_levels(img, levels, p))
        names.append(path.name)
    seen = set()
    for name in names:
        if name in seen:
            raise CodecError(f"two images are named {name}: an archive restores images by name")
        seen.add(name)
    return np.stack(images), names


def _read_npz(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CodecError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    try:
        with NpzReader(path) as npz:
            if "x" not in npz.keys:
                raise CodecError(f"{path}: has no array 'x' (arrays: {', '.join(npz.keys) or 'none'})")
            shape, dtype = npz.info("x")
            if dtype != np.uint8 or len(shape) != 4:
                raise CodecError(f"{path}: 'x' must be uint8 (N, H, W, C), got {dtype} of shape {tuple(shape)}")
            return np.ascontiguousarray(npz.read("x"))
    except DatasetError as e:
        raise CodecError(str(e)) from None


def _png_levels(img: np.ndarray, levels: int, name: str) -> np.ndarray:
    if levels == 256:
        return img
    display = to_display(np.arange(levels), levels)
    lookup = np.full(256, -1, np.int64)
    lookup[display] = np.arange(levels)
    out = lookup[img]
    if (out < 0).any():
        raise CodecError(
            f"{name}: pixel values are not the display values of the model's {levels} levels, so the PNG "
            "cannot be restored exactly; compress the levels as an .npz with key 'x' instead"
        )
    return out.astype(np.uint8)


def check_outputs(out_dir: str | os.PathLike, names: list[str] | None) -> list[Path]:
    """The files :func:`write_outputs` would write; CodecError if ``out_dir`` is not a folder or
    one of them exists (checked before decoding too, so that nothing is decoded in vain)."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise CodecError(f"{folder} exists and is not a folder; decompress into a folder")
    targets = [folder / n for n in names] if names is not None else [folder / NPZ_NAME]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise CodecError(f"{existing[0]}{more} already exists; decompress into another folder")
    return targets


def write_outputs(out_dir: str | os.PathLike, images: np.ndarray, names: list[str] | None, levels: int) -> list[Path]:
    """Write decoded images into ``out_dir``: PNG files by name, or ``images.npz`` (key ``x``).
    Refuses to replace an existing file; each file appears whole or not at all."""
    folder = Path(out_dir)
    targets = check_outputs(folder, names)
    folder.mkdir(parents=True, exist_ok=True)
    if names is None:
        buf = io.BytesIO()
        np.savez_compressed(buf, x=images)
        atomic_write_bytes(targets[0], buf.getvalue())
        return targets
    for target, img in zip(targets, images):
        shown = to_display(img, levels)
        buf = io.BytesIO()
        Image.fromarray(shown[..., 0] if shown.shape[-1] == 1 else shown).save(buf, format="PNG")
        atomic_write_bytes(target, buf.getvalue())
    return targets
