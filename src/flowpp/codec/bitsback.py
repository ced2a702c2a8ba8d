"""Bits-back coding of whole images with a Flow++ model, batch by batch on one stack.

Compressing a batch (data -> latent): decode the dequantizer's noise from the stack (its bits
come back when decompressing), push it through the dequantizer's layers and its sigmoid to u,
form y = x + u on the grid, code y through the main flow layer by layer, and encode z under the
N(0, I) prior. Decompressing runs the same steps backwards and in reverse batch order.

The first bits-back image borrows the bits its noise needs from the bottom of the stack: the
seed, which holds the lead images' JPEG XL bytes and stays in the archive (the start-up cost;
see ``flowpp.codec.seed`` and ``flowpp.codec.lead``). Later batches borrow
from what earlier images left on the stack, so a batch may hold as many images as the stack can
lend noise to; the sizes are recorded so that decoding replays the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..dequantizers import UniformDequantizer
from ..flows import Sigmoid
from .entropy import CodecError
from .layers import FlowCoder

__all__ = ["encode_batch", "decode_batch", "EncodeStats", "plan_and_encode", "RanDry"]

_SAFETY = 1.1  # a batch borrows at most 1/_SAFETY of the stack, against per-image variation


def _dequantizer_layers(model):
    layers = list(model.dequantizer.flow.layers)
    if not isinstance(layers[-1], Sigmoid):
        raise CodecError("the dequantizer's flow must end with its sigmoid")
    return layers[:-1]


@torch.no_grad()
def encode_batch(fc: FlowCoder, model, x: torch.Tensor) -> torch.Tensor:
    """Push a batch of integer images (B, C, H, W) onto the stack; returns the dequantization
    noise it used (the dequantizer's Gaussian eps, or u for uniform dequantization).

    The dequantizer and y = x + u live on the images' grid (``fc.input_bits``), the main flow
    after its logit pre-processing on ``fc.grid_bits``."""
    dq = fc.input_coder()
    step, top = dq.step, 1 << dq.grid_bits
    n = x.numel()
    deq = model.dequantizer
    if isinstance(deq, UniformDequantizer):
        cell = torch.from_numpy(fc.coder.pop_uniform(np.full(n, top, np.int64))).view(x.shape)
        noise = cell.double() * step
    else:
        context = deq.context_net(x.to(fc.dtype))
        k_eps = torch.from_numpy(fc.coder.pop_gaussian(0.0, 1.0 / step, count=n)).view(x.shape)
        noise = k_eps.double() * step
        k_v = dq.forward(_dequantizer_layers(model), k_eps, context)
        cell = dq.sigmoid_forward(k_v)
    k_y = x.long() * top + cell
    k_z = fc.forward(model.flow.layers, k_y)
    fc.coder.push_gaussian(k_z.numpy(), 0.0, 1.0 / fc.step)
    return noise


@torch.no_grad()
def decode_batch(fc: FlowCoder, model, count: int) -> torch.Tensor:
    """Pop the last encoded batch of ``count`` images; returns them as int64 (B, C, H, W)."""
    dq = fc.input_coder()
    step, top = dq.step, 1 << dq.grid_bits
    latent = (count, *model.latent_shape)
    k_z = torch.from_numpy(fc.coder.pop_gaussian(0.0, 1.0 / fc.step, count=math.prod(latent))).view(latent)
    k_y = fc.inverse(model.flow.layers, k_z)
    x, cell = torch.div(k_y, top, rounding_mode="floor"), k_y % top
    if bool((x < 0).any() or (x >= model.config.num_levels).any()):
        raise CodecError("decoding went wrong: pixel values fell outside the model's levels (the archive does not "
                         "decode exactly here)")  # fmt: skip
    deq = model.dequantizer
    if isinstance(deq, UniformDequantizer):
        fc.coder.push_uniform(cell.numpy(), np.full(cell.numel(), top, np.int64))
        return x
    context = deq.context_net(x.to(fc.dtype))
    k_v = dq.sigmoid_inverse(cell)
    k_eps = dq.inverse(_dequantizer_layers(model), k_v, context)
    fc.coder.push_gaussian(k_eps.numpy(), 0.0, 1.0 / step)
    return x


@dataclass
class EncodeStats:
    """What an encoding cost, image by image (bits of each batch shared equally by its images)."""

    batches: list[int] = field(default_factory=list)
    image_bits: list[float] = field(default_factory=list)
    borrowed_bits: list[float] = field(default_factory=list)  # per image, the most its batch borrowed
    noise: list[torch.Tensor] = field(default_factory=list)


def plan_and_encode(
    fc: FlowCoder, model, images: torch.Tensor, *, max_batch: int, keep_noise: bool = False, progress=None
) -> EncodeStats:
    """Encode ``images`` onto ``fc.coder`` in growing batches; raises ``RanDry`` when the stack
    held too few bits to lend even one image (the caller seeds it more and starts again). A
    batch that borrowed more than the stack held is undone and coded again in halves."""
    stats = EncodeStats()
    done, borrow_per_image = 0, None
    total = images.shape[0]
    size_cap = max_batch
    while done < total:
        available = fc.coder.num_bits()
        if borrow_per_image is None:
            size = 1
        else:
            size = int(max(1, min(size_cap, total - done, available // (_SAFETY * borrow_per_image))))
        snapshot = fc.coder.words() if size > 1 else None
        start = fc.coder.num_bits()
        fc.coder.low_water = start
        try:
            noise = encode_batch(fc, model, images[done : done + size])
        except CodecError:
            # Values decoded from an exhausted stack are arbitrary and may not code back: that
            # is running dry, not a property of the images.
            if fc.coder.low_water >= 64:
                raise
        borrowed = start - fc.coder.low_water
        borrow_per_image = max(borrow_per_image or 0.0, borrowed / size)
        if fc.coder.low_water < 64:
            if snapshot is None:
                raise RanDry(borrowed / size)
            fc.coder.restore(snapshot)
            size_cap = max(1, size // 2)
            continue
        size_cap = max_batch
        spent = fc.coder.num_bits() - start
        stats.batches.append(size)
        stats.image_bits.extend([spent / size] * size)
        stats.borrowed_bits.extend([borrowed / size] * size)
        if keep_noise:
            stats.noise.append(noise)
        done += size
        if progress is not None:
            progress(size)
    return stats


class RanDry(Exception):
    """The stack ran out of bits to lend: seed it with at least ``per_image`` more and retry."""

    def __init__(self, per_image: float):
        super().__init__(per_image)
        self.per_image = per_image
