"""PNG / JPEG images through Pillow, with size and mode checks (no decompression bombs)."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Collection, Optional, Sequence, Union

import numpy as np

from .errors import DatasetError
from .safety import MAX_IMAGE_PIXELS, PathLike, fail

__all__ = ["decode_image", "probe_image"]


def _pil():
    from PIL import Image

    return Image


@contextlib.contextmanager
def _open_image(src: Union[PathLike, bytes], formats: Sequence[str]):
    """Pillow's image of a path or of bytes, trying only ``formats``, its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fobj = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src)
        with _pil().open(fobj, formats=list(formats)) as im:
            yield im


def probe_image(src: Union[PathLike, bytes], source: PathLike, formats: Sequence[str] = ("PNG",)) -> tuple:
    """Return ``(width, height, mode)`` of an image from its header only."""
    try:
        with _open_image(src, formats) as im:
            return im.size[0], im.size[1], im.mode
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
        names = "/".join(formats)
        raise fail(source, f"cannot read as {names} image: not an image or corrupted", exc) from exc


def decode_image(
    src: Union[PathLike, bytes],
    source: PathLike,
    *,
    formats: Sequence[str] = ("PNG",),
    modes: Collection[str] = ("L", "RGB"),
    expect_size: Optional[tuple] = None,
    gray_to_rgb: bool = False,
) -> np.ndarray:
    """Decode one image to ``(H, W, C)`` uint8 (C = 1 for mode L, 3 for RGB).

    `src` is a path or the file's bytes; `source` names it in errors.  Only
    the Pillow `formats` listed are tried; the image's mode must be in
    `modes`; with `expect_size` = ``(width, height)`` other sizes are refused.
    With `gray_to_rgb`, an L image is returned as 3 equal channels.  The size
    is checked from the header before decoding (decompression bombs).
    """
    try:
        with _open_image(src, formats) as im:
            w, h = im.size
            if expect_size is not None and (w, h) != tuple(expect_size):
                raise fail(source, f"image is {w}x{h}, expected {expect_size[0]}x{expect_size[1]}")
            if w * h > MAX_IMAGE_PIXELS or w <= 0 or h <= 0:
                raise fail(source, f"image size {w}x{h} is out of range")
            if im.mode not in modes:
                raise fail(
                    source,
                    f"image mode {im.mode!r} is not supported (expected "
                    f"{' or '.join(sorted(modes))}); convert it first, "
                    "e.g. PIL Image.convert('RGB')",
                )
            im.load()
            arr = np.asarray(im, dtype=np.uint8)
            mode = im.mode
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, zlib.error, ...
        names = "/".join(formats)
        raise fail(source, f"cannot decode as {names} image: not an image, truncated or corrupted", exc) from exc
    if mode == "L":
        arr = arr[:, :, None]
        if gray_to_rgb:
            arr = np.repeat(arr, 3, axis=2)
    if arr.shape[:2] != (h, w) or arr.ndim != 3:
        raise fail(source, f"decoded to an unexpected array shape {arr.shape}")
    return np.ascontiguousarray(arr)
