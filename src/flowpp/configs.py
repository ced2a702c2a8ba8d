"""Named, frozen model-and-training configurations.

Each config is plain data: the architecture (as a layout of stages that reads like the
paper's table), the conditioner sizes and the official training recipe. ``get_config(name)``
returns one; ``dataclasses.replace`` derives variants; ``to_dict``/``from_dict`` round-trip it
through JSON for run directories and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import ConfigError
from .schedules import SCHEDULES

__all__ = [
    "FlowConfig",
    "ModelSize",
    "model_size",
    "MAX_PARAMETERS",
    "MAX_ACTIVATION_PER_IMAGE",
    "MAX_GATED_BLOCKS",
    "TRAINING_FIELDS",
    "get_config",
    "list_configs",
    "register_config",
    "parse_stage",
    "parse_override",
]

LR_SCHEDULES = tuple(SCHEDULES)

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


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def parse_override(text: str) -> tuple[str, Any]:
    """'filters=64' -> ('filters', 64); values are JSON when they parse as JSON, else strings."""
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, got {_shown(text)}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
    except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting past the parser
        raise ConfigError(
            f"{_shown(key.strip())}: the value is JSON that cannot be read ({type(e).__name__})"
        ) from None


def parse_stage(token: str) -> tuple[str, int, bool]:
    """'stripe x4' -> ('stripe', 4, True); 'stripe x4 no-attention' -> ('stripe', 4, False);
    'squeeze' -> ('squeeze', 0, False). The flag says whether the stage's conditioners use the
    config's mixer (attention) or only gated convolutions (cheaper at high resolution)."""
    m = _STAGE.match(token.strip())
    if not m:
        raise ConfigError(
            f"bad layout stage {_shown(token)}: expected 'stripe xN', 'channel xN' (optionally "
            f"followed by ' no-attention') or 'squeeze'"
        )
    if m.group(1) is None:
        return "squeeze", 0, False
    if len(m.group(2).lstrip("0")) > len(str(MAX_COUPLINGS)):  # before int(), which refuses thousands of digits
        raise ConfigError(f"layout stage {_shown(token)}: more than {MAX_COUPLINGS} couplings in one stage")
    return m.group(1), int(m.group(2)), m.group(3) is None


