"""Pieces of the training loop, tested on their own."""
from __future__ import annotations

import math

import pytest
import torch

import flowpp
from flowpp.train import backward_and_clip


def _grad_norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


@pytest.mark.parametrize("units", ["nats", "bpd"])
def test_clipping_acts_on_the_configured_scale(units):
    # A gradient whose bits/dim-scale norm is 0.5 has a nats-scale norm of 0.5 D ln 2 (66.5 for
    # the 192 dimensions of `tiny`): the official (nats) recipe clips it, the bpd one does not.
    cfg = flowpp.get_config("tiny").replace(grad_clip=1.0, grad_clip_units=units)
    nats_per_bpd = cfg.num_dims * math.log(2.0)
    w = torch.nn.Parameter(torch.tensor([0.3, -0.4], dtype=torch.float64))
    loss_bpd = (w * torch.tensor([0.6, 0.8], dtype=torch.float64)).sum() * 0.5  # d loss / dw has norm 0.5
    norm = backward_and_clip(loss_bpd, [w], cfg)
    assert norm.item() == pytest.approx(0.5 * nats_per_bpd)  # logged on the nats scale either way
    if units == "nats":
        assert _grad_norm([w]) == pytest.approx(1.0)  # clipped to unit norm, in nats units
        assert w.grad.tolist() == pytest.approx([0.6, 0.8])
    else:
        assert _grad_norm([w]) == pytest.approx(0.5)  # below 1 on the bpd scale: untouched
        assert w.grad.tolist() == pytest.approx([0.3, 0.4])


def test_nats_units_give_adam_the_official_gradient(tiny_model):
    # Unclipped (a huge threshold), the gradient is that of the mean negative log-likelihood in nats.
    cfg = tiny_model.config.replace(grad_clip=1e30, grad_clip_units="nats")
    x = torch.randint(0, 256, (4, *cfg.image_shape), generator=torch.Generator().manual_seed(0))
    noise = tiny_model.dequantizer.sample_noise(x.shape, torch.Generator().manual_seed(1)).double()
    tiny_model.eval()
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    nll = -tiny_model.log_prob(x, noise=noise).mean()
    expected = torch.autograd.grad(nll, params, retain_graph=True)
    bpd = nll / (cfg.num_dims * math.log(2.0))
    backward_and_clip(bpd, params, cfg)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
