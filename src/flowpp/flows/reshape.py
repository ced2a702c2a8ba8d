"""Volume-preserving rearrangements: splits into halves, the swap and the squeeze.

Tensors are NCHW. Each layer here has log|det| = 0. A split is closed by ``Inverse(split)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Flow, zero_logdet

__all__ = ["StripeSplit", "ChannelSplit", "SwapHalves", "Squeeze"]

Pair = tuple[Tensor, Tensor]


def _stripe_split(x: Tensor) -> Pair:
    if x.shape[-1] % 2:
        raise ValueError(f"stripe split needs an even width, got shape {tuple(x.shape)}")
    return x[..., 0::2], x[..., 1::2]


def _stripe_merge(pair: Pair) -> Tensor:
    a, b = pair
    return torch.stack((a, b), dim=-1).flatten(-2)


def _channel_split(x: Tensor) -> Pair:
    if x.shape[1] % 2:
        raise ValueError(f"channel split needs an even channel count, got shape {tuple(x.shape)}")
    a, b = x.chunk(2, dim=1)
    return a, b


def _channel_merge(pair: Pair) -> Tensor:
    return torch.cat(pair, dim=1)


class StripeSplit(Flow):
    """(B, C, H, W) -> even columns, odd columns, each (B, C, H, W/2).

    The official code calls this "CheckerboardSplit"; it splits by column parity, not a
    checkerboard.
    """

    def forward(self, x, context=None):
        return _stripe_split(x), zero_logdet(x)

    def inverse(self, y, context=None):
        return _stripe_merge(y), zero_logdet(y)


class ChannelSplit(Flow):
    """(B, C, H, W) -> first C/2 channels, last C/2 channels."""

    def forward(self, x, context=None):
        return _channel_split(x), zero_logdet(x)

    def inverse(self, y, context=None):
        return _channel_merge(y), zero_logdet(y)


class SwapHalves(Flow):
    """(a, b) -> (b, a), so the next coupling transforms the other half."""

    def forward(self, x, context=None):
        a, b = x
        return (b, a), zero_logdet(x)

    def inverse(self, y, context=None):
        a, b = y
        return (b, a), zero_logdet(y)


class Squeeze(Flow):
    """TensorFlow ``space_to_depth(2)``: (B, C, H, W) -> (B, 4C, H/2, W/2).

    Output channel ``(dy * 2 + dx) * C + c`` holds input pixel (2i + dy, 2j + dx) of channel c,
    so a following channel split separates the top row of each 2x2 block from the bottom row.
    (``pixel_unshuffle`` orders channels (c, dy, dx) instead.)
    """

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze needs even height and width, got shape {tuple(x.shape)}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), zero_logdet(x)

    def inverse(self, y, context=None):
        b, c4, h, w = y.shape
        c = c4 // 4
        x = y.reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, c, 2 * h, 2 * w), zero_logdet(y)
