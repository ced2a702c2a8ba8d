"""The archive's file format: a header that says exactly what is needed to decode, and the stack.

Layout (all integers little-endian)::

    b"FLOWPPBB"                 magic (8 bytes)
    uint16 format version
    uint32 header length, then the header: UTF-8 JSON, zlib-compressed with a preset dictionary
    the stack: uint32 words, bottom first
    32 bytes: SHA-256 of everything before it

The header names the model (SHA-256 of its weights; its config as a named config plus the
fields that differ, and the SHA-256 of the whole config), the images (count, shape, levels,
names), the coder's settings and batch sizes, the number of seed words and of stack words, and
what decoding must match to reproduce the encoder's floating-point computation (flowpp, torch
and constriction versions, device, CPU kernels, thread count). Every field a few hundred bytes
at most, compressed: on small images the header is part of the rate. Reading checks all of it
before anything is decoded.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

import numpy as np
import torch

from .. import __version__
from ..evaluate import weights_digest
from .entropy import CodecError
from .layers import OP_STD
from .seed import seed_layout_words

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "environment",
    "model_identity",
    "pack",
    "read_header",
    "check_model",
    "check_environment",
]

MAGIC = b"FLOWPPBB"
FORMAT_VERSION = 2
MAX_BATCH = 64
MAX_HEADER_BYTES = 64 << 20
MAX_IMAGES = 1 << 24
MAX_PIXELS = 1 << 32  # all images together
MIN_BITS_PER_DIM = 1.0 / 64  # a header may not promise more pixels than this many bits could hold
MAX_THREADS = 1024  # the thread count a header may ask decoding to set
_PREFIX = struct.Struct("<8sHI")


def environment(device: torch.device) -> dict:
    """What decoding must match to repeat the encoder's floating-point operations exactly."""
    import constriction

    return {
        "flowpp": __version__,
        "torch": torch.__version__,
        "constriction": getattr(constriction, "__version__", _dist_version("constriction")),
        "device": device.type if device.type == "cpu" else f"{device.type}:{torch.cuda.get_device_name(device)}",
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def model_identity(model) -> dict:
    """The weights' SHA-256, and the config as its name plus the fields that differ from the
    registered config of that name (all of them when the name is not registered)."""
    from ..configs import get_config

    cfg = model.config.to_dict()
    try:
        base = get_config(model.config.name).to_dict()
        changes = {k: v for k, v in cfg.items() if base.get(k) != v}
    except Exception:  # an unregistered name: keep every field
        changes = cfg
    text = json.dumps(cfg, sort_keys=True, default=list).encode()
    return {
        "weights_sha256": weights_digest(model),
        "config": {"name": model.config.name, "changes": changes, "sha256": hashlib.sha256(text).hexdigest()},
    }


# zlib's preset dictionary for headers: the keys and common values of a header, so that a
# header costs about its digests and numbers (some 130 bytes, not 370: 2,000 bits of a one-image
# archive). Part of the format: changing it needs a new FORMAT_VERSION.
_HEADER_DICTIONARY = (
    b'"environment":{"constriction":"0.5.0","cpu_kernels":"AVX512","device":"cpu","flowpp":"0.1.0",'
    b'"threads":1,"torch":"2.4.0+cpu"},"cpu_kernels":"AVX2","cpu_kernels":"DEFAULT","threads":2,'
    b'"images":{"count":1,"levels":256,"names":null,"shape":[1,28,28]},"names":[".png",'
    b'"model":{"config":{"changes":{},"name":"cifar10-small","name":"imagenet32","name":"mnist",'
    b'"name":"digits","name":"cifar10","sha256":"'
    b'{"coder":{"batches":[1,1,1,2,2,2,3,3,4,5,6,64,64,64,64],"check_bytes":1,"grid_bits":18,"image_grid_bits":14,'
    b'"lead_bytes":1,"lead_images":1,"op_std":8.0,"seed_words":1},"format":2,"stack_words":1,"weights_sha256":"'
)


def pack(header: dict, words: np.ndarray) -> bytes:
    packer = zlib.compressobj(9, zdict=_HEADER_DICTIONARY)
    text = packer.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode()) + packer.flush()
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)), text, words.astype("<u4").tobytes()])
    return body + hashlib.sha256(body).digest()


# --- read and check ----------------------------------------------------------------------------