@dataclass(frozen=True)
class FlowConfig:
    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_levels: int = 256

    # Main flow. Every coupling step is [Norm, (Pointwise), coupling, swap halves].
    layout: tuple[str, ...] = ("stripe x4", "squeeze", "channel x2", "stripe x3")
    filters: int = 96
    blocks: int = 10
    components: int = 32
    heads: int = 4
    coupling: str = "mixture"  # "mixture" | "affine"
    mixer: str = "attention"  # "attention" | "pointwise" (no-attention ablation) | "none"
    pointwise: bool = True
    weight_norm: bool = False
    layer_norm: bool = True
    final_concat_elu: bool = False
    dropout: float = 0.0
    mixture_float64: bool = False

    # Dequantizer q(u|x).
    dequantizer: str = "variational"  # "variational" | "uniform"
    dequant_layout: tuple[str, ...] = ("stripe x4",)
    dequant_filters: int = 96
    dequant_blocks: int = 2
    dequant_components: int = 32
    dequant_mixer: str = "attention"
    dequant_frozen_pos_emb: bool = False
    context_channels: int = 32
    context_blocks: int = 3
    context_mixer: str = "none"
    context_layer_norm: bool = False

    # Training recipe.
    batch_size: int = 64
    init_batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 2000
    lr_schedule: str = "constant"  # one of LR_SCHEDULES (flowpp.schedules)
    min_lr: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)): the EMA forgets the first steps
    # The loss whose gradient is clipped at ``grad_clip`` (global norm) and handed to Adam:
    # "nats" = mean negative log-likelihood in nats per image, as in the official code (its
    # gradient is D ln 2 times larger, so the paper's runs clip nearly every step);
    # "bpd" = the same loss in bits/dim. Metrics log the loss in bits/dim and the gradient norm
    # on the nats scale either way.
    grad_clip: float = 1.0
    grad_clip_units: str = "nats"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    # A model of the authors' release: `flowpp eval` then reminds of the paper's protocol.
    official: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        self._check_values()
        c, h, w = self.image_shape
        if min(c, h, w) < 1 or self.num_levels < 2:
            raise ConfigError(
                f"config {self.name!r}: bad image_shape {self.image_shape} or num_levels {self.num_levels}"
            )
        for key in ("layout", "dequant_layout"):
            layout = getattr(self, key)
            if len(layout) > MAX_STAGES:
                raise ConfigError(f"config {self.name!r}: {key} has {len(layout):,} stages, more than {MAX_STAGES}")
            for token in layout:
                try:
                    parse_stage(token)
                except ConfigError as e:
                    raise ConfigError(f"config {self.name!r}: {key}: {e}") from None
        if any(parse_stage(t)[0] != "stripe" for t in self.dequant_layout):
            raise ConfigError(f"config {self.name!r}: the dequantizer layout may only use stripe stages")
        for key, allowed in (
            ("coupling", ("mixture", "affine")),
            ("dequantizer", ("variational", "uniform")),
            ("mixer", ("attention", "pointwise", "none")),
            ("dequant_mixer", ("attention", "pointwise", "none")),
            ("context_mixer", ("attention", "pointwise", "none")),
            ("lr_schedule", LR_SCHEDULES),
            ("grad_clip_units", ("nats", "bpd")),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"config {self.name!r}: {key}={_shown(getattr(self, key))}, expected one of {allowed}"
                )
        self._check_size()

    def _check_values(self) -> None:
        """Types and ranges of the numeric fields, so that a typo in a config file or a --set is
        a one-line ConfigError here rather than a failure deep inside model building."""

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"config {self.name!r}: {key}={_shown(getattr(self, key))}, expected {expected}")

        # The name is in every message, and configs are hashed (lru caches keyed by config).
        if not (isinstance(self.name, str) and len(self.name) <= 200):
            raise ConfigError(f"config name {_shown(self.name)}: expected a string of at most 200 characters")
        if not isinstance(self.notes, str):
            raise bad("notes", "a string")
        shape = self.image_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(v, 1, 65536) for v in shape)):
            raise ConfigError(f"config {self.name!r}: bad image_shape {_shown(shape)}, expected (C, H, W): three "
                              "whole numbers from 1 to 65536")  # fmt: skip
        for key, (lo, hi) in _INT_RANGES.items():
            if not _is_int(getattr(self, key), lo, hi):
                raise bad(key, f"a whole number from {lo} to {hi}")
        for key, (lo, hi, lo_open) in _FLOAT_RANGES.items():
            v = getattr(self, key)
            if not (_is_real(v) and (lo < v if lo_open else lo <= v) and v <= hi):
                raise bad(key, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")
        if not (isinstance(self.adam_betas, tuple) and len(self.adam_betas) == 2
                and all(_is_real(b) and 0 <= b < 1 for b in self.adam_betas)):  # fmt: skip
            raise bad("adam_betas", "two numbers in [0, 1)")
        for key in ("pointwise", "weight_norm", "layer_norm", "final_concat_elu", "mixture_float64",
                    "dequant_frozen_pos_emb", "context_layer_norm", "ema_warmup", "official"):  # fmt: skip
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        if not (isinstance(self.layout, tuple) and isinstance(self.dequant_layout, tuple)
                and all(isinstance(t, str) for t in self.layout + self.dequant_layout)):  # fmt: skip
            raise bad("layout", "a list of stages such as 'stripe x4'")

    def _check_size(self) -> None:
        """Refuse, from the config's numbers alone, what must not be built: layouts of absurd
        size, attention heads that do not divide their width, and models whose parameters,
        networks or per-image tensors are far beyond any working config (the MAX_* bounds)."""
        for key in ("layout", "dequant_layout"):
            couplings = sum(parse_stage(t)[1] for t in getattr(self, key))
            if couplings > MAX_COUPLINGS:
                raise ConfigError(
                    f"config {self.name!r}: {key} has {couplings:,} couplings, more than the {MAX_COUPLINGS} flowpp "
                    "builds in one layout"
                )
        size = model_size(self)
        for key, width in _attention_widths(self):
            if width % self.heads:
                raise ConfigError(
                    f"config {self.name!r}: heads={self.heads} does not divide {key}={width}, the width its "
                    f"attention splits into heads"
                )
        if size.activation_per_image > MAX_ACTIVATION_PER_IMAGE:
            raise ConfigError(
                f"config {self.name!r}: one image of image_shape {self.image_shape} makes a tensor of "
                f"{size.activation_per_image:,} elements ({size.widest}), more than the {MAX_ACTIVATION_PER_IMAGE:,} "
                f"flowpp allows; use smaller images or narrower networks"
            )
        if size.parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"config {self.name!r}: {size.parameters:,} parameters ({size.largest_part}), more than the "
                f"{MAX_PARAMETERS:,} flowpp builds; use smaller filters, blocks, components, layout or image_shape"
            )
        if size.gated_blocks > MAX_GATED_BLOCKS:
            parts = [("blocks", self.blocks, size.couplings[0], "coupling(s) of the flow")]
            if self.dequantizer == "variational":
                parts += [("dequant_blocks", self.dequant_blocks, size.couplings[1], "coupling(s) of the dequantizer"),
                          ("context_blocks", self.context_blocks, 1, "context network")]  # fmt: skip
            key, value, count, where = max(parts, key=lambda p: p[1] * p[2])
            raise ConfigError(
                f"config {self.name!r}: {key}={value} in each of {count:,} {where} makes {size.gated_blocks:,} "
                f"gated blocks in all, more than the {MAX_GATED_BLOCKS:,} flowpp builds; use fewer couplings or blocks"
            )

    @property
    def num_dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    @property
    def nats_per_bpd(self) -> float:
        """D ln 2: a log-likelihood in nats per image divided by this is in bits/dim."""
        return self.num_dims * math.log(2.0)

    def check_data(self, image_shape: tuple[int, ...], num_levels: int, what: str) -> None:
        """Raise ConfigError unless images of shape (C, H, W) with ``num_levels`` levels fit this config."""
        if tuple(image_shape) != tuple(self.image_shape):
            raise ConfigError(
                f"{what} images have shape (C, H, W) = {tuple(image_shape)}, but config {self.name!r} "
                f"expects {tuple(self.image_shape)}"
            )
        if num_levels != self.num_levels:
            raise ConfigError(
                f"{what} data has {num_levels} levels, but config {self.name!r} expects "
                f"{self.num_levels}; pick a config made for this data"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlowConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a JSON object of fields, got a {type(d).__name__}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            more = f" and {len(unknown) - 8:,} more" if len(unknown) > 8 else ""
            raise ConfigError(f"unknown config fields: {[_shown(k)[1:-1] for k in unknown[:8]]}{more}")
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # fmt: skip
        if missing:
            raise ConfigError(f"the config lacks the fields {missing}")
        d = dict(d)
        # Configs written before grad_clip_units existed clipped the bits/dim gradient.
        d.setdefault("grad_clip_units", "bpd")
        for key in ("image_shape", "layout", "dequant_layout", "adam_betas"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes) -> "FlowConfig":
        return dataclasses.replace(self, **changes)

    def with_changes(self, changes: dict[str, Any]) -> "FlowConfig":
        """Like :meth:`replace`, from plain (e.g. JSON) values: lists become tuples and unknown
        field names are a ValueError that lists the known ones."""
        if not changes:
            return self
        unknown = sorted(set(changes) - set(self.to_dict()))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {', '.join(sorted(self.to_dict()))}")
        return FlowConfig.from_dict({**self.to_dict(), **changes})

    def architecture_differences(self, other: "FlowConfig") -> list[str]:
        """Fields that change the model's parameters or its function, as 'field: a vs b'."""
        a, b = self.to_dict(), other.to_dict()
        return [
            f"{k}: {a[k]!r} vs {b[k]!r}"
            for k in a
            if k not in TRAINING_FIELDS and k not in ("name", "notes", "official") and a[k] != b[k]
        ]


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


def _attention_widths(cfg: "FlowConfig") -> list[tuple[str, int]]:
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


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Bounds that no working config is near; they turn typos (negative, huge) into clear errors.
_INT_RANGES = {
    "num_levels": (2, 65536), "filters": (1, 65536), "blocks": (1, 1024), "components": (1, 1024),
    "heads": (1, 1024), "dequant_filters": (1, 65536), "dequant_blocks": (1, 1024),
    "dequant_components": (1, 1024), "context_channels": (1, 65536), "context_blocks": (0, 1024),
    "batch_size": (1, 1 << 20), "init_batch_size": (1, 1 << 20), "warmup_steps": (0, 1 << 40),
}  # fmt: skip
_FLOAT_RANGES = {  # key: (low, high, low excluded)
    "dropout": (0.0, 0.99, False), "lr": (0.0, 10.0, False), "min_lr": (0.0, 10.0, False),
    "ema_decay": (0.0, 1.0, False), "grad_clip": (0.0, 1e30, True), "adam_eps": (0.0, 1.0, False),
}  # fmt: skip


# Fields of the training recipe: a run may be resumed with other values for these.
TRAINING_FIELDS = frozenset(
    {
        "batch_size",
        "init_batch_size",
        "lr",
        "warmup_steps",
        "lr_schedule",
        "min_lr",
        "ema_decay",
        "ema_warmup",
        "grad_clip",
        "grad_clip_units",
        "adam_betas",
        "adam_eps",
    }
)


_CONFIGS: dict[str, FlowConfig] = {}


def register_config(config: FlowConfig) -> FlowConfig:
    _CONFIGS[config.name] = config
    return config


def get_config(name: str) -> FlowConfig:
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(list_configs())}") from None


