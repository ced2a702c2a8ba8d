"""The training loop: set up, step until the budget runs out, finish.

The loop itself (:func:`_train_loop`) only sequences the named pieces: the batches
(:mod:`flowpp.data.batches`), the step (:class:`OptimizerStep`), the rank agreement
(:func:`flowpp.distributed.agree`), the divergence guard (:class:`DivergenceGuard`) and what is due
(:class:`Events`). Everything a checkpoint needs to repeat the run exactly is in
:class:`TrainState`, so a resumed run does what an uninterrupted one would have (on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .. import distributed as D
from ..checkpoint import list_checkpoints
from ..configs import FlowConfig
from ..data.batches import Prefetch, epoch_permutation, local_batches
from ..errors import UsageError
from ..evaluate import evaluate_now
from ..images import chw_shape, gather, to_nchw
from ..model import FlowPlusPlus
from ..runs import CheckpointKeeper, MetricsWriter, RunDir
from ..schedules import budget_used, learning_rate_now
from .events import Due, Events, RunClock, StopSignal
from .guard import APPLY, ROLL_BACK, STOP, DivergenceGuard, LossNow
from .settings import TrainingDiverged, TrainSettings
from .state import TrainState
from .step import EMA, OptimizerStep, make_optimizer, parameter_norm

__all__ = ["Trainer", "start_training", "train", "finish_training"]

Log = Callable[[str], None]


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
        resumed_from, saved_state, saved_config = keeper.resume(model, ema.model, opt)
        state = TrainState.resumed(saved_state, new_lr=saved_config.lr != config.lr, log=say)
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
        t = start_training(config, settings, run, train_x, resume=resume, log=log)
        try:
            return _train_loop(t, valid_x, step_hook)
        except Exception as e:
            if t.dist.enabled and not isinstance(e, TrainingDiverged):  # say how far the run got
                _summarize_a_failed_run(t)
            raise
    finally:
        run.unlock()


def _summarize_a_failed_run(t: Trainer) -> None:
    newest = list_checkpoints(t.run.checkpoints)
    try:
        finish_training(t, torch.empty(0), "failed", newest[-1] if newest else None, time.monotonic())
    except Exception as e:  # the run's folder may be what failed; the first error is the one to report
        t.say(f"could not write summary.json: {e}")


def _train_loop(t: Trainer, valid_x: Tensor, step_hook: Callable[[int, Tensor], Tensor] | None) -> dict:
    """Steps until the budget, a signal, divergence or the patience ends the run; then finishes it."""
    state, dist, config = t.state, t.dist, t.config
    mine = slice(
        dist.rank * config.batch_size // dist.world_size, (dist.rank + 1) * config.batch_size // dist.world_size
    )
    step = OptimizerStep(t.net, t.model, t.opt, t.ema, seed=t.settings.seed, rank=dist.rank, hook=step_hook,
                         share=(mine.stop - mine.start) * dist.world_size / config.batch_size)  # fmt: skip
    guard, clock = DivergenceGuard(state, t.settings, config, t.say), RunClock(state, dist)
    events = Events(t.settings, config, state, fresh=t.resumed_from is None)
    progress = functools.partial(budget_used, t.settings, state)
    tuner = D.ThreadTuner.for_run(t.settings.threads, t.device, t.say)
    bar = _progress_bar(t.settings, state) if dist.is_main and t.settings.progress else None
    stop_reason, ckpt_path, grad_norm, dt, stop_agreed = "budget", None, float("nan"), 0.0, False
    loss_now = None  # of the current weights on the last batch, asked by the guard before a save
    with StopSignal() as stop, contextlib.closing(_batches(t, mine)) as batches:
        while progress() < 1.0:
            if stop_agreed or (stop.requested and not dist.enabled):
                stop_reason = "signal"
                break
            t0 = time.perf_counter()
            epoch, offset, x, noise = next(batches)
            x, noise = x.to(t.device, non_blocking=True), noise.to(t.device, non_blocking=True)
            lr = learning_rate_now(config, state, progress())
            loss, norm, finite = step.compute(x, noise, lr, state.step)
            finite, bpd, stop_agreed, rank0_clock = D.agree(finite, loss, stop.requested, dist, (dt, clock.wall()))
            clock.agreed(*rank0_clock)
            state.advance(epoch, offset, config.batch_size)
            verdict = guard.judge(finite, bpd)
            loss_now = functools.partial(_loss_now, step, x, noise, dist)
            if verdict == APPLY:
                step.apply(state.step - 1)
                guard.healthy(bpd)
                grad_norm = float(norm)
            else:  # no optimizer or EMA update
                step.discard()
            if verdict == ROLL_BACK:
                guard.roll_back(t.keeper, t.model, t.ema, t.opt)
            elif verdict == STOP:
                stop_reason = "diverged"
                break
            dt = time.perf_counter() - t0
            _account(t, clock, tuner, bar, dt, bpd, verdict == APPLY, lr)
            now = clock.now()
            due = events.due(now, progress())
            ckpt_path = _run_due(t, due, now, events, guard, clock, valid_x, lr, grad_norm, loss_now) or ckpt_path
            if events.out_of_patience():
                t.say(f"stopping early: no new best in {state.evals_since_best} evaluations "
                      f"({state.best_valid_bpd:.4f})")  # fmt: skip
                stop_reason = "patience"
                break
        if bar is not None:
            bar.close()
        stop_reason, ckpt_path, saved = _final_checkpoint(t, guard, stop_reason, ckpt_path, loss_now)
    if tuner is not None:
        t.thread_switches = tuner.switches
        tuner.close()
    summary = finish_training(t, valid_x, stop_reason, ckpt_path, clock.start, weights_saved=saved)
    if stop_reason == "diverged":
        raise TrainingDiverged(guard.stop_message(t.run, summary))
    return summary


def _batches(t: Trainer, mine: slice) -> Prefetch:
    """This process's batches from the run's position on, gathered ahead on a GPU."""
    depth = t.settings.prefetch if t.settings.prefetch is not None else (2 if t.device.type == "cuda" else 0)
    s = t.state
    batches = local_batches(t.train_x, t.model, t.config, t.settings.seed, step=s.step, epoch=s.epoch,
                            offset=s.offset, mine=mine, pin=t.device.type == "cuda")  # fmt: skip
    return Prefetch(batches, depth)


def _account(t: Trainer, clock: RunClock, tuner, bar, seconds: float, bpd: float, applied: bool, lr: float) -> None:
    """Count a step's time, and its loss when its update was applied, and show them."""
    if tuner is not None:
        tuner.step_done(seconds)
    clock.step_done(seconds)
    t.state.add_step(bpd if applied else None, t.config.batch_size, seconds)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(bpd=f"{bpd:.3f}", lr=f"{lr:.2e}", img_s=f"{t.state.img_per_s:.1f}")


