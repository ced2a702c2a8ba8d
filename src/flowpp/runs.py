"""The run directory: the one place that knows its layout.

::

    RUN/config.json        the resolved config
        settings.json      the training settings
        metrics.csv        learning curve (METRIC_FIELDS)
        summary.json       written when training ends
        checkpoints/       checkpoint-<step>.pt, each with a .sha256 beside it (the newest few)
        best.pt            the weights of the best evaluation so far (never rotated away)
        samples/           step-<step>.png, a sample grid per evaluation
        tensorboard/       events, when tensorboard is installed
        eval-<data>-<split>-S<samples>.json   written by `flowpp eval`
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

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
from .configs import TRAINING_FIELDS, FlowConfig, model_size
from .errors import ConfigError, RunError
from .model import FlowPlusPlus

__all__ = ["RunDir", "CheckpointKeeper", "MetricsWriter", "METRIC_FIELDS", "load_run", "run_config"]

METRIC_FIELDS = [
    "step",
    "images_seen",
    "train_bpd",
    "valid_bpd",
    "lr",
    "img_per_s",
    "inverse_error",
    "grad_norm",
    "skipped_steps",
    "rollbacks",
    "train_seconds",
    "wall_seconds",
    "threads",
]

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
        saved = _read_json_object(self.config_file, "a flowpp config")
        try:
            return FlowConfig.from_dict(saved)
        except (ValueError, TypeError) as e:
            raise RunError(f"{self.config_file} is not a valid flowpp config: {e}") from e

    def write_settings(self, settings: dict) -> None:
        atomic_write_text(self.settings_file, json_text(settings))

    def read_settings(self) -> dict:
        """The saved settings, or {} for a run that has none yet."""
        if not self.settings_file.is_file():
            return {}
        return _read_json_object(self.settings_file, "the run's settings")

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
        try:
            config = FlowConfig.from_dict(ck.get("config"))
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        if weights not in ck:
            raise CheckpointError(f"checkpoint {path} holds no '{weights}' weights")
        state = ck[weights] if isinstance(ck[weights], dict) else {}
        held = sum(t.numel() for t in state.values() if torch.is_tensor(t) and t.is_floating_point())
        needed = model_size(config).parameters
        if needed > held:  # a small file must not make flowpp allocate the model of a large config
            raise CheckpointError(f"checkpoint {path} does not fit config {config.name!r}: it holds {held:,} "
                                  f"parameters, the config describes {needed:,}")  # fmt: skip
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


class CheckpointKeeper:
    """A training run's checkpoints: written by rank 0 (the rotation keeps the newest ``keep`` and
    a rollback target), the best model, and loading back for a resume or a rollback. Whether
    weights are healthy enough to be saved is the caller's judgement (the divergence guard's)."""

    def __init__(self, run: RunDir, config: FlowConfig, settings: dict, keep: int, dist, log: Log):
        self.run, self.config, self.settings, self.keep, self.dist, self.log = run, config, settings, keep, dist, log

    def save(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, state: dict) -> Path | None:
        """Write a checkpoint of the training ``state`` (a dict: ``step``, ``rollback_step``, ...);
        its path on rank 0, None on the others."""
        if not self.dist.is_main:
            return None
        ck = dict(
            config=self.config.to_dict(),
            model=model.state_dict(),
            ema=ema.state_dict(),
            optimizer=opt.state_dict(),
            train_state=state,
            rng=dict(torch=torch.get_rng_state()),
            settings=self.settings,
            world_size=self.dist.world_size,
        )
        rollback_step = state.get("rollback_step")
        protect = None if rollback_step is None else self.run.checkpoint_file(rollback_step)
        return self.run.save_checkpoint(state["step"], ck, self.keep, log=self.log, protect=protect)

    def save_best(self, model: nn.Module, ema: nn.Module, state: dict) -> Path | None:
        """Keep the weights of the best evaluation so far (best.pt: outside the rotation)."""
        if not self.dist.is_main:
            return None
        ck = dict(config=self.config.to_dict(), model=model.state_dict(), ema=ema.state_dict(),
                  train_state=state, valid_bpd=state.get("best_valid_bpd"))  # fmt: skip
        return self.run.save_best(ck)

    def _load(
        self,
        model: nn.Module,
        ema: nn.Module,
        opt: torch.optim.Optimizer,
        step: int | None = None,
        found: tuple[Path, dict] | None = None,
    ) -> tuple[Path, dict] | None:
        """Load ``found`` (a checkpoint already read), the checkpoint of ``step`` (when it is still
        readable) or else the newest one."""
        # Every rank reads the same file (the run directory is shared), so optimizer states agree.
        if found is None and step is not None:
            try:
                found = self.run.checkpoint_file(step), load_checkpoint(self.run.checkpoint_file(step))
            except CheckpointError as e:
                self.log(f"cannot roll back to step {step} ({e}); taking the newest readable checkpoint")
        found = found or self.run.latest_checkpoint(log=self.log)
        if found is None:
            return None
        path, ck = found
        missing = [k for k in ("ema", "optimizer", "train_state") if k not in ck]
        if missing:
            raise CheckpointError(f"checkpoint {path} cannot resume training: it lacks {', '.join(missing)}")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        return path, ck

    def resume(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer) -> tuple[Path, dict, FlowConfig]:
        """Load the newest readable checkpoint of a run of this config: its path, training state
        (a dict) and the config it was written with (the training recipe may differ)."""
        found = self.run.latest_checkpoint(log=self.log)
        if found is None:
            raise CheckpointError(f"--resume: no readable checkpoint in {self.run.checkpoints}")
        saved = FlowConfig.from_dict(found[1]["config"])
        diffs = saved.architecture_differences(self.config)
        if diffs:
            raise CheckpointError(
                f"checkpoint {found[0]} was written for another config (checkpoint vs now: {'; '.join(diffs)})"
            )
        recipe = [
            f"{k}: {v!r} -> {getattr(self.config, k)!r}"
            for k, v in saved.to_dict().items()
            if k in TRAINING_FIELDS and v != getattr(self.config, k)
        ]
        if recipe:
            self.log(f"resuming with a changed training recipe: {'; '.join(recipe)}")
        path, ck = self._load(model, ema, opt, found=found)  # not looked up again: skips are said once
        return path, ck["train_state"], saved

    def rollback(
        self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, step: int | None = None
    ) -> tuple[Path, int, list] | None:
        """Restore the weights and optimizer of the checkpoint of ``step`` (default: the newest);
        its (path, step, the healthy losses before it), or None when there is no checkpoint yet."""
        found = self._load(model, ema, opt, step)
        if found is None:
            return None
        saved = found[1]["train_state"]
        return found[0], saved["step"], list(saved.get("recent_losses", []))


def _read_json_object(path: Path, what: str) -> dict:
    """A run file that must hold one JSON object; anything else (bytes that are not JSON, another
    type, nesting deep enough to exhaust the parser) is a damaged run file, said in one line."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunError(f"{path} is damaged: it is not the JSON of {what} ({type(e).__name__})") from None
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise RunError(f"{path} is damaged: it holds a JSON {type(value).__name__}, not {what}")
    return value


