"""Shared fixtures: random non-identity parameters and a ready tiny model (float64)."""

from __future__ import annotations

import io
import os

import pytest
import torch
from helpers import perturb_parameters

import flowpp


def pytest_configure(config):
    # Two xdist workers on two cores: each takes one intra-op thread, since spinning OpenMP
    # threads of two processes on the same cores slow both down several times.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_itemcollected(item):
    """Under xdist (``make test``: ``-n 2 --dist loadgroup``) the tests that start several
    processes share one worker, so that they run one at a time beside the in-process tests
    instead of crowding two cores with two process groups at once. (Marked as each test is
    collected: xdist reads the groups in its own collection hook.)"""
    if item.get_closest_marker("processes"):
        item.add_marker(pytest.mark.xdist_group("processes"))


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
