"""The archive: a header that says exactly what is needed to decode, and the coded stack.

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
at most, compressed: on small images the header is part of the rate.

The seed, at the bottom of the stack, is what the first bits-back image borrows its noise from.
It is not wasted: it holds the SHA-256 of all images and a checksum of each image, then the lead
images (the first few, coded by JPEG XL; see ``flowpp.codec.lead``), then filler derived from
the digest where more bits are needed, and a top word derived from the digest. Decoding ends
with exactly the seed left on the stack; the lead images are decoded from it, and every image is
checked against it before anything is returned.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import __version__
from ..evaluate import weights_digest
from .bitsback import RanDry, decode_batch, plan_and_encode
from .entropy import CodecError, StackCoder
from .layers import OP_STD, FlowCoder
from .lead import choose_lead, decode_lead

__all__ = [
    "compress",
    "decompress",
    "read_header",
    "Decompressed",
    "MAGIC",
    "FORMAT_VERSION",
    "environment",
    "model_identity",
]

MAGIC = b"FLOWPPBB"
FORMAT_VERSION = 2
DEFAULT_GRID_BITS = 18  # the main flow's grid, 2**-18 (in logit units and beyond)
DEFAULT_IMAGE_GRID_BITS = 14  # the grid of the dequantizer and of y = x + u, 2**-14 of a pixel level
MAX_BATCH = 64
MAX_HEADER_BYTES = 64 << 20
MAX_IMAGES = 1 << 24
MAX_PIXELS = 1 << 32  # all images together
MIN_BITS_PER_DIM = 1.0 / 64  # a header may not promise more pixels than this many bits could hold
MAX_THREADS = 1024  # the thread count a header may ask decoding to set
_PREFIX = struct.Struct("<8sHI")


@dataclass
class Decompressed:
    """Decoded images (N, H, W, C) uint8, their names (None for arrays), and the header."""

    images: np.ndarray
    names: list[str] | None
    header: dict


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


# --- seed -------------------------------------------------------------------------------------


def _image_digests(x: torch.Tensor) -> tuple[bytes, list[bytes]]:
    data = x.to(torch.uint8).contiguous().numpy()
    per_image = [hashlib.sha256(img.tobytes()).digest() for img in data]
    return hashlib.sha256(b"".join(per_image)).digest(), per_image


def _seed_words(digest: bytes, per_image: list[bytes], check_bytes: int, lead: bytes, words: int) -> np.ndarray:
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


def _checks_words(count: int, check_bytes: int) -> int:
    """Words of the seed's first part: the images' digest and their checksums."""
    return -(-(32 + check_bytes * count) // 4)


def _seed_layout_words(count: int, check_bytes: int, lead_bytes: int) -> int:
    """The fewest words a seed takes: its digest, checksums and lead, and the top word."""
    return _checks_words(count, check_bytes) + -(-lead_bytes // 4) + 1


def _check_bytes(count: int) -> int:
    """Checksum bytes per image. Every image is also covered by the SHA-256 of all images; the
    checksum names the image that does not decode, and shrinks as an archive grows (at 1,000
    CIFAR-10 images, one byte each is 0.003 bits/dim)."""
    return 4 if count <= 16 else 2 if count <= 256 else 1


# --- compress -----------------------------------------------------------------------------------


def compress(
    model,
    images,
    names: list[str] | None = None,
    *,
    grid_bits: int = DEFAULT_GRID_BITS,
    image_bits: int = DEFAULT_IMAGE_GRID_BITS,
    max_batch: int = MAX_BATCH,
    lead: bool = True,
    progress=None,
    stats: dict | None = None,
) -> bytes:
    """Compress integer images with ``model`` into an archive (bytes).

    ``images``: a (N, C, H, W) integer tensor, or a (N, H, W, C) uint8 array as stored on disk.
    ``names``: one per image (file names for PNG inputs), or None. ``progress(n)`` is called as
    n more images are done. ``lead=False`` codes every image by bits-back on a seed of filler
    (for measurements of bits-back alone). ``stats``, when given, is filled with the bits-back
    images' bits and the noise each used, and the lead's size (for measurements).
    """
    _check_levels(model)
    x = _as_nchw(images)
    model.check_images(x)
    if x.shape[0] == 0:
        raise CodecError("no images to compress")
    if x.shape[0] > MAX_IMAGES:
        raise CodecError(f"at most {MAX_IMAGES} images fit one archive, got {x.shape[0]}")
    if names is not None and len(names) != x.shape[0]:
        raise CodecError(f"{len(names)} names for {x.shape[0]} images")
    if not 8 <= grid_bits <= 24 or not 8 <= image_bits <= 22:
        raise CodecError(f"grid_bits must be in [8, 24] and image_bits in [8, 22], got {grid_bits} and {image_bits}")
    model.eval()
    device = next(model.parameters()).device
    _check_cpu(device)
    x = x.long()
    digest, per_image = _image_digests(x)
    check_bytes = _check_bytes(x.shape[0])
    k, lead_data, seed_words, coder, run, borrow = _encode_all(
        model, x, digest, per_image, check_bytes, grid_bits, image_bits, max_batch, lead, progress, stats is not None
    )
    words = coder.words()
    header = {
        "format": FORMAT_VERSION,
        "model": model_identity(model),
        "images": {
            "count": int(x.shape[0]),
            "shape": list(x.shape[1:]),
            "levels": int(model.config.num_levels),
            "names": list(names) if names is not None else None,
        },
        "coder": {
            "grid_bits": grid_bits,
            "image_grid_bits": image_bits,
            "op_std": OP_STD,
            "batches": run.batches,
            "seed_words": int(seed_words),
            "check_bytes": check_bytes,
            "lead_images": k,
            "lead_bytes": len(lead_data),
        },  # fmt: skip
        "stack_words": int(words.size),
        "environment": environment(device),
    }
    if stats is not None:
        stats.update(
            image_bits=run.image_bits, borrowed_bits=run.borrowed_bits, batches=run.batches,
            seed_bits=32 * int(seed_words), lead_images=k, lead_bits=8 * len(lead_data),
            first_borrow_bits=borrow,
            noise=torch.cat(run.noise) if run.noise else None,
        )  # fmt: skip
    return _pack(header, words)


def _encode_all(model, x, digest, per_image, check_bytes, grid_bits, image_bits, max_batch, lead, progress, keep_noise):
    """Seed the stack (checksums, then as many lead images as the first bits-back image needs)
    and code the other images on it by bits-back; starts over with more when the stack runs
    dry. Returns (lead images, their bytes, seed words, the coder, the bits-back run, what image
    0 borrowed or None)."""
    param = next(model.parameters())
    n = x.shape[0]
    fixed_bits = 32 * _checks_words(n, check_bytes)
    # What the first bits-back image borrows, measured by coding image 0 on a generous random
    # stack; a single image is all lead.
    borrow = None if lead and n == 1 else _first_borrow(x[:1], model, grid_bits, image_bits)
    need_bits = math.inf if borrow is None else 1.1 * borrow + 256
    min_words = 0
    reported = done = 0  # an attempt that starts over reports no image to ``progress`` twice

    def report(size: int) -> None:
        nonlocal reported, done
        done += size
        if progress is not None and done > reported:
            progress(done - reported)
            reported = done

    while True:
        done = 0
        if lead and need_bits > fixed_bits:
            k, lead_data = choose_lead(x, need_bits - fixed_bits)
        else:
            k, lead_data = 0, b""
        seed_words = max(_seed_layout_words(n, check_bytes, len(lead_data)), min_words)
        if k < n:
            seed_words = max(seed_words, math.ceil(need_bits / 32) + 1)
        seed = _seed_words(digest, per_image, check_bytes, lead_data, seed_words)
        coder = StackCoder(seed)
        try:
            run = plan_and_encode(
                FlowCoder(coder, grid_bits, param.device, param.dtype, image_bits), model, x[k:],
                max_batch=max_batch, keep_noise=keep_noise, progress=report,
            )  # fmt: skip
        except RanDry as e:  # an image borrowed more than image 0 did: a longer lead, and start again
            need_bits = max(1.25 * need_bits, 1.25 * e.per_image + 256)
            continue
        floor_words = math.ceil(x.numel() * MIN_BITS_PER_DIM / 32)  # what read_header demands of any archive
        if coder.words().size < floor_words:  # images so compressible that the check would refuse them: pad
            min_words = floor_words
            continue
        break
    report(k)  # the lead images
    return k, lead_data, seed_words, coder, run, borrow


def _first_borrow(x: torch.Tensor, model, grid_bits: int, image_bits: int) -> float:
    param = next(model.parameters())
    words = max(64, (grid_bits + 12) * x[0].numel() // 16)
    while True:
        noise_words = np.random.default_rng(0).integers(1, 1 << 32, size=words, dtype=np.uint64)
        trial = FlowCoder(StackCoder(noise_words.astype(np.uint32)), grid_bits, param.device, param.dtype, image_bits)
        try:
            return plan_and_encode(trial, model, x, max_batch=1).borrowed_bits[0]
        except RanDry:
            words *= 2


def _check_levels(model) -> None:
    # Images travel as 8-bit values everywhere here: digests, the lead's JPEG XL, the output.
    if model.config.num_levels > 256:
        raise CodecError(f"compression handles images of at most 256 levels; this model has {model.config.num_levels}")


def _check_cpu(device: torch.device) -> None:
    # The coder's arithmetic runs on the CPU; the networks would have to move their results
    # there at every layer, which has not been built or measured on a GPU.
    if device.type != "cpu":
        raise CodecError(f"compression runs on the CPU; the model is on {device} (use --device cpu, or model.cpu())")


def _as_nchw(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    a = np.asarray(images)
    if a.ndim != 4:
        raise CodecError(f"expected images (N, H, W, C), got an array of shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


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


def _pack(header: dict, words: np.ndarray) -> bytes:
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
        body = data[_PREFIX.size + length : -32]
        declared = int(header["stack_words"])
        images = header["images"]
        count, shape, coder = int(images["count"]), [int(s) for s in images["shape"]], header["coder"]
        batches = [int(b) for b in coder["batches"]]
        seed_words, grid_bits = int(coder["seed_words"]), int(coder["grid_bits"])
        image_bits = int(coder["image_grid_bits"])
        lead_images, lead_bytes = int(coder["lead_images"]), int(coder["lead_bytes"])
        check_bytes = int(coder["check_bytes"])
        names = images["names"]
    except (ValueError, KeyError, TypeError, zlib.error) as e:
        raise CodecError(f"archive header unreadable: {e}") from None
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
        or _seed_layout_words(count, check_bytes, lead_bytes) > seed_words
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


# --- decompress ----------------------------------------------------------------------------------


def decompress(data: bytes, model, *, progress=None) -> Decompressed:
    """Decode an archive written by :func:`compress` with the same model; every image is
    checked against its checksum and the archive's digest before anything is returned."""
    header, words = read_header(data)
    _check_levels(model)
    check_model(header, model)
    param = next(model.parameters())
    _check_cpu(param.device)
    check_environment(header, param.device)
    coder_settings = header["coder"]
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(header["environment"]["threads"]))
    try:
        coder = StackCoder(words)
        bits = int(coder_settings["grid_bits"]), int(coder_settings["image_grid_bits"])
        fc = FlowCoder(coder, bits[0], param.device, param.dtype, bits[1])
        parts = []
        for size in reversed(coder_settings["batches"]):
            parts.append(decode_batch(fc, model, size))
            if progress is not None:
                progress(size)
    except (CodecError, ValueError, OverflowError, RuntimeError) as e:
        # A value the encoder never produced: this machine computes differently, or the archive
        # was forged with valid digests. Either way there is nothing exact to return.
        raise CodecError(f"decoding did not reproduce the encoder's computation ({e}); nothing was written") from None
    finally:
        torch.set_num_threads(threads)
    settings = int(coder_settings["check_bytes"]), int(coder_settings["lead_images"]), int(coder_settings["lead_bytes"])
    check_bytes, lead_images, lead_bytes = settings
    count, shape = int(header["images"]["count"]), tuple(header["images"]["shape"])
    left = coder.words()
    if left.size != int(coder_settings["seed_words"]):
        raise CodecError("decoding did not reproduce the images exactly (the stack did not unwind to its seed); "
                         "nothing was written")  # fmt: skip
    start = 4 * _checks_words(count, check_bytes)
    lead_data = left.astype("<u4").tobytes()[start : start + lead_bytes]
    if lead_images:
        try:
            parts.append(decode_lead(lead_data, lead_images, shape))
        except CodecError as e:
            raise CodecError(f"decoding did not reproduce the images exactly ({e}); nothing was written") from None
        if progress is not None:
            progress(lead_images)
    x = torch.cat(parts[::-1])
    digest, per_image = _image_digests(x)
    seed = _seed_words(digest, per_image, check_bytes, lead_data, left.size)
    if not np.array_equal(left, seed):
        bad = _first_mismatch(left, seed, per_image, check_bytes)
        raise CodecError(f"decoding did not reproduce the images exactly ({bad}); nothing was written")
    images = x.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)
    return Decompressed(images, header["images"]["names"], header)


def _first_mismatch(left: np.ndarray, seed: np.ndarray, per_image: list[bytes], check_bytes: int) -> str:
    if left.size != seed.size:
        return "the stack did not unwind to its seed"
    stored = left.astype("<u4").tobytes()[32:]
    for i, d in enumerate(per_image):
        if stored[i * check_bytes : (i + 1) * check_bytes] != d[:check_bytes]:
            return f"image {i} does not match its checksum"
    return "the images' digest does not match"
