"""Export a run's weights to safetensors (no pickle at all), with the config as metadata."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write_bytes
from .errors import UsageError
from .runs import load_run

__all__ = ["export_safetensors"]


def export_safetensors(run_dir: str | Path, out: str | Path, weights: str = "ema") -> tuple[Path, int]:
    try:
        from safetensors.torch import save
    except ImportError as e:
        raise UsageError("exporting needs the safetensors package: pip install safetensors") from e
    model, info = load_run(run_dir, "cpu", weights=weights)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "flowpp",
        "config": json.dumps(model.config.to_dict()),
        "weights": weights,
        "step": str(info["step"]),
    }
    path = atomic_write_bytes(out, save(tensors, metadata=meta))
    return path, len(tensors)
