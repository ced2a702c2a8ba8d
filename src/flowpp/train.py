"""Training: the official recipe as a few named pieces and one loop that reads top to bottom.

The pieces: :class:`TrainSettings` (everything about a run but the model config),
:class:`TrainState` (the counters a checkpoint saves), :class:`EMA`, :func:`learning_rate_now`
(the schedule with its re-warm after a rollback), :func:`train_step` (forward, backward,
clipping), :func:`agree` (the multi-process step/skip/stop vote), :class:`CheckpointKeeper`
(save, resume, roll back, and keep the best model), :class:`MetricsWriter` (metrics.csv and
TensorBoard), and :func:`evaluate_now` (the sharded evaluator of :mod:`flowpp.evaluate`, plus
samples and the inverse error). :func:`start_training` sets up, :func:`train` is the loop
(stopping at the budget, on a signal, or after ``patience`` evaluations without a new best),
:func:`finish_training` evaluates and writes the summary.

Determinism: the data order depends only on (seed, epoch), and the dequantization noise and
dropout of step k only on (seed, k), so a run resumed from a checkpoint repeats exactly what
an uninterrupted run would have done (on CPU), and a run on W processes sees the same global
batches and noise as a run on one.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import math
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import distributed as D
from .atomic import atomic_write_text
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .configs import TRAINING_FIELDS, FlowConfig
from .errors import RunError, UsageError
from .evaluate import evaluate_bpd
from .images import chw_shape, gather, save_grid, to_nchw
from .model import FlowPlusPlus
from .runs import RunDir
from .schedules import learning_rate, warmed_up

__all__ = [
    "Trainer",
    "start_training",
    "finish_training",
    "TrainSettings",
    "TrainState",
    "TrainingDiverged",
    "Prefetch",
    "health_problem",
    "parameter_norm",
    "EMA",
    "CheckpointKeeper",
    "MetricsWriter",
    "train",
    "train_step",
    "agree",
    "learning_rate_now",
    "ema_update",
    "make_optimizer",
    "batch_iterator",
    "epoch_permutation",
    "backward_and_clip",
    "evaluate_now",
    "METRIC_FIELDS",
]

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

SPIKE_WINDOW = 64  # healthy step losses whose median is the reference of the divergence guard
SPIKE_MIN_HISTORY = 16  # no step is judged a spike before this many healthy ones
PARAM_NORM_GROWTH = 10.0  # a checkpoint is refused when the weights' norm grew more since the last


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

    def record_valid(self, bpd: float) -> bool:
        """Note an evaluation; True when it is the best so far."""
        self.last_valid_bpd = bpd
        if self.best_valid_bpd is None or bpd < self.best_valid_bpd:
            self.best_valid_bpd, self.best_step, self.evals_since_best = bpd, self.step, 0
            return True
        self.evals_since_best += 1
        return False


# --- data order, noise and the schedule ---------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_iterator(n: int, batch_size: int, seed: int, epoch: int, offset: int):
    """Yield (epoch, offset_after, indices) for consecutive global batches, epoch after epoch.

    The tail of an epoch that does not fill a batch is dropped.
    """
    if n < batch_size:
        raise UsageError(f"the training set has {n} images, fewer than one batch of {batch_size}")
    while True:
        perm = epoch_permutation(n, seed, epoch)
        while offset + batch_size <= n:
            idx = perm[offset : offset + batch_size]
            offset += batch_size
            yield epoch, offset, idx
        epoch, offset = epoch + 1, 0


def _batches(t: "Trainer", mine: slice):
    """(epoch, offset, images, noise) of this process's part of each global batch, from
    ``t.state``'s position on; the images pinned when they go to a GPU."""
    config, settings, state = t.config, t.settings, t.state
    step = state.step
    pin = t.device.type == "cuda"
    order = batch_iterator(len(t.train_x), config.batch_size, settings.seed, state.epoch, state.offset)
    for epoch, offset, idx in order:
        x = gather(t.train_x, idx[mine])
        noise = step_noise(t.model, config, settings.seed, step)[mine]
        yield epoch, offset, (x.pin_memory() if pin else x), (noise.pin_memory() if pin else noise)
        step += 1