def _run_due(
    t: Trainer, due: Due, now: float, events: Events, guard: DivergenceGuard, clock: RunClock, valid_x: Tensor,
    lr: float, grad_norm: float, loss_now: LossNow,
) -> Path | None:  # fmt: skip
    """The metrics row, evaluation and checkpoint due after this step (at the run's second
    ``now``); the checkpoint's path if one was written (on rank 0). Whether the weights may be
    saved is judged once, and only when a save may follow."""
    state, s = t.state, t.state.step
    save_problem = functools.cache(lambda: guard.save_problem(t.model, t.ema, loss_now))
    row = None
    if due.log:
        train_bpd, img_per_s = state.close_window()
        row = dict(step=s, images_seen=state.images_seen, train_bpd=train_bpd, lr=lr, img_per_s=img_per_s,
                   grad_norm=grad_norm, skipped_steps=state.skipped_steps, rollbacks=state.rollbacks,
                   train_seconds=state.train_seconds, threads=torch.get_num_threads())  # fmt: skip
    if due.evaluate:
        result = _evaluate(t, valid_x, save_problem)
        events.evaluated(now)
        row = {**(row or dict(step=s, images_seen=state.images_seen, lr=lr)), **result}
        t.say(f"step {s}: valid bpd {result['valid_bpd']:.4f} (EMA), inverse error {result['inverse_error']:.2e}")
    state.wall_seconds = clock.wall()
    if row is not None:
        t.metrics.write({**row, "wall_seconds": state.wall_seconds})
    path = None
    if due.checkpoint:
        if guard.consider_checkpoint(save_problem()):  # (only rank 0 writes and gets a path)
            path = t.keeper.save(t.model, t.ema.model, t.opt, state.to_dict())
        events.checkpoint_considered(bool(state.healthy_streak), now)
    return path


