"""Fixed elementwise bijections: the logit pre-processing of L-level data and the sigmoid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Flow, sum_except_batch

__all__ = ["LogitPreprocess", "Sigmoid"]


class LogitPreprocess(Flow):
    """x in [0, L] -> y = logit(0.05 + 0.9 x / L).

    The 0.05 margin keeps the logit finite at x = 0 and x = L. The constant log(0.9 / L) per
    dimension is what puts the density on the [0, L] pixel scale (no separate D log L term).
    """

    def __init__(self, num_levels: int, margin: float = 0.05):
        super().__init__()
        self.num_levels = int(num_levels)
        self.margin = float(margin)
        self.scale = (1.0 - 2.0 * margin) / num_levels

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.margin + self.scale * x
        y = torch.log(p) - torch.log1p(-p)
        # log dp/dy = log sigmoid(y) + log sigmoid(-y); log-sigmoid keeps precision where
        # softplus (linear past its threshold) would not.
        logdet = math.log(self.scale) - F.logsigmoid(y) - F.logsigmoid(-y)
        return y, sum_except_batch(logdet)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = (torch.sigmoid(y) - self.margin) / self.scale
        logdet = -math.log(self.scale) + F.logsigmoid(y) + F.logsigmoid(-y)
        return x, sum_except_batch(logdet)


class Sigmoid(Flow):
    """y = sigmoid(x); the dequantizer's last layer, mapping R to (0, 1)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(x), sum_except_batch(F.logsigmoid(x) + F.logsigmoid(-x))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.log(y) - torch.log1p(-y)
        return x, sum_except_batch(-torch.log(y) - torch.log1p(-y))
