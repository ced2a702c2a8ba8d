"""Shared fixtures: random non-identity parameters and a ready tiny model (float64)."""
from __future__ import annotations

import io

import pytest
import torch

import flowpp
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


@pytest.fixture
def perturb():
    return perturb_parameters


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the tiny tensors of the model-library tests: several threads only
    add synchronisation, and on a busy 2-core machine their spin-waits cost 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def int_images(config, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.num_levels, (n, *config.image_shape), generator=g)


@pytest.fixture(scope="session")
def tiny_config():
    return flowpp.get_config("tiny")


@pytest.fixture(scope="session")
def tiny_state(tiny_config):
    """Serialized state of a float64 tiny model: data-dependent init, then perturbed."""
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(tiny_config).double()
    assert model.initialize(int_images(tiny_config, 16, seed=1))
    perturb_parameters(model, 0.1, seed=2)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def tiny_model(tiny_config, tiny_state):
    """A fresh float64 tiny model with random, non-identity, initialised parameters."""
    model = flowpp.FlowPlusPlus(tiny_config).double()
    model.load_state_dict(torch.load(io.BytesIO(tiny_state)))
    return model
