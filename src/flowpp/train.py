"""The training loop (the official recipe): Adam, warm-up and schedule, gradient clipping,
EMA of weights, data-dependent init, periodic evaluation, samples and atomic checkpoints.

Determinism: the data order depends only on (seed, epoch), and the dequantization noise and
dropout of step k only on (seed, k), so a run resumed from a checkpoint repeats exactly what
an uninterrupted run would have done (on CPU), and a run on W processes sees the same global
batches and noise as a run on one.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import distributed as D
from .atomic import atomic_write_text
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, remove_checkpoint, save_checkpoint
from .configs import TRAINING_FIELDS, FlowConfig
from .images import save_grid
from .model import FlowPlusPlus
from .schedules import learning_rate

__all__ = ["TrainSettings", "train", "resolve_device", "ema_update", "batch_iterator", "backward_and_clip",
           "METRIC_FIELDS"]

METRIC_FIELDS = ["step", "images_seen", "train_bpd", "valid_bpd", "lr", "img_per_s", "inverse_error",
                 "grad_norm", "skipped_steps", "rollbacks", "train_seconds", "wall_seconds"]


@dataclass
class TrainSettings:
    """Everything about a run that is not the model config."""

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
    max_bad_steps: int = 5  # non-finite steps in a row before rolling back to the last checkpoint
    progress: bool = True
    bf16: bool = False  # conditioner networks under bfloat16 autocast (mixture math stays float32)
    activation_checkpointing: bool = False  # recompute conditioners in the backward pass (less memory)
    dataset: str = ""
    train_split: str = "train"  # "train+valid" when validating on the test set
    valid_split: str = "valid"
    dataset_description: str = ""
    extra: dict = field(default_factory=dict)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def backward_and_clip(loss_bpd: Tensor, parameters, config: FlowConfig) -> Tensor:
    """Backpropagate a bits/dim loss in the units of ``config.grad_clip_units`` and clip the
    global gradient norm at ``config.grad_clip``; return the norm before clipping, on the
    official scale (the gradient of the loss in nats per image) whatever the units.

    The units matter beyond the clipping threshold: Adam's epsilon acts on the gradient it is
    given, so "nats" reproduces the official optimisation exactly.
    """
    nats_per_bpd = config.nats_per_bpd
    parameters = list(parameters)
    if config.grad_clip_units == "nats":
        (loss_bpd * nats_per_bpd).backward()
        return torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
    loss_bpd.backward()
    return torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip) * nats_per_bpd


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_iterator(n: int, batch_size: int, seed: int, epoch: int, offset: int):
    """Yield (epoch, offset_after, indices) for consecutive global batches, epoch after epoch.

    The tail of an epoch that does not fill a batch is dropped.
    """
    if n < batch_size:
        raise ValueError(f"the training set has {n} images, fewer than one batch of {batch_size}")
    while True:
        perm = epoch_permutation(n, seed, epoch)
        while offset + batch_size <= n:
            idx = perm[offset: offset + batch_size]
            offset += batch_size
            yield epoch, offset, idx
        epoch, offset = epoch + 1, 0


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 17)


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


class _MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and not path.exists():
            atomic_write_text(path, ",".join(METRIC_FIELDS) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint (they will be recomputed)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        # A row cut short by a crash has missing fields: drop it with the rows after the checkpoint.
        kept = [r for r in rows if None not in r.values() and len(r) == len(METRIC_FIELDS)
                and (r.get("step") or "").isdigit() and int(r["step"]) <= step]
        lines = [",".join(METRIC_FIELDS)] + [",".join(r.get(k, "") or "" for k in METRIC_FIELDS) for r in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        vals = []
        for k in METRIC_FIELDS:
            v = row.get(k, "")
            vals.append(f"{v:.9g}" if isinstance(v, float) else str(v))
        with open(self.path, "a") as f:
            f.write(",".join(vals) + "\n")
            f.flush()


def _tensorboard(out_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _to_nchw(images: np.ndarray | Tensor) -> Tensor:
    if isinstance(images, Tensor):
        return images
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def check_dataset_fits(config: FlowConfig, images: Tensor, num_levels: int, what: str) -> None:
    shape = tuple(images.shape[1:])
    if shape != tuple(config.image_shape):
        raise ValueError(f"{what} images have shape (C, H, W) = {shape}, but config {config.name!r} "
                         f"expects {tuple(config.image_shape)}")
    if num_levels != config.num_levels:
        raise ValueError(f"{what} data has {num_levels} levels, but config {config.name!r} expects "
                         f"{config.num_levels}; pick a config made for this data")


def train(config: FlowConfig, settings: TrainSettings, train_images: np.ndarray | Tensor,
          valid_images: np.ndarray | Tensor, *, num_levels: int | None = None, resume: bool = False,
          log: Callable[[str], None] = print, step_hook: Callable[[int, Tensor], Tensor] | None = None) -> dict:
    """Train ``config`` on uint8 images (NHWC numpy or NCHW tensor) and return the summary.

    ``step_hook(step, loss) -> loss`` lets tests inject faults (e.g. a NaN loss).
    """
    out = Path(settings.out_dir)
    train_x, valid_x = _to_nchw(train_images), _to_nchw(valid_images)
    check_dataset_fits(config, train_x, num_levels or config.num_levels, "training")
    check_dataset_fits(config, valid_x, num_levels or config.num_levels, "validation")

    device = resolve_device(settings.device)
    info = D.setup_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    main = info.is_main
    say = log if main else (lambda *_: None)
    if config.batch_size % info.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch and must be divisible by the "
                         f"number of processes ({info.world_size})")
    local_bs = config.batch_size // info.world_size

    ckpt_dir = out / "checkpoints"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"run directory {out} is not writable")
        existing = list_checkpoints(ckpt_dir)
        if existing and not resume:
            raise FileExistsError(f"{out} already holds checkpoints ({existing[-1].name}); pass --resume to "
                                  f"continue that run or choose another --out")
        (out / "samples").mkdir(exist_ok=True)
        for stale in ckpt_dir.glob("*.tmp") if ckpt_dir.is_dir() else []:
            stale.unlink()  # a write interrupted by a crash; the checkpoints themselves are whole
    D.barrier(info)

    torch.manual_seed(settings.seed)
    model = FlowPlusPlus(config).to(device)
    if settings.bf16:
        model.set_autocast(torch.bfloat16)
    if settings.activation_checkpointing:
        model.set_activation_checkpointing(True)
    ema: FlowPlusPlus | None = None
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                           betas=config.adam_betas, eps=config.adam_eps)
    state = dict(step=0, images_seen=0, epoch=0, offset=0, train_seconds=0.0, wall_seconds=0.0, rewarm_from=None,
                 skipped_steps=0, rollbacks=0, best_valid_bpd=None, last_valid_bpd=None)

    def load_state(ck: dict, path: Path) -> None:
        nonlocal ema
        saved = FlowConfig.from_dict(ck["config"])
        diffs = saved.architecture_differences(config)
        if diffs:
            raise CheckpointError(f"checkpoint {path} was written for another config (checkpoint vs now: "
                                  f"{'; '.join(diffs)})")
        recipe = [f"{k}: {v!r} -> {getattr(config, k)!r}" for k, v in saved.to_dict().items()
                  if k in TRAINING_FIELDS and v != getattr(config, k)]
        if recipe:
            say(f"resuming with a changed training recipe: {'; '.join(recipe)}")
        model.load_state_dict(ck["model"])
        ema = copy.deepcopy(model)  # a copy keeps the autocast setting
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        state.update(ck["train_state"])

    resumed_from = None
    if resume:
        found = latest_checkpoint(ckpt_dir, log=say)
        if found is None:
            raise CheckpointError(f"--resume: no readable checkpoint in {ckpt_dir}")
        path, ck = found
        load_state(ck, path)
        resumed_from = str(path)
        say(f"resuming from {path} (step {state['step']})")

    if ema is None:  # a fresh run: data-dependent init on rank 0's init batch, then share it
        init_idx = epoch_permutation(train_x.shape[0], settings.seed, -1)[: config.init_batch_size]
        if main:
            model.train()
            model.initialize(train_x[init_idx].to(device))
        D.broadcast_module(model, info)
        model.initialized.fill_(True)
        ema = copy.deepcopy(model)
    ema.eval()
    ema.requires_grad_(False)

    net: torch.nn.Module = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    settings_dict = asdict(settings)
    if main:
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        atomic_write_text(out / "settings.json", json.dumps(settings_dict, indent=2, default=str) + "\n")
    metrics = _MetricsLog(out / "metrics.csv", main)
    if resume:
        metrics.truncate_after(state["step"])
    tb = _tensorboard(out, main)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"flowpp: config {config.name} ({n_params:,} parameters), {train_x.shape[0]:,} training images, "
        f"device {device}, {info.world_size} process(es), global batch {config.batch_size}")

    valid_eval = valid_x[: settings.eval_images]
    scale = 1.0 / (config.num_dims * math.log(2.0))

    def evaluate_now(step: int) -> dict:
        t0 = time.perf_counter()
        # The noise of image i is fixed by (seed, i), and each rank scores a shard whose sums and
        # counts are all-reduced (not means of means): any world size gives the same number.
        n_eval = valid_eval.shape[0]
        noise_all = model.dequantizer.sample_noise((n_eval, *config.image_shape), torch.Generator().manual_seed(1234))
        mine = torch.arange(info.rank, n_eval, info.world_size)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(0, mine.numel(), settings.eval_batch_size):
                idx = mine[i: i + settings.eval_batch_size]
                lp = ema.log_prob(valid_eval[idx].to(device), check=False, noise=noise_all[idx].to(device))
                total[0] += (lp.double() * -scale).sum()
                total[1] += idx.numel()
        D.all_reduce_sum(total, info)
        valid_bpd = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        inv_err = float("nan")
        if main:
            with torch.no_grad():
                y = valid_eval[:16].to(device).to(next(ema.parameters()).dtype) + 0.5
                inv_err = float((ema.decode(ema.encode(y)) - y).abs().max())
                gs = torch.Generator(device=device).manual_seed(settings.seed) if device.type == "cuda" \
                    else torch.Generator().manual_seed(settings.seed)
                samples = ema.sample(settings.num_samples, generator=gs)
                save_grid(samples, config.num_levels, out / "samples" / f"step-{step:08d}.png")
        return dict(valid_bpd=valid_bpd, inverse_error=inv_err, seconds=time.perf_counter() - t0)

    def checkpoint_now() -> Path | None:
        if not main:
            return None
        bad = [f"{which}.{n}" for which, m in (("model", model), ("ema", ema)) for n, p in m.state_dict().items()
               if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            say(f"not writing a checkpoint: non-finite values in {bad[:3]}")
            return None
        ck = dict(
            config=config.to_dict(), model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
            train_state=dict(state), rng=dict(torch=torch.get_rng_state()),
            settings=json.loads(json.dumps(settings_dict, default=str)), world_size=info.world_size,
        )
        path = save_checkpoint(ckpt_dir / f"checkpoint-{state['step']:08d}.pt", ck)
        for old in list_checkpoints(ckpt_dir)[: -settings.keep_checkpoints]:
            remove_checkpoint(old)
        return path

    def rollback() -> bool:
        # Every rank reads the same file (the run directory is shared), so optimizer states agree.
        found = latest_checkpoint(ckpt_dir, log=say)
        if found is None:
            return False
        path, ck = found
        kept = {k: state[k] for k in ("step", "images_seen", "epoch", "offset", "train_seconds", "wall_seconds",
                                     "skipped_steps", "rollbacks")}
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        state.update(kept)
        say(f"rolled back to {path} after {settings.max_bad_steps} non-finite steps; re-warming the learning rate")
        return True

    # --- the loop ---------------------------------------------------------------------------
    budget_s = settings.max_minutes * 60.0 if settings.max_minutes else None

    def progress_fraction() -> float | None:
        fr = []
        if settings.max_steps:
            fr.append(state["step"] / settings.max_steps)
        if budget_s:
            fr.append(state["train_seconds"] / budget_s)
        return max(fr) if fr else None

    def finished() -> bool:
        if settings.max_steps is not None and state["step"] >= settings.max_steps:
            return True
        return budget_s is not None and state["train_seconds"] >= budget_s

    if settings.max_steps is None and budget_s is None:
        raise ValueError("give --max-steps and/or --max-minutes")

    batches = batch_iterator(train_x.shape[0], config.batch_size, settings.seed, state["epoch"], state["offset"])
    bar = None
    if main and settings.progress:
        from tqdm import tqdm
        bar = tqdm(total=settings.max_steps, initial=state["step"], dynamic_ncols=True, unit="step")
    last_ckpt_time = last_eval_time = time.monotonic()
    wall_start = time.monotonic() - state["wall_seconds"]  # wall-clock of the run, across resumes
    window_bpd, window_imgs, window_time = [], 0, 0.0
    bad_in_row = 0
    grad_norm_val = float("nan")
    stop_reason = "budget"
    ckpt_path = None
    last_eval: dict = {}

    with _Stop() as stop:
        stop_agreed = False
        while not finished():
            if stop_agreed or (stop.requested and not info.enabled):
                stop_reason = "signal"
                break
            t0 = time.perf_counter()
            step = state["step"]
            epoch, offset, idx = next(batches)
            local_idx = idx[info.rank * local_bs: (info.rank + 1) * local_bs]
            x = train_x[local_idx].to(device, non_blocking=True)
            gen = _step_generator(settings.seed, step)
            noise = model.dequantizer.sample_noise((config.batch_size, *config.image_shape), gen)
            noise = noise[info.rank * local_bs: (info.rank + 1) * local_bs].to(device)
            torch.manual_seed(settings.seed * 1_000_003 + step * 8_191 + info.rank)  # dropout stream

            lr = learning_rate(config, step, progress_fraction())
            if state["rewarm_from"] is not None and config.warmup_steps > 0:
                lr *= min(1.0, (step - state["rewarm_from"] + 1) / config.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr

            model.train()
            log_p = net(x, check=False, noise=noise)
            loss = -(log_p.mean()) * scale  # bits/dim of this (local) batch
            if step_hook is not None:
                loss = step_hook(step, loss)
            opt.zero_grad(set_to_none=True)
            grad_norm = backward_and_clip(loss, model.parameters(), config)
            ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            if info.enabled:
                # Every rank must agree to step or to skip, and to stop on a signal (else the
                # collectives would hang); the logged loss is the global mean.
                agg = torch.stack([ok.to(torch.float64).reshape(()), loss.detach().double().reshape(()),
                                   torch.tensor(float(stop.requested), dtype=torch.float64, device=device)])
                D.all_reduce_sum(agg, info)
                agg = agg.cpu()
                finite = bool(agg[0].item() == info.world_size)
                global_bpd = float(agg[1]) / info.world_size
                stop_agreed = bool(agg[2] > 0)
            else:
                finite = bool(ok)
                global_bpd = float(loss.detach())
                stop_agreed = stop.requested
            state["epoch"], state["offset"] = epoch, offset
            state["step"] = step + 1
            state["images_seen"] += config.batch_size
            if finite:
                opt.step()
                decay = config.ema_decay
                if config.ema_warmup:  # short runs: an average over the steps so far, up to ema_decay
                    decay = min(decay, (1.0 + step) / (10.0 + step))
                ema_update(ema, model, decay)
                bad_in_row = 0
                window_bpd.append(global_bpd)
                grad_norm_val = float(grad_norm)
            else:
                opt.zero_grad(set_to_none=True)
                state["skipped_steps"] += 1
                bad_in_row += 1
                say(f"step {step}: non-finite loss or gradient, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= settings.max_bad_steps:
                    if rollback():
                        state["rollbacks"] += 1
                        state["rewarm_from"] = state["step"]
                    else:
                        say("no checkpoint to roll back to yet; continuing to skip bad steps")
                    bad_in_row = 0
            dt = time.perf_counter() - t0
            state["train_seconds"] += dt
            window_time += dt
            window_imgs += config.batch_size

            s = state["step"]
            if bar is not None:
                bar.update(1)
                if window_bpd:
                    bar.set_postfix(bpd=f"{window_bpd[-1]:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{window_imgs / max(window_time, 1e-9):.1f}")
            row = None
            if s % settings.log_every == 0 or finished():
                row = dict(step=s, images_seen=state["images_seen"],
                           train_bpd=float(np.mean(window_bpd)) if window_bpd else float("nan"), lr=lr,
                           img_per_s=window_imgs / max(window_time, 1e-9), grad_norm=grad_norm_val,
                           skipped_steps=state["skipped_steps"], rollbacks=state["rollbacks"],
                           train_seconds=state["train_seconds"])
                window_bpd, window_imgs, window_time = [], 0, 0.0
            now = time.monotonic()
            due_eval = (settings.eval_every and s % settings.eval_every == 0) or \
                       (settings.eval_minutes and now - last_eval_time >= settings.eval_minutes * 60)
            if due_eval and not finished():
                last_eval = evaluate_now(s)
                last_eval_time = time.monotonic()
                state["last_valid_bpd"] = last_eval["valid_bpd"]
                if state["best_valid_bpd"] is None or last_eval["valid_bpd"] < state["best_valid_bpd"]:
                    state["best_valid_bpd"] = last_eval["valid_bpd"]
                row = dict(row or dict(step=s, images_seen=state["images_seen"], lr=lr),
                           valid_bpd=last_eval["valid_bpd"], inverse_error=last_eval["inverse_error"])
                say(f"step {s}: valid bpd {last_eval['valid_bpd']:.4f} (EMA), inverse error "
                    f"{last_eval['inverse_error']:.2e}")
            state["wall_seconds"] = time.monotonic() - wall_start
            if row is not None:
                row["wall_seconds"] = state["wall_seconds"]
                metrics.write(row)
                if tb is not None:
                    for k in ("train_bpd", "valid_bpd", "lr", "img_per_s", "inverse_error", "grad_norm"):
                        v = row.get(k)
                        if isinstance(v, float) and math.isfinite(v):
                            tb.add_scalar(k, v, s)
            due_ckpt = (settings.checkpoint_every and s % settings.checkpoint_every == 0) or \
                       (settings.checkpoint_minutes and now - last_ckpt_time >= settings.checkpoint_minutes * 60)
            if due_ckpt and not finished():
                ckpt_path = checkpoint_now()
                last_ckpt_time = time.monotonic()

        if bar is not None:
            bar.close()
        # Final checkpoint (also on SIGTERM / SIGINT), then the final evaluation.
        ckpt_path = checkpoint_now() or ckpt_path
        if stop_reason == "signal":
            say(f"stopped by signal at step {state['step']}; checkpoint {ckpt_path}")
    final = evaluate_now(state["step"]) if stop_reason != "signal" else {}
    if final:
        state["last_valid_bpd"] = final["valid_bpd"]
        if state["best_valid_bpd"] is None or final["valid_bpd"] < state["best_valid_bpd"]:
            state["best_valid_bpd"] = final["valid_bpd"]
        metrics.write(dict(step=state["step"], images_seen=state["images_seen"], valid_bpd=final["valid_bpd"],
                           inverse_error=final["inverse_error"], skipped_steps=state["skipped_steps"],
                           rollbacks=state["rollbacks"], train_seconds=state["train_seconds"],
                           wall_seconds=time.monotonic() - wall_start))
        say(f"done: step {state['step']}, valid bpd {final['valid_bpd']:.4f} (EMA, {valid_eval.shape[0]} images)")
    summary = dict(
        config=config.name, dataset=settings.dataset, dataset_description=settings.dataset_description,
        parameters=n_params, steps=state["step"], images_seen=state["images_seen"],
        train_seconds=state["train_seconds"], final_valid_bpd=state["last_valid_bpd"],
        best_valid_bpd=state["best_valid_bpd"], final_inverse_error=final.get("inverse_error"),
        skipped_steps=state["skipped_steps"], rollbacks=state["rollbacks"], stopped_by=stop_reason,
        checkpoint=str(ckpt_path) if ckpt_path else None, resumed_from=resumed_from,
        world_size=info.world_size, device=str(device), torch_version=torch.__version__,
    )
    if main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if tb is not None:
            tb.close()
    return summary
