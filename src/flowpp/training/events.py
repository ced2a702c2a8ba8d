"""What is due after a step: a metrics row, an evaluation, a checkpoint, an early stop; all on
rank 0's clock, so that every process decides alike. And the signal that asks a run to stop."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from ..configs import FlowConfig
from ..distributed import DistInfo
from ..schedules import warmed_up
from .settings import TrainSettings
from .state import TrainState

__all__ = ["Events", "Due", "Every", "RunClock", "StopSignal"]


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Every:
    """Due every ``steps`` steps or every ``minutes`` of the run's wall-clock (seconds ``now``, the
    same on every process), whichever comes first."""

    def __init__(self, steps: int | None, minutes: float | None, now: float):
        self.steps, self.seconds, self.last = steps, minutes * 60 if minutes else None, now

    def due(self, step: int, now: float) -> bool:
        return bool((self.steps and step % self.steps == 0) or (self.seconds and now - self.last >= self.seconds))

    def reset(self, now: float) -> None:
        self.last = now


class RunClock:
    """The run's seconds, across resumes (``state.wall_seconds`` at the start); under several
    processes every rank follows rank 0's clock, handed over by :func:`flowpp.distributed.agree`."""

    def __init__(self, state: TrainState, dist: DistInfo):
        self.state, self.dist = state, dist
        self.start = time.monotonic() - state.wall_seconds
        self.rank0_wall = 0.0

    def wall(self) -> float:
        return time.monotonic() - self.start

    def now(self) -> float:
        """The run's wall-clock seconds as every process agrees on them."""
        return self.rank0_wall if self.dist.enabled else self.wall()

    def agreed(self, rank0_step_seconds: float, rank0_wall: float) -> None:
        """Rank 0's time of the step before (counted here so that all ranks count the same budget)."""
        self.rank0_wall = rank0_wall
        if self.dist.enabled:
            self.state.train_seconds += rank0_step_seconds

    def step_done(self, seconds: float) -> None:
        if not self.dist.enabled:
            self.state.train_seconds += seconds


@dataclass(frozen=True)
class Due:
    log: bool
    evaluate: bool
    checkpoint: bool


class Events:
    """Decides, after each step, what is due: a metrics row every ``log_every`` steps (and at the
    end), an evaluation and a checkpoint on their step or minute timers (not at the end, which
    has its own), the first checkpoint as soon as the warm-up is over (the peak learning rate is
    where a recipe blows up, and without a checkpoint there is nothing to roll back to), and an
    early stop after ``patience`` evaluations without a new best."""

    def __init__(self, settings: TrainSettings, config: FlowConfig, state: TrainState, *, fresh: bool):
        self.settings, self.config, self.state = settings, config, state
        self.evaluations = Every(settings.eval_every, settings.eval_minutes, state.wall_seconds)
        self.checkpoints = Every(settings.checkpoint_every, settings.checkpoint_minutes, state.wall_seconds)
        self.first_checkpoint_pending = bool(settings.checkpoint_every or settings.checkpoint_minutes) and fresh

    def due(self, now: float, progress: float) -> Due:
        step, last = self.state.step, progress >= 1.0
        first = self.first_checkpoint_pending and warmed_up(self.config, step, progress)
        return Due(
            log=step % self.settings.log_every == 0 or last,
            evaluate=self.evaluations.due(step, now) and not last,
            checkpoint=(self.checkpoints.due(step, now) or first) and not last,
        )

    def evaluated(self, now: float) -> None:
        self.evaluations.reset(now)

    def checkpoint_considered(self, attempted: bool, now: float) -> None:
        """The timer starts again whether or not a checkpoint was attempted; the first-checkpoint
        rule ends with the first attempt (healthy last step), written or refused for its weights."""
        if attempted:
            self.first_checkpoint_pending = False
        self.checkpoints.reset(now)

    def out_of_patience(self) -> bool:
        return bool(self.settings.patience and self.state.evals_since_best >= self.settings.patience)