def list_configs() -> list[str]:
    return sorted(_CONFIGS)


# fmt: off
# --- The paper's models (official parameter counts in the notes; tests check them) --------------

CIFAR10 = register_config(FlowConfig(
    name="cifar10", image_shape=(3, 32, 32),
    layout=("stripe x4", "squeeze", "channel x2", "stripe x3"),
    filters=96, blocks=10, components=32, dropout=0.2, pointwise=True,
    dequant_layout=("stripe x4",), dequant_filters=96, dequant_blocks=2, dequant_components=32,
    context_blocks=3, context_mixer="none", context_layer_norm=False,
    batch_size=64, init_batch_size=128, lr=3e-4, warmup_steps=2000, ema_decay=0.999, official=True,
    notes="official CIFAR-10 model, 31,443,440 parameters; 3.08 bits/dim (IW, S=4096)",
))

register_config(CIFAR10.replace(
    name="cifar10-uniform-dequant", filters=104, dequantizer="uniform",
    notes="ablation: uniform dequantization, conditioner widened to 104 filters (32,324,408 parameters)",
))
register_config(CIFAR10.replace(
    name="cifar10-affine", filters=108, dequant_filters=108, coupling="affine",
    notes="ablation: affine couplings instead of mixture CDF, 108 filters (32,045,708 parameters)",
))
register_config(CIFAR10.replace(
    name="cifar10-no-attention", mixer="pointwise", dequant_mixer="pointwise",
    notes="ablation: a same-size pointwise gated layer instead of attention (31,443,440 parameters)",
))

