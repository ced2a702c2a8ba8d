"""Conditioner networks: gated convolutions, gated multi-head self-attention and layer norm.

Tensors are NCHW in shape. Inside a network they are kept channels-last in memory (NHWC strides):
a 1x1 convolution is then one matrix product over all pixels with the bias fused, its output
and everything after it stay contiguous, and layer norm over channels reads contiguous rows
(measurements in docs/performance.md). Networks convert once at their input and hand back
NCHW-contiguous outputs.

Every convolution starts from N(0, 0.05) weights and is rescaled on the first batch (see
:mod:`flowpp.ddi`) so that its output has zero mean and standard deviation ``init_scale`` per
channel: 1.0 by default, 0.1 for the gate projections and the last layer,
which makes every coupling start close to the identity.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .ddi import DataDependentInit

__all__ = [
    "InitConv2d",
    "concat_elu",
    "ChannelLayerNorm",
    "GatedConv",
    "GatedAttention",
    "GatedPointwise",
    "GatedBlock",
    "Conditioner",
    "ContextNet",
]


def concat_elu(x: Tensor) -> Tensor:
    """ELU of [x, -x] along channels: doubles the channel count."""
    return F.elu(torch.cat((x, -x), dim=1))


class InitConv2d(nn.Module, DataDependentInit):
    """A 'same'-padded convolution with data-dependent init, optionally weight-normalised.

    With ``weight_norm`` the kernel is g * v / ||v|| (Salimans & Kingma 2016), and init sets g
    and the bias; without, init rescales the kernel itself, as the official CIFAR code does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        init_scale: float = 1.0,
        weight_norm: bool = False,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.init_scale = init_scale
        self.weight_norm = weight_norm
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        if weight_norm:
            self.v = nn.Parameter(torch.randn(shape) * 0.05)
            self.g = nn.Parameter(torch.ones(out_channels))
        else:
            self.weight = nn.Parameter(torch.randn(shape) * 0.05)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self._register_init_flag()

    def kernel(self) -> Tensor:
        if self.weight_norm:
            norm = self.v.flatten(1).norm(dim=1).clamp_min(1e-12)
            return self.v * (self.g / norm).view(-1, 1, 1, 1)
        return self.weight

    def _conv(self, x: Tensor, bias: Tensor | None) -> Tensor:
        w = self.kernel()
        if self.kernel_size == 1:
            # One (B*H*W, C) x (C, O) product with the bias fused; channels-last in and out.
            y = F.linear(x.permute(0, 2, 3, 1), w.view(w.shape[0], w.shape[1]), bias)
            return y.permute(0, 3, 1, 2)
        return F.conv2d(x, w, bias, padding=self.padding)

    def _init_from(self, x: Tensor) -> None:
        y = self._conv(x, None)
        mean = y.mean(dim=(0, 2, 3))
        var = y.var(dim=(0, 2, 3), unbiased=False)
        scale = self.init_scale * torch.rsqrt(var + 1e-8)
        if self.weight_norm:
            self.g.data.mul_(scale)
        else:
            self.weight.data.mul_(scale.view(-1, 1, 1, 1))
        self.bias.data.copy_(-mean * scale)
        self._mark_initialized()

    def forward(self, x: Tensor) -> Tensor:
        if self._should_init():
            self._init_from(x)
        return self._conv(x, self.bias)

    def extra_repr(self) -> str:
        wn = ", weight_norm" if self.weight_norm else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, init_scale={self.init_scale}{wn}"
        )


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of an NCHW tensor (eps 1e-5)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class Dropout(nn.Dropout):
    """Inverted dropout drawn as ``rand >= p``: the same distribution as ``nn.Dropout``, and faster
    on CPU than its Bernoulli sampler (docs/performance.md)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


def _gate(h: Tensor) -> Tensor:
    a, b = h.chunk(2, dim=1)
    return a * torch.sigmoid(b)


class GatedConv(nn.Module):
    """PixelCNN++-style gated residual block.

    h = conv3x3(concat_elu(x)) [+ conv1x1(concat_elu(context))]; h = dropout(concat_elu(h));
    h = conv(h) -> 2F (init scale 0.1); out = x + a * sigmoid(b).
    """

    def __init__(
        self,
        channels: int,
        *,
        context_channels: int = 0,
        gate_kernel: int = 1,
        dropout: float = 0.0,
        weight_norm: bool = False,
    ):
        super().__init__()
        self.conv_in = InitConv2d(2 * channels, channels, 3, weight_norm=weight_norm)
        self.context_proj = (
            InitConv2d(2 * context_channels, channels, 1, weight_norm=weight_norm) if context_channels else None
        )
        self.dropout = Dropout(dropout)
        self.conv_gate = InitConv2d(2 * channels, 2 * channels, gate_kernel, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.conv_in(concat_elu(x))
        if self.context_proj is not None:
            if context is None:
                raise ValueError("this gated conv was built with a context input but got none")
            h = h + self.context_proj(concat_elu(context))
        h = self.dropout(concat_elu(h))
        return x + _gate(self.conv_gate(h))


class GatedAttention(nn.Module):
    """Multi-head self-attention over all H*W positions, gated and residual.

    q, k, v = conv1x1(x + pos_emb); softmax(q k^T / sqrt(d)) v per head; dropout on the
    attention output (not on the weights); conv1x1 -> 2F (init scale 0.1); out = x + a*sigmoid(b).
    Uses fused scaled-dot-product attention, so the (B, heads, N, N) weights are not stored.
    """

    def __init__(self, channels: int, heads: int, *, dropout: float = 0.0, weight_norm: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = InitConv2d(channels, 3 * channels, 1, weight_norm=weight_norm)
        self.dropout = Dropout(dropout)
        self.proj_out = InitConv2d(channels, 2 * channels, 1, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        # Channel index of q, k, v: (which, head, d); a view when x is channels-last.
        qkv = self.qkv(x + pos_emb).permute(0, 2, 3, 1).reshape(b, h * w, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.permute(0, 2, 1, 3).reshape(b, h, w, c).permute(0, 3, 1, 2)  # channel = head * d + j
        return x + _gate(self.proj_out(self.dropout(a)))


class GatedPointwise(nn.Module):
    """The no-attention ablation's same-size replacement for attention: conv1x1 -> 3F, max over
    each group of 3, dropout, conv1x1 -> 2F (init 0.1), gated residual."""

    def __init__(self, channels: int, *, dropout: float = 0.0, weight_norm: bool = False):
        super().__init__()
        self.proj_in = InitConv2d(channels, 3 * channels, 1, weight_norm=weight_norm)
        self.dropout = Dropout(dropout)
        self.proj_out = InitConv2d(channels, 2 * channels, 1, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        b, c, h, w = x.shape
        m = self.proj_in(x + pos_emb).permute(0, 2, 3, 1).reshape(b, h, w, c, 3).amax(dim=-1).permute(0, 3, 1, 2)
        return x + _gate(self.proj_out(self.dropout(m)))


class GatedBlock(nn.Module):
    """[gated conv, (layer norm), (attention or pointwise mixer, (layer norm))]."""

    def __init__(
        self,
        channels: int,
        *,
        mixer: str,
        heads: int,
        layer_norm: bool,
        context_channels: int,
        gate_kernel: int,
        dropout: float,
        weight_norm: bool,
    ):
        super().__init__()
        self.conv = GatedConv(
            channels,
            context_channels=context_channels,
            gate_kernel=gate_kernel,
            dropout=dropout,
            weight_norm=weight_norm,
        )
        self.norm1 = ChannelLayerNorm(channels) if layer_norm else nn.Identity()
        if mixer == "attention":
            self.mixer = GatedAttention(channels, heads, dropout=dropout, weight_norm=weight_norm)
        elif mixer == "pointwise":
            self.mixer = GatedPointwise(channels, dropout=dropout, weight_norm=weight_norm)
        elif mixer == "none":
            self.mixer = None
        else:
            raise ValueError(f"unknown mixer {mixer!r}: expected 'attention', 'pointwise' or 'none'")
        self.norm2 = ChannelLayerNorm(channels) if (layer_norm and self.mixer is not None) else nn.Identity()

    def forward(self, x: Tensor, pos_emb: Tensor | None, context: Tensor | None) -> Tensor:
        x = self.norm1(self.conv(x, context))
        if self.mixer is not None:
            x = self.norm2(self.mixer(x, pos_emb))
        return x


class _Autocast:
    """Optional reduced-precision compute for a network (set by ``FlowPlusPlus.set_autocast``).

    Only the conditioner and context networks run under autocast; their outputs are returned in
    float32 so that the mixture math and the log-determinants keep full precision.
    """

    autocast_dtype: torch.dtype | None = None
    activation_checkpointing: bool = False

    def _autocast(self, x: Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def _restore(self, h: Tensor, like: Tensor) -> Tensor:
        return h.to(like.dtype, memory_format=torch.contiguous_format)


class Conditioner(nn.Module, _Autocast):
    """The network inside a coupling: conv3x3 -> F; B gated blocks; (concat_elu); conv3x3 -> out.

    ``pos_emb`` (F x H x W, N(0, 0.01)) is learned per coupling and shared by its blocks.
    ``frozen_pos_emb`` keeps an embedding that no block reads (the official ImageNet64
    dequantizer allocates one); it is frozen so that optimisers and DDP skip it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        height: int,
        width: int,
        *,
        filters: int,
        blocks: int,
        mixer: str = "attention",
        heads: int = 4,
        layer_norm: bool = True,
        context_channels: int = 0,
        gate_kernel: int = 1,
        final_concat_elu: bool = False,
        dropout: float = 0.0,
        weight_norm: bool = False,
        frozen_pos_emb: bool = False,
    ):
        super().__init__()
        needs_pos = mixer != "none"
        self.pos_emb = (
            nn.Parameter(torch.randn(filters, height, width) * 0.01) if (needs_pos or frozen_pos_emb) else None
        )
        if self.pos_emb is not None and not needs_pos:
            self.pos_emb.requires_grad_(False)
        self.proj_in = InitConv2d(in_channels, filters, 3, weight_norm=weight_norm)
        self.blocks = nn.ModuleList(
            GatedBlock(
                filters,
                mixer=mixer,
                heads=heads,
                layer_norm=layer_norm,
                context_channels=context_channels,
                gate_kernel=gate_kernel,
                dropout=dropout,
                weight_norm=weight_norm,
            )
            for _ in range(blocks)
        )
        self.final_concat_elu = final_concat_elu
        self.proj_out = InitConv2d(
            (2 if final_concat_elu else 1) * filters, out_channels, 3, init_scale=0.1, weight_norm=weight_norm
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        # (Data-dependent init runs under no_grad, so it never takes the checkpointed path.)
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Keep only this network's input for the backward pass and recompute the rest there:
            # activation memory falls from all blocks of all couplings to one network at a time.
            return torch.utils.checkpoint.checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        with self._autocast(x):
            h = self.proj_in(x.contiguous(memory_format=torch.channels_last))
            for block in self.blocks:
                h = block(h, self.pos_emb, context)
            if self.final_concat_elu:
                h = concat_elu(h)
            h = self.proj_out(h)
        return self._restore(h, x)


class ContextNet(nn.Module, _Autocast):
    """The dequantizer's x-context network.

    x / L - 0.5 -> stripe split -> halves concatenated on channels -> conv3x3 -> ``channels``
    -> gated blocks. Its output (B, channels, H, W/2) matches a stripe half and is fed to every
    gated conv of every dequantizer coupling.
    """

    def __init__(
        self,
        image_channels: int,
        height: int,
        width: int,
        num_levels: int,
        *,
        channels: int = 32,
        blocks: int = 3,
        mixer: str = "none",
        heads: int = 4,
        layer_norm: bool = False,
        dropout: float = 0.0,
        weight_norm: bool = False,
    ):
        super().__init__()
        self.num_levels = num_levels
        self.proj = InitConv2d(2 * image_channels, channels, 3, weight_norm=weight_norm)
        self.pos_emb = nn.Parameter(torch.randn(channels, height, width // 2) * 0.01) if mixer != "none" else None
        self.blocks = nn.ModuleList(
            GatedBlock(
                channels,
                mixer=mixer,
                heads=heads,
                layer_norm=layer_norm,
                context_channels=0,
                gate_kernel=3,
                dropout=dropout,
                weight_norm=weight_norm,
            )
            for _ in range(blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x / self.num_levels - 0.5
        with self._autocast(x):
            h = self.proj(torch.cat((x[..., 0::2], x[..., 1::2]), dim=1).contiguous(memory_format=torch.channels_last))
            for block in self.blocks:
                h = block(h, self.pos_emb, None)
        return self._restore(h, x)
