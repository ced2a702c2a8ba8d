"""Exact evaluation: the single-sample dequantization bound and the importance-weighted bound.

For each image, S dequantization samples u_i ~ q(.|x) give r_i = log p(x + u_i) - log q(u_i|x);
the single-sample bound is the mean of r_i, the importance-weighted bound log mean_i exp(r_i)
(float64, max-shifted). Both are reported in bits/dim with standard errors over images.

The noise of image i comes from its own generator, seeded by (seed, i), one draw per sample:
the numbers do not depend on the batch size, on which images share a batch, or on how many
processes share the work. Under torchrun each process scores every world_size-th image and
the per-image results are all-reduced, so every process returns the same summary.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import distributed as D
from .model import FlowPlusPlus

__all__ = ["evaluate_bpd", "log_weights", "noise_generator", "summarize"]


_MASK64 = (1 << 64) - 1


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The dequantization-noise stream of image ``index`` (a CPU generator: device-independent).

    The CPU generator keeps only 32 bits of its seed, so (seed, index) is mixed (splitmix64)
    into 32 well-spread bits rather than packed side by side."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed((z ^ (z >> 31)) & 0xFFFFFFFF)


@torch.no_grad()
def log_weights(model: FlowPlusPlus, x: Tensor, generators: list[torch.Generator], samples: int) -> Tensor:
    """(samples, B) float64 r = log p(x + u) - log q(u|x) for integer images x (B, C, H, W), the
    noise of image j drawn from ``generators[j]``, one sample after another."""
    p = next(model.parameters())
    shape = (1, *x.shape[1:])
    noise = torch.stack(
        [
            torch.cat([model.dequantizer.sample_noise(shape, g, dtype=p.dtype) for _ in range(samples)])
            for g in generators
        ],
        dim=1,
    )  # (samples, B, C, H, W)
    xr = x.expand(samples, *x.shape).reshape(-1, *x.shape[1:])
    lp = model.log_prob(xr, check=False, noise=noise.reshape(-1, *x.shape[1:]).to(p.device))
    return lp.double().view(samples, x.shape[0])


def _stats(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def summarize(single_bpd: np.ndarray, iw_bpd: np.ndarray | None, samples: int) -> dict:
    mean, se = _stats(single_bpd)
    out = {"n_images": int(len(single_bpd)), "samples": int(samples), "bpd": mean, "bpd_se": se}
    if iw_bpd is not None and samples > 1:
        m, s = _stats(iw_bpd)
        out.update(iw_bpd=m, iw_bpd_se=s)
    return out


@torch.no_grad()
def evaluate_bpd(
    model: FlowPlusPlus,
    images: Tensor,
    *,
    samples: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    dist: D.DistInfo | None = None,
    progress: Callable[[int], None] | None = None,
    per_image: bool = False,
) -> dict:
    """Bits/dim of integer images (N, C, H, W) under ``model`` (put in eval mode), with S = ``samples``.

    ``batch_size`` bounds the rows of one pass (images x samples). ``progress(n)`` is told of
    each n images done by this process. With ``per_image``, the result also holds every
    image's bits/dim (``per_image_bpd``, and ``per_image_iw_bpd`` when S > 1).
    """
    dist = dist or D.DistInfo()
    model.eval()
    model.check_images(images)
    device = next(model.parameters()).device
    n = images.shape[0]
    per_pass = min(samples, batch_size)  # samples of one image in one pass
    images_per_pass = max(1, batch_size // per_pass)
    mine = torch.arange(dist.rank, n, dist.world_size)
    sums = torch.zeros(2, n, dtype=torch.float64, device=device)  # mean r, log mean exp r, per image
    for start in range(0, mine.numel(), images_per_pass):
        idx = mine[start : start + images_per_pass]
        x = images[idx].to(device)
        generators = [noise_generator(seed, int(i)) for i in idx]
        r = torch.cat(
            [log_weights(model, x, generators, min(per_pass, samples - done)) for done in range(0, samples, per_pass)]
        )
        sums[0, idx.to(device)] = r.mean(0)
        sums[1, idx.to(device)] = torch.logsumexp(r, 0) - math.log(samples)
        if progress:
            progress(idx.numel())
    D.all_reduce_sum(sums, dist)
    bpd = (-sums / model.config.nats_per_bpd).cpu().numpy()
    out = summarize(bpd[0], bpd[1], samples)
    if per_image:
        out["per_image_bpd"] = bpd[0].tolist()
        if samples > 1:
            out["per_image_iw_bpd"] = bpd[1].tolist()
    return out
