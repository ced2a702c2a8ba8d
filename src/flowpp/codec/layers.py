"""Local bits-back coding through Flow++'s layers, one layer at a time.

Every value is an integer grid index (value = index * 2**-grid_bits). Going from data to latent
("forward", what compression does), each layer turns the indices of its input into indices of
its output while the net change of the stack is the layer's -log|det| (in bits, up to small
overheads); "inverse" (decompression) undoes exactly that, in reverse order.

- Volume-preserving rearrangements (splits, swap, squeeze) move indices: free and exact.
- A constant elementwise affine map (Norm, and the diagonal of Pointwise) uses local bits-back
  with Gaussians (below), which is exact for a linear map.
- Pointwise's channel mixing is factored as P L D U (LU with pivoting): the unit-triangular
  factors are integer shears (free and exact), D is the affine case above.
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
from ..mixture import PreparedMixture
from .entropy import CodecError, StackCoder

__all__ = ["FlowCoder", "OP_STD", "V_LIMIT"]

OP_STD = 8.0  # grid steps that each local bits-back Gaussian spans at least
INVERSE_STEPS = 12  # Newton steps per coupling inverse at most (see _coupling_maps)
# Grid steps: after a Newton step this small the error is about its square, a tiny fraction of a step.
INVERSE_TOLERANCE = 1.0
V_LIMIT = 1e4  # the dequantizer's pre-sigmoid values must lie in [-V_LIMIT, V_LIMIT]: sigmoid is 0 or 1 beyond
_REARRANGE = (StripeSplit, ChannelSplit, SwapHalves, Squeeze)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class FlowCoder:
    """Codes grid indices through a list of flow layers (with a context for the dequantizer's)."""

    def __init__(
        self, coder: StackCoder, grid_bits: int, device: torch.device, dtype: torch.dtype, input_bits: int | None = None
    ):
        self.coder = coder
        self.grid_bits = grid_bits
        self.input_bits = grid_bits if input_bits is None else input_bits  # the grid of the images' y = x + u
        self.step = 2.0**-grid_bits
        self.device = device
        self.dtype = dtype  # the networks' dtype; the elementwise maps run in float64
        self._cache: dict[int, object] = {}

    def input_coder(self) -> "FlowCoder":
        """A coder on the same stack for the images' grid: the dequantizer and its noise."""
        if self.input_bits == self.grid_bits:
            return self
        return FlowCoder(self.coder, self.input_bits, self.device, self.dtype)

    # --- walking the layers ----------------------------------------------------------------

    def forward(self, layers, k, context: Tensor | None = None):
        for step in _fuse(layers):
            k = self._layer(step, k, context, forward=True)
        return k

    def inverse(self, layers, k, context: Tensor | None = None):
        for step in reversed(_fuse(layers)):
            k = self._layer(step, k, context, forward=False)
        return k

    def _layer(self, layer, k, context, forward: bool):
        if isinstance(layer, tuple):  # a Norm and the Pointwise after it, coded as one map
            return self._per_part(k, forward, lambda p, i: self._pointwise(p, layer[1], i, forward, norm=layer[0]))
        inner = layer.flow if isinstance(layer, Inverse) else layer
        if isinstance(inner, _REARRANGE):
            run_forward = forward != isinstance(layer, Inverse)
            return (inner(k) if run_forward else inner.inverse(k))[0]
        if isinstance(layer, Inverse):
            raise CodecError(f"cannot code the inverse of a {type(inner).__name__} layer")
        if isinstance(layer, ElementwiseNorm):
            return self._norm(layer, k, forward)
        if isinstance(layer, Pointwise):
            return self._per_part(k, forward, lambda p, i: self._pointwise(p, layer, i, forward))
        if isinstance(layer, LogitPreprocess):
            return self._elementwise(k, *self._logit_maps(layer), forward, bits_in=self.input_bits)
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

    @staticmethod
    def _spread(log_slope: Tensor, bits_in: int, bits_out: int) -> Tensor:
        """sigma in grid steps of the input: OP_STD, or wider where f shrinks a step of the
        input grid below a step of the output grid, so that f's output Gaussian (sigma f')
        still spans OP_STD steps of its own grid."""
        shrink = bits_in - bits_out - log_slope / math.log(2)  # log2(step_out / (f' step_in))
        return OP_STD * torch.exp2(torch.clamp(shrink, min=0.0, max=80.0))

    def _elementwise(self, k: Tensor, f, f_inv, forward: bool, bits_in: int | None = None) -> Tensor:
        """Local bits-back through y' = f(y) elementwise; the input may lie on a coarser grid
        (``bits_in``) than the output (this coder's): the logit pre-processing, whose outputs
        are about 70 times closer together than its inputs."""
        bits_in = self.grid_bits if bits_in is None else bits_in
        bits_out = self.grid_bits
        step_in, step_out = 2.0**-bits_in, 2.0**-bits_out

        def out_std(spread, log_slope):  # sigma f' in output steps
            return spread * torch.exp(log_slope) * (step_in / step_out)

        if forward:
            fy, log_slope = f(k.double() * step_in)
            spread = self._spread(log_slope, bits_in, bits_out)
            out = self.coder.pop_gaussian(_np(fy / step_out), _np(out_std(spread, log_slope)))
            k_out = torch.from_numpy(out).view(k.shape).to(k.device)
            back, log_slope_back = f_inv(k_out.double() * step_out)
            self.coder.push_gaussian(_np(k), _np(back / step_in), _np(self._spread(log_slope_back, bits_in, bits_out)))
            return k_out
        back, log_slope_back = f_inv(k.double() * step_out)
        out = self.coder.pop_gaussian(_np(back / step_in), _np(self._spread(log_slope_back, bits_in, bits_out)))
        k_in = torch.from_numpy(out).view(k.shape).to(k.device)
        fy, log_slope = f(k_in.double() * step_in)
        spread = self._spread(log_slope, bits_in, bits_out)
        self.coder.push_gaussian(_np(k), _np(fy / step_out), _np(out_std(spread, log_slope)))
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
            params = layer._params(x_c, context)
        if isinstance(layer, AffineCoupling):
            s, t = (p.double() for p in params)

            def f(y):
                return y * torch.exp(s) + t, s.expand_as(y)

            def f_inv(z):
                return (z - t) * torch.exp(-s), s.expand_as(z)

            return f, f_inv
        s, t, logits, means, log_scales = params
        s, t = s.double(), t.double()
        mixture = PreparedMixture(logits, means, log_scales, dtype=torch.float64)
        scale = torch.exp(s)

        def f(y):
            logit_cdf, log_slope = mixture.logit_cdf(y)
            return scale * logit_cdf + t, log_slope + s

        def f_inv(z):
            # The slope at the last point evaluated serves as f' (any function of z that both
            # sides compute works).
            y, log_slope = mixture.inverse_logit_cdf(
                (z - t) / scale, tolerance=INVERSE_TOLERANCE * 2.0**-self.grid_bits, max_iters=INVERSE_STEPS
            )
            return y, log_slope + s

        return f, f_inv

    # --- constant affine maps -------------------------------------------------------------------

    def _norm(self, layer: ElementwiseNorm, k, forward: bool):
        """Both halves in one call: they have the same shape (their parameters are stacked)."""
        key = id(layer)
        if key not in self._cache:
            g = torch.stack([s.detach().double().clamp_min(1e-10).cpu() for s in layer.scales])
            b = torch.stack([s.detach().double().cpu() for s in layer.biases])
            self._cache[key] = (g[:, None], b[:, None], torch.ones((), dtype=torch.long))
        scale, offset, sign = self._cache[key]
        parts = k if isinstance(k, tuple) else (k,)
        out = self._affine(torch.stack(parts), scale, offset, sign, forward)
        return tuple(out.unbind(0)) if isinstance(k, tuple) else out[0]

    def _affine(self, k: Tensor, scale: Tensor, offset: Tensor, sign: Tensor, forward: bool) -> Tensor:
        """y' = scale * (sign * y) + offset per element (scale > 0, parameters broadcast over the
        batch), by local bits-back with Gaussians, which is exact for a linear map: no rational
        approximation of the scale, whose error a large Norm scale would blow up."""
        shape, step = k.shape, self.step
        scale_b, offset_b, sign_b = (
            np.ascontiguousarray(np.broadcast_to(_np(t), shape)).reshape(-1) for t in (scale, offset, sign)
        )
        values = _np(k).reshape(-1)
        # sigma spans OP_STD grid steps on the narrower side, as in _elementwise.
        in_std = OP_STD * np.maximum(1.0, 1.0 / scale_b)
        out_std = in_std * scale_b
        if forward:
            values = values * sign_b
            out = self.coder.pop_gaussian((scale_b * (values * step) + offset_b) / step, out_std)
            self.coder.push_gaussian(values, ((out * step - offset_b) / scale_b) / step, in_std)
            return torch.from_numpy(out).view(shape)
        out = self.coder.pop_gaussian(((values * step - offset_b) / scale_b) / step, in_std)
        self.coder.push_gaussian(values, (scale_b * (out * step) + offset_b) / step, out_std)
        return torch.from_numpy(out * sign_b).view(shape)

    # --- Pointwise: P L D U ------------------------------------------------------------------------

    def _pointwise(self, k: Tensor, layer: Pointwise, part: int, forward: bool, norm=None) -> Tensor:
        """y = W^T x at every pixel, or W^T (g x + b) with the ElementwiseNorm before it.

        W^T = P L D U (LU with pivoting; L, U unit triangular, D diagonal). The Norm's diagonal G
        moves through U, U G = G U' with U' = G^-1 U G (unit upper triangular again, its
        coefficients now per pixel): W^T (G x + b) = P L (D G U' x + D U b). So the pair is two
        exact integer shears around one coded diagonal, D G, instead of two coded diagonals."""
        key = (id(layer), id(norm), part)
        if key not in self._cache:
            perm, lower, upper = torch.linalg.lu(layer.weights[part].detach().double().cpu().T)
            d = torch.diagonal(upper).clone()
            unit_upper = upper / d[:, None]
            sign = torch.where(d < 0, -1, 1).long().view(-1, 1, 1)
            order = perm.argmax(dim=1)  # y[a] = t[order[a]]
            channels = d.numel()
            if norm is None:
                shear_upper = unit_upper.view(channels, channels, 1, 1)
                scale, offset = d.abs().view(-1, 1, 1), torch.zeros((), dtype=torch.float64)
            else:
                g = norm.scales[part].detach().double().clamp_min(1e-10).cpu()  # (C, H, W)
                b = norm.biases[part].detach().double().cpu()
                shear_upper = unit_upper[:, :, None, None] * g[None] / g[:, None]
                scale = d.abs().view(-1, 1, 1) * g
                offset = d.view(-1, 1, 1) * torch.einsum("ij,jhw->ihw", unit_upper, b)
            self._cache[key] = (shear_upper, lower, scale, sign, offset, order)
        shear_upper, lower, scale, sign, offset, order = self._cache[key]
        channels = k.shape[1]
        if forward:
            k = k.clone()
            for i in range(channels):
                k[:, i] += _shear(k[:, i + 1 :], shear_upper[i, i + 1 :])
            k = self._affine(k, scale, offset, sign, True)
            for i in reversed(range(channels)):
                k[:, i] += _shear(k[:, :i], lower[i, :i])
            return k[:, order]
        t = torch.empty_like(k)
        t[:, order] = k
        for i in range(channels):
            t[:, i] -= _shear(t[:, :i], lower[i, :i])
        t = self._affine(t, scale, offset, sign, False)
        for i in reversed(range(channels)):
            t[:, i] -= _shear(t[:, i + 1 :], shear_upper[i, i + 1 :])
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


def _shear(others: Tensor, coefficients: Tensor) -> Tensor:
    """round(sum_j c_j k_j) over the channel axis: an exact, invertible integer shear
    (coefficients per channel, or per channel and pixel)."""
    if others.shape[1] == 0:
        return 0
    if coefficients.dim() == 1:
        coefficients = coefficients.view(-1, *([1] * (others.dim() - 2)))
    total = (others.double() * coefficients.unsqueeze(0)).sum(dim=1)
    return torch.round(total).long()


def _fuse(layers) -> list:
    """The layers in order, each ElementwiseNorm followed by a Pointwise as one (norm, pointwise) step."""
    out = []
    for layer in layers:
        if isinstance(layer, Pointwise) and out and isinstance(out[-1], ElementwiseNorm):
            out[-1] = (out[-1], layer)
        else:
            out.append(layer)
    return out
