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


# --- changes to the dataset registry's entries for one test (monkeypatch undoes them) -----------


def replace_entry(monkeypatch, name: str, **changes) -> None:
    import dataclasses

    from flowpp.data import registry

    monkeypatch.setitem(registry._ENTRIES, name, dataclasses.replace(registry.DATASETS[name], **changes))


def replace_holdout(monkeypatch, name: str, **sizes) -> None:
    """E.g. ``valid=2``: a smaller held-out split, so that tiny fixture files can be split."""
    import dataclasses

    from flowpp.data import DATASETS

    replace_entry(monkeypatch, name, holdout=dataclasses.replace(DATASETS[name].holdout, **sizes))


def replace_mirrors(monkeypatch, name: str, urls) -> None:
    replace_entry(monkeypatch, name, mirrors=tuple(urls))


def replace_md5(monkeypatch, name: str, path: str, md5: str) -> None:
    import dataclasses

    from flowpp.data import DATASETS

    files = tuple(dataclasses.replace(f, md5=md5) if f.path == path else f for f in DATASETS[name].files)
    replace_entry(monkeypatch, name, files=files)


def published_md5(name: str, path: str) -> str:
    from flowpp.data import DATASETS

    return next(f.md5 for f in DATASETS[name].files if f.path == path)
