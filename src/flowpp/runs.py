"""The run directory: the one place that knows its layout.

::

    RUN/config.json        the resolved config
        settings.json      the training settings
        metrics.csv        learning curve (flowpp.train.METRIC_FIELDS)
        summary.json       written when training ends
        checkpoints/       checkpoint-<step>.pt, each with a .sha256 beside it (the newest few)
        best.pt            the weights of the best evaluation so far (never rotated away)
        samples/           step-<step>.png, a sample grid per evaluation
        tensorboard/       events, when tensorboard is installed
        eval-<data>-<split>-S<samples>.json   written by `flowpp eval`
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

import torch

from .atomic import atomic_write_text, json_text
from .checkpoint import (
    CheckpointError,
    digest_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .configs import FlowConfig
from .errors import RunError
from .model import FlowPlusPlus

__all__ = ["RunDir", "load_run", "run_config"]

Log = Callable[[str], None]


class RunDir:
    """Paths and files of one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_file = self.path / "config.json"
        self.settings_file = self.path / "settings.json"
        self.metrics_file = self.path / "metrics.csv"
        self.summary_file = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.best_file = self.path / "best.pt"
        self.lock_file = self.path / ".lock"
        self._lock = None
        self._verified: set = set()
        self.samples = self.path / "samples"
        self.tensorboard = self.path / "tensorboard"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:08d}.png"

    def eval_file(self, data: str, split: str, samples: int) -> Path:
        tag = Path(str(data)).stem if ("/" in str(data) or "." in str(data)) else str(data)
        return self.path / f"eval-{tag}-{split}-S{samples}.json"

    # --- one writer at a time -------------------------------------------------------------------

    def lock(self) -> None:
        """Take the run directory for this process: a second training on the same directory (another
        terminal, a re-submitted job, a --resume beside a live run) is refused, not interleaved,
        with the holder's pid and host in the message. The OS drops the lock when the process
        ends, however it ends, so a dead run's lock is simply taken over."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection
            return
        if self._lock is not None:
            return
        handle = open(self.lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"{self.path} is in use by a running training ({holder}); wait for it to end or "
                           "choose another --out") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self._verified: set = set()

    # --- starting a run -------------------------------------------------------------------------

    def create(self, resume: bool) -> None:
        """Make the directory for a new run (refusing one that holds checkpoints) or for a resume,
        and take its lock (:meth:`lock`) for this process."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {self.path}: {e.strerror or e}") from e
        if not os.access(self.path, os.W_OK):
            raise RunError(f"run directory {self.path} is not writable")
        self.lock()  # before anything is read or cleaned up: a live run's files are never touched
        existing = list_checkpoints(self.checkpoints)
        if existing and not resume:
            raise RunError(
                f"{self.path} already holds checkpoints ({existing[-1].name}); pass --resume to "
                f"continue that run or choose another --out"
            )
        self.samples.mkdir(exist_ok=True)
        for stale in self.checkpoints.glob("*.tmp") if self.checkpoints.is_dir() else []:
            stale.unlink()  # a write interrupted by a crash; the checkpoints themselves are whole

    # --- config, settings, summary ------------------------------------------------------------------

    def write_config(self, config: FlowConfig) -> None:
        atomic_write_text(self.config_file, json_text(config.to_dict()))

    def read_config(self) -> FlowConfig:
        if not self.config_file.is_file():
            raise RunError(f"{self.path} is not a flowpp run directory (no config.json)")
        try:
            return FlowConfig.from_dict(json.loads(self.config_file.read_text()))
        except (ValueError, TypeError) as e:
            raise RunError(f"{self.config_file} is not a valid flowpp config: {e}") from e

    def write_settings(self, settings: dict) -> None:
        atomic_write_text(self.settings_file, json_text(settings))

    def read_settings(self) -> dict:
        """The saved settings, or {} for a run that has none yet."""
        if not self.settings_file.is_file():
            return {}
        try:
            return json.loads(self.settings_file.read_text())
        except ValueError as e:
            raise RunError(f"{self.settings_file} is not valid JSON: {e}") from e

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, json_text(summary))

    # --- checkpoints --------------------------------------------------------------------------------

    def checkpoint_file(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step:08d}.pt"

    def save_checkpoint(
        self, step: int, state: dict, keep: int, log: Log | None = None, protect: Path | None = None
    ) -> Path:
        """Write the checkpoint of ``step`` atomically, then keep the newest ``keep`` intact ones,
        and ``protect`` (a rollback target) besides.

        A damaged checkpoint never counts toward ``keep`` (it would push a good one out): it is
        renamed ``<name>.unreadable``, out of the rotation but kept for inspection."""
        path = save_checkpoint(self.checkpoint_file(step), state)
        self._verified.add(self._identity(path))  # its digest was just taken from the disk
        intact = 0
        for old in reversed(list_checkpoints(self.checkpoints)):
            if old == protect:
                continue
            if intact >= keep:
                remove_checkpoint(old)
            elif self._intact(old):
                intact += 1
            else:
                for part in (old, digest_path(old)):
                    if part.exists():
                        part.rename(part.with_name(part.name + ".unreadable"))
                if log:
                    log(f"{old.name} is damaged: renamed {old.name}.unreadable, not counted among the kept")
        return path

    @staticmethod
    def _identity(path: Path) -> tuple:
        st = path.stat()
        return (path.name, st.st_size, st.st_mtime_ns)

    def _intact(self, path: Path) -> bool:
        key = self._identity(path)
        if key in self._verified:  # a file checked once in this process is not hashed again
            return True
        try:
            verify_checkpoint(path)
        except CheckpointError:
            return False
        self._verified.add(key)
        return True

    def save_best(self, state: dict) -> Path:
        return save_checkpoint(self.best_file, state)

    def latest_checkpoint(self, log: Log | None = None) -> tuple[Path, dict] | None:
        return latest_checkpoint(self.checkpoints, log=log)

    def load_model(
        self, device: torch.device | str = "cpu", weights: str = "ema", log: Log | None = None, which: str | None = None
    ) -> tuple[FlowPlusPlus, dict]:
        """A model of the run in eval mode: ``which`` = "best" (best.pt), "last" (the newest readable
        checkpoint) or None (best when the run has one); EMA weights unless ``weights="model"``."""
        if not self.path.is_dir():
            raise RunError(f"run directory {self.path} does not exist")
        if which not in (None, "best", "last"):
            raise RunError(f"weights {which!r}: expected 'best' or 'last'")
        which = which or ("best" if self.best_file.is_file() else "last")
        if which == "best":
            if not self.best_file.is_file():
                raise RunError(f"{self.path} has no best model yet (best.pt is written at its first evaluation)")
            path, ck = self.best_file, load_checkpoint(self.best_file)
        else:
            found = self.latest_checkpoint(log=log)
            if found is None:
                raise CheckpointError(f"no readable checkpoint in {self.checkpoints}")
            path, ck = found
        config = FlowConfig.from_dict(ck["config"])
        if weights not in ck:
            raise CheckpointError(f"checkpoint {path} holds no '{weights}' weights")
        model = FlowPlusPlus(config)
        try:
            model.load_state_dict(ck[weights])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit config {config.name!r}: {str(e).splitlines()[0]}"
            ) from e
        model.to(device).eval()
        info = {"checkpoint": str(path), "step": ck.get("train_state", {}).get("step"), "weights": weights,
                "which": which}  # fmt: skip
        return model, info


def run_config(run_dir: str | os.PathLike) -> FlowConfig:
    return RunDir(run_dir).read_config()


def load_run(
    run_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    weights: str = "ema",
    log: Log | None = None,
    which: str | None = None,
) -> tuple[FlowPlusPlus, dict]:
    return RunDir(run_dir).load_model(device, weights=weights, log=log, which=which)
