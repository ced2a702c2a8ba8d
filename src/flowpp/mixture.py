"""Pure functions for a mixture of K logistic distributions, computed in log space.

Shapes: ``x`` is ``(...)``; ``logits``, ``means`` and ``log_scales`` are ``(..., K)`` and
broadcast against ``x[..., None]``. All functions are elementwise over ``...`` and
differentiable. ``log_scales`` are used as given: callers clamp them (Flow++ clamps at -7).

The coupling layer needs the *logit* of the CDF, ``log F - log(1 - F)``, and its derivative.
Both tails are computed as log-sum-exps of log-sigmoids, never as ``1 - F``, so they stay
accurate where F is within float epsilon of 0 or 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MixtureTerms",
    "PreparedMixture",
    "mixture_terms",
    "mixture_log_cdf",
    "mixture_log_sf",
    "mixture_log_pdf",
    "mixture_logit_cdf",
    "mixture_inverse_logit_cdf",
    "mixture_inverse_cdf",
]


class MixtureTerms(NamedTuple):
    """log F(x), log(1 - F(x)) and log f(x), each shaped like ``x``."""

    log_cdf: Tensor
    log_sf: Tensor
    log_pdf: Tensor


def _terms(x: Tensor, log_weights: Tensor, means: Tensor, inv_scales: Tensor, log_weights_pdf: Tensor) -> MixtureTerms:
    # Uses log sigmoid(-z) = log sigmoid(z) - z and log pdf_k = log sigmoid(z) + log sigmoid(-z) - log s_k,
    # so one log-sigmoid per component serves all three quantities.
    z = (x.unsqueeze(-1) - means) * inv_scales
    log_sig_pos = F.logsigmoid(z)
    log_sig_neg = log_sig_pos - z
    log_cdf = torch.logsumexp(log_weights + log_sig_pos, dim=-1)
    log_sf = torch.logsumexp(log_weights + log_sig_neg, dim=-1)
    log_pdf = torch.logsumexp(log_weights_pdf + log_sig_pos + log_sig_neg, dim=-1)
    return MixtureTerms(log_cdf, log_sf, log_pdf)


# Where a sum of sigmoids loses relative precision, log space takes over: the CDF's sum only
# underflows (its terms are accurate), the survival's terms are 1 - sigmoid, which carry an
# absolute error of one ulp of 1, so a survival below 1e-6 of its largest value, or a pdf below
# 1e-6 of its, is recomputed (a relative error of at most 1e-10 is left above).
_LINEAR_FLOOR = 1e-200
_LINEAR_RELATIVE = 1e-6


def _linear_terms(
    x: Tensor, neg_shifted_means: Tensor, inv_scales: Tensor, weights: Tensor, weights_pdf: Tensor,
    pdf_scale: Tensor, means: Tensor,
) -> MixtureTerms:  # fmt: skip
    """log F, log(1 - F) and log f at ``x`` (N,) as sums of sigmoids, then one log each: about
    twice as fast as log-sum-exps on a CPU. Parameters are laid out (K, N), components first,
    so that the sums run over the leading axis (several times faster than over the last);
    ``neg_shifted_means`` = -means * inv_scales; ``pdf_scale`` (N,) = the sum of weights_pdf,
    the largest the pdf sum can be. Elements where a sum has lost relative precision (rare: F
    or 1 - F within 1e-6 of 1) are recomputed in log space, with a host sync."""
    z = torch.addcmul(neg_shifted_means, x, inv_scales)
    sig = torch.sigmoid(z)
    complement = 1.0 - sig
    cdf = (weights * sig).sum(dim=0)
    sf = (weights * complement).sum(dim=0)
    pdf = (weights_pdf * (sig * complement)).sum(dim=0)
    terms = MixtureTerms(torch.log(cdf), torch.log(sf), torch.log(pdf))
    low = ~((cdf > _LINEAR_FLOOR) & (sf > _LINEAR_RELATIVE) & (pdf > _LINEAR_RELATIVE * pdf_scale))
    if bool(low.any()):  # a host sync: this path is for CPU callers (the codec)
        log_weights = torch.log(weights[:, low].T)
        inv = inv_scales[:, low].T
        exact = _terms(x[low], log_weights, means[:, low].T, inv, log_weights + torch.log(inv))
        for mine, theirs in zip(terms, exact):
            mine[low] = theirs
    return terms


def _prepare(logits: Tensor, log_scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    log_weights = torch.log_softmax(logits, dim=-1)
    return log_weights, torch.exp(-log_scales), log_weights - log_scales


def mixture_terms(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> MixtureTerms:
    """log F(x), log(1 - F(x)) and log f(x) in one pass (one log-sigmoid per component)."""
    log_weights, inv_scales, log_weights_pdf = _prepare(logits, log_scales)
    return _terms(x, log_weights, means, inv_scales, log_weights_pdf)


def mixture_log_cdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log F(x) of the mixture, shape of ``x``."""
    log_weights = torch.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
    return torch.logsumexp(log_weights + F.logsigmoid(z), dim=-1)


