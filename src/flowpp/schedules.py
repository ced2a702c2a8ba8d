"""Learning-rate schedules of the official recipes, implemented as intended.

``learning_rate(config, step, progress)`` is a pure function: ``progress`` in [0, 1] is the
fraction of the training budget used (steps or wall-clock), needed only by the budget-aware
schedules "cosine" and "linear".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # configs name the schedules they may use, so this module cannot import them
    from .configs import FlowConfig

__all__ = [
    "learning_rate",
    "learning_rate_now",
    "warmed_up",
    "budget_used",
    "BUDGET_WARMUP_FRACTION",
    "SCHEDULES",
    "Schedule",
]

BUDGET_WARMUP_FRACTION = 0.05  # of the budget: the longest warm-up of a budget-aware schedule


def _warmup(step: int, warmup_steps: int, peak: float) -> float:
    return peak * min(1.0, step / warmup_steps) if warmup_steps > 0 else peak


def _warm_hold_decay(cfg: FlowConfig, s: int, hold_until: int, rate: float, floor: float) -> float:
    """Warm up to the peak, hold it until step ``hold_until``, then x``rate`` per step down to ``floor``."""
    if s < cfg.warmup_steps:
        return _warmup(s, cfg.warmup_steps, cfg.lr)
    if s <= hold_until:
        return cfg.lr
    return max(cfg.lr * rate ** (s - hold_until), floor)


def _constant(cfg: FlowConfig, s: int, progress: float | None) -> float:
    return _warmup(s, cfg.warmup_steps, cfg.lr)


def _budget_aware(remaining: Callable[[float], float]) -> Callable[[FlowConfig, int, float | None], float]:
    """Warm up over warmup_steps or the first 5% of the budget, whichever ends first (a short run
    must not spend itself warming up), then decay to min_lr at the end of the budget (steps or
    wall-clock) by ``remaining(progress)``, the fraction of the way from min_lr to the peak left."""

    def rate(cfg: FlowConfig, s: int, progress: float | None) -> float:
        if progress is None:
            return _warmup(s, cfg.warmup_steps, cfg.lr)
        p = min(max(progress, 0.0), 1.0)
        warm = min(1.0, max(s / cfg.warmup_steps if cfg.warmup_steps > 0 else 1.0, p / BUDGET_WARMUP_FRACTION))
        return warm * (cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining(p))

    return rate


def _imagenet32(cfg: FlowConfig, s: int, progress: float | None) -> float:
    # Warm up to the peak, hold until 10x the warm-up, then x0.99995 per step down to min_lr.
    return _warm_hold_decay(cfg, s, 10 * cfg.warmup_steps, 0.99995, cfg.min_lr)


def _imagenet64(cfg: FlowConfig, s: int, progress: float | None) -> float:
    # The intended piecewise schedule (the official code returns None at the boundaries and a
    # negative rate between 280k and 290k): warm up to 4e-4 over 10k, hold to 50k, decay
    # x0.99995 per step to 3e-4, hold to 230k, re-warm 0 -> 1e-5 over 10k, hold to 280k,
    # re-warm 0 -> 1e-6 over 10k, then hold (the authors' guard against late NaNs).
    if s < 230_000:
        return _warm_hold_decay(cfg, s, 5 * cfg.warmup_steps, 0.99995, 3e-4)
    if s < 240_000:
        return 1e-5 * (s - 230_000) / 10_000
    if s < 280_000:
        return 1e-5
    if s < 290_000:
        return 1e-6 * (s - 280_000) / 10_000
    return max(cfg.min_lr, 1e-6)


def _imagenet64_5bit(cfg: FlowConfig, s: int, progress: float | None) -> float:
    # The release's 5-bit ImageNet64 launcher, repaired as above (it returns no rate at its
    # boundary steps): warm up to 4e-4 over 10k, hold to 50k, x0.99995 per step down to
    # 3e-4, hold to 110k, ramp 0 -> 1e-5 over 110k-130k, then hold at 1e-5 (min_lr).
    if s < 110_000:
        return _warm_hold_decay(cfg, s, 5 * cfg.warmup_steps, 0.99995, 3e-4)
    if s < 130_000:
        return cfg.min_lr * (s - 110_000) / 20_000
    return cfg.min_lr


def _celeba64(cfg: FlowConfig, s: int, progress: float | None) -> float:
    # The release's CelebA 64x64 launchers: warm up to the peak, hold to 50k steps, then
    # x0.9995 per step down to min_lr.
    return _warm_hold_decay(cfg, s, 50_000, 0.9995, cfg.min_lr)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``rate(config, step, progress)``; a ``budget_aware`` one also
    ends its warm-up at 5% of the budget and decays to min_lr at its end."""

    rate: Callable[[FlowConfig, int, float | None], float]
    budget_aware: bool = False


# A config's ``lr_schedule`` names one of these.
SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(_constant),
    "cosine": Schedule(_budget_aware(lambda p: 0.5 * (1.0 + math.cos(math.pi * p))), budget_aware=True),
    "linear": Schedule(_budget_aware(lambda p: 1.0 - p), budget_aware=True),
    "imagenet32": Schedule(_imagenet32),
    "imagenet64": Schedule(_imagenet64),
    "imagenet64-5bit": Schedule(_imagenet64_5bit),
    "celeba64": Schedule(_celeba64),
}


def warmed_up(cfg: FlowConfig, step: int, progress: float | None = None) -> bool:
    """Whether the first warm-up is over after ``step`` optimizer steps (``progress`` as in
    :func:`learning_rate`: the budget-aware schedules' warm-up also ends at 5% of the budget)."""
    if step >= cfg.warmup_steps:
        return True
    return SCHEDULES[cfg.lr_schedule].budget_aware and progress is not None and progress >= BUDGET_WARMUP_FRACTION


def learning_rate(cfg: FlowConfig, step: int, progress: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    try:
        schedule = SCHEDULES[cfg.lr_schedule]
    except KeyError:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}") from None
    return schedule.rate(cfg, step, progress)


# --- the schedule of a run: its budget, and rollbacks (a TrainSettings and a TrainState) ---------


def budget_used(settings, state) -> float:
    """The fraction of the budget (``settings.max_steps`` or ``max_minutes`` of training, whichever
    runs out first) that ``state`` (``step``, ``train_seconds``) has used."""
    used = [state.step / settings.max_steps] if settings.max_steps else []
    if settings.max_minutes:
        used.append(state.train_seconds / (settings.max_minutes * 60.0))
    return max(used)


def learning_rate_now(config: FlowConfig, state, progress: float | None) -> float:
    """The schedule's rate for ``state.step``, warmed up again after a rollback and scaled down
    after repeated ones (``state.lr_scale``)."""
    lr = learning_rate(config, state.step, progress) * state.lr_scale
    if state.rewarm_from is not None and config.warmup_steps > 0:
        lr *= min(1.0, (state.step - state.rewarm_from + 1) / config.warmup_steps)
    return lr
