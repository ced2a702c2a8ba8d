"""The weight format of the Flow++ release: read the authors' trained models, write flowpp's.

The local bits-back coding release (Ho, Lohn, Abbeel, NeurIPS 2019) distributes the trained
Flow++ models as ``.npz`` files holding one float32 array per variable of the official
TensorFlow graph, keyed by the variable's name without ``:0``. The names come from the official
code's ``tf.make_template`` scopes, numbered in the order the graph first calls them (the
dequantizer before the main flow): ``Norm``, ``Norm_1``, ...; ``Pointwise``, ...;
``MixLogisticAttnCoupling``, ...; ``context_proc/...``. Layouts are TensorFlow's (convolutions
HWIO, dense layers (in, out), per-element tensors HWC).

Two dialects of that code exist: the CIFAR-10 code (``flows/``: Pointwise layers, conditioner
``proj_in``/``proj_out``, layer norms stored as (1, 1, 1, C)) and the ImageNet code
(``flows_imagenet/``: conditioner ``c1``/``c2`` with a concat-ELU before the last, layer norms
stored as (C,), weight normalisation (``V``, ``g``, ``b``) in the 32x32 model, couplings
without attention named ``MixLogisticCoupling``). :func:`release_variables` walks a flowpp model
in the official graph's order and names each parameter as that code does, so the mapping is one
list used in both directions.
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import atomic_write, file_sha256
from .configs import TRAINING_FIELDS, FlowConfig, get_config, list_configs, parse_stage
from .ddi import DataDependentInit
from .dequantizers import VariationalDequantizer
from .errors import ConfigError, FlowppError
from .flows import ElementwiseNorm, MixtureLogisticCoupling, Pointwise, Sequential
from .model import FlowPlusPlus
from .nets import ChannelLayerNorm, Conditioner, ContextNet, GatedAttention, GatedBlock, InitConv2d

__all__ = [
    "ReleaseFormatError",
    "ReleaseVariable",
    "release_dialect",
    "release_variables",
    "read_release",
    "import_release",
    "release_arrays",
    "write_release",
    "configs_fitting",
    "RELEASE_REPORTED",
]

# Bits/dim the compression paper reports for the released models (the single-sample bound on
# the test set, which bits-back coding attains); the Flow++ paper's 3.08 / 3.86 / 3.69 are
# importance-weighted with S = 4096.
RELEASE_REPORTED = {
    "cifar10": dict(file="flowpp_cifar_model.npz", data="CIFAR-10 test", bpd=3.116),
    "imagenet32": dict(file="flowpp_imagenet32_model.npz", data="ImageNet 32x32 validation", bpd=3.871),
    "imagenet64": dict(file="flowpp_imagenet64_model.npz", data="ImageNet 64x64 validation", bpd=3.701),
}

_EMA_SUFFIX = "/ExponentialMovingAverage"
_SLOT_SUFFIXES = ("/Adam", "/Adam_1")
# Variables of the official training graph that are not part of the model.
_TRAINING_STATE = frozenset({"global_step", "beta1_power", "beta2_power"})


class ReleaseFormatError(FlowppError, ValueError):
    """A file is not a Flow++ release weight file, or does not fit the config it is read with."""


@dataclass(frozen=True)
class ReleaseVariable:
    """One variable of the official graph: its TF name, the flowpp ``state_dict`` key that holds
    it, and how the layouts differ (``layout``: conv, dense, hwc, layer_norm4, same)."""

    name: str
    key: str
    layout: str


# --- layouts ---------------------------------------------------------------------------------


def _to_tf(t: Tensor, layout: str) -> Tensor:
    if layout == "conv":  # (O, I, kh, kw) -> (kh, kw, I, O)
        return t.permute(2, 3, 1, 0)
    if layout == "dense":  # (O, I, 1, 1) -> (I, O)
        return t[:, :, 0, 0].t()
    if layout == "hwc":  # (C, H, W) -> (H, W, C)
        return t.permute(1, 2, 0)
    if layout == "layer_norm4":  # (C,) -> (1, 1, 1, C)
        return t.view(1, 1, 1, -1)
    return t


def _from_tf(t: Tensor, layout: str) -> Tensor:
    if layout == "conv":
        return t.permute(3, 2, 0, 1)
    if layout == "dense":
        return t.t()[:, :, None, None]
    if layout == "hwc":
        return t.permute(2, 0, 1)
    if layout == "layer_norm4":
        return t.reshape(-1)
    return t


def _tf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return tuple(_to_tf(torch.empty(shape, device="meta"), layout).shape)


# --- the official graph's names, in its order -----------------------------------------------


def release_dialect(config: FlowConfig) -> str:
    """'cifar' or 'imagenet': which of the official code's model families ``config`` is built
    like; a ReleaseFormatError saying why when the official code builds no such model."""

    def refuse(why: str) -> ReleaseFormatError:
        return ReleaseFormatError(f"config {config.name!r} has no release-format equivalent: {why}")

    if config.coupling != "mixture":
        raise refuse("the official code has only mixture-of-logistics couplings (coupling='affine')")
    if config.dequantizer != "variational":
        raise refuse("the official code has only the variational dequantizer (dequantizer='uniform')")
    for key in ("mixer", "dequant_mixer", "context_mixer"):
        if getattr(config, key) == "pointwise":
            raise refuse(f"{key}='pointwise' (the no-attention ablation) is not in the official code")
    if config.pointwise and not config.final_concat_elu:
        if config.weight_norm or config.layer_norm is False or config.context_layer_norm:
            raise refuse("the CIFAR-10 code has no weight norm or context layer norm, and always layer norm")
        if config.context_mixer != "none" or any("no-attention" in t for t in config.layout + config.dequant_layout):
            raise refuse("every coupling of the CIFAR-10 code has attention, and its context network none")
        if config.mixer != "attention" or config.dequant_mixer != "attention":
            raise refuse("every coupling of the CIFAR-10 code has attention")
        return "cifar"
    if config.final_concat_elu and not config.pointwise:
        if not config.layer_norm:
            raise refuse("the ImageNet code always uses layer norm in its conditioners")
        return "imagenet"
    raise refuse(
        "the official code pairs Pointwise layers with the CIFAR-10 conditioner (no final concat-ELU) "
        "and the ImageNet conditioner (final concat-ELU) with no Pointwise layers"
    )


class _Scopes:
    """tf.make_template's unique scope names: 'Norm', 'Norm_1', 'Norm_2', ..."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def next(self, base: str) -> str:
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"


