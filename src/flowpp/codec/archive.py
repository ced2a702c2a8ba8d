"""compress and decompress: images to an archive and back, exactly.

Compressing seeds the stack (``flowpp.codec.seed``: the images' digest and checksums, and the
lead images that JPEG XL codes), codes the other images onto it by bits-back in growing batches
(``flowpp.codec.bitsback``), and writes the header and the stack (``flowpp.codec.header``).
Decompressing checks the header, the model and the environment, decodes the batches in reverse
order, decodes the lead from what is left, and checks every image against the seed before
anything is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .bitsback import RanDry, decode_batch, plan_and_encode
from .entropy import CodecError, StackCoder
from .header import (
    FORMAT_VERSION,
    MAGIC,
    MAX_BATCH,
    MAX_IMAGES,
    MIN_BITS_PER_DIM,
    check_environment,
    check_model,
    environment,
    model_identity,
    pack,
    read_header,
)
from .layers import OP_STD, FlowCoder
from .lead import choose_lead, decode_lead
from .seed import build_seed, checks_words, checksum_bytes, image_digests, seed_layout_words

__all__ = ["compress", "decompress", "read_header", "Decompressed", "MAGIC", "FORMAT_VERSION"]

DEFAULT_GRID_BITS = 18  # the main flow's grid, 2**-18 (in logit units and beyond)
DEFAULT_IMAGE_GRID_BITS = 14  # the grid of the dequantizer and of y = x + u, 2**-14 of a pixel level


@dataclass
class Decompressed:
    """Decoded images (N, H, W, C) uint8, their names (None for arrays), and the header."""

    images: np.ndarray
    names: list[str] | None
    header: dict


# --- compress ---------------------------------------------------------------------------------


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
    digest, per_image = image_digests(x)
    check_bytes = checksum_bytes(x.shape[0])
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
    return pack(header, words)


def _encode_all(model, x, digest, per_image, check_bytes, grid_bits, image_bits, max_batch, lead, progress, keep_noise):
    """Seed the stack (checksums, then as many lead images as the first bits-back image needs)
    and code the other images on it by bits-back; starts over with more when the stack runs
    dry. Returns (lead images, their bytes, seed words, the coder, the bits-back run, what image
    0 borrowed or None)."""
    param = next(model.parameters())
    n = x.shape[0]
    fixed_bits = 32 * checks_words(n, check_bytes)
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
        seed_words = max(seed_layout_words(n, check_bytes, len(lead_data)), min_words)
        if k < n:
            seed_words = max(seed_words, math.ceil(need_bits / 32) + 1)
        seed = build_seed(digest, per_image, check_bytes, lead_data, seed_words)
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
    start = 4 * checks_words(count, check_bytes)
    lead_data = left.astype("<u4").tobytes()[start : start + lead_bytes]
    if lead_images:
        try:
            parts.append(decode_lead(lead_data, lead_images, shape))
        except CodecError as e:
            raise CodecError(f"decoding did not reproduce the images exactly ({e}); nothing was written") from None
        if progress is not None:
            progress(lead_images)
    x = torch.cat(parts[::-1])
    digest, per_image = image_digests(x)
    seed = build_seed(digest, per_image, check_bytes, lead_data, left.size)
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
