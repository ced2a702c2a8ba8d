"""The layout grammar of a config and the size of its model, by arithmetic over its numbers.

``parse_stage`` reads one layout stage; ``model_size`` counts what ``FlowPlusPlus(config)`` would
hold (parameters, couplings, gated blocks, the widest tensor one image makes) without building it,
which is how a config from a file or a ``--set`` is bounded before anything is allocated.
"""

from __future__ import annotations

import re
import reprlib
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import ConfigError

if TYPE_CHECKING:
    from .configs import FlowConfig

__all__ = ["ModelSize", "model_size", "parse_stage", "MAX_PARAMETERS", "MAX_ACTIVATION_PER_IMAGE", "MAX_GATED_BLOCKS",
           "MAX_STAGES", "MAX_COUPLINGS"]  # fmt: skip

_STAGE = re.compile(r"^(stripe|channel) x(\d+)( no-attention)?$|^squeeze$")

# Sizes that no working config comes near (the paper's largest model, imagenet32, has 168,955,724
# parameters and 332 gated blocks; celeba128-5bit's widest tensor has 1,572,864 elements an image).
# They are checked from the config's numbers alone, so that a file or a --set can never make
# flowpp build (or even loop over) a model of absurd size.
MAX_PARAMETERS = 2_000_000_000
MAX_GATED_BLOCKS = 4096  # gated residual blocks in all networks: each is a few modules to build
MAX_ACTIVATION_PER_IMAGE = 1 << 28  # elements of the widest tensor one image makes in the model
MAX_STAGES = 256  # entries of one layout
MAX_COUPLINGS = 1024  # couplings of one layout

# Values shown in messages are cut short: a config file may hold anything.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 60, 60, 60


def shown(value: Any) -> str:
    return _SHOWN.repr(value)


def parse_stage(token: str) -> tuple[str, int, bool]:
    """'stripe x4' -> ('stripe', 4, True); 'stripe x4 no-attention' -> ('stripe', 4, False);
    'squeeze' -> ('squeeze', 0, False). The flag says whether the stage's conditioners use the
    config's mixer (attention) or only gated convolutions (cheaper at high resolution)."""
    m = _STAGE.match(token.strip())
    if not m:
        raise ConfigError(
            f"bad layout stage {shown(token)}: expected 'stripe xN', 'channel xN' (optionally "
            f"followed by ' no-attention') or 'squeeze'"
        )
    if m.group(1) is None:
        return "squeeze", 0, False
    if len(m.group(2).lstrip("0")) > len(str(MAX_COUPLINGS)):  # before int(), which refuses thousands of digits
        raise ConfigError(f"layout stage {shown(token)}: more than {MAX_COUPLINGS} couplings in one stage")
    return m.group(1), int(m.group(2)), m.group(3) is None


class ModelSize(NamedTuple):
    """A config's model measured from its numbers (:func:`model_size`), without building it."""

    parameters: int
    couplings: tuple[int, int]  # of the flow, of the dequantizer (0 with uniform dequantization)
    gated_blocks: int  # residual blocks of all conditioner and context networks
    activation_per_image: int  # elements of the widest tensor one image makes inside the model
    widest: str  # where that tensor is
    largest_part: str  # which network holds the most parameters, with the fields that size it


def _conv(i: int, o: int, k: int, weight_norm: bool) -> int:
    """Parameters of an InitConv2d: kernel, bias, and the gain g under weight norm."""
    return o * i * k * k + o * (2 if weight_norm else 1)


def _gated_block(width: int, mixer: str, layer_norm: bool, context: int, gate_kernel: int, wn: bool) -> int:
    """Parameters of a nets.GatedBlock."""
    n = _conv(2 * width, width, 3, wn) + _conv(2 * width, 2 * width, gate_kernel, wn) + (2 * width if layer_norm else 0)
    if context:
        n += _conv(2 * context, width, 1, wn)
    if mixer != "none":
        n += _conv(width, 3 * width, 1, wn) + _conv(width, 2 * width, 1, wn) + (2 * width if layer_norm else 0)
    return n