def _conv_variables(conv: InitConv2d, key: str, scope: str) -> Iterator[ReleaseVariable]:
    layout = "dense" if conv.kernel_size == 1 else "conv"
    if conv.weight_norm:
        yield ReleaseVariable(f"{scope}/V", f"{key}.v", layout)
        yield ReleaseVariable(f"{scope}/g", f"{key}.g", "same")
    else:
        yield ReleaseVariable(f"{scope}/W", f"{key}.weight", layout)
    yield ReleaseVariable(f"{scope}/b", f"{key}.bias", "same")


def _layer_norm_variables(norm: nn.Module, key: str, scope: str, dialect: str) -> Iterator[ReleaseVariable]:
    if isinstance(norm, ChannelLayerNorm):
        layout = "layer_norm4" if dialect == "cifar" else "same"
        yield ReleaseVariable(f"{scope}/g", f"{key}.weight", layout)
        yield ReleaseVariable(f"{scope}/b", f"{key}.bias", layout)


def _attention_variables(mixer: nn.Module, key: str, scope: str) -> Iterator[ReleaseVariable]:
    assert isinstance(mixer, GatedAttention), type(mixer)
    yield from _conv_variables(mixer.qkv, f"{key}.qkv", f"{scope}/proj1")
    yield from _conv_variables(mixer.proj_out, f"{key}.proj_out", f"{scope}/proj2")


def _block_variables(block: GatedBlock, key: str, scopes: dict[str, str], dialect: str) -> Iterator[ReleaseVariable]:
    """A gated block's variables; ``scopes`` names its parts (conv, a_proj, gate, ln1, attn, ln2)
    as the official code does where the block stands (conditioner or context network)."""
    yield from _conv_variables(block.conv.conv_in, f"{key}.conv.conv_in", scopes["conv"])
    if block.conv.context_proj is not None:
        yield from _conv_variables(block.conv.context_proj, f"{key}.conv.context_proj", scopes["a_proj"])
    yield from _conv_variables(block.conv.conv_gate, f"{key}.conv.conv_gate", scopes["gate"])
    yield from _layer_norm_variables(block.norm1, f"{key}.norm1", scopes["ln1"], dialect)
    if block.mixer is not None:
        yield from _attention_variables(block.mixer, f"{key}.mixer", scopes["attn"])
        yield from _layer_norm_variables(block.norm2, f"{key}.norm2", scopes["ln2"], dialect)