class Prefetch:
    """Runs an iterator ``depth`` items ahead in a background thread (the next batch is
    gathered while the current step runs); ``depth`` 0 runs it in the caller's thread.
    The items and their order are those of the iterator: determinism is unchanged."""

    def __init__(self, items, depth: int):
        self.items, self.depth = iter(items), depth
        if depth <= 0:
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="flowpp-prefetch", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        try:
            for item in self.items:
                while not self.stopped.is_set():
                    try:
                        self.queue.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self.queue.put((False, e))

    def __next__(self):
        if self.depth <= 0:
            return next(self.items)
        ok, item = self.queue.get()
        if not ok:
            raise item
        return item

    def close(self) -> None:
        if self.depth > 0:
            self.stopped.set()
            self.thread.join(timeout=10)


def step_noise(model: FlowPlusPlus, config: FlowConfig, seed: int, step: int) -> Tensor:
    """The dequantization noise of the whole global batch of ``step`` (each rank takes its rows)."""
    g = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 17)
    return model.dequantizer.sample_noise((config.batch_size, *config.image_shape), g)


def budget_used(settings: TrainSettings, state: TrainState) -> float:
    """The fraction of the budget (steps or training minutes, whichever runs out first) used."""
    used = [state.step / settings.max_steps] if settings.max_steps else []
    if settings.max_minutes:
        used.append(state.train_seconds / (settings.max_minutes * 60.0))
    return max(used)


def learning_rate_now(config: FlowConfig, state: TrainState, progress: float | None) -> float:
    """The schedule's rate for ``state.step``, warmed up again after a rollback and scaled down
    after repeated ones (``state.lr_scale``)."""
    lr = learning_rate(config, state.step, progress) * state.lr_scale
    if state.rewarm_from is not None and config.warmup_steps > 0:
        lr *= min(1.0, (state.step - state.rewarm_from + 1) / config.warmup_steps)
    return lr


# --- one optimisation step -------------------------------------------------------------------------


def backward_and_clip(loss_bpd: Tensor, parameters, config: FlowConfig) -> Tensor:
    """Backpropagate a bits/dim loss in the units of ``config.grad_clip_units`` and clip the
    global gradient norm at ``config.grad_clip``; return the norm before clipping, on the
    official scale (the gradient of the loss in nats per image) whatever the units.

    The units matter beyond the clipping threshold: Adam's epsilon acts on the gradient it is
    given, so "nats" reproduces the official optimisation exactly.
    """
    parameters = list(parameters)
    if config.grad_clip_units == "nats":
        (loss_bpd * config.nats_per_bpd).backward()
        return torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    loss_bpd.backward()
    return torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip) * config.nats_per_bpd


def train_step(
    net: torch.nn.Module,
    model: FlowPlusPlus,
    opt: torch.optim.Optimizer,
    x: Tensor,
    noise: Tensor,
    lr: float,
    hook: Callable[[int, Tensor], Tensor] | None = None,
    step: int = 0,
    share: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward and backward of one (local) batch with clipped gradients; the optimizer does not
    step yet. Returns (loss in bits/dim, gradient norm on the nats scale, finite flag) as tensors.

    ``share``: this process's images over the global batch, times the number of processes. DDP
    averages the processes' gradients, so scaling each local mean by its share makes that average
    the gradient of the global batch's mean even when the batch does not split evenly (and the
    mean of the returned losses its loss)."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    loss = -net(x, check=False, noise=noise).mean() / model.config.nats_per_bpd
    if share != 1.0:
        loss = loss * share
    if hook is not None:
        loss = hook(step, loss)
    opt.zero_grad(set_to_none=True)
    grad_norm = backward_and_clip(loss, model.parameters(), model.config)
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    return loss.detach(), grad_norm, finite


