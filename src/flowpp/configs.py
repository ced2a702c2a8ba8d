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
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .schedules import SCHEDULES
from .sizing import (
    MAX_ACTIVATION_PER_IMAGE,
    MAX_COUPLINGS,
    MAX_GATED_BLOCKS,
    MAX_PARAMETERS,
    MAX_STAGES,
    ModelSize,
    attention_widths,
    model_size,
    parse_stage,
    shown,
)

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


def parse_override(text: str) -> tuple[str, Any]:
    """'filters=64' -> ('filters', 64); values are JSON when they parse as JSON, else strings."""
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, got {shown(text)}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
    except (ValueError, RecursionError) as e:  # a number of thousands of digits, nesting past the parser
        raise ConfigError(f"{shown(key.strip())}: the value is JSON that cannot be read ({type(e).__name__})") from None


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
                raise ConfigError(f"config {self.name!r}: {key}={shown(getattr(self, key))}, expected one of {allowed}")
        self._check_size()

    def _check_values(self) -> None:
        """Types and ranges of the numeric fields, so that a typo in a config file or a --set is
        a one-line ConfigError here rather than a failure deep inside model building."""

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"config {self.name!r}: {key}={shown(getattr(self, key))}, expected {expected}")

        # The name is in every message, and configs are hashed (lru caches keyed by config).
        if not (isinstance(self.name, str) and len(self.name) <= 200):
            raise ConfigError(f"config name {shown(self.name)}: expected a string of at most 200 characters")
        if not isinstance(self.notes, str):
            raise bad("notes", "a string")
        shape = self.image_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(v, 1, 65536) for v in shape)):
            raise ConfigError(f"config {self.name!r}: bad image_shape {shown(shape)}, expected (C, H, W): three "
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
        for key, width in attention_widths(self):
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
            raise ConfigError(f"unknown config fields: {[shown(k)[1:-1] for k in unknown[:8]]}{more}")
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