def _conditioner_variables(net: Conditioner, key: str, scope: str, dialect: str) -> Iterator[ReleaseVariable]:
    first, last = ("proj_in", "proj_out") if dialect == "cifar" else ("c1", "c2")
    if net.pos_emb is not None:
        yield ReleaseVariable(f"{scope}/pos_emb", f"{key}.pos_emb", "hwc")
    yield from _conv_variables(net.proj_in, f"{key}.proj_in", f"{scope}/{first}")
    for i, block in enumerate(net.blocks):
        s = f"{scope}/block{i}"
        names = dict(conv=f"{s}/conv/c1", a_proj=f"{s}/conv/a_proj", gate=f"{s}/conv/c2", ln1=f"{s}/ln1",
                     attn=f"{s}/attn", ln2=f"{s}/ln2")  # fmt: skip
        yield from _block_variables(block, f"{key}.blocks.{i}", names, dialect)
    yield from _conv_variables(net.proj_out, f"{key}.proj_out", f"{scope}/{last}")


def _context_variables(net: ContextNet, key: str, dialect: str) -> Iterator[ReleaseVariable]:
    scope = "context_proc"
    yield from _conv_variables(net.proj, f"{key}.proj", f"{scope}/proj")
    if net.pos_emb is not None:
        yield ReleaseVariable(f"{scope}/pos_emb_dq", f"{key}.pos_emb", "hwc")
    for i, block in enumerate(net.blocks):
        names = dict(conv=f"{scope}/c{i}/c1", gate=f"{scope}/c{i}/c2", ln1=f"{scope}/dqln{i}",
                     attn=f"{scope}/dqattn{i}", ln2=f"{scope}/ln{i}")  # fmt: skip
        yield from _block_variables(block, f"{key}.blocks.{i}", names, dialect)


def _flow_variables(flow: Sequential, key: str, scopes: _Scopes, dialect: str) -> Iterator[ReleaseVariable]:
    for i, layer in enumerate(flow.layers):
        k = f"{key}.layers.{i}"
        if isinstance(layer, ElementwiseNorm):
            scope = scopes.next("Norm")
            for j in range(len(layer.scales)):
                yield ReleaseVariable(f"{scope}/norm{j}/g", f"{k}.scales.{j}", "hwc")
                yield ReleaseVariable(f"{scope}/norm{j}/b", f"{k}.biases.{j}", "hwc")
        elif isinstance(layer, Pointwise):
            scope = scopes.next("Pointwise")
            for j in range(len(layer.weights)):
                yield ReleaseVariable(f"{scope}/W{j}", f"{k}.weights.{j}", "same")
        elif isinstance(layer, MixtureLogisticCoupling):
            attention = any(block.mixer is not None for block in layer.conditioner.blocks)
            scope = scopes.next("MixLogisticAttnCoupling" if attention else "MixLogisticCoupling")
            yield from _conditioner_variables(layer.conditioner, f"{k}.conditioner", scope, dialect)
        elif any(True for _ in layer.parameters()):
            raise ReleaseFormatError(f"layer {k} ({type(layer).__name__}) has no release-format name")


def release_variables(model: FlowPlusPlus) -> list[ReleaseVariable]:
    """Every parameter of ``model`` as a variable of the official graph, in the graph's order."""
    dialect = release_dialect(model.config)
    scopes = _Scopes()
    variables: list[ReleaseVariable] = []
    dequantizer = model.dequantizer
    assert isinstance(dequantizer, VariationalDequantizer)
    variables += _context_variables(dequantizer.context_net, "dequantizer.context_net", dialect)
    variables += _flow_variables(dequantizer.flow, "dequantizer.flow", scopes, dialect)
    variables += _flow_variables(model.flow, "flow", scopes, dialect)
    return variables


def expected_shapes(config: FlowConfig) -> dict[str, tuple[int, ...]]:
    """{TF name: TF shape} of the release file for ``config`` (built on the meta device: no memory)."""
    release_dialect(config)
    # Only the architecture decides the file: configs that differ in their recipe, levels or the
    # precision of the mixture math (the n-bit models) share one answer.
    plain = FlowConfig.from_dict({**config.to_dict(), **_NOT_ARCHITECTURE})
    return _expected_shapes(plain)


_DEFAULTS = FlowConfig(name="defaults", image_shape=(1, 2, 2))
_NOT_ARCHITECTURE = dict(name="release", notes="", official=False, num_levels=256, mixture_float64=False, dropout=0.0,
                         **{k: getattr(_DEFAULTS, k) for k in TRAINING_FIELDS})  # fmt: skip


@functools.lru_cache(maxsize=32)
def _expected_shapes(config: FlowConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = FlowPlusPlus(config)
    params = dict(model.named_parameters())
    return {v.name: _tf_shape(tuple(params[v.key].shape), v.layout) for v in release_variables(model)}


def _image_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int] | None:
    """(C, H, W) of the images a file's model is for: the first Norm acts on a stripe half of the
    image (the dequantizer's first stage), shaped (H, W/2, C)."""
    first = shapes.get("Norm/norm0/g")
    return (first[2], first[0], 2 * first[1]) if first is not None and len(first) == 3 else None