def agree(
    finite: Tensor, loss: Tensor, stop_requested: bool, dist: D.DistInfo, clock: tuple[float, float] = (0.0, 0.0)
) -> tuple[bool, float, bool, tuple[float, float]]:
    """(step?, global mean loss, stop?, rank 0's ``clock``): every rank must agree to step or skip,
    and to stop on a signal, or the next collective would hang. ``clock`` is (the previous step's
    seconds, the run's wall-clock seconds): every rank takes rank 0's, so that the time budget, the
    learning rate that follows it and the timed evaluations and checkpoints are the same everywhere
    (each process's own clock differs by a little, and a learning rate that differs by a little
    makes the copies of the weights drift apart)."""
    if not dist.enabled:
        return bool(finite), float(loss), stop_requested, clock
    rank0_clock = clock if dist.is_main else (0.0, 0.0)
    votes = torch.cat(
        [
            finite.to(torch.float64).reshape(1),
            loss.double().reshape(1),
            torch.tensor([float(stop_requested), *rank0_clock], dtype=torch.float64, device=loss.device),
        ]
    )
    votes = D.all_reduce_sum(votes, dist).cpu()
    return (
        bool(votes[0].item() == dist.world_size),
        float(votes[1]) / dist.world_size,
        bool(votes[2] > 0),
        (float(votes[3]), float(votes[4])),
    )


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


def parameter_norm(model: torch.nn.Module) -> float:
    """The global L2 norm of the weights (one host sync: used at checkpoints, not every step)."""
    with torch.no_grad():
        norms = torch.stack([p.detach().double().norm() for p in model.parameters()])
        return float(torch.linalg.vector_norm(norms))


