"""The divergence guard: the one judge of a run's health.

It decides what happens to each step's update (apply, skip, roll back to the last good
checkpoint, or stop), whether weights may be saved (as a checkpoint or as best.pt, by the same
rules), when a run has recovered from a rollback, and what the run says when it gives up.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..checkpoint import list_checkpoints
from ..configs import FlowConfig
from .settings import TrainSettings
from .state import SPIKE_WINDOW, TrainState
from .step import EMA, parameter_norm

LossNow = Callable[[], tuple[bool, float]]  # the weights' agreed (finite, bits/dim) on the last batch

__all__ = ["DivergenceGuard", "health_problem", "weights_problem", "recovery_steps", "APPLY", "SKIP", "ROLL_BACK",
           "STOP"]  # fmt: skip

SPIKE_MIN_HISTORY = 16  # no step is judged a spike before this many healthy ones
PARAM_NORM_GROWTH = 10.0  # a checkpoint is refused when the weights' norm grew more since the last

APPLY, SKIP, ROLL_BACK, STOP = "apply", "skip", "roll back", "stop"


def health_problem(finite: bool, loss: float, state: TrainState, spike_ratio: float | None) -> str | None:
    """Why a step is unhealthy (its update must not be applied), or None when it is healthy.

    A step is unhealthy when its loss or gradient is not finite, or when its loss (global mean,
    bits/dim) exceeds ``spike_ratio`` times the median of the last healthy step losses: weights
    that blow up to large but finite values show there first, one step after the update that
    broke them. The median ignores the odd hard batch; a healthy run stays within a few percent
    of it (digits: at most 1.02x over 400 steps), so 1.25 leaves a wide margin. Until there are
    SPIKE_MIN_HISTORY healthy steps (a fresh run, or a checkpoint saved without its history),
    the last validation bpd, when there is one, is the reference.
    """
    if not finite:
        return "non-finite loss or gradient"
    if not spike_ratio:
        return None
    if len(state.recent_losses) >= SPIKE_MIN_HISTORY:
        reference, what = float(np.median(state.recent_losses)), "the recent median"
    elif state.last_valid_bpd is not None and math.isfinite(state.last_valid_bpd):
        reference, what = state.last_valid_bpd, "the last validation bpd"
    else:
        return None
    if loss > spike_ratio * reference:
        return f"loss {loss:.4g} bits/dim is over {spike_ratio:g} x {what} {reference:.4g}"
    return None


def weights_problem(model: torch.nn.Module, ema: torch.nn.Module, norm: float, before: float | None) -> str | None:
    """Why weights of norm ``norm`` (``before`` at the last checkpoint) must not be saved, or None."""
    bad = [
        f"{which}.{n}"
        for which, m in (("model", model), ("ema", ema))
        for n, p in m.state_dict().items()
        if p.is_floating_point() and not torch.isfinite(p).all()
    ]
    if bad:
        return f"non-finite values in {bad[:3]}"
    if before and not norm <= PARAM_NORM_GROWTH * before:
        return f"the weights' norm grew from {before:.4g} to {norm:.4g} since the last checkpoint"
    return None


def recovery_steps(config: FlowConfig) -> int:
    """Healthy steps in a row after which a rollback counts as a success: a whole re-warm of the
    learning rate (at least SPIKE_WINDOW steps)."""
    return max(config.warmup_steps, SPIKE_WINDOW)


class DivergenceGuard:
    """Judges every step (:meth:`judge`) and every checkpoint (:meth:`may_checkpoint`) of a run.

    A step is unhealthy when its loss is not finite or spikes (:func:`health_problem`); its update
    is skipped. ``max_bad_steps`` of them in a row roll back to the last good checkpoint: the
    first rollback of a series only re-warms the learning rate (a transient fault), each further
    one also halves it (the recipe itself diverges), and ``max_rollbacks`` in a row without
    :func:`recovery_steps` healthy steps between stop the run. Checkpoints and best.pt are written
    from healthy weights only (:meth:`save_problem`: judged by their own loss too, not only by the
    loss of the step that made them), so the one rolled back to is the newest good one, and the
    rotation (which follows a new healthy checkpoint) never removes it before a newer good one exists.
    """

    def __init__(self, state: TrainState, settings: TrainSettings, config: FlowConfig, say: Callable[[str], None]):
        self.state, self.settings, self.config, self.say = state, settings, config, say
        self.bad_in_row = 0
        self.problem: str | None = None
        self._judged_norm: float | None = None  # of the weights last judged for saving

    def judge(self, finite: bool, loss: float) -> str:
        """APPLY, SKIP, ROLL_BACK or STOP for the step just taken (``state.step`` already counts it)."""
        state, settings = self.state, self.settings
        self.problem = health_problem(finite, loss, state, settings.spike_ratio)
        if self.problem is None:
            return APPLY
        state.skipped_steps, state.healthy_streak = state.skipped_steps + 1, 0
        self.bad_in_row += 1
        self.say(f"step {state.step - 1}: {self.problem}; step skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row < settings.max_bad_steps:
            return SKIP
        self.bad_in_row = 0
        state.rollbacks_in_row += 1
        if state.rollbacks_in_row > settings.max_rollbacks:
            tried = f"after {state.rollbacks} rollback(s)" if state.rollbacks else "with no checkpoint to roll back to"
            self.say(f"step {state.step}: still unhealthy ({self.problem}) {tried}; stopping")
            return STOP
        return ROLL_BACK

    def healthy(self, loss: float) -> None:
        """The update of a healthy step was applied; a rollback series ends after enough of them."""
        state = self.state
        state.remember_healthy(loss)
        self.bad_in_row = 0
        if state.rollbacks_in_row and state.healthy_streak >= recovery_steps(self.config):
            self.say(f"step {state.step}: healthy for {state.healthy_streak} steps since the last rollback")
            state.rollbacks_in_row, state.rollback_step = 0, None

    def roll_back(self, keeper, model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> None:
        """Restore the good checkpoint of this series (the newest, when the series starts)."""
        state = self.state
        back = keeper.rollback(model, ema.model, opt, state.rollback_step)
        if back is None:
            self.say(f"no checkpoint to roll back to yet; skipping on ({state.rollbacks_in_row} of "
                     f"{self.settings.max_rollbacks})")  # fmt: skip
            return
        path, state.rollback_step, history = back  # the same good checkpoint for the whole series
        # The guard's reference goes back with the weights: judged against the losses of the
        # later, better weights, every step after a rollback to an early checkpoint would look
        # like a spike.
        state.recent_losses = history
        state.rollbacks, state.rewarm_from = state.rollbacks + 1, state.step
        if state.rollbacks_in_row > 1:
            state.lr_scale /= 2
        scaled = f", now scaled by {state.lr_scale:g}" if state.lr_scale != 1 else ""
        self.say(f"rolled back to {path}; re-warming the learning rate{scaled}")

    def may_checkpoint(self, model: torch.nn.Module, ema: EMA, loss_now: LossNow | None = None) -> bool:
        """Whether the current weights may be saved (see :meth:`_weights_problem`), saying why not.
        Every rank judges alike (the weights are the same everywhere) and updates the state alike."""
        return self.consider_checkpoint(self._weights_problem(model, ema, loss_now))

    def save_problem(self, model: torch.nn.Module, ema: EMA, loss_now: LossNow | None = None) -> str | None:
        """Why the current weights must not be saved, as a checkpoint or as best.pt (one set of rules
        for both, so that neither ever holds a broken model), or None: the last step was unhealthy
        (its update skipped), or the weights themselves fail (:meth:`_weights_problem`). Changes
        nothing: :meth:`consider_checkpoint` takes the answer."""
        if not self.state.healthy_streak:
            return "the last step was unhealthy"
        return self._weights_problem(model, ema, loss_now)

    def consider_checkpoint(self, problem: str | None) -> bool:
        """Whether a checkpoint may be written, given the weights' ``problem`` (just judged): says why
        not; when it may, their norm becomes the reference of the next one."""
        if problem:
            self.say(f"step {self.state.step}: not writing a checkpoint: {problem}")
            return False
        self.state.checkpoint_param_norm = self._judged_norm
        return True

    def _weights_problem(self, model: torch.nn.Module, ema: EMA, loss_now: LossNow | None) -> str | None:
        """Non-finite weights, a norm exploded since the last checkpoint (:func:`weights_problem`), or,
        given ``loss_now`` (the agreed (finite, bits/dim) of the weights on the last step's batch),
        a loss that :func:`health_problem` judges unhealthy: a step's own loss judges the weights
        before its update, so the update that breaks them passes as healthy, and only their own
        loss shows it before they are saved."""
        self._judged_norm = norm = parameter_norm(model)
        problem = weights_problem(model, ema.model, norm, self.state.checkpoint_param_norm)
        if problem is None and loss_now is not None:
            finite, loss = loss_now()
            why = "non-finite loss" if not finite else health_problem(True, loss, self.state, self.settings.spike_ratio)
            if why:
                problem = f"the updated weights are unhealthy ({why}, on the last step's batch)"
        return problem

    def stop_message(self, run, summary: dict) -> str:
        """Why a diverged run stopped, and which of its files are good: its checkpoints and best.pt
        are written from healthy weights only, so it may have neither, and then says so."""
        state, settings = self.state, self.settings
        found = list_checkpoints(run.checkpoints)
        best, no_best = summary.get("best_checkpoint"), "no best model (best.pt is kept only from healthy weights)"
        best = f" and its best model {best} (valid {summary['best_valid_bpd']:.4f} bits/dim)" if best else None
        if not found:
            return (
                f"training diverged by step {state.step}, before its first checkpoint{best or ' and with ' + no_best}: "
                f"the loss stayed unhealthy for {settings.max_bad_steps * (settings.max_rollbacks + 1)} steps. Start "
                "again with a lower --lr (or a longer warm-up: --set warmup_steps=N), or see --spike-ratio if the rise "
                "in loss is expected"
            )
        if state.rollback_step is not None:
            good = f"its last good checkpoint is {run.checkpoint_file(state.rollback_step)}"
        else:
            good = f"its newest checkpoint is {found[-1]}"
        return (
            f"training diverged by step {state.step}: {state.rollbacks} rollback(s) (learning rate scaled "
            f"down to {state.lr_scale:g}) did not make it healthy; {good}{best or '; it has ' + no_best}. Resume with "
            "a lower --lr, or see --spike-ratio if the rise in loss is expected"
        )
