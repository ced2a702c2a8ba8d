"""The invertible-layer interface and the sequential container.

Direction convention: ``forward`` maps data to latent (the density direction) and returns
``(y, logdet)`` with ``logdet`` of shape (B,) equal to log|det dy/dx|; ``inverse`` maps back and
returns ``(x, logdet)`` with log|det dx/dy|. Values passed between layers are a tensor or, after
a split, a pair ``(a, b)`` of tensors.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

from torch import Tensor, nn

Value = Union[Tensor, Tuple[Tensor, Tensor]]

__all__ = [
    "Flow",
    "Sequential",
    "Inverse",
    "Value",
    "batch_size_of",
    "zero_logdet",
    "sum_except_batch",
    "standard_normal_log_prob",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def batch_size_of(x: Value) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[0]


def zero_logdet(x: Value) -> Tensor:
    t = x[0] if isinstance(x, tuple) else x
    return t.new_zeros(t.shape[0])


def sum_except_batch(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """(B,) log N(z; 0, I) of a batch (B, ...)."""
    return (-0.5 * z.square() - _HALF_LOG_2PI).flatten(1).sum(1)


class Flow(nn.Module):
    """An invertible layer."""

    def forward(self, x: Value, context: Tensor | None = None) -> tuple[Value, Tensor]:  # noqa: D401
        raise NotImplementedError

    def inverse(self, y: Value, context: Tensor | None = None) -> tuple[Value, Tensor]:
        raise NotImplementedError


class Sequential(Flow):
    """Layers applied in order by ``forward`` and in reverse order by ``inverse``.

    The optional ``context`` is handed to every layer (the dequantizer's couplings use it).
    """

    def __init__(self, *layers: Flow):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Value, context: Tensor | None = None) -> tuple[Value, Tensor]:
        total = zero_logdet(x)
        for layer in self.layers:
            x, logdet = layer(x, context)
            total = total + logdet
        return x, total

    def inverse(self, y: Value, context: Tensor | None = None) -> tuple[Value, Tensor]:
        total = zero_logdet(y)
        for layer in reversed(self.layers):
            y, logdet = layer.inverse(y, context)
            total = total + logdet
        return y, total

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Flow:
        return self.layers[i]


class Inverse(Flow):
    """A layer run backwards: ``forward`` is ``flow.inverse`` and ``inverse`` is ``flow.forward``
    (e.g. the merge that closes a split)."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, x: Value, context: Tensor | None = None) -> tuple[Value, Tensor]:
        return self.flow.inverse(x, context)

    def inverse(self, y: Value, context: Tensor | None = None) -> tuple[Value, Tensor]:
        return self.flow(y, context)
