"""The settings of a training run: everything about it but the model config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import RunError, UsageError

__all__ = ["TrainSettings", "TrainingDiverged", "Option"]


class TrainingDiverged(RunError):
    """Training kept diverging after rolling back; its checkpoints and best.pt, written from healthy weights
    only, are intact (a run may have neither: its message says which it has)."""


@dataclass(frozen=True)
class Option:
    """How a setting appears on the command line (``flowpp train``): its help, its group, and
    its kind of value (``flowpp.cli_values`` turns kinds into parsers: whole numbers, minutes or 'off',
    flags, ...). A setting without one is not an option."""

    help: str
    group: str
    kind: str = "value"
    flag: str | None = None  # default: --field-name
    metavar: str | None = None


OPTIMISATION, OUTPUT = "optimisation", "evaluation, checkpoints and output"


def _setting(default: Any, help: str, group: str = OUTPUT, kind: str = "positive_int", **option) -> Any:
    return field(default=default, metadata={"option": Option(help, group, kind, **option)})


@dataclass
class TrainSettings:
    """Everything about a run that is not the model config; the command line's training options
    are generated from the fields' :class:`Option` metadata, so a setting is declared once."""

    out_dir: str = field(metadata={"option": Option("run directory", OUTPUT, "required", flag="--out")})
    max_steps: int | None = _setting(None, "stop after this many steps", OPTIMISATION)
    max_minutes: float | None = _setting(
        None, "stop after this much training time (evaluation and checkpoints not counted)", OPTIMISATION,
        "positive_float",
    )  # fmt: skip
    bf16: bool = _setting(
        False, "run the conditioner networks under bfloat16 autocast (for GPUs with bf16; the mixture math and "
        "log-dets stay float32)", OPTIMISATION, "flag",
    )  # fmt: skip
    activation_checkpointing: bool = _setting(
        False, "recompute the conditioner networks in the backward pass: far less memory, ~1/3 more time",
        OPTIMISATION, "flag",
    )  # fmt: skip
    eval_every: int | None = _setting(None, "evaluate every N steps (default: at the end)")
    eval_minutes: float | None = _setting(None, "evaluate every M minutes of wall-clock", kind="minutes_or_off")
    eval_images: int = _setting(1000, "validation images per evaluation")
    checkpoint_every: int | None = _setting(None, "checkpoint every N steps")
    checkpoint_minutes: float | None = _setting(
        10.0, "checkpoint every M minutes (0: only at the end). Otherwise a run's first checkpoint comes at the "
        "end of its warm-up too, so that a blow-up at the peak rate has one to roll back to", kind="minutes_or_off",
    )  # fmt: skip
    keep_checkpoints: int = _setting(2, "how many recent checkpoints to keep")
    patience: int | None = _setting(
        None, "stop early after N evaluations in a row without a new best validation bpd (small datasets)"
    )
    max_bad_steps: int = _setting(
        5, "unhealthy steps (non-finite, or a loss spike) in a row before rolling back to the last checkpoint"
    )
    spike_ratio: float | None = _setting(
        1.25, "a step whose loss exceeds R x the median of the recent healthy steps is unhealthy: skipped, and "
        "never checkpointed ('off': only non-finite steps are)", kind="ratio_or_off", metavar="R",
    )  # fmt: skip
    max_rollbacks: int = _setting(
        3, "rollbacks in a row (no healthy checkpoint between; each after the first halves the learning rate) "
        "before training stops as diverged, with a non-zero exit",
    )  # fmt: skip
    log_every: int = _setting(10, "write a metrics row every N steps")
    progress: bool = _setting(True, "no progress bar", kind="off_flag", flag="--no-progress")
    # Shared with the other commands (their options are declared with them in flowpp.cli):
    seed: int = 0
    device: str = "auto"
    threads: int | str | None = None  # CPU threads: N, "auto" (adapt to the load, D.ThreadTuner), None: as set
    # Not options:
    eval_batch_size: int = 256
    num_samples: int = 64  # samples in the grid of each evaluation
    prefetch: int | None = None  # batches gathered ahead by a background thread; None: 2 on CUDA, 0 on CPU
    dataset: str = ""
    dataset_description: str = ""
    train_split: str = "train"  # "train+valid" when validating on the test set
    valid_split: str = "valid"
    extra: dict = field(default_factory=dict)

    def check_budget(self) -> None:
        """A run needs a step budget, a positive time budget, or both."""
        if not self.max_steps and not (self.max_minutes and self.max_minutes > 0):
            raise UsageError("give --max-steps and/or a positive --max-minutes")

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one setting (the CLI takes its defaults from here)."""
        f = next(f for f in fields(cls) if f.name == name)
        return f.default_factory() if callable(f.default_factory) else f.default