def _coupling_stages(layout: tuple[str, ...], shape: tuple[int, int, int]):
    """(couplings, half shape (C, H, W), whether they attend) of each coupling stage, walking the
    shapes as model._stages does (a layout that cannot be built is refused there)."""
    c, h, w = shape
    for token in layout:
        kind, n, mixing = parse_stage(token)
        if kind == "squeeze":
            c, h, w = 4 * c, h // 2, w // 2
        elif n:
            yield n, ((c, h, w // 2) if kind == "stripe" else (c // 2, h, w)), mixing


def attention_widths(cfg: "FlowConfig") -> list[tuple[str, int]]:
    """(field, width) of each network that builds attention: heads must divide the width."""
    widths = []
    if cfg.mixer == "attention" and any(mixing for _, _, mixing in _coupling_stages(cfg.layout, cfg.image_shape)):
        widths.append(("filters", cfg.filters))
    if cfg.dequantizer == "variational":
        stages = _coupling_stages(cfg.dequant_layout, cfg.image_shape)
        if cfg.dequant_mixer == "attention" and any(mixing for _, _, mixing in stages):
            widths.append(("dequant_filters", cfg.dequant_filters))
        if cfg.context_mixer == "attention" and cfg.context_blocks:
            widths.append(("context_channels", cfg.context_channels))
    return widths


def model_size(cfg: "FlowConfig") -> ModelSize:
    """The size of ``FlowPlusPlus(cfg)`` by arithmetic over the config, in microseconds and no
    memory: the same parameter count as building the model (tests hold the two equal), the
    coupling and gated-block counts, and the widest tensor one image makes (the image, a
    conditioner's hidden and output tensors, the context network's)."""
    c, h, w = cfg.image_shape
    widest = [(c * h * w, "the image itself")]

    def flow_part(layout, filters, blocks, components, mixer, context, frozen_pos_emb, label):
        params = couplings = 0
        per_element = 2 + 3 * components if cfg.coupling == "mixture" else 2
        for n, (hc, hh, hw), mixing in _coupling_stages(layout, cfg.image_shape):
            net_mixer = mixer if mixing else "none"
            out = hc * per_element
            one = 4 * hc * hh * hw + (2 * hc * hc if cfg.pointwise else 0)  # ElementwiseNorm, Pointwise
            one += filters * hh * hw if (net_mixer != "none" or frozen_pos_emb) else 0  # position embedding
            one += _conv(hc, filters, 3, cfg.weight_norm)
            one += blocks * _gated_block(filters, net_mixer, cfg.layer_norm, context, 1, cfg.weight_norm)
            one += _conv((2 if cfg.final_concat_elu else 1) * filters, out, 3, cfg.weight_norm)
            params += n * one
            couplings += n
            wide = max(3 * filters if net_mixer != "none" else 2 * filters, out)
            widest.append((wide * hh * hw, f"{label} on a {hc}x{hh}x{hw} half"))
        return params, couplings

    main, main_couplings = flow_part(cfg.layout, cfg.filters, cfg.blocks, cfg.components, cfg.mixer, 0, False,
                                     f"filters={cfg.filters}, components={cfg.components}")  # fmt: skip
    parts = [(main, f"the flow: filters={cfg.filters}, blocks={cfg.blocks}, {main_couplings} couplings")]
    dq_couplings = gated_blocks = 0
    if cfg.dequantizer == "variational":
        dq, dq_couplings = flow_part(cfg.dequant_layout, cfg.dequant_filters, cfg.dequant_blocks,
                                     cfg.dequant_components, cfg.dequant_mixer, cfg.context_channels,
                                     cfg.dequant_frozen_pos_emb, f"dequant_filters={cfg.dequant_filters}")  # fmt: skip
        ch, mixer = cfg.context_channels, cfg.context_mixer
        context = _conv(2 * c, ch, 3, cfg.weight_norm) + (ch * h * (w // 2) if mixer != "none" else 0)
        context += cfg.context_blocks * _gated_block(ch, mixer, cfg.context_layer_norm, 0, 3, cfg.weight_norm)
        widest.append(((3 if mixer != "none" else 2) * ch * h * (w // 2), f"context_channels={ch}"))
        dq_fields = f"dequant_filters={cfg.dequant_filters}, dequant_blocks={cfg.dequant_blocks}"
        parts.append((dq, f"the dequantizer: {dq_fields}, {dq_couplings} couplings"))
        parts.append((context, f"the context network: context_channels={ch}, context_blocks={cfg.context_blocks}"))
        gated_blocks = dq_couplings * cfg.dequant_blocks + cfg.context_blocks
    gated_blocks += main_couplings * cfg.blocks
    activation, where = max(widest)
    return ModelSize(
        parameters=sum(p for p, _ in parts),
        couplings=(main_couplings, dq_couplings),
        gated_blocks=gated_blocks,
        activation_per_image=activation,
        widest=where,
        largest_part=max(parts)[1],
    )
