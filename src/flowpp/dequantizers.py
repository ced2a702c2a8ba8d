"""Dequantizers q(u|x): noise u in [0, 1)^D added to integer pixels, with log q(u|x)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .flows import Sequential, standard_normal_log_prob

__all__ = ["UniformDequantizer", "VariationalDequantizer"]


class UniformDequantizer(nn.Module):
    """u ~ U[0, 1)^D, log q(u|x) = 0."""

    @staticmethod
    def sample_noise(shape, generator=None, device=None, dtype=None) -> Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        u = self.sample_noise(x.shape, generator, x.device, x.dtype) if noise is None else noise.to(x.dtype)
        return u, x.new_zeros(x.shape[0])


class VariationalDequantizer(nn.Module):
    """u = sigmoid(g_x(eps)), eps ~ N(0, I), g_x a coupling flow conditioned on x.

    ``flow`` maps eps to u (its last layer is the sigmoid) and receives the context network's
    output as ``context``; log q(u|x) = log N(eps) - log|det du/deps|.
    """

    def __init__(self, context_net: nn.Module, flow: Sequential):
        super().__init__()
        self.context_net = context_net
        self.flow = flow

    @staticmethod
    def sample_noise(shape, generator=None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``noise``: the Gaussian eps to transform (drawn here when None)."""
        eps = self.sample_noise(x.shape, generator, x.device, x.dtype) if noise is None else noise.to(x.dtype)
        log_p_eps = standard_normal_log_prob(eps)
        u, logdet = self.flow(eps, self.context_net(x))
        return u, log_p_eps - logdet
