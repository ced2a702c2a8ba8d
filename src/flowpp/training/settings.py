"""The settings of a training run: everything about it but the model config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import RunError, UsageError

__all__ = ["TrainSettings", "TrainingDiverged"]


class TrainingDiverged(RunError):
    """Training kept diverging after rolling back; the last good checkpoint and best.pt are intact."""


@dataclass
class TrainSettings:
    """Everything about a run that is not the model config (the command line's defaults)."""

    out_dir: str
    max_steps: int | None = None
    max_minutes: float | None = None  # training time only: evaluation and checkpoints do not count
    eval_every: int | None = None  # steps; None: only at the end
    eval_minutes: float | None = None
    checkpoint_every: int | None = None  # steps
    checkpoint_minutes: float | None = 10.0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    eval_images: int = 1000  # validation images used by the evaluations during training
    eval_batch_size: int = 256
    num_samples: int = 64
    keep_checkpoints: int = 2
    patience: int | None = None  # stop after this many evaluations in a row without a new best
    max_bad_steps: int = 5  # unhealthy steps in a row before rolling back to the last checkpoint
    spike_ratio: float | None = 1.25  # a loss above this x the recent median is unhealthy; None: off
    max_rollbacks: int = 3  # rollbacks in a row (no healthy checkpoint between) before giving up
    progress: bool = True
    bf16: bool = False  # conditioner networks under bfloat16 autocast (mixture math stays float32)
    activation_checkpointing: bool = False  # recompute conditioners in the backward pass (less memory)
    prefetch: int | None = None  # batches gathered ahead by a background thread; None: 2 on CUDA, 0 on CPU
    threads: int | str | None = None  # CPU threads: N, "auto" (adapt to the load, D.ThreadTuner), None: as set
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