def _is_final_row(row: dict) -> bool:
    """The row of a run's final evaluation: a validation result and the run's totals, but no
    learning rate (a periodic evaluation's row has one)."""
    return bool(row.get("valid_bpd")) and not row.get("lr") and not row.get("train_bpd")


class MetricsWriter:
    """metrics.csv (rank 0; rows after a resumed checkpoint are dropped) and TensorBoard when installed."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = run.metrics_file, enabled
        self.tb = None
        if not enabled:
            return
        if not self.path.exists():
            atomic_write_text(self.path, ",".join(METRIC_FIELDS) + "\n")
        elif resume_step is not None:
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return
        self.tb = SummaryWriter(str(run.tensorboard))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint (they will be recomputed)."""
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise RunError(
                f"{self.path} is damaged ({type(e).__name__}): move it aside to resume with a new learning curve"
            ) from None
        # A row cut short by a crash has missing fields: drop it with the rows after the checkpoint.
        # (A file written before a column was added keeps its rows; the new column is empty there.)
        # The final row of a run that had ended at the checkpoint's step (a kill came after it) is
        # written again when the resumed run ends: keep one, as an uninterrupted run has.
        kept = [
            r
            for r in rows
            if None not in r.values()
            and None not in r
            and (r.get("step") or "").isdigit()
            and (int(r["step"]) < step or (int(r["step"]) == step and not _is_final_row(r)))
        ]
        lines = [",".join(METRIC_FIELDS)] + [",".join(r.get(k, "") or "" for k in METRIC_FIELDS) for r in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        vals = [f"{v:.9g}" if isinstance(v, float) else str(v) for v in (row.get(k, "") for k in METRIC_FIELDS)]
        with open(self.path, "a") as f:
            f.write(",".join(vals) + "\n")
        if self.tb is not None:
            for k in ("train_bpd", "valid_bpd", "lr", "img_per_s", "inverse_error", "grad_norm"):
                v = row.get(k)
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def run_config(run_dir: str | os.PathLike) -> FlowConfig:
    return RunDir(run_dir).read_config()


def load_run(
    run_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    weights: str | None = None,
    log: Log | None = None,
    which: str | None = None,
    *,
    raw: bool = False,
) -> tuple[FlowPlusPlus, dict]:
    """A run's model in eval mode, in the words of the command line: ``weights`` is "best"
    (best.pt), "last" (the newest readable checkpoint) or None (best when the run has one), as
    ``--weights``; ``raw=True`` takes the trained weights instead of their EMA, as ``--raw``.
    The info says ``weights`` (best or last), ``raw``, ``checkpoint`` and ``step``.

    The earlier words still work, with a DeprecationWarning: ``weights="ema"|"model"|"raw"``
    (now ``raw``) and ``which="best"|"last"`` (now ``weights``)."""
    if weights in ("ema", "model", "raw"):
        warnings.warn(f"load_run(weights={weights!r}) is the EMA-or-raw choice of earlier versions: pass "
                      f"raw={weights != 'ema'} (weights now means best or last, as --weights)",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        raw, weights = weights != "ema", None
    if which is not None:
        warnings.warn("load_run(which=...) is now load_run(weights=...)", DeprecationWarning, stacklevel=2)
        if weights is not None and weights != which:
            raise RunError(f"load_run: weights={weights!r} and which={which!r} disagree")
        weights = which
    model, info = RunDir(run_dir).load_model(device, weights="model" if raw else "ema", log=log, which=weights)
    return model, {"weights": info["which"], "raw": raw, "checkpoint": info["checkpoint"], "step": info["step"]}
