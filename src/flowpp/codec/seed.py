"""The seed: the bottom of an archive's stack, which the first bits-back image borrows its noise
from. It is not wasted: it holds the SHA-256 of all images and a checksum of each image, then the
lead images (the first few, coded by JPEG XL; see ``flowpp.codec.lead``), then filler derived
from the digest where more bits are needed, and a top word derived from the digest. Decoding
ends with exactly the seed left on the stack; the lead images are decoded from it, and every
image is checked against it before anything is returned.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["image_digests", "build_seed", "checks_words", "seed_layout_words", "checksum_bytes"]


def image_digests(x: torch.Tensor) -> tuple[bytes, list[bytes]]:
    data = x.to(torch.uint8).contiguous().numpy()
    per_image = [hashlib.sha256(img.tobytes()).digest() for img in data]
    return hashlib.sha256(b"".join(per_image)).digest(), per_image


def build_seed(digest: bytes, per_image: list[bytes], check_bytes: int, lead: bytes, words: int) -> np.ndarray:
    """digest, checksums, lead bytes (each part padded to whole words), filler, top word."""
    body = _pad(digest + b"".join(d[:check_bytes] for d in per_image)) + _pad(lead)
    counter = 0
    while len(body) < 4 * (words - 1):
        body += hashlib.sha256(digest + counter.to_bytes(8, "little")).digest()
        counter += 1
    top = (int.from_bytes(digest[:4], "little") | 1).to_bytes(4, "little")  # an ANS stack's top word is never 0
    return np.frombuffer(body[: 4 * (words - 1)] + top, dtype="<u4").astype(np.uint32)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def checks_words(count: int, check_bytes: int) -> int:
    """Words of the seed's first part: the images' digest and their checksums."""
    return -(-(32 + check_bytes * count) // 4)


def seed_layout_words(count: int, check_bytes: int, lead_bytes: int) -> int:
    """The fewest words a seed takes: its digest, checksums and lead, and the top word."""
    return checks_words(count, check_bytes) + -(-lead_bytes // 4) + 1


def checksum_bytes(count: int) -> int:
    """Checksum bytes per image. Every image is also covered by the SHA-256 of all images; the
    checksum names the image that does not decode, and shrinks as an archive grows (at 1,000
    CIFAR-10 images, one byte each is 0.003 bits/dim)."""
    return 4 if count <= 16 else 2 if count <= 256 else 1
