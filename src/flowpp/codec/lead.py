"""The archive's lead images: the first few, coded without bits-back by JPEG XL (lossless).

Bits-back borrows: before the first image's latent is encoded, its dequantization noise and its
layers' Gaussians have been decoded from the stack, about 20 bits per value of the image. An
empty stack cannot lend, so those bits would have to be paid for, once per archive. Instead
the first images are coded by a classical lossless codec into the bottom of the stack, and the
first bits-back image borrows those bytes as its noise; decompressing gives them back, byte for
byte, and the lead images are decoded from them last. Each lead image costs what the codec makes
of it, a little over the model's bound (JPEG XL on a mosaic of a few CIFAR-10 images: about 3.9
bits/dim against the model's 3.8), instead of the 20 bits per value of a paid-for start-up.

A lead of k images is one JPEG XL image: the k images stacked vertically (k H, W, C) for one or
three channels, each channel as a gray plane (k C H, W) otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .entropy import CodecError

__all__ = ["encode_lead", "decode_lead", "choose_lead"]

_EFFORT = 7  # JPEG XL's default; effort 9 took 4x the time for no gain on mosaics of a few images


def _imagecodecs():
    try:
        import imagecodecs
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CodecError("compression needs the imagecodecs package: pip install imagecodecs") from e
    return imagecodecs


def _mosaic(x: torch.Tensor) -> np.ndarray:
    k, c, h, w = x.shape
    a = x.to(torch.uint8).numpy()
    if c in (1, 3):
        m = a.transpose(0, 2, 3, 1).reshape(k * h, w, c)
        return m[..., 0] if c == 1 else m
    return a.reshape(k * c * h, w)


def encode_lead(x: torch.Tensor) -> bytes:
    """Lossless JPEG XL bytes of the images ``x`` (k, C, H, W), values 0-255: a bare codestream
    whose size decode_lead can check before decoding (refused here otherwise, not at decoding)."""
    mosaic = _mosaic(x)
    data = bytes(_imagecodecs().jpegxl_encode(mosaic, lossless=True, effort=_EFFORT, numthreads=1))
    if _declared_size(data) != mosaic.shape[:2]:
        raise CodecError("this imagecodecs writes JPEG XL in a form whose size flowpp cannot read; compression needs "
                         "a bare JPEG XL codestream")  # fmt: skip
    return data


def decode_lead(data: bytes, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The ``count`` images (C, H, W) that :func:`encode_lead` coded into ``data``. The size
    the JPEG XL declares is checked before it is decoded: an archive cannot make the decoder
    allocate more than its header declares."""
    c, h, w = shape
    expected = _mosaic(torch.zeros(1, c, h, w, dtype=torch.uint8)).shape
    expected = (count * expected[0], *expected[1:])
    declared = _declared_size(data)
    if declared != expected[:2]:
        raise CodecError(f"the lead images declare a JPEG XL image of shape {declared}, expected {expected[:2]}")
    try:
        m = np.asarray(_imagecodecs().jpegxl_decode(data, numthreads=1))
    except Exception as e:  # the codec's own error types differ between versions
        raise CodecError(f"the lead images do not decode ({type(e).__name__}: {e})") from None
    if m.shape != expected or m.dtype != np.uint8:
        raise CodecError(f"the lead images decode to an array of shape {m.shape}, expected {expected}")
    if c in (1, 3):
        m = m.reshape(count, h, w, c).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(m.reshape(count, c, h, w))).long()


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a bare JPEG XL codestream's SizeHeader (ISO/IEC 18181-1), or None
    when ``data`` does not start with one."""
    if len(data) < 12 or data[:2] != b"\xff\x0a":
        return None
    bits = int.from_bytes(data[2:12], "little")  # read least significant bit first
    position = 0

    def take(n: int) -> int:
        nonlocal position
        value = (bits >> position) & ((1 << n) - 1)
        position += n
        return value

    def dimension(small: bool) -> int:
        if small:
            return (take(5) + 1) * 8
        return take((9, 13, 18, 30)[take(2)]) + 1

    small = bool(take(1))
    rows = dimension(small)
    ratio = take(3)
    ratios = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
    columns = dimension(small) if ratio == 0 else rows * ratios[ratio][0] // ratios[ratio][1]
    return rows, columns


def choose_lead(x: torch.Tensor, need_bits: float) -> tuple[int, bytes]:
    """The fewest first images of ``x`` whose JPEG XL holds at least ``need_bits`` bits (all of
    them when even all hold fewer), and their bytes."""
    n = x.shape[0]
    short, k = 0, 1  # ``short`` images are known to hold too few bits
    while True:
        data = encode_lead(x[:k])
        if 8 * len(data) >= need_bits or k == n:
            break
        short = k
        k = min(n, max(k + 1, math.ceil(need_bits * k / (8 * len(data)))))  # mosaics cost less per image
    while k - short > 1:  # the guess may have overshot: bisect back to the fewest
        mid = (short + k) // 2
        fewer = encode_lead(x[:mid])
        if 8 * len(fewer) >= need_bits:
            k, data = mid, fewer
        else:
            short = mid
    return k, data
