"""Helpers shared by the tests (imported; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from flowpp.flows import ElementwiseNorm


def perturb_parameters(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter away from its (near-identity) initial value.

    Additive N(0, scale^2) noise everywhere, except the scales of ElementwiseNorm, which are
    multiplied by exp(N(0, scale^2)) so that they stay positive (a negative scale would be
    clamped at 1e-10 and the layer would stop being invertible).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                if isinstance(mod, ElementwiseNorm) and name.startswith("scales"):
                    p.mul_(noise.exp())
                else:
                    p.add_(noise)
