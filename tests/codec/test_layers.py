"""Local bits-back coding through each kind of layer: exact inverses, and a cost equal to the
layer's -log|det| (what makes the archive's length the model's bound)."""

import math

import numpy as np
import pytest
import torch

from flowpp.codec.entropy import StackCoder
from flowpp.codec.layers import FlowCoder
from flowpp.flows import ElementwiseNorm, LogitPreprocess, MixtureLogisticCoupling, Pointwise, Sigmoid

GRID_BITS = 16


def _coder(words=200000):
    seed = np.random.default_rng(0).integers(1, 2**32, size=words, dtype=np.uint64).astype(np.uint32)
    return seed, FlowCoder(StackCoder(seed), GRID_BITS, torch.device("cpu"), torch.float64)


def _grid(values: torch.Tensor) -> torch.Tensor:
    return torch.round(values * 2**GRID_BITS).long()


def _same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all(bool((p == q).all()) for p, q in zip(a, b))


def _walk(model, x):
    """(layer, grid input) for every layer of the main flow, on the model's own values."""
    value = model._float(x) + 0.5
    out = []
    for layer in model.flow.layers:
        if isinstance(value, tuple):
            grid = tuple(_grid(v) for v in value)
            value = tuple(g.double() * 2**-GRID_BITS for g in grid)
        else:
            grid = _grid(value)
            value = grid.double() * 2**-GRID_BITS
        out.append((layer, grid, value))
        value, _ = layer(value)
    return out


@torch.no_grad()
def test_every_main_flow_layer_codes_and_decodes_exactly_at_the_cost_of_its_log_det(tiny_model, single_thread):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, *tiny_model.config.image_shape))
    kinds = set()
    for layer, grid, value in _walk(tiny_model, x):
        seed, fc = _coder()
        before = fc.coder.num_bits()
        coded = fc.forward([layer], grid)
        spent = fc.coder.num_bits() - before
        assert _same(fc.inverse([layer], coded), grid), type(layer).__name__
        assert np.array_equal(fc.coder.words(), seed), type(layer).__name__
        _, logdet = layer(value)
        expected = -logdet.sum().item() / math.log(2)
        elements = sum(v.numel() for v in (value if isinstance(value, tuple) else (value,)))
        if isinstance(layer, (ElementwiseNorm, Pointwise)):  # exact up to the rational scales
            assert spent == pytest.approx(expected, abs=0.002 * elements + 2), type(layer).__name__
        elif isinstance(layer, (LogitPreprocess, MixtureLogisticCoupling)):  # Gaussians: noisy, unbiased
            assert spent == pytest.approx(expected, abs=0.1 * elements + 8), type(layer).__name__
        else:
            assert spent == 0
        kinds.add(type(layer).__name__)
    assert {"LogitPreprocess", "ElementwiseNorm", "Pointwise", "MixtureLogisticCoupling", "Squeeze"} <= kinds


@torch.no_grad()
def test_a_norm_and_the_pointwise_after_it_are_coded_as_one_diagonal(tiny_model, single_thread, monkeypatch):
    """W^T (g x + b) = P L (D G U' x + D U b): the pair costs its two log-dets, exactly
    inverted, with one coded diagonal per half instead of two."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (3, *tiny_model.config.image_shape))
    walk = _walk(tiny_model, x)
    pairs = [
        (i, walk[i]) for i in range(len(walk) - 1)
        if isinstance(walk[i][0], ElementwiseNorm) and isinstance(walk[i + 1][0], Pointwise)
    ]  # fmt: skip
    assert pairs
    calls = []
    real = FlowCoder._affine
    monkeypatch.setattr(FlowCoder, "_affine", lambda self, *a: (calls.append(1), real(self, *a))[1])
    for i, (norm, grid, value) in pairs:
        pointwise = walk[i + 1][0]
        assert float(max((g - 1).abs().max() for g in norm.scales)) > 1e-3  # a norm that does something
        seed, fc = _coder()
        calls.clear()
        before = fc.coder.num_bits()
        coded = fc.forward([norm, pointwise], grid)
        spent = fc.coder.num_bits() - before
        assert len(calls) == 2  # one diagonal per half
        assert _same(fc.inverse([norm, pointwise], coded), grid)
        assert np.array_equal(fc.coder.words(), seed)
        normed, logdet_norm = norm(value)
        _, logdet_pointwise = pointwise(normed)
        expected = -(logdet_norm + logdet_pointwise).sum().item() / math.log(2)
        assert spent == pytest.approx(expected, abs=0.002 * sum(v.numel() for v in value) + 2)


@torch.no_grad()
def test_the_dequantizer_layers_and_its_sigmoid_code_exactly(tiny_model, single_thread):
    x = torch.randint(0, 256, (3, *tiny_model.config.image_shape))
    context = tiny_model.dequantizer.context_net(x.double())
    layers = list(tiny_model.dequantizer.flow.layers)
    assert isinstance(layers[-1], Sigmoid)
    seed, fc = _coder()
    eps = torch.from_numpy(fc.coder.pop_gaussian(0.0, 2.0**GRID_BITS, count=x.numel())).view(x.shape)
    v = fc.forward(layers[:-1], eps, context)
    cells = fc.sigmoid_forward(v)
    assert int(cells.min()) >= 0 and int(cells.max()) < 2**GRID_BITS
    assert _same(fc.sigmoid_inverse(cells), v)
    assert _same(fc.inverse(layers[:-1], v, context), eps)
    fc.coder.push_gaussian(eps.numpy(), 0.0, 2.0**GRID_BITS)
    assert np.array_equal(fc.coder.words(), seed)


def test_the_sigmoid_cells_cover_the_line_without_gaps_or_overlaps():
    _, fc = _coder(64)
    cells = torch.arange(0, 2**GRID_BITS + 1)
    edges = fc._cell_edges(cells)
    assert bool((edges[1:] > edges[:-1]).all())
    v = torch.arange(-(2**GRID_BITS) * 3, 2**GRID_BITS * 3, 997)
    i = torch.clamp(torch.searchsorted(edges, v, right=True) - 1, 0, 2**GRID_BITS - 1)
    seed, fc = _coder(2000)
    assert _same(fc.sigmoid_forward(v), i)
