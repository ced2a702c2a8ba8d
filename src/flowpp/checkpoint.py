"""Checkpoints: plain tensors and data only, written atomically, read with ``weights_only=True``.

Each checkpoint has a sidecar ``<name>.sha256`` with the digest of its bytes, written before the
checkpoint is renamed into place; loading verifies it, so a corrupted file is refused rather
than silently loaded. A checkpoint is a dict with ``format``/``version`` tags, the resolved config (a plain dict),
model and EMA state dicts, optimizer state, step counters, RNG states and the data position.
Writes go through :func:`flowpp.atomic.atomic_write`, so a crash never leaves a half-written
file under a checkpoint's name.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_write, atomic_write_text, file_sha256
from .errors import FlowppError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "remove_checkpoint",
    "digest_path",
    "verify_checkpoint",
    "FORMAT",
]

FORMAT = "flowpp-checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(FlowppError, ValueError):
    """A checkpoint could not be read, or does not fit what it is loaded into."""


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tensors and plain data) to ``path``, with its digest beside it."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **state}

    def write_digest(written: Path) -> None:
        # Read back from disk, the digest also vouches for what was actually written.
        atomic_write_text(digest_path(path), f"{file_sha256(written)}  {path.name}\n")

    try:
        atomic_write(path, lambda f: torch.save(payload, f), before_replace=write_digest)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from e
    return path


def remove_checkpoint(path: Path) -> None:
    for p in (path, digest_path(path)):
        try:
            p.unlink()
        except OSError:
            pass


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless the file's bytes are intact: its SHA-256 digest when it has
    one, else its zip CRCs. Cheaper than loading (nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = digest_path(path)
    if sidecar.is_file():
        try:
            expected = sidecar.read_text().split()[0]
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint digest {sidecar} is unreadable") from e
        if file_sha256(path) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 does not match {sidecar.name}")
    else:  # without a digest, at least the zip container's CRCs (torch.load does not check them)
        _check_zip_crcs(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(path)
    verify_checkpoint(path)
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
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"checkpoint {path}: 'config' and 'model' must be dictionaries")
    return state


def _check_zip_crcs(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or not a flowpp checkpoint ({e})") from e
    except Exception as e:  # zlib errors of a damaged compressed member
        raise CheckpointError(f"checkpoint {path} is corrupted ({e})") from e
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: member {bad} fails its CRC check (and it has no "
                              f"{digest_path(path).name} digest)")  # fmt: skip


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(
    directory: str | os.PathLike, log: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads; unreadable newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            if log:
                log(f"skipping {e}")
    return None
