"""Coupling layers: the logistic-mixture-CDF coupling of Flow++ and an affine coupling.

A coupling takes a pair (x_c, x_e): x_c passes unchanged and conditions the elementwise
transform of x_e through a conditioner network (optionally with an external context).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..mixture import mixture_inverse_logit_cdf, mixture_terms
from .base import Flow, sum_except_batch

__all__ = ["MixtureLogisticCoupling", "AffineCoupling", "MIN_LOG_SCALE"]

MIN_LOG_SCALE = -7.0


class MixtureLogisticCoupling(Flow):
    """y_e = exp(s) * logit(F(x_e)) + b, F a K-component logistic mixture.

    The conditioner outputs C * (2 + 3K) channels viewed as [C, 2 + 3K]: index 0 is a
    (s = tanh(a)), 1 is b, then K logits, K means and K log-scales (clamped at -7).
    log|det| per element = log f - log F - log(1 - F) + s.

    ``mixture_dtype`` runs the elementwise part in another precision (float64 in the official
    ImageNet models) while the conditioner stays in the model's dtype.
    """

    def __init__(
        self, conditioner: nn.Module, channels: int, components: int, mixture_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.conditioner = conditioner
        self.channels = channels
        self.components = components
        self.mixture_dtype = mixture_dtype

    def _params(self, x_c: Tensor, context: Tensor | None):
        p = self.conditioner(x_c, context)
        b, _, h, w = p.shape
        p = p.view(b, self.channels, 2 + 3 * self.components, h, w)
        if self.mixture_dtype is not None:
            p = p.to(self.mixture_dtype)
        k = self.components
        s = torch.tanh(p[:, :, 0])
        t = p[:, :, 1]
        mix = p[:, :, 2:].movedim(2, -1)  # (B, C, H, W, 3K)
        logits, means, log_scales = mix[..., :k], mix[..., k : 2 * k], mix[..., 2 * k :]
        return s, t, logits, means, log_scales.clamp_min(MIN_LOG_SCALE)

    def forward(self, x, context=None):
        x_c, x_e = x
        s, t, logits, means, log_scales = self._params(x_c, context)
        x_e_m = x_e.to(s.dtype)
        terms = mixture_terms(x_e_m, logits, means, log_scales)
        y_e = torch.exp(s) * (terms.log_cdf - terms.log_sf) + t
        logdet = sum_except_batch(terms.log_pdf - terms.log_cdf - terms.log_sf + s)
        return (x_c, y_e.to(x_e.dtype)), logdet.to(x_e.dtype)

    def inverse(self, y, context=None):
        x_c, y_e = y
        s, t, logits, means, log_scales = self._params(x_c, context)
        target_logit = (y_e.to(s.dtype) - t) * torch.exp(-s)
        x_e = mixture_inverse_logit_cdf(target_logit, logits, means, log_scales)
        terms = mixture_terms(x_e, logits, means, log_scales)
        logdet = -sum_except_batch(terms.log_pdf - terms.log_cdf - terms.log_sf + s)
        return (x_c, x_e.to(y_e.dtype)), logdet.to(y_e.dtype)


class AffineCoupling(Flow):
    """y_e = exp(s) * x_e + b with s = tanh(a); the conditioner outputs C * 2 channels [a, b].

    Used by the paper's ablation "affine coupling instead of mixture of logistics".
    """

    def __init__(self, conditioner: nn.Module, channels: int):
        super().__init__()
        self.conditioner = conditioner
        self.channels = channels

    def _params(self, x_c: Tensor, context: Tensor | None):
        p = self.conditioner(x_c, context)
        b, _, h, w = p.shape
        p = p.view(b, self.channels, 2, h, w)
        return torch.tanh(p[:, :, 0]), p[:, :, 1]

    def forward(self, x, context=None):
        x_c, x_e = x
        s, t = self._params(x_c, context)
        return (x_c, x_e * torch.exp(s) + t), sum_except_batch(s)

    def inverse(self, y, context=None):
        x_c, y_e = y
        s, t = self._params(x_c, context)
        return (x_c, (y_e - t) * torch.exp(-s)), -sum_except_batch(s)
