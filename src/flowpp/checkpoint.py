"""Checkpoints: plain tensors and data only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict with ``format``/``version`` tags, the resolved config (a plain dict),
model and EMA state dicts, optimizer state, step counters, RNG states and the data position.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the target,
so a crash never leaves a half-written file under a checkpoint's name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "FORMAT"]

FORMAT = "flowpp-checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit what it is loaded into."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tensors and plain data) to ``path``."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from e
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, a forbidden global, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or not a flowpp checkpoint ({msg})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flowpp checkpoint (missing format tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, this flowpp reads {VERSION}")
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'")
    return state


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike, log: Callable[[str], None] | None = None
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads; unreadable newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            if log:
                log(f"skipping {e}")
    return None