def _evaluate(t: Trainer, valid_x: Tensor, save_problem: Callable[[], str | None]) -> dict:
    """Evaluate the EMA weights, note the result, and keep them as best.pt when they are the best
    and ``save_problem()`` (the rules of a checkpoint) finds nothing: a broken model is never the
    best one, however its evaluation came out."""
    s, state = t.settings, t.state
    result = evaluate_now(t.ema.model, valid_x, batch_size=s.eval_batch_size, samples=s.num_samples, seed=s.seed,
                          grid=t.run.sample_grid(state.step), dist=t.dist)  # fmt: skip
    bpd = result["valid_bpd"]
    state.last_valid_bpd = bpd  # the guard's reference while the run has little history, here too
    problem = save_problem() if state.is_new_best(bpd) else None
    if problem:
        t.say(f"step {state.step}: valid bpd {bpd:.4f} is not kept as the best model: {problem}")
    if state.record_valid(bpd, healthy=problem is None):
        t.keeper.save_best(t.model, t.ema.model, state.to_dict())
    return result


def _loss_now(step: OptimizerStep, x: Tensor, noise: Tensor, dist: D.DistInfo) -> tuple[bool, float]:
    """The (finite, bits/dim) of the current weights on the batch ``x``, agreed by every process."""
    loss, finite = step.loss_now(x, noise)
    finite, bpd, _, _ = D.agree(finite, loss, False, dist)
    return finite, bpd


def _final_checkpoint(
    t: Trainer, guard: DivergenceGuard, stop_reason: str, ckpt_path: Path | None, loss_now: LossNow | None
) -> tuple[str, Path | None, bool]:
    """The final checkpoint (also on SIGTERM / SIGINT); a run that ends in the middle of unhealthy
    steps keeps the weights of its newest good checkpoint instead. Also whether the weights the
    run ends with are those of a checkpoint (so judged healthy)."""
    state, saved = t.state, False
    if stop_reason != "diverged" and state.healthy_streak:
        if saved := guard.may_checkpoint(t.model, t.ema, loss_now):
            ckpt_path = t.keeper.save(t.model, t.ema.model, t.opt, state.to_dict()) or ckpt_path
    elif stop_reason not in ("diverged", "signal"):
        back = t.keeper.rollback(t.model, t.ema.model, t.opt, state.rollback_step)
        if back is None:
            t.say("the run ended on unhealthy steps and has no checkpoint to go back to")
            stop_reason = "diverged"
        else:
            (ckpt_path, _, _), state.rollbacks, saved = back, state.rollbacks + 1, True
            t.say(f"the run ended on unhealthy steps: it keeps the weights of {ckpt_path}")
    if stop_reason == "signal":
        t.say(f"stopped by signal at step {state.step}; checkpoint {ckpt_path}")
    return stop_reason, ckpt_path, saved


def _progress_bar(settings: TrainSettings, state: TrainState):
    from tqdm import tqdm

    return tqdm(total=settings.max_steps, initial=state.step, dynamic_ncols=True, unit="step")


def finish_training(
    t: Trainer, valid_x: Tensor, stop_reason: str, ckpt_path: Path | None, wall_start: float, weights_saved: bool = True
) -> dict:
    """The final evaluation (unless stopped by a signal or diverged), its metrics row, and summary.json.
    ``weights_saved``: whether the final weights are those of a checkpoint; only then may they be
    kept as the best model."""
    state, final = t.state, {}
    if stop_reason not in ("signal", "diverged", "failed"):
        unsaved = "the final weights were not checkpointed (see above)"
        final = _evaluate(t, valid_x, lambda: None if weights_saved else unsaved)
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