register_config(FlowConfig(
    name="imagenet32", image_shape=(3, 32, 32),
    # The official code lists the first 7 stripe couplings as two groups of 4 and 3.
    layout=("stripe x4", "stripe x3", "squeeze", "channel x3", "stripe x3"),
    filters=128, blocks=20, components=32, dropout=0.0, pointwise=False, weight_norm=True,
    final_concat_elu=True, mixture_float64=True,
    dequant_layout=("stripe x4", "stripe x4"), dequant_filters=128, dequant_blocks=8, dequant_components=32,
    context_blocks=8, context_mixer="attention", context_layer_norm=True,
    batch_size=32, init_batch_size=32, lr=1e-3, warmup_steps=5000, lr_schedule="imagenet32", min_lr=3e-4,
    ema_decay=0.999222, official=True,
    notes="official ImageNet 32x32 model, 168,955,724 parameters; 3.86 bits/dim",
))

IMAGENET64 = register_config(FlowConfig(
    name="imagenet64", image_shape=(3, 64, 64),
    layout=("squeeze", "stripe x4", "squeeze", "channel x2", "stripe x2", "squeeze", "channel x2", "stripe x2"),
    filters=96, blocks=16, components=4, dropout=0.0, pointwise=False, final_concat_elu=True,
    mixture_float64=True,
    dequant_layout=("stripe x4",), dequant_filters=96, dequant_blocks=5, dequant_components=4,
    dequant_mixer="none", dequant_frozen_pos_emb=True,
    context_blocks=5, context_mixer="none", context_layer_norm=True,
    batch_size=72, init_batch_size=72, lr=4e-4, warmup_steps=10000, lr_schedule="imagenet64", min_lr=1e-6,
    ema_decay=0.999, official=True,
    notes="official ImageNet 64x64 model, 73,489,960 parameters; 3.69 bits/dim",
))