def read_header(data: bytes) -> tuple[dict, np.ndarray]:
    """(header, stack words) of an archive; raises CodecError (one line) unless the archive is
    whole and self-consistent. Nothing is allocated beyond the size of ``data``."""
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise CodecError("not a flowpp archive (no FLOWPPBB magic at the start)")
    _, version, length = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CodecError(f"archive format version {version}; this flowpp reads version {FORMAT_VERSION}")
    if length > MAX_HEADER_BYTES or _PREFIX.size + length + 32 > len(data):
        raise CodecError(f"archive truncated: its header declares {length} bytes, the file holds {len(data)} in all")
    if hashlib.sha256(memoryview(data)[:-32]).digest() != data[-32:]:  # no copy of a large archive
        raise CodecError("archive truncated or altered: its SHA-256 does not match its contents")
    try:
        unpacker = zlib.decompressobj(zdict=_HEADER_DICTIONARY)
        text = unpacker.decompress(data[_PREFIX.size : _PREFIX.size + length], MAX_HEADER_BYTES)
        header = json.loads(text)
        _check_fields(header)
    except (ValueError, TypeError, zlib.error) as e:
        raise CodecError(f"archive header unreadable: {e}") from None
    # Every field below is present and of its type (_check_fields).
    body = data[_PREFIX.size + length : -32]
    declared, images, coder = header["stack_words"], header["images"], header["coder"]
    count, shape, names, batches = images["count"], images["shape"], images["names"], coder["batches"]
    seed_words, grid_bits, image_bits = coder["seed_words"], coder["grid_bits"], coder["image_grid_bits"]
    lead_images, lead_bytes, check_bytes = coder["lead_images"], coder["lead_bytes"], coder["check_bytes"]
    if len(body) != 4 * declared:
        raise CodecError(f"archive inconsistent: its stack should be {4 * declared} bytes, found {len(body)}")
    words = np.frombuffer(body, dtype="<u4").astype(np.uint32)
    pixels = count * math.prod(shape) if len(shape) == 3 and min(shape) > 0 else -1
    if not (0 < count <= MAX_IMAGES) or pixels <= 0 or pixels > MAX_PIXELS:
        raise CodecError(f"archive header declares an impossible image set: {count} images of shape {shape}")
    if pixels * MIN_BITS_PER_DIM > 32 * declared:
        raise CodecError(
            f"archive header declares {count} images of shape {shape}, more than its {4 * declared}-byte stack can hold"
        )
    if sum(batches) + lead_images != count or lead_images < 0 or any(not 0 < b <= MAX_BATCH for b in batches):
        raise CodecError("archive header's lead and batch sizes do not add up to its image count")
    if (
        not 0 < seed_words <= declared
        or not 8 <= grid_bits <= 24
        or not 8 <= image_bits <= 22
        or check_bytes not in (1, 2, 4)
        or not 0 <= lead_bytes
        or (lead_images > 0) != (lead_bytes > 0)
        or seed_layout_words(count, check_bytes, lead_bytes) > seed_words
    ):
        raise CodecError("archive header's coder settings are out of range")
    if names is not None and (len(names) != count or not all(isinstance(n, str) and _safe_name(n) for n in names)):
        raise CodecError("archive header's image names are not one plain file name per image")
    if coder["op_std"] != OP_STD:
        raise CodecError(f"archive's Gaussians span {coder['op_std']} grid steps; this flowpp codes {OP_STD}")
    if not 1 <= header["environment"]["threads"] <= MAX_THREADS:
        raise CodecError(f"archive header's thread count is out of range (1 to {MAX_THREADS})")
    return header, words


# The fields decoding reads, and their JSON types: a header forged with valid digests is refused
# in one line here, not by an exception from deep inside decoding.
_FIELDS = {
    ("model", "weights_sha256"): str,
    ("model", "config", "sha256"): str,
    ("images", "count"): int,
    ("images", "shape"): list,
    ("images", "levels"): int,
    ("images", "names"): (list, type(None)),
    ("coder", "batches"): list,
    ("coder", "op_std"): float,
    **{
        ("coder", key): int
        for key in ("grid_bits", "image_grid_bits", "seed_words", "check_bytes", "lead_images", "lead_bytes")
    },  # fmt: skip
    ("stack_words",): int,
    ("environment", "threads"): int,
    **{("environment", key): str for key in ("flowpp", "torch", "constriction", "device", "cpu_kernels")},
}


def _check_fields(header) -> None:
    """TypeError naming the first field that is missing or of another type."""
    for path, kind in _FIELDS.items():
        value = header
        for key in path:
            value = value.get(key, KeyError) if isinstance(value, dict) else KeyError
        if value is KeyError:
            raise TypeError(f"no {'.'.join(path)}")
        if isinstance(value, bool) or not isinstance(value, kind):  # JSON's true is no count
            raise TypeError(f"{'.'.join(path)} is not of the expected type")
        if kind is list and not all(type(v) is int for v in value):
            raise TypeError(f"{'.'.join(path)} is not a list of integers")


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def check_model(header: dict, model) -> None:
    """CodecError unless ``model`` is the one that wrote the archive."""
    expected = header["model"]["weights_sha256"]
    actual = weights_digest(model)
    if actual == expected and header["model"]["config"]["sha256"] != model_identity(model)["config"]["sha256"]:
        raise CodecError("archive was made with the same weights under another config")
    if actual != expected:
        raise CodecError(
            f"archive was made with another model (weights sha256 {expected[:12]}...), this one is {actual[:12]}..."
        )
    images = header["images"]
    if list(images["shape"]) != list(model.config.image_shape) or images["levels"] != model.config.num_levels:
        raise CodecError("archive's image shape or levels differ from the model's config")


def check_environment(header: dict, device: torch.device) -> None:
    """CodecError naming what differs from the encoder's environment (except threads, which
    decoding sets)."""
    recorded, here = header["environment"], environment(device)
    for key in ("flowpp", "torch", "constriction", "device", "cpu_kernels"):
        if recorded.get(key) != here[key]:
            raise CodecError(
                f"archive was written with {key} {recorded.get(key)!r}, this machine has {here[key]!r}; decoding "
                "repeats the encoder's floating-point operations and needs the same (see docs/compression.md)"
            )
