"""The counters of a training run, saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

__all__ = ["TrainState", "SPIKE_WINDOW"]

SPIKE_WINDOW = 64  # healthy step losses whose median is the reference of the divergence guard


@dataclass
class TrainState:
    """The counters of a run; saved in every checkpoint as ``train_state``."""

    step: int = 0
    images_seen: int = 0
    epoch: int = 0
    offset: int = 0  # images of the current epoch already used
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    rewarm_from: int | None = None  # step of the last rollback: the learning rate warms up again from there
    skipped_steps: int = 0
    rollbacks: int = 0
    # The divergence guard (see health_problem):
    recent_losses: list = field(default_factory=list)  # the last SPIKE_WINDOW healthy step losses
    healthy_streak: int = 0  # healthy steps in a row (a checkpoint needs at least one)
    rollbacks_in_row: int = 0  # since the run last recovered (see roll_back)
    rollback_step: int | None = None  # the checkpoint rolled back to until then (never rotated away)
    lr_scale: float = 1.0  # halved by each rollback after the first in a row
    checkpoint_param_norm: float | None = None  # at the last healthy checkpoint (or after init)
    best_valid_bpd: float | None = None
    best_step: int | None = None
    last_valid_bpd: float | None = None
    evals_since_best: int = 0  # evaluations in a row without a new best (early stopping)
    # Since the last metrics row (saved, so that the first row after a resume covers the same steps):
    window_bpd_sum: float = 0.0
    window_finite_steps: int = 0
    window_images: int = 0
    window_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def add_step(self, bpd: float | None, images: int, seconds: float) -> None:
        """Count a step in the metrics window (``bpd`` None for a skipped step)."""
        if bpd is not None:
            self.window_bpd_sum += bpd
            self.window_finite_steps += 1
        self.window_images += images
        self.window_seconds += seconds

    @property
    def img_per_s(self) -> float:
        return self.window_images / max(self.window_seconds, 1e-9)

    def close_window(self) -> tuple[float, float]:
        """(mean train bpd, images/s) of the window, which starts again."""
        mean = self.window_bpd_sum / self.window_finite_steps if self.window_finite_steps else float("nan")
        out = (mean, self.img_per_s)
        self.window_bpd_sum, self.window_finite_steps, self.window_images, self.window_seconds = 0.0, 0, 0, 0.0
        return out

    def remember_healthy(self, bpd: float) -> None:
        self.recent_losses = [*self.recent_losses[-(SPIKE_WINDOW - 1) :], bpd]
        self.healthy_streak += 1

    def is_new_best(self, bpd: float) -> bool:
        return self.best_valid_bpd is None or bpd < self.best_valid_bpd

    def record_valid(self, bpd: float, healthy: bool = True) -> bool:
        """Note an evaluation; True when it is the best so far. Only healthy weights (the divergence
        guard's judgement) can be: an evaluation of broken ones counts as one without a new best."""
        self.last_valid_bpd = bpd
        if healthy and self.is_new_best(bpd):
            self.best_valid_bpd, self.best_step, self.evals_since_best = bpd, self.step, 0
            return True
        self.evals_since_best += 1
        return False

    def advance(self, epoch: int, offset: int, images: int) -> None:
        """One step taken (applied or skipped): the data position and the counters move on."""
        self.epoch, self.offset, self.step = epoch, offset, self.step + 1
        self.images_seen += images

    @classmethod
    def resumed(cls, saved: dict, new_lr: bool, log: Callable[[str], None]) -> "TrainState":
        """The state of a checkpoint, resumed; a new learning rate (``new_lr``) forgets the scale that
        earlier rollbacks left, since the user has chosen a rate."""
        state = cls.from_dict(saved)
        if new_lr and (state.lr_scale != 1 or state.rollbacks_in_row):
            log(f"a new learning rate: the scale {state.lr_scale:g} left by earlier rollbacks is reset to 1")
            state.lr_scale, state.rollbacks_in_row, state.rollback_step = 1.0, 0, None
        return state