def make_optimizer(parameters: list[Tensor], config: FlowConfig) -> torch.optim.Adam:
    """Adam with the config's betas and epsilon, on PyTorch's fused kernel where it has one for
    the parameters' device: one pass over all tensors instead of a dozen small operations per
    tensor (on CPU, 1.5 ms a step instead of 7-9 ms for the ``mnist`` preset's 274 tensors)."""
    options = dict(lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    try:
        return torch.optim.Adam(parameters, fused=True, **options)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(parameters, foreach=True, **options)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


class EMA:
    """The exponential moving average of the weights that evaluation and sampling use."""

    def __init__(self, model: FlowPlusPlus, decay: float, warmup: bool = False):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # a copy keeps the autocast setting
        self.decay, self.warmup = decay, warmup

    def update(self, model: FlowPlusPlus, step: int) -> None:
        decay = self.decay
        if self.warmup:  # short runs: an average over the steps so far, up to decay
            decay = min(decay, (1.0 + step) / (10.0 + step))
        ema_update(self.model, model, decay)


# --- checkpoints, metrics, evaluation ------------------------------------------------------------------


class CheckpointKeeper:
    """Writes checkpoints of the run (rank 0 only, healthy weights only), resumes from the newest
    readable one, and rolls back to it after a run of unhealthy steps."""

    def __init__(self, run: RunDir, config: FlowConfig, settings: dict, keep: int, dist: D.DistInfo, log: Log):
        self.run, self.config, self.settings, self.keep, self.dist, self.log = run, config, settings, keep, dist, log

    def save(self, model: FlowPlusPlus, ema: EMA, opt: torch.optim.Optimizer, state: TrainState) -> Path | None:
        """Write a checkpoint unless the weights are unhealthy: non-finite, or their norm grown over
        PARAM_NORM_GROWTH x since the last checkpoint. Every rank judges (the weights are the same
        everywhere) and updates ``state`` alike; rank 0 writes."""
        norm = parameter_norm(model)
        problem = self.weights_problem(model, ema, norm, state.checkpoint_param_norm)
        if problem:
            self.log(f"step {state.step}: not writing a checkpoint: {problem}")
            return None
        state.checkpoint_param_norm = norm
        if not self.dist.is_main:
            return None
        ck = dict(
            config=self.config.to_dict(),
            model=model.state_dict(),
            ema=ema.model.state_dict(),
            optimizer=opt.state_dict(),
            train_state=state.to_dict(),
            rng=dict(torch=torch.get_rng_state()),
            settings=self.settings,
            world_size=self.dist.world_size,
        )
        protect = None if state.rollback_step is None else self.run.checkpoint_file(state.rollback_step)
        return self.run.save_checkpoint(state.step, ck, self.keep, log=self.log, protect=protect)

    @staticmethod
    def weights_problem(model: FlowPlusPlus, ema: EMA, norm: float, before: float | None) -> str | None:
        """Why weights of norm ``norm`` (``before`` at the last checkpoint) must not be saved, or None."""
        bad = [
            f"{which}.{n}"
            for which, m in (("model", model), ("ema", ema.model))
            for n, p in m.state_dict().items()
            if p.is_floating_point() and not torch.isfinite(p).all()
        ]
        if bad:
            return f"non-finite values in {bad[:3]}"
        if before and not norm <= PARAM_NORM_GROWTH * before:
            return f"the weights' norm grew from {before:.4g} to {norm:.4g} since the last checkpoint"
        return None

    def save_best(self, model: FlowPlusPlus, ema: EMA, state: TrainState) -> Path | None:
        """Keep the weights of the best evaluation so far (best.pt: outside the rotation)."""
        if not self.dist.is_main:
            return None
        ck = dict(config=self.config.to_dict(), model=model.state_dict(), ema=ema.model.state_dict(),
                  train_state=state.to_dict(), valid_bpd=state.best_valid_bpd)  # fmt: skip
        return self.run.save_best(ck)

    def _load_latest(
        self, model: FlowPlusPlus, ema: EMA, opt: torch.optim.Optimizer, step: int | None = None
    ) -> tuple[Path, dict] | None:
        """Load the checkpoint of ``step`` (when it is still readable) or else the newest one."""
        # Every rank reads the same file (the run directory is shared), so optimizer states agree.
        found = None
        if step is not None:
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
        ema.model.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        return path, ck

    def resume(self, model: FlowPlusPlus, ema: EMA, opt: torch.optim.Optimizer) -> tuple[Path, TrainState]:
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
        path, ck = self._load_latest(model, ema, opt)
        state = TrainState.from_dict(ck["train_state"])
        if saved.lr != self.config.lr and (state.lr_scale != 1 or state.rollbacks_in_row):
            self.log(f"a new learning rate: the scale {state.lr_scale:g} left by earlier rollbacks is reset to 1")
            state.lr_scale, state.rollbacks_in_row, state.rollback_step = 1.0, 0, None
        return path, state

    def rollback(
        self, model: FlowPlusPlus, ema: EMA, opt: torch.optim.Optimizer, step: int | None = None
    ) -> tuple[Path, int, list] | None:
        """Restore the weights and optimizer of the checkpoint of ``step`` (default: the newest);
        the counters go on. Its (path, step, the healthy losses before it), or None when there is
        no checkpoint yet."""
        found = self._load_latest(model, ema, opt, step)
        if found is None:
            return None
        saved = found[1]["train_state"]
        return found[0], saved["step"], list(saved.get("recent_losses", []))


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
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        # A row cut short by a crash has missing fields: drop it with the rows after the checkpoint.
        # (A file written before a column was added keeps its rows; the new column is empty there.)
        kept = [
            r
            for r in rows
            if None not in r.values() and None not in r and (r.get("step") or "").isdigit() and int(r["step"]) <= step
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


def evaluate_now(
    ema: FlowPlusPlus, valid_x: Tensor, settings: TrainSettings, run: RunDir, step: int, dist: D.DistInfo
) -> dict:
    """Validation bits/dim (sharded, noise fixed per image), and on rank 0 the inverse error of 16
    images and a sample grid."""
    res = evaluate_bpd(ema, valid_x, batch_size=settings.eval_batch_size, seed=1234, dist=dist)
    inv_err = float("nan")
    if dist.is_main:
        with torch.no_grad():
            p = next(ema.parameters())
            y = valid_x[:16].to(p.device).to(p.dtype) + 0.5
            inv_err = float((ema.decode(ema.encode(y)) - y).abs().max())
            g = torch.Generator(device=p.device).manual_seed(settings.seed)
            save_grid(ema.sample(settings.num_samples, generator=g), ema.config.num_levels, run.sample_grid(step))
    return dict(valid_bpd=res["bpd"], inverse_error=inv_err)


class _Stop:
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


class _Every:
    """Due every ``steps`` steps or every ``minutes`` of the run's wall-clock (seconds ``now``, the
    same on every process), whichever comes first."""

    def __init__(self, steps: int | None, minutes: float | None, now: float):
        self.steps, self.seconds, self.last = steps, minutes * 60 if minutes else None, now

    def due(self, step: int, now: float) -> bool:
        return bool((self.steps and step % self.steps == 0) or (self.seconds and now - self.last >= self.seconds))

    def reset(self, now: float) -> None:
        self.last = now


# --- the loop -------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What the loop works on, set up by :func:`start_training`."""

    config: FlowConfig
    settings: TrainSettings
    dist: D.DistInfo
    device: torch.device
    run: RunDir
    model: FlowPlusPlus
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    ema: EMA
    keeper: CheckpointKeeper
    metrics: MetricsWriter
    state: TrainState
    resumed_from: Path | None
    say: Log
    train_x: Any  # (N, C, H, W) tensor or (N, H, W, C) array / memory map: gathered a batch at a time
    thread_switches: int = 0  # by the ThreadTuner of "auto" threads


def start_training(
    config: FlowConfig, settings: TrainSettings, run: RunDir, train_x: Tensor, *, resume: bool, log: Log
) -> Trainer:
    """Join the processes, prepare the run directory, and build the model, optimizer and EMA:
    from the newest checkpoint, or fresh with data-dependent init on rank 0's init batch."""
    device = D.resolve_device(settings.device)
    dist = D.setup_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if config.batch_size < dist.world_size:
        raise UsageError(
            f"--batch-size {config.batch_size} is the global batch and must be at least the number of "
            f"processes ({dist.world_size}): each takes a part of it"
        )
    say = log if dist.is_main else (lambda *_: None)
    if dist.is_main:
        run.create(resume)  # takes the directory's lock first
    D.barrier(dist)

    torch.manual_seed(settings.seed)
    model = FlowPlusPlus(config).to(device)
    model.set_autocast(torch.bfloat16 if settings.bf16 else None)
    model.set_activation_checkpointing(settings.activation_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, config)
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    settings_dict = json.loads(json.dumps(asdict(settings), default=str))  # plain data for the checkpoints
    keeper = CheckpointKeeper(run, config, settings_dict, settings.keep_checkpoints, dist, say)
    resumed_from, state = None, TrainState()
    if resume:
        resumed_from, state = keeper.resume(model, ema, opt)
        say(f"resuming from {resumed_from} (step {state.step})")
    else:  # every rank takes rank 0's initialised weights
        if dist.is_main:
            init_idx = epoch_permutation(len(train_x), settings.seed, -1)[: config.init_batch_size]
            model.initialize(gather(train_x, init_idx).to(device))
        D.broadcast_module(model, dist)
        model.initialized.fill_(True)
        ema = EMA(model, config.ema_decay, config.ema_warmup)
        state.checkpoint_param_norm = parameter_norm(model)  # the divergence guard's first reference
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if dist.is_main:
        run.write_config(config)
        run.write_settings(settings_dict)
    metrics = MetricsWriter(run, dist.is_main, resume_step=state.step if resume else None)
    say(
        f"flowpp: config {config.name} ({sum(p.numel() for p in model.parameters()):,} parameters), "
        f"{len(train_x):,} training images, device {device}, {dist.world_size} process(es), "
        f"global batch {config.batch_size}"
    )
    return Trainer(
        config, settings, dist, device, run, model, net, opt, ema, keeper, metrics, state, resumed_from, say, train_x
    )


def train(
    config: FlowConfig,
    settings: TrainSettings,
    train_images: np.ndarray | Tensor,
    valid_images: np.ndarray | Tensor,
    *,
    num_levels: int | None = None,
    resume: bool = False,
    log: Log = print,
    step_hook: Callable[[int, Tensor], Tensor] | None = None,
) -> dict:
    """Train ``config`` on uint8 images (NHWC numpy array or memory map, or NCHW tensor) and
    return the summary. The training images are read a batch at a time, never copied whole.

    ``step_hook(step, loss) -> loss`` lets tests inject faults (e.g. a NaN loss).
    """
    train_x, valid_x = train_images, to_nchw(valid_images[: settings.eval_images])
    config.check_data(chw_shape(train_x), num_levels or config.num_levels, "training")
    config.check_data(valid_x.shape[1:], num_levels or config.num_levels, "validation")
    settings.check_budget()
    run = RunDir(settings.out_dir)
    try:
        return _train_loop(start_training(config, settings, run, train_x, resume=resume, log=log), valid_x, step_hook)
    finally:
        run.unlock()


def _train_loop(t: Trainer, valid_x: Tensor, step_hook: Callable[[int, Tensor], Tensor] | None) -> dict:
    """Steps until the budget, a signal or the patience runs out; then the final checkpoint and evaluation."""
    config, settings = t.config, t.settings
    state, dist, say = t.state, t.dist, t.say
    mine = slice(
        dist.rank * config.batch_size // dist.world_size, (dist.rank + 1) * config.batch_size // dist.world_size
    )
    share = (mine.stop - mine.start) * dist.world_size / config.batch_size
    progress = functools.partial(budget_used, settings, state)
    depth = settings.prefetch if settings.prefetch is not None else (2 if t.device.type == "cuda" else 0)
    batches = Prefetch(_batches(t, mine), depth)
    bar = _progress_bar(settings, state) if dist.is_main and settings.progress else None
    wall_start = time.monotonic() - state.wall_seconds  # wall-clock of the run, across resumes
    eval_timer = _Every(settings.eval_every, settings.eval_minutes, state.wall_seconds)
    ckpt_timer = _Every(settings.checkpoint_every, settings.checkpoint_minutes, state.wall_seconds)
    first_pending = bool(settings.checkpoint_every or settings.checkpoint_minutes) and t.resumed_from is None
    bad_in_row, grad_norm, stop_reason, ckpt_path, dt = 0, float("nan"), "budget", None, 0.0
    tuner = D.ThreadTuner.for_run(settings.threads, t.device, say)

    with _Stop() as stop, contextlib.closing(batches):
        stop_agreed = False
        while progress() < 1.0:
            if stop_agreed or (stop.requested and not dist.enabled):
                stop_reason = "signal"
                break
            t0 = time.perf_counter()
            epoch, offset, x, noise = next(batches)
            x, noise = x.to(t.device, non_blocking=True), noise.to(t.device, non_blocking=True)
            torch.manual_seed(settings.seed * 1_000_003 + state.step * 8_191 + dist.rank)  # dropout stream
            lr = learning_rate_now(config, state, progress())
            loss, norm, finite = train_step(t.net, t.model, t.opt, x, noise, lr, step_hook, state.step, share)
            clock = (dt, time.monotonic() - wall_start)
            finite, global_bpd, stop_agreed, (rank0_dt, rank0_wall) = agree(finite, loss, stop.requested, dist, clock)
            if dist.enabled:  # rank 0's time of the step before, so all ranks count the same budget
                state.train_seconds += rank0_dt
            problem = health_problem(finite, global_bpd, state, settings.spike_ratio)
            state.epoch, state.offset, state.step = epoch, offset, state.step + 1
            state.images_seen += config.batch_size
            if problem is None:
                t.opt.step()
                t.ema.update(t.model, state.step - 1)
                state.remember_healthy(global_bpd)
                bad_in_row, grad_norm = 0, float(norm)
                if state.rollbacks_in_row and state.healthy_streak >= recovery_steps(config):
                    say(f"step {state.step}: healthy for {state.healthy_streak} steps since the last rollback")
                    state.rollbacks_in_row, state.rollback_step = 0, None
            else:  # skipped: no optimizer or EMA update
                t.opt.zero_grad(set_to_none=True)
                state.skipped_steps, state.healthy_streak = state.skipped_steps + 1, 0
                bad_in_row += 1
                say(f"step {state.step - 1}: {problem}; step skipped ({bad_in_row} in a row)")
                if bad_in_row >= settings.max_bad_steps:
                    bad_in_row = 0
                    if roll_back(t, problem):
                        stop_reason = "diverged"
                        break
            dt = time.perf_counter() - t0
            if tuner is not None:
                tuner.step_done(dt)
            if not dist.enabled:
                state.train_seconds += dt
            state.add_step(global_bpd if problem is None else None, config.batch_size, dt)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(bpd=f"{global_bpd:.3f}", lr=f"{lr:.2e}", img_s=f"{state.img_per_s:.1f}")

            s, row, last = state.step, None, progress() >= 1.0
            now = rank0_wall if dist.enabled else time.monotonic() - wall_start
            if s % settings.log_every == 0 or last:
                train_bpd, img_per_s = state.close_window()
                row = dict(step=s, images_seen=state.images_seen, train_bpd=train_bpd, lr=lr, img_per_s=img_per_s,
                           grad_norm=grad_norm, skipped_steps=state.skipped_steps, rollbacks=state.rollbacks,
                           train_seconds=state.train_seconds, threads=torch.get_num_threads())  # fmt: skip
            if eval_timer.due(s, now) and not last:
                result = evaluate_now(t.ema.model, valid_x, settings, t.run, s, dist)
                eval_timer.reset(now)
                if state.record_valid(result["valid_bpd"]):
                    t.keeper.save_best(t.model, t.ema, state)
                row = {**(row or dict(step=s, images_seen=state.images_seen, lr=lr)), **result}
                say(f"step {s}: valid bpd {result['valid_bpd']:.4f} (EMA), inverse error {result['inverse_error']:.2e}")
            state.wall_seconds = time.monotonic() - wall_start
            if row is not None:
                t.metrics.write({**row, "wall_seconds": state.wall_seconds})
            # The first checkpoint comes as soon as the warm-up is over: the peak learning rate
            # is where a recipe blows up, and without a checkpoint there is nothing to roll back to.
            first = first_pending and warmed_up(config, s, progress())
            if (ckpt_timer.due(s, now) or first) and not last:
                if not state.healthy_streak:
                    say(f"step {s}: not writing a checkpoint: the last step was unhealthy")
                else:  # (only rank 0 writes and gets a path; every rank decides alike)
                    ckpt_path = t.keeper.save(t.model, t.ema, t.opt, state) or ckpt_path
                    first_pending = False
                ckpt_timer.reset(now)
            if settings.patience and state.evals_since_best >= settings.patience:
                say(f"stopping early: no new best in {state.evals_since_best} evaluations ({state.best_valid_bpd:.4f})")
                stop_reason = "patience"
                break

        if bar is not None:
            bar.close()
        # Final checkpoint (also on SIGTERM / SIGINT), then the final evaluation; a run that ends
        # in the middle of unhealthy steps keeps the weights of its newest checkpoint instead.
        if stop_reason != "diverged" and state.healthy_streak:
            ckpt_path = t.keeper.save(t.model, t.ema, t.opt, state) or ckpt_path
        elif stop_reason not in ("diverged", "signal"):
            back = t.keeper.rollback(t.model, t.ema, t.opt, state.rollback_step)
            if back is None:
                say("the run ended on unhealthy steps and has no checkpoint to go back to")
                stop_reason = "diverged"
            else:
                (ckpt_path, _, _), state.rollbacks = back, state.rollbacks + 1
                say(f"the run ended on unhealthy steps: it keeps the weights of {ckpt_path}")
        if stop_reason == "signal":
            say(f"stopped by signal at step {state.step}; checkpoint {ckpt_path}")
    if tuner is not None:
        t.thread_switches = tuner.switches
        tuner.close()
    summary = finish_training(t, valid_x, stop_reason, ckpt_path, wall_start)
    if stop_reason == "diverged":
        raise TrainingDiverged(diverged_message(t, summary))
    return summary


def recovery_steps(config: FlowConfig) -> int:
    """Healthy steps in a row after which a rollback counts as a success: a whole re-warm of the
    learning rate (at least SPIKE_WINDOW steps)."""
    return max(config.warmup_steps, SPIKE_WINDOW)


def roll_back(t: Trainer, problem: str) -> bool:
    """Restore the newest checkpoint after ``max_bad_steps`` unhealthy steps in a row; True when
    ``max_rollbacks`` in a row have not helped (no :func:`recovery_steps` healthy steps between).

    The first rollback of a series only re-warms the learning rate (a transient fault); each
    further one also halves it (the recipe itself diverges). Checkpoints are written from healthy
    steps only, so the one rolled back to is the newest good one, and rotation (which follows a
    new healthy checkpoint) never removes it before a newer good one exists."""
    state, say = t.state, t.say
    state.rollbacks_in_row += 1
    if state.rollbacks_in_row > t.settings.max_rollbacks:
        tried = f"after {state.rollbacks} rollback(s)" if state.rollbacks else "with no checkpoint to roll back to"
        say(f"step {state.step}: still unhealthy ({problem}) {tried}; stopping")
        return True
    back = t.keeper.rollback(t.model, t.ema, t.opt, state.rollback_step)
    if back is None:
        say(f"no checkpoint to roll back to yet; skipping on ({state.rollbacks_in_row} of {t.settings.max_rollbacks})")
        return False
    path, state.rollback_step, history = back  # the same good checkpoint for the whole series
    # The divergence guard's reference goes back with the weights: judged against the losses of
    # the later, better weights, every step after a rollback to an early checkpoint would look
    # like a spike.
    state.recent_losses = history
    state.rollbacks, state.rewarm_from = state.rollbacks + 1, state.step
    if state.rollbacks_in_row > 1:
        state.lr_scale /= 2
    scaled = f", now scaled by {state.lr_scale:g}" if state.lr_scale != 1 else ""
    say(f"rolled back to {path}; re-warming the learning rate{scaled}")
    return False


def diverged_message(t: Trainer, summary: dict) -> str:
    found = list_checkpoints(t.run.checkpoints)
    best = summary.get("best_checkpoint")
    best = f" and its best model {best} (valid {summary['best_valid_bpd']:.4f} bits/dim)" if best else ""
    if not found:
        return (
            f"training diverged by step {t.state.step}, before its first checkpoint{best}: the loss stayed "
            f"unhealthy for {t.settings.max_bad_steps * (t.settings.max_rollbacks + 1)} steps. Start again with a "
            "lower --lr (or a longer warm-up: --set warmup_steps=N), or see --spike-ratio if the rise in loss is "
            "expected"
        )
    if t.state.rollback_step is not None:
        good = f"its last good checkpoint is {t.run.checkpoint_file(t.state.rollback_step)}"
    else:
        good = f"its newest checkpoint is {found[-1]}"
    return (
        f"training diverged by step {t.state.step}: {t.state.rollbacks} rollback(s) (learning rate scaled "
        f"down to {t.state.lr_scale:g}) did not make it healthy; {good}{best}. Resume with a lower --lr, "
        "or see --spike-ratio if the rise in loss is expected"
    )


def _progress_bar(settings: TrainSettings, state: TrainState):
    from tqdm import tqdm

    return tqdm(total=settings.max_steps, initial=state.step, dynamic_ncols=True, unit="step")


def finish_training(t: Trainer, valid_x: Tensor, stop_reason: str, ckpt_path: Path | None, wall_start: float) -> dict:
    """The final evaluation (unless stopped by a signal), its metrics row, and summary.json."""
    state, final = t.state, {}
    if stop_reason not in ("signal", "diverged"):
        final = evaluate_now(t.ema.model, valid_x, t.settings, t.run, state.step, t.dist)
        if state.record_valid(final["valid_bpd"]):
            t.keeper.save_best(t.model, t.ema, state)
        t.metrics.write(
            dict(step=state.step, images_seen=state.images_seen, skipped_steps=state.skipped_steps,
                 rollbacks=state.rollbacks, train_seconds=state.train_seconds,
                 wall_seconds=time.monotonic() - wall_start, **final)
        )  # fmt: skip
        t.say(f"done: step {state.step}, valid bpd {final['valid_bpd']:.4f} (EMA, {len(valid_x)} images)")
    summary = dict(
        config=t.config.name, dataset=t.settings.dataset, dataset_description=t.settings.dataset_description,
        parameters=sum(p.numel() for p in t.model.parameters()), steps=state.step, images_seen=state.images_seen,
        train_seconds=state.train_seconds, final_valid_bpd=state.last_valid_bpd, best_valid_bpd=state.best_valid_bpd,
        best_step=state.best_step, best_checkpoint=str(t.run.best_file) if t.run.best_file.exists() else None,
        final_inverse_error=final.get("inverse_error"), skipped_steps=state.skipped_steps, rollbacks=state.rollbacks,
        lr_scale=state.lr_scale, stopped_by=stop_reason, threads=t.settings.threads,
        thread_switches=t.thread_switches, checkpoint=str(ckpt_path) if ckpt_path else None,
        resumed_from=str(t.resumed_from) if t.resumed_from else None, world_size=t.dist.world_size,
        device=str(t.device), torch_version=torch.__version__,
    )  # fmt: skip
    if t.dist.is_main:
        t.run.write_summary(summary)
    t.metrics.close()
    return summary
