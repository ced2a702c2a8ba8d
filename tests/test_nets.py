"""Conditioner building blocks and data-dependent init (float64, tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowpp.ddi import data_dependent_init, is_initialized
from flowpp.nets import (
    ChannelLayerNorm,
    Conditioner,
    ContextNet,
    GatedAttention,
    GatedBlock,
    GatedConv,
    GatedPointwise,
    InitConv2d,
    concat_elu,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def randn(*shape, seed=0, scale=1.0, shift=0.0):
    return shift + scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- InitConv2d and data-dependent init ----------------------------------------------------------


@pytest.mark.parametrize("weight_norm", [False, True], ids=["plain", "weight_norm"])
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_init_conv_output_statistics(weight_norm, kernel_size, init_scale):
    torch.manual_seed(0)
    conv = InitConv2d(5, 7, kernel_size, init_scale=init_scale, weight_norm=weight_norm).double()
    x = randn(16, 5, 6, 6, seed=1, scale=3.0, shift=1.0)
    assert not bool(conv.initialized)
    with data_dependent_init(conv):
        y = conv(x)
    assert bool(conv.initialized)
    mean = y.mean(dim=(0, 2, 3))
    std = y.std(dim=(0, 2, 3), unbiased=False)
    assert mean.abs().max().item() < 1e-12 * (1 + init_scale)
    assert torch.allclose(std, torch.full_like(std, init_scale), rtol=1e-6)
    # The returned output is what the initialised layer computes.
    assert torch.allclose(conv(x), y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("weight_norm", [False, True], ids=["plain", "weight_norm"])
def test_init_happens_once_and_only_in_init_mode(weight_norm):
    torch.manual_seed(0)
    conv = InitConv2d(3, 4, 3, weight_norm=weight_norm).double()
    x = randn(8, 3, 5, 5, seed=2, scale=4.0)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    conv(x)  # outside init mode: nothing changes
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    with data_dependent_init(conv):
        conv(x)
    after = {k: v.clone() for k, v in conv.state_dict().items()}
    assert not torch.equal(before["bias"], after["bias"])
    with data_dependent_init(conv):
        conv(x * 10 + 3)  # already initialised: ignored
    assert all(torch.equal(after[k], v) for k, v in conv.state_dict().items())
    assert conv._ddi_active is False


def test_data_dependent_init_context_is_reset_on_error():
    conv = InitConv2d(3, 4, 1).double()
    with pytest.raises(RuntimeError):
        with data_dependent_init(conv):
            raise RuntimeError("boom")
    assert conv._ddi_active is False and not bool(conv.initialized)
    assert not is_initialized(conv)


def test_weight_norm_kernel_and_one_by_one_path():
    torch.manual_seed(0)
    conv = InitConv2d(4, 6, 1, weight_norm=True).double()
    with torch.no_grad():
        conv.g.copy_(randn(6, seed=3))
    k = conv.kernel()
    norms = k.flatten(1).norm(dim=1)
    assert torch.allclose(norms, conv.g.abs(), rtol=1e-13)
    with torch.no_grad():
        conv.v.mul_(7.0)  # direction only
    assert torch.allclose(conv.kernel(), k, rtol=1e-13)
    x = randn(2, 4, 3, 3, seed=4)
    assert torch.allclose(conv(x), F.conv2d(x, k, conv.bias), rtol=1e-13, atol=1e-14)


def test_concat_elu():
    x = randn(2, 3, 2, 2, seed=5)
    y = concat_elu(x)
    assert y.shape == (2, 6, 2, 2)
    assert torch.equal(y[:, :3], F.elu(x)) and torch.equal(y[:, 3:], F.elu(-x))


def test_channel_layer_norm_normalises_over_channels():
    ln = ChannelLayerNorm(5).double()
    with torch.no_grad():
        ln.weight.copy_(randn(5, seed=6))
        ln.bias.copy_(randn(5, seed=7))
    x = randn(2, 5, 3, 4, seed=8, scale=3.0, shift=2.0)
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mu) / torch.sqrt(var + 1e-5) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    assert torch.allclose(ln(x), expected, rtol=1e-12, atol=1e-12)


# --- gated blocks against explicit formulas -------------------------------------------------------


def _random_init(module, seed):
    """Random offsets on every parameter (biases start at 0, gains at 1): nothing trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def conv_apply(conv: InitConv2d, x):
    return F.conv2d(x, conv.kernel(), conv.bias, padding=conv.kernel_size // 2)


def gate(h):
    a, b = h.chunk(2, dim=1)
    return a * torch.sigmoid(b)


@pytest.mark.parametrize("with_context", [False, True])
def test_gated_conv_formula(with_context):
    torch.manual_seed(0)
    block = GatedConv(6, context_channels=3 if with_context else 0).double()
    _random_init(block, 1)
    x = randn(2, 6, 4, 4, seed=9)
    ctx = randn(2, 3, 4, 4, seed=10) if with_context else None
    h = conv_apply(block.conv_in, concat_elu(x))
    if with_context:
        h = h + conv_apply(block.context_proj, concat_elu(ctx))
    expected = x + gate(conv_apply(block.conv_gate, concat_elu(h)))
    assert torch.allclose(block(x, ctx), expected, rtol=1e-12, atol=1e-12)
    if with_context:
        with pytest.raises(ValueError, match="context"):
            block(x, None)


def test_gated_attention_matches_explicit_multi_head_attention():
    torch.manual_seed(0)
    c, heads, h, w = 8, 2, 3, 4
    block = GatedAttention(c, heads).double()
    _random_init(block, 2)
    x = randn(2, c, h, w, seed=11)
    pos = randn(c, h, w, seed=12, scale=0.5)
    qkv = conv_apply(block.qkv, x + pos)  # (B, 3C, H, W): q | k | v, heads contiguous in each
    d = c // heads
    out = torch.empty(2, c, h * w, dtype=F64)
    for b in range(2):
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            q = qkv[b, :c][sl].reshape(d, h * w).T
            k = qkv[b, c : 2 * c][sl].reshape(d, h * w).T
            v = qkv[b, 2 * c :][sl].reshape(d, h * w).T
            att = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
            out[b, sl] = (att @ v).T
    expected = x + gate(conv_apply(block.proj_out, out.reshape(2, c, h, w)))
    assert torch.allclose(block(x, pos), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        GatedAttention(6, 4)


def test_gated_pointwise_formula():
    torch.manual_seed(0)
    block = GatedPointwise(4).double()
    _random_init(block, 3)
    x = randn(2, 4, 3, 3, seed=13)
    pos = randn(4, 3, 3, seed=14)
    m = conv_apply(block.proj_in, x + pos).reshape(2, 4, 3, 3, 3).amax(dim=2)
    expected = x + gate(conv_apply(block.proj_out, m))
    assert torch.allclose(block(x, pos), expected, rtol=1e-12, atol=1e-12)


def test_gated_block_rejects_unknown_mixer():
    with pytest.raises(ValueError, match="unknown mixer 'conv'"):
        GatedBlock(
            4, mixer="conv", heads=2, layer_norm=True, context_channels=0, gate_kernel=1, dropout=0.0, weight_norm=False
        )


# --- conditioner and context network ---------------------------------------------------------------


@pytest.mark.parametrize("mixer", ["attention", "pointwise", "none"])
def test_conditioner_init_gives_small_outputs(mixer):
    torch.manual_seed(0)
    cond = Conditioner(3, 3 * 11, 4, 4, filters=8, blocks=2, mixer=mixer, heads=2, context_channels=2).double()
    x = randn(32, 3, 4, 4, seed=15, scale=2.0)
    ctx = randn(32, 2, 4, 4, seed=16)
    with data_dependent_init(cond):
        out = cond(x, ctx)
    assert is_initialized(cond)
    assert out.shape == (32, 33, 4, 4)
    # The last conv is initialised to output std 0.1 (and mean 0) per channel on the init batch.
    std = out.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(std, torch.full_like(std, 0.1), rtol=1e-6)
    assert out.mean(dim=(0, 2, 3)).abs().max().item() < 1e-12
    assert (cond.pos_emb is None) == (mixer == "none")


def test_frozen_positional_embedding():
    cond = Conditioner(2, 4, 4, 2, filters=4, blocks=1, mixer="none", frozen_pos_emb=True)
    assert cond.pos_emb is not None and not cond.pos_emb.requires_grad
    cond2 = Conditioner(2, 4, 4, 2, filters=4, blocks=1, mixer="attention", heads=2)
    assert cond2.pos_emb.requires_grad and cond2.pos_emb.shape == (4, 4, 2)
    assert cond2.pos_emb.std().item() < 0.05  # N(0, 0.01)


def test_context_net_shape_and_input_scaling():
    torch.manual_seed(0)
    net = ContextNet(3, 4, 6, 17, channels=5, blocks=2).double()
    x = torch.randint(0, 17, (2, 3, 4, 6))
    out = net(x.double())
    assert out.shape == (2, 5, 4, 3)
    # The first conv sees x / L - 0.5, even columns then odd columns on channels.
    xs = x.double() / 17 - 0.5
    stacked = torch.cat((xs[..., 0::2], xs[..., 1::2]), dim=1)
    h = conv_apply(net.proj, stacked)
    for block in net.blocks:
        h = block(h, None, None)
    assert torch.allclose(out, h, rtol=1e-13, atol=1e-13)
