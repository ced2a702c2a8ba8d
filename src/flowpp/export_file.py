"""The file format of a flowpp export: safetensors (no pickle at all) with the config as metadata,
and a model card beside it. Reading it needs no other part of flowpp but the config, so that
the model class itself can offer ``from_pretrained`` without importing the writers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .configs import FlowConfig, model_size
from .errors import UsageError

__all__ = ["EXPORT_VERSION", "card_path", "safetensors_module", "load_export"]

EXPORT_VERSION = "1"  # of the metadata layout; files of another version are refused


def safetensors_module():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise UsageError("exported weights need the safetensors package: pip install safetensors") from e
    return st


def card_path(weights_file: str | os.PathLike) -> Path:
    """model.safetensors -> model.card.json"""
    p = Path(weights_file)
    return p.with_name(p.name[: -len(p.suffix)] + ".card.json" if p.suffix else p.name + ".card.json")


def _floating(tensor_slice) -> bool:
    """Whether a safetensors entry holds parameters (floats) rather than an init flag (bool)."""
    return tensor_slice.get_dtype().startswith(("F", "BF"))


def load_export(path: str | os.PathLike, device: torch.device | str, model_class) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, the file's metadata) of an exported file; ``model_class`` builds the
    model from the config in the metadata (:class:`flowpp.FlowPlusPlus`)."""
    st = safetensors_module()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with st.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            # Only the header's shapes: the config must describe these weights before any is read.
            held = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if _floating(f.get_slice(k)))
    except Exception as e:  # a truncated file, another format: safetensors' own errors
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from e
    if meta.get("format") != "flowpp" or "config" not in meta:
        raise CheckpointError(f"{path} holds no flowpp metadata: not exported by `flowpp export`")
    version = meta.get("flowpp_export_version", EXPORT_VERSION)
    if version != EXPORT_VERSION:
        raise CheckpointError(f"{path} was exported in layout version {version}; this flowpp reads {EXPORT_VERSION}")
    try:
        config = FlowConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested past the parser
        raise CheckpointError(f"{path}: its config metadata is not a valid flowpp config ({e})") from None
    needed = model_size(config).parameters
    if needed > held:  # a small file must not make flowpp allocate the model of a large config
        raise CheckpointError(
            f"{path} does not fit config {config.name!r}: the file holds {held:,} parameters, the config "
            f"describes {needed:,}"
        )
    try:
        with st.safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from e
    model = model_class(config)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit config {config.name!r}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval(), meta
