"""Reading a run directory back: its config and the EMA model of its newest checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, latest_checkpoint
from .configs import FlowConfig
from .model import FlowPlusPlus

__all__ = ["load_run", "run_config"]


def run_config(run_dir: str | Path) -> FlowConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a flowpp run directory (no config.json)")
    try:
        return FlowConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a valid flowpp config: {e}") from e


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", weights: str = "ema",
             log: Callable[[str], None] | None = None) -> tuple[FlowPlusPlus, dict]:
    """The model of the newest readable checkpoint in ``run_dir`` (EMA weights by default), in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    found = latest_checkpoint(run_dir / "checkpoints", log=log)
    if found is None:
        raise CheckpointError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    path, ck = found
    config = FlowConfig.from_dict(ck["config"])
    model = FlowPlusPlus(config)
    try:
        model.load_state_dict(ck[weights])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit config {config.name!r}: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    info = {"checkpoint": str(path), "step": ck.get("train_state", {}).get("step"), "weights": weights}
    return model, info