def mixture_log_sf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log(1 - F(x)) (log survival), computed without forming 1 - F."""
    log_weights = torch.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
    return torch.logsumexp(log_weights + F.logsigmoid(-z), dim=-1)


def mixture_log_pdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log f(x) = logsumexp_k [log pi_k + z_k - l_k - 2 softplus(z_k)].

    Written as log sigmoid(z) + log sigmoid(-z) - l, which equals the above exactly and, unlike
    ``F.softplus`` (linear past its threshold of 20), keeps full precision in the tails.
    """
    log_weights = torch.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
    log_sig = F.logsigmoid(z)
    return torch.logsumexp(log_weights - log_scales + 2.0 * log_sig - z, dim=-1)


def mixture_logit_cdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> tuple[Tensor, Tensor]:
    """``logit F(x)`` and ``log d/dx logit F(x) = log f - log F - log(1 - F)``."""
    t = mixture_terms(x, logits, means, log_scales)
    return t.log_cdf - t.log_sf, t.log_pdf - t.log_cdf - t.log_sf


def _initial_bracket(
    target_logit: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    # Every component satisfies z_k <= v at x <= min_k(mu_k + v s_k), so F(x) <= sigmoid(v) there,
    # and F(x) >= sigmoid(v) at x >= max_k(mu_k + v s_k): a bracket that is tight when the
    # components agree, instead of the official +-200 * sum of scales. Each component's own root
    # mu_k + v s_k, averaged with the mixture weights, is a starting point inside it.
    candidates = means + target_logit.unsqueeze(-1) * torch.exp(log_scales)
    start = (torch.softmax(logits, dim=-1) * candidates).sum(dim=-1)
    lo, hi = candidates.amin(dim=-1), candidates.amax(dim=-1)
    return lo, hi, start.clamp(lo, hi)


def mixture_inverse_logit_cdf(
    target_logit: Tensor,
    logits: Tensor,
    means: Tensor,
    log_scales: Tensor,
    *,
    max_iters: int | None = None,
    check_every: int = 4,
    with_log_slope: bool = False,
    tolerance: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Solve ``logit F(x) = target_logit`` for x, elementwise.

    Safeguarded Newton on g(x) = logit F(x) - v inside a bracket that always contains the root.
    g is exactly linear for a single logistic and close to linear in the tails, so Newton
    converges in a handful of steps; a step that would leave the bracket is replaced by
    bisection, which keeps convergence guaranteed. Iterations run on the device without
    host syncs; convergence is checked once every ``check_every`` iterations.

    Working in the logit domain keeps targets at F = 1e-30 or 1 - 1e-12 exactly representable.
    ``with_log_slope`` also returns log d/dx logit F at the last point evaluated (the root, up to
    the last step), which the iteration has computed anyway. ``tolerance``: also stop refining
    an element once its step is at most this (absolute), for callers that need less than full
    precision. :class:`PreparedMixture` solves the same problem faster on a CPU.
    """
    dtype = target_logit.dtype
    eps = torch.finfo(dtype).eps
    if max_iters is None:
        max_iters = 100 if dtype == torch.float64 else 60
    v = target_logit
    lo, hi, x = _initial_bracket(v, logits, means, log_scales)
    log_weights, inv_scales, log_weights_pdf = _prepare(logits, log_scales)  # hoisted out of the loop
    # As in Numerical Recipes' rtsafe: a Newton step is taken only if it stays in the bracket and
    # is less than half the step before last; otherwise bisect. This rules out Newton cycles
    # between the bracket ends, while a root that is itself a bracket end is still reached.
    step = hi - lo
    step_before = step
    done = torch.zeros_like(x, dtype=torch.bool)
    residual_tol = 8 * eps * (1.0 + v.abs())
    for it in range(max_iters):
        t = _terms(x, log_weights, means, inv_scales, log_weights_pdf)
        x, lo, hi, step, step_before, done, log_slope, _ = _safeguarded_step(
            t, v, x, lo, hi, step, step_before, done, residual_tol, tolerance
        )
        if (it + 1) % check_every == 0 and bool(done.all()):
            break
    return (x, log_slope) if with_log_slope else x


def _safeguarded_step(
    t: MixtureTerms, v: Tensor, x: Tensor, lo: Tensor, hi: Tensor, step: Tensor, step_before: Tensor,
    done: Tensor, residual_tol: Tensor, tolerance: float,
) -> tuple[Tensor, ...]:  # fmt: skip
    """One iteration of :func:`mixture_inverse_logit_cdf` given the mixture's terms at ``x``:
    (x, lo, hi, step, step_before, done, log slope at the old x, whether Newton was used)."""
    eps = torch.finfo(x.dtype).eps
    g = t.log_cdf - t.log_sf - v
    # Converged elements are frozen: a residual at the level of rounding in logit F itself
    # (float32 cannot improve x beyond it), or x pinned to a few ulps (below).
    done = done | (g.abs() <= residual_tol) | (g == 0)
    log_slope = t.log_pdf - t.log_cdf - t.log_sf
    # Shrink the bracket with the sign of g: the root stays inside.
    lo = torch.where(g < 0, x, lo)
    hi = torch.where(g > 0, x, hi)
    newton_step = g * torch.exp(-log_slope)
    newton = x - newton_step
    use_newton = (newton >= lo) & (newton <= hi) & torch.isfinite(newton) & (2 * newton_step.abs() <= step_before.abs())
    x_next = torch.where(done, x, torch.where(use_newton, newton, 0.5 * (lo + hi)))
    step_before, step = step, x_next - x
    # Relative tolerance, so that a root near 0 is found to full relative precision too.
    tol = torch.clamp(4 * eps * x_next.abs() + 1e-30, min=tolerance)
    done = done | (step.abs() <= tol) | (hi - lo <= tol)
    return x_next, lo, hi, step, step_before, done, log_slope, use_newton


class PreparedMixture:
    """A logistic mixture per element, prepared once for repeated evaluation on a CPU (the
    codec evaluates each coupling's mixtures once forward and several times inverting).

    The parameters are flattened; the mixture is evaluated as sums of sigmoids
    (:func:`_linear_terms`: the same precision, falling back to log space where a sum loses it,
    with a host sync), and the inverse iterates only on the
    elements not yet converged. Results agree with :func:`mixture_logit_cdf` and
    :func:`mixture_inverse_logit_cdf` to rounding.
    """

    def __init__(self, logits: Tensor, means: Tensor, log_scales: Tensor, dtype: torch.dtype | None = None):
        k = logits.shape[-1]
        self.shape = torch.broadcast_shapes(logits.shape, means.shape, log_scales.shape)[:-1]
        dtype = logits.dtype if dtype is None else dtype

        def components_first(a: Tensor) -> Tensor:  # (K, N) in ``dtype``, in one copy
            out = torch.empty((k, math.prod(self.shape)), dtype=dtype, device=a.device)
            out.view(k, *self.shape).copy_(a.expand(*self.shape, k).movedim(-1, 0))
            return out

        logits, means, log_scales = (components_first(a) for a in (logits, means, log_scales))
        weights = torch.softmax(logits, dim=0)
        inv_scales = torch.exp(-log_scales)
        weights_pdf = weights * inv_scales
        # The order _linear_terms takes them in.
        self.params = [-means * inv_scales, inv_scales, weights, weights_pdf, weights_pdf.sum(dim=0), means]
        self.scales = torch.exp(log_scales)

    def logit_cdf(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``logit F(x)`` and ``log d/dx logit F(x)``, as :func:`mixture_logit_cdf`."""
        t = _linear_terms(x.reshape(-1), *self.params)
        return (t.log_cdf - t.log_sf).view(self.shape), (t.log_pdf - t.log_cdf - t.log_sf).view(self.shape)

    def inverse_logit_cdf(self, target_logit: Tensor, *, tolerance: float, max_iters: int) -> tuple[Tensor, Tensor]:
        """x with ``logit F(x) = target_logit``, and log d/dx logit F at the last point evaluated.

        The iteration of :func:`mixture_inverse_logit_cdf` (the same steps), dropping converged
        elements from the work whenever a quarter of those left have converged. An element
        stops once its step is at most ``tolerance`` or, sooner, once the error its last Newton
        step leaves, estimated from the quadratic convergence as step^2 / (step before), is:
        one evaluation fewer than waiting for a step that small."""
        v = target_logit.reshape(-1)
        eps = torch.finfo(v.dtype).eps
        weights, means = self.params[2], self.params[5]
        params = list(self.params)
        candidates = torch.addcmul(means, v, self.scales)  # as in _initial_bracket
        lo, hi = candidates.amin(dim=0), candidates.amax(dim=0)
        x = (weights * candidates).sum(dim=0).clamp(lo, hi)
        out_x, out_slope = torch.empty_like(x), torch.empty_like(x)
        index = torch.arange(x.numel())
        step = hi - lo
        step_before = step
        done = torch.zeros_like(x, dtype=torch.bool)
        residual_tol = 8 * eps * (1.0 + v.abs())
        for it in range(max_iters):
            x, lo, hi, step, step_before, done, log_slope, use_newton = _safeguarded_step(
                _linear_terms(x, *params), v, x, lo, hi, step, step_before, done, residual_tol, tolerance
            )
            if tolerance > 0 and it > 0:
                left = step * step / step_before.abs().clamp_min(1e-300)
                done = done | (use_newton & (left <= tolerance) & (step.abs() < 0.5 * step_before.abs()))
            finished = int(done.sum())
            if finished == x.numel() or it == max_iters - 1:
                out_x[index], out_slope[index] = x, log_slope
                break
            if 4 * finished >= x.numel():
                out_x[index[done]], out_slope[index[done]] = x[done], log_slope[done]
                keep = (~done).nonzero().squeeze(1)  # gathered by index: cheaper than a mask per tensor
                index, x, lo, hi, v, residual_tol, step, step_before = (
                    a.index_select(0, keep) for a in (index, x, lo, hi, v, residual_tol, step, step_before)
                )
                done = torch.zeros_like(x, dtype=torch.bool)
                params = [p.index_select(-1, keep) for p in params]
        return out_x.view(self.shape), out_slope.view(self.shape)


def mixture_inverse_cdf(
    u: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor, *, max_iters: int | None = None
) -> Tensor:
    """Solve ``F(x) = u`` for u in (0, 1). Prefer :func:`mixture_inverse_logit_cdf` near 0 or 1."""
    return mixture_inverse_logit_cdf(torch.logit(u), logits, means, log_scales, max_iters=max_iters)