def configs_fitting(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The named configs whose release file has exactly these variable names and shapes."""
    found, image_shape = [], _image_shape(shapes)
    for name in list_configs():
        config = get_config(name)
        if image_shape is not None and tuple(config.image_shape) != image_shape:
            continue
        try:
            if expected_shapes(config) == shapes:
                found.append(name)
        except (ReleaseFormatError, ConfigError):
            continue
    return found


def _sizes_in(shapes: dict[str, tuple[int, ...]], config: FlowConfig) -> dict[str, int] | None:
    """The sizes (filters, blocks, components, ...) of a reduced model of ``config``'s architecture
    as the shapes of its file say them, or None when the file is not of that architecture."""
    dialect = release_dialect(config)
    dequant_couplings = sum(parse_stage(t)[1] for t in config.dequant_layout)
    if config.dequant_mixer == "none":
        dequant, main = "MixLogisticCoupling", "MixLogisticAttnCoupling"
    else:
        dequant, main = "MixLogisticAttnCoupling", f"MixLogisticAttnCoupling_{dequant_couplings}"
    first, last = ("proj_in", "proj_out") if dialect == "cifar" else ("c1", "c2")
    kernel = "V" if config.weight_norm else "W"

    def sizes(scope: str) -> tuple[int, int, int] | None:
        emb, into, out = (shapes.get(f"{scope}/{n}") for n in ("pos_emb", f"{first}/{kernel}", f"{last}/{kernel}"))
        if emb is None or into is None or out is None or len(into) != 4:
            return None
        channels = into[2]  # of the half this coupling transforms
        if out[-1] % channels or (out[-1] // channels - 2) % 3:
            return None
        blocks = len({n.split("/")[1] for n in shapes if n.startswith(f"{scope}/block")})
        return emb[-1], blocks, (out[-1] // channels - 2) // 3

    found_main, found_dequant = sizes(main), sizes(dequant)
    context = shapes.get(f"context_proc/proj/{kernel}")
    if found_main is None or found_dequant is None or context is None:
        return None
    context_blocks = len({n.split("/")[1] for n in shapes if re.match(r"context_proc/c\d+/", n)})
    return dict(
        filters=found_main[0], blocks=found_main[1], components=found_main[2], dequant_filters=found_dequant[0],
        dequant_blocks=found_dequant[1], dequant_components=found_dequant[2], context_channels=context[-1],
        context_blocks=context_blocks,
    )  # fmt: skip


def fitting_overrides(shapes: dict[str, tuple[int, ...]], config: FlowConfig) -> dict[str, int] | None:
    """The config changes (--set) under which ``config``'s architecture has exactly these
    variables, when there are such changes; None otherwise."""
    try:
        sizes = _sizes_in(shapes, config)
        if sizes is None:
            return None
        changes = {k: v for k, v in sizes.items() if getattr(config, k) != v}
        if config.filters != sizes["filters"] and sizes["filters"] % config.heads:
            changes["heads"] = 1
        candidate = config.with_changes(changes)
        return changes if expected_shapes(candidate) == shapes else None
    except (ReleaseFormatError, ConfigError):
        return None


# --- reading ---------------------------------------------------------------------------------


def read_release(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The model variables of a release-format ``.npz`` (EMA values when the file has them) and
    what was done to get them: ``{"ema": bool, "ignored": [names of optimizer state]}``.

    Never unpickles: object arrays are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseFormatError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise ReleaseFormatError(f"{path} holds pickled objects; a release weight file holds arrays only") from e
        raise ReleaseFormatError(f"{path} is not a readable .npz file ({e})") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise ReleaseFormatError(f"{path} is not a readable .npz file ({str(e) or type(e).__name__})") from e
    if not arrays:
        raise ReleaseFormatError(f"{path} holds no arrays")
    ignored = sorted(k for k in arrays if k.endswith(_SLOT_SUFFIXES) or k in _TRAINING_STATE)
    shadows = {k[: -len(_EMA_SUFFIX)]: k for k in arrays if k.endswith(_EMA_SUFFIX)}
    variables = {k: v for k, v in arrays.items() if k not in ignored and not k.endswith(_EMA_SUFFIX)}
    if shadows:
        missing = sorted(set(variables) - set(shadows))
        if missing:
            raise ReleaseFormatError(
                f"{path} holds exponential-moving-average shadows, but not of {missing[0]!r} "
                f"({len(missing)} variables have none)"
            )
        orphans = sorted(set(shadows) - set(variables))
        if orphans:
            raise ReleaseFormatError(f"{path}: {shadows[orphans[0]]!r} shadows a variable the file does not hold")
        variables = {k: arrays[shadows[k]] for k in variables}
    return variables, {"ema": bool(shadows), "ignored": ignored}


def _check_fit(variables: dict[str, np.ndarray], config: FlowConfig, model: FlowPlusPlus, source: str) -> None:
    """Every variable used once, every parameter filled once, shapes and values checked; else one
    error naming the first variable that does not fit (and the named configs the file fits)."""
    params = dict(model.named_parameters())
    expected = {v.name: _tf_shape(tuple(params[v.key].shape), v.layout) for v in release_variables(model)}
    problem = None
    for name, shape in expected.items():  # in the graph's order
        if name not in variables:
            missing = sum(n not in variables for n in expected)
            problem = f"config {config.name!r} needs variable {name!r}, which the file lacks ({missing} missing)"
        elif tuple(variables[name].shape) != shape:
            found = tuple(variables[name].shape)
            problem = f"variable {name!r} has shape {found}, but config {config.name!r} expects {shape}"
        if problem:
            break
    if problem is None:
        extra = [n for n in sorted(variables) if n not in expected]
        if extra:
            problem = f"variable {extra[0]!r} has no place in config {config.name!r} ({len(extra)} such variables)"
    if problem is not None:
        shapes = {k: tuple(v.shape) for k, v in variables.items()}
        fits = configs_fitting(shapes)
        changes = None if fits else fitting_overrides(shapes, config)
        if fits:
            hint = f"; the file fits config {' / '.join(repr(f) for f in fits)}"
        elif changes:
            sets = " ".join(f"--set {k}={v}" for k, v in changes.items())
            hint = f"; it fits config {config.name!r} reduced in size: {sets}"
        else:
            hint = "; it fits no named config"
        raise ReleaseFormatError(f"{source}: {problem}{hint}")
    for name, array in variables.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ReleaseFormatError(f"{source}: variable {name!r} has dtype {array.dtype}, expected floating point")
        if not np.isfinite(array).all():
            raise ReleaseFormatError(f"{source}: variable {name!r} holds non-finite values (NaN or inf)")


def import_release(
    source: str | os.PathLike | dict[str, np.ndarray], config: FlowConfig | str
) -> tuple[FlowPlusPlus, dict]:
    """A flowpp model (float32, eval mode, marked initialised) holding the weights of a release
    ``.npz`` file (or of a dict of its arrays), and what was read: source name and SHA-256,
    whether EMA shadows were used, which optimizer variables were ignored."""
    if isinstance(config, str):
        config = get_config(config)
    try:
        release_dialect(config)
    except ReleaseFormatError as e:
        raise ConfigError(str(e)) from None
    if isinstance(source, dict):
        variables, info = dict(source), {"ema": False, "ignored": []}
        info.update(source="arrays", sha256=None)
        label = "the given arrays"
    else:
        variables, info = read_release(source)
        info.update(source=Path(source).name, sha256=file_sha256(source))
        label = str(source)
    with torch.device("meta"):
        model = FlowPlusPlus(config)
    _check_fit(variables, config, model, label)
    model = model.to_empty(device="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for v in release_variables(model):
            value = _from_tf(torch.from_numpy(np.ascontiguousarray(variables[v.name])), v.layout)
            params[v.key].copy_(value)
        # The weights are given, so no layer initialises from data.
        model.initialized.fill_(True)
        for m in model.modules():
            if isinstance(m, DataDependentInit):
                m.initialized.fill_(True)
    info["variables"] = len(variables)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model.eval(), info


# --- writing ---------------------------------------------------------------------------------


def release_arrays(model: FlowPlusPlus) -> dict[str, np.ndarray]:
    """{TF name: float32 array in TF layout} for every parameter of ``model``."""
    params = dict(model.named_parameters())
    out = {}
    for v in release_variables(model):
        t = _to_tf(params[v.key].detach().to("cpu", torch.float32), v.layout)
        out[v.name] = t.contiguous().numpy()
    return out


def write_release(model: FlowPlusPlus, path: str | os.PathLike) -> tuple[Path, int]:
    """Write ``model`` as a release-format ``.npz`` (atomically); returns (path, variable count)."""
    arrays = release_arrays(model)
    # Uncompressed, as the release's files are: the weights do not compress, and reading is faster.
    path = atomic_write(path, lambda f: np.savez(f, **arrays))
    return path, len(arrays)
