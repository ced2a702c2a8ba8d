"""Local bits-back coding through Flow++'s layers, one layer at a time.

Every value is an integer grid index (value = index * 2**-grid_bits). Going from data to latent
("forward", what compression does), each layer turns the indices of its input into indices of
its output while the net change of the stack is the layer's -log|det| (in bits, up to small
overheads); "inverse" (decompression) undoes exactly that, in reverse order.

- Volume-preserving rearrangements (splits, swap, squeeze) move indices: free and exact.
- A constant elementwise affine map (Norm, and the diagonal of Pointwise) is coded exactly with
  integer arithmetic: y' = floor((y R + r) / S) with R/S close to the scale, r decoded uniformly
  from the stack and the remainder encoded back (iFlow's modular scale transform).
- Pointwise's channel mixing is factored as P L D U (LU with pivoting): the unit-triangular
  factors are integer shears (free), D is the affine case above.
- A nonlinear elementwise map f (logit pre-processing, the couplings given their conditioning
  half) uses local bits-back with Gaussians: decode y' ~ N(f(y), (sigma f'(y))^2), then encode y
  under N(f^-1(y'), sigma^2). The net cost is -log f'(y) plus an error that shrinks with sigma;
  sigma is chosen per element so that both Gaussians span at least ``OP_STD`` grid steps.
- The dequantizer's final sigmoid maps each grid cell of v onto the grid of u many-to-one; its
  position inside the cell of u is encoded uniformly (exact, costs -log sigmoid').

Encoder and decoder compute every mean and spread from the same indices with the same
floating-point operations, which is what makes decoding exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..flows import (
    AffineCoupling,
    ChannelSplit,
    ElementwiseNorm,
    Inverse,
    LogitPreprocess,
    MixtureLogisticCoupling,
    Pointwise,
    Squeeze,
    StripeSplit,
    SwapHalves,
)
from ..mixture import mixture_inverse_logit_cdf, mixture_logit_cdf
from .entropy import CodecError, StackCoder

__all__ = ["FlowCoder", "OP_STD", "V_LIMIT"]

OP_STD = 32.0  # grid steps that each local bits-back Gaussian spans at least
SCALE_BITS = 12  # precision of the rational scales R/S of the affine maps
CHUNKS = 4  # pieces of an exact affine map, coded one after the other (see _affine)
INVERSE_STEPS = 6  # Newton steps per coupling inverse (see _coupling_maps)
V_LIMIT = 1e4  # the dequantizer's pre-sigmoid values must lie in [-V_LIMIT, V_LIMIT]: sigmoid is 0 or 1 beyond
_REARRANGE = (StripeSplit, ChannelSplit, SwapHalves, Squeeze)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class FlowCoder:
    """Codes grid indices through a list of flow layers (with a context for the dequantizer's)."""

    def __init__(self, coder: StackCoder, grid_bits: int, device: torch.device, dtype: torch.dtype):
        self.coder = coder
        self.grid_bits = grid_bits
        self.step = 2.0**-grid_bits
        self.device = device
        self.dtype = dtype  # the networks' dtype; the elementwise maps run in float64
        self._cache: dict[int, object] = {}

    # --- walking the layers ----------------------------------------------------------------

    def forward(self, layers, k, context: Tensor | None = None):
        for layer in layers:
            k = self._layer(layer, k, context, forward=True)
        return k

    def inverse(self, layers, k, context: Tensor | None = None):
        for layer in reversed(list(layers)):
            k = self._layer(layer, k, context, forward=False)
        return k

    def _layer(self, layer, k, context, forward: bool):
        inner = layer.flow if isinstance(layer, Inverse) else layer
        if isinstance(inner, _REARRANGE):
            run_forward = forward != isinstance(layer, Inverse)
            return (inner(k) if run_forward else inner.inverse(k))[0]
        if isinstance(layer, Inverse):
            raise CodecError(f"cannot code the inverse of a {type(inner).__name__} layer")
        if isinstance(layer, ElementwiseNorm):
            return self._per_part(k, forward, lambda p, i: self._affine(p, *self._norm_params(layer, i), forward))
        if isinstance(layer, Pointwise):
            return self._per_part(k, forward, lambda p, i: self._pointwise(p, layer, i, forward))
        if isinstance(layer, LogitPreprocess):
            return self._elementwise(k, *self._logit_maps(layer), forward)
        if isinstance(layer, (MixtureLogisticCoupling, AffineCoupling)):
            k_c, k_e = k
            maps = self._coupling_maps(layer, k_c, context)
            return k_c, self._elementwise(k_e, *maps, forward)
        raise CodecError(f"the codec cannot code a {type(layer).__name__} layer")

    @staticmethod
    def _per_part(k, forward: bool, code):
        """``code(part, index)`` for each half; decoding takes them in the reverse order, as
        the stack returns them."""
        parts = list(k) if isinstance(k, tuple) else [k]
        order = range(len(parts)) if forward else reversed(range(len(parts)))
        for i in order:
            parts[i] = code(parts[i], i)
        return tuple(parts) if isinstance(k, tuple) else parts[0]

    # --- nonlinear elementwise maps: local bits-back with Gaussians ---------------------------

    def _spread(self, log_slope: Tensor) -> Tensor:
        """sigma in grid steps of the input: OP_STD, or wider where f compresses (f' < 1),
        so that f's output Gaussian (sigma f') still spans OP_STD steps."""
        return OP_STD * torch.exp(torch.clamp(-log_slope, min=0.0, max=60.0))

    def _elementwise(self, k: Tensor, f, f_inv, forward: bool) -> Tensor:
        step = self.step
        if forward:
            fy, log_slope = f(k.double() * step)
            spread = self._spread(log_slope)
            out = self.coder.pop_gaussian(_np(fy / step), _np(spread * torch.exp(log_slope)))
            k_out = torch.from_numpy(out).view(k.shape).to(k.device)
            back, log_slope_back = f_inv(k_out.double() * step)
            self.coder.push_gaussian(_np(k), _np(back / step), _np(self._spread(log_slope_back)))
            return k_out
        back, log_slope_back = f_inv(k.double() * step)
        out = self.coder.pop_gaussian(_np(back / step), _np(self._spread(log_slope_back)))
        k_in = torch.from_numpy(out).view(k.shape).to(k.device)
        fy, log_slope = f(k_in.double() * step)
        self.coder.push_gaussian(_np(k), _np(fy / step), _np(self._spread(log_slope) * torch.exp(log_slope)))
        return k_in

    def _logit_maps(self, layer: LogitPreprocess):
        margin, scale = layer.margin, layer.scale

        def f(y):
            p = margin + scale * y
            out = torch.log(p) - torch.log1p(-p)
            return out, math.log(scale) - torch.nn.functional.logsigmoid(out) - torch.nn.functional.logsigmoid(-out)

        def f_inv(z):
            y = (torch.sigmoid(z) - margin) / scale
            return y, f(y)[1]

        return f, f_inv

    def _coupling_maps(self, layer, k_c: Tensor, context: Tensor | None):
        x_c = (k_c.double() * self.step).to(self.dtype)
        with torch.no_grad():
            params = [p.double() for p in layer._params(x_c, context)]
        if isinstance(layer, AffineCoupling):
            s, t = params

            def f(y):
                return y * torch.exp(s) + t, s.expand_as(y)

            def f_inv(z):
                return (z - t) * torch.exp(-s), s.expand_as(z)

            return f, f_inv
        s, t, logits, means, log_scales = params

        def f(y):
            logit_cdf, log_slope = mixture_logit_cdf(y, logits, means, log_scales)
            return torch.exp(s) * logit_cdf + t, log_slope + s

        def f_inv(z):
            # A fixed number of safeguarded Newton steps, without convergence checks: the mean of
            # a Gaussian needs no more precision than a small fraction of its spread, and the
            # slope of the last step serves as f' (any function of z both sides compute works).
            y, log_slope = mixture_inverse_logit_cdf(
                (z - t) * torch.exp(-s), logits, means, log_scales,
                max_iters=INVERSE_STEPS, check_every=INVERSE_STEPS + 1, with_log_slope=True,
            )  # fmt: skip
            return y, log_slope + s

        return f, f_inv

    # --- constant affine maps: exact integer scaling ---------------------------------------------

    def _norm_params(self, layer: ElementwiseNorm, part: int):
        key = (id(layer), part)
        if key not in self._cache:
            g = layer.scales[part].detach().double().clamp_min(1e-10).cpu()
            b = layer.biases[part].detach().double().cpu()
            num, den = _ratio(g)
            self._cache[key] = (num, den, torch.round(b / self.step).long(), torch.ones_like(num))
        return self._cache[key]

    def _affine(self, k: Tensor, num: Tensor, den: Tensor, offset: Tensor, sign: Tensor, forward: bool) -> Tensor:
        """y' = sign * y * num/den + offset, per element (parameters broadcast over the batch).

        In a few chunks, each decoded and encoded back before the next: what the stack must
        lend at once (log2 num bits per element) is a chunk's, not the whole tensor's."""
        shape = k.shape
        num_b, den_b, sign_b, offset_b = (
            np.ascontiguousarray(np.broadcast_to(_np(t), shape)).reshape(-1) for t in (num, den, sign, offset)
        )
        values = _np(k).reshape(-1)
        out = np.empty_like(values)
        chunks = _chunks(values.size)
        if forward:
            values = values * sign_b
            for c in chunks:
                v = values[c] * num_b[c] + self.coder.pop_uniform(num_b[c])
                out[c] = np.floor_divide(v, den_b[c])
                self.coder.push_uniform(v - out[c] * den_b[c], den_b[c])
            out += offset_b
        else:
            values = values - offset_b
            for c in reversed(chunks):
                v = values[c] * den_b[c] + self.coder.pop_uniform(den_b[c])
                out[c] = np.floor_divide(v, num_b[c])
                self.coder.push_uniform(v - out[c] * num_b[c], num_b[c])
            out *= sign_b
        return torch.from_numpy(out).view(shape)

    # --- Pointwise: P L D U ------------------------------------------------------------------------

    def _pointwise(self, k: Tensor, layer: Pointwise, part: int, forward: bool) -> Tensor:
        key = (id(layer), part)
        if key not in self._cache:
            # y = W^T x at every pixel; W^T = P L U with L unit lower, U = D U1, U1 unit upper.
            perm, lower, upper = torch.linalg.lu(layer.weights[part].detach().double().cpu().T)
            d = torch.diagonal(upper).clone()
            unit_upper = upper / d[:, None]
            num, den = _ratio(d.abs())
            sign = torch.where(d < 0, -1, 1).long()
            order = perm.argmax(dim=1)  # y[a] = t[order[a]]
            view = (-1, 1, 1)
            self._cache[key] = (unit_upper, lower, num.view(view), den.view(view), sign.view(view), order)
        unit_upper, lower, num, den, sign, order = self._cache[key]
        channels = k.shape[1]
        zero = torch.zeros((), dtype=torch.long)
        if forward:
            k = k.clone()
            for i in range(channels):
                k[:, i] += _shear(k[:, i + 1 :], unit_upper[i, i + 1 :])
            k = self._affine(k, num, den, zero, sign, True)
            for i in reversed(range(channels)):
                k[:, i] += _shear(k[:, :i], lower[i, :i])
            return k[:, order]
        t = torch.empty_like(k)
        t[:, order] = k
        for i in range(channels):
            t[:, i] -= _shear(t[:, :i], lower[i, :i])
        t = self._affine(t, num, den, zero, sign, False)
        for i in reversed(range(channels)):
            t[:, i] -= _shear(t[:, i + 1 :], unit_upper[i, i + 1 :])
        return t

    # --- the dequantizer's sigmoid -------------------------------------------------------------

    def _cell_edges(self, i: Tensor) -> Tensor:
        """First grid index of v in the cell of u index i: ceil(logit(i * step) / step)."""
        limit = math.ceil(V_LIMIT / self.step)
        u = i.double() * self.step
        inner = torch.ceil((torch.log(u) - torch.log1p(-u)) / self.step).long()
        top = 1 << self.grid_bits
        return torch.where(i <= 0, -limit, torch.where(i >= top, limit + 1, inner))

    def sigmoid_forward(self, k_v: Tensor) -> Tensor:
        """u index of each v (many-to-one), encoding v's place in its cell."""
        limit = math.ceil(V_LIMIT / self.step)
        if bool((k_v.abs() > limit).any()):
            raise CodecError(
                f"a dequantizer value lies beyond +-{V_LIMIT:g} before its sigmoid; this image cannot be coded"
            )
        top = 1 << self.grid_bits
        i = torch.floor(torch.sigmoid(k_v.double() * self.step) * top).long().clamp(0, top - 1)
        for _ in range(3):  # rounding in sigmoid can be off by one cell: move to the cell that holds v
            i = i - (k_v < self._cell_edges(i)).long() + (k_v >= self._cell_edges(i + 1)).long()
        lo, hi = self._cell_edges(i), self._cell_edges(i + 1)
        if bool(((k_v < lo) | (k_v >= hi)).any()):
            raise CodecError("the sigmoid's grid cells are not monotone here; this image cannot be coded")
        self.coder.push_uniform(_np(k_v - lo), _np(hi - lo))
        return i

    def sigmoid_inverse(self, i: Tensor) -> Tensor:
        lo, hi = self._cell_edges(i), self._cell_edges(i + 1)
        return lo + torch.from_numpy(self.coder.pop_uniform(_np(hi - lo))).view(i.shape)


def _chunks(n: int) -> list[slice]:
    size = max(1, -(-n // CHUNKS))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _ratio(scale: Tensor) -> tuple[Tensor, Tensor]:
    """Integers (R, S) with R/S close to ``scale``; the uniform one decoded (R) is at most
    2**SCALE_BITS so that constriction's 24-bit uniform model stays close to uniform."""
    one = 1 << SCALE_BITS
    up = scale >= 1
    num = torch.where(up, torch.full_like(scale, one), torch.round(scale * one).clamp(1, one)).long()
    den = torch.where(up, torch.round(one / scale).clamp(1, one), torch.full_like(scale, one)).long()
    return num, den


def _shear(others: Tensor, coefficients: Tensor) -> Tensor:
    """round(sum_j c_j k_j) over the channel axis: an exact, invertible integer shear."""
    if others.shape[1] == 0:
        return 0
    total = (others.double() * coefficients.view(1, -1, *([1] * (others.dim() - 2)))).sum(dim=1)
    return torch.round(total).long()
