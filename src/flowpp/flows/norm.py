"""Per-element affine normalisation and the per-half invertible 1x1 ("Pointwise") layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ddi import DataDependentInit
from .base import Flow

__all__ = ["ElementwiseNorm", "Pointwise"]

_MIN_SCALE = 1e-10


class ElementwiseNorm(Flow, DataDependentInit):
    """y = x * g + b with g, b shaped like one sample of each half (not per channel).

    Data-dependent init sets g = 1/std and b = -mean/std over the batch, so the first batch
    leaves this layer with zero mean and unit variance at every position.
    log|det| = sum log max(g, 1e-10).
    """

    def __init__(self, half_shape: tuple[int, int, int], halves: int = 2, init_scale: float = 1.0):
        super().__init__()
        self.init_scale = init_scale
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(half_shape)) for _ in range(halves)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(half_shape)) for _ in range(halves)])
        self._register_init_flag()

    def _init_from(self, parts: tuple[Tensor, ...]) -> None:
        for part, g, b in zip(parts, self.scales, self.biases):
            mean = part.mean(dim=0)
            var = part.var(dim=0, unbiased=False)
            scale = self.init_scale * torch.rsqrt(var + 1e-8)
            g.data.copy_(scale)
            b.data.copy_(-mean * scale)
        self._mark_initialized()

    def _parts(self, x) -> tuple[Tensor, ...]:
        parts = x if isinstance(x, tuple) else (x,)
        if len(parts) != len(self.scales):
            raise ValueError(f"ElementwiseNorm built for {len(self.scales)} parts, got {len(parts)}")
        return parts

    def _logdet(self, batch: int, ref: Tensor) -> Tensor:
        total = sum(torch.log(g.clamp_min(_MIN_SCALE)).sum() for g in self.scales)
        return total.to(ref.dtype).expand(batch)

    def forward(self, x, context=None):
        parts = self._parts(x)
        if self._should_init():
            self._init_from(parts)
        out = tuple(p * g.clamp_min(_MIN_SCALE) + b for p, g, b in zip(parts, self.scales, self.biases))
        return (out if isinstance(x, tuple) else out[0]), self._logdet(parts[0].shape[0], parts[0])

    def inverse(self, y, context=None):
        parts = self._parts(y)
        out = tuple((p - b) / g.clamp_min(_MIN_SCALE) for p, g, b in zip(parts, self.scales, self.biases))
        return (out if isinstance(y, tuple) else out[0]), -self._logdet(parts[0].shape[0], parts[0])


class Pointwise(Flow):
    """An invertible C x C channel mixing for each half separately (the halves never mix).

    y[c'] = sum_c x[c] W[c, c'] at every pixel; W starts at I + 0.001 N(0, 1).
    log|det| = H W log|det W|, computed in float64 so that near-identity matrices keep precision.
    """

    def __init__(self, channels: int, halves: int = 2, noise: float = 1e-3):
        super().__init__()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.eye(channels) + noise * torch.randn(channels, channels)) for _ in range(halves)]
        )

    @staticmethod
    def _mix(x: Tensor, w: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, w.to(x.dtype))

    def _logdet(self, parts: tuple[Tensor, ...]) -> Tensor:
        ref = parts[0]
        hw = ref.shape[-1] * ref.shape[-2]
        total = sum(torch.linalg.slogdet(w.double())[1] for w in self.weights) * hw
        return total.to(ref.dtype).expand(ref.shape[0])

    def _parts(self, x) -> tuple[Tensor, ...]:
        parts = x if isinstance(x, tuple) else (x,)
        if len(parts) != len(self.weights):
            raise ValueError(f"Pointwise built for {len(self.weights)} parts, got {len(parts)}")
        return parts

    def forward(self, x, context=None):
        parts = self._parts(x)
        out = tuple(self._mix(p, w) for p, w in zip(parts, self.weights))
        return (out if isinstance(x, tuple) else out[0]), self._logdet(parts)

    def inverse(self, y, context=None):
        parts = self._parts(y)
        out = tuple(self._mix(p, torch.linalg.inv(w.double()).to(p.dtype)) for p, w in zip(parts, self.weights))
        return (out if isinstance(y, tuple) else out[0]), -self._logdet(parts)