# The release's n-bit models: the ImageNet64 architecture on 2^n levels, with float32 mixture math.
# LogitPreprocess and the context network scale by num_levels, so nothing else changes.
register_config(IMAGENET64.replace(
    name="imagenet64-5bit", num_levels=32, mixture_float64=False,
    batch_size=60, init_batch_size=60, lr=4e-4, warmup_steps=10000, lr_schedule="imagenet64-5bit", min_lr=1e-5,
    notes="official ImageNet 64x64 5-bit model (x // 8), 73,489,960 parameters",
))
CELEBA64_5BIT = register_config(IMAGENET64.replace(
    name="celeba64-5bit", num_levels=32, mixture_float64=False,
    batch_size=56, init_batch_size=56, lr=4e-5, warmup_steps=20000, lr_schedule="celeba64", min_lr=1e-5,
    notes="official CelebA 64x64 5-bit model, 73,489,960 parameters",
))
register_config(CELEBA64_5BIT.replace(
    name="celeba64-3bit", num_levels=8,
    notes="official CelebA 64x64 3-bit model, 73,489,960 parameters",
))
register_config(IMAGENET64.replace(
    name="celeba128-5bit", image_shape=(3, 128, 128), num_levels=32, mixture_float64=False,
    layout=("squeeze",) + IMAGENET64.layout, blocks=12,
    batch_size=48, init_batch_size=64, lr=1e-5, warmup_steps=50000, lr_schedule="constant", min_lr=0.0,
    notes="official CelebA 128x128 5-bit model, 122,790,952 parameters",
))

# --- Small presets for CPUs and tests -----------------------------------------------------------

register_config(FlowConfig(
    name="tiny", image_shape=(3, 8, 8), num_levels=256,
    layout=("stripe x2", "squeeze", "channel x2", "stripe x1"),
    filters=8, blocks=1, components=4, heads=2, dropout=0.0,
    dequant_layout=("stripe x2",), dequant_filters=8, dequant_blocks=1, dequant_components=4,
    context_channels=4, context_blocks=1,
    batch_size=8, init_batch_size=16, lr=1e-3, warmup_steps=10, ema_decay=0.9, grad_clip_units="bpd",
    notes="for tests only",
))

register_config(FlowConfig(
    name="digits", image_shape=(1, 8, 8), num_levels=17,
    layout=("stripe x4", "squeeze", "channel x2", "stripe x2"),
    # Dropout 0.6 in the conditioners: the 1,293 training images are seen ~60 times in the demo's
    # 4 minutes; without it the validation bpd rose from 1.887 to 2.073 (docs/small-machines.md).
    filters=32, blocks=2, components=8, heads=4, dropout=0.6,
    dequant_layout=("stripe x2",), dequant_filters=32, dequant_blocks=1, dequant_components=8,
    context_channels=16, context_blocks=2,
    batch_size=64, init_batch_size=256, lr=2e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.99,
    grad_clip_units="bpd",
    notes="scikit-learn's 8x8 digits (17 levels), trains in minutes on a CPU",
))

MNIST = register_config(FlowConfig(
    name="mnist", image_shape=(1, 28, 28), num_levels=256,
    # Attention only after the squeeze (196 and 98 positions per half, not 392): at full
    # resolution it tripled the cost of a step for little gain within a short budget.
    # One attention head of 32 channels: PyTorch's CPU attention kernel is several times slower
    # per position at 8 channels a head, and at 600 steps one head also ended lower (1.393 vs
    # 1.410 valid bits/dim at lr 4e-3). At batch 32, peak rates 2e-3 / 4e-3 / 6e-3 ended at
    # 1.451 / 1.410 / 1.379 after 600 steps; 8e-3 blew up right after its warm-up.
    layout=("stripe x4 no-attention", "squeeze", "channel x2", "stripe x2"),
    filters=32, blocks=2, components=8, heads=1, dropout=0.0,
    dequant_layout=("stripe x2",), dequant_filters=16, dequant_blocks=1, dequant_components=8,
    dequant_mixer="none", context_channels=16, context_blocks=2,
    # Batch 16 at peak lr 3.5e-3, decaying linearly to 0: in the same minutes as batch 32 at 5e-3
    # with a cosine decay, 0.05 bits/dim lower in the short screen (1.7x the steps at 0.8x the
    # images per second; 5e-3 blew up once at batch 16); the EMA at 0.99 because a longer one only
    # trailed the raw weights (docs/small-machines.md, "Round four").
    batch_size=16, init_batch_size=256, lr=3.5e-3, warmup_steps=100, lr_schedule="linear", ema_decay=0.99,
    ema_warmup=True, grad_clip_units="bpd",
    notes="any 28x28x1 data on a CPU: chosen for the best bits/dim in ~20 minutes on 2 cores",
))

register_config(MNIST.replace(
    name="cifar10-small", image_shape=(3, 32, 32),
    notes="32x32x3 data on a CPU: the mnist preset's recipe",
))
# fmt: on
