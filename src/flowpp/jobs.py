"""What each command does, as functions of plain arguments: ``flowpp.cli`` parses the command
line and calls one of these; tests and scripts can call them directly."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import distributed as D
from .atomic import atomic_write, write_json, write_npz
from .compression_jobs import compress_job, decompress_job
from .configs import FlowConfig, get_config, list_configs
from .data import DATASET_NAMES
from .data.for_config import load_images
from .data.prepared import prepare, prepared_path, verify_prepared
from .errors import UsageError
from .evaluate import EvalParts, default_chunk, evaluate_bpd, weights_digest
from .images import chw_shape, save_grid, to_nhwc
from .job_support import load_for_command, progress_bar
from .model import count_parameters
from .runs import RunDir
from .training import TrainSettings, train

__all__ = [
    "PAPER_EVAL_SAMPLES",
    "resolve_train_config",
    "train_job",
    "eval_job",
    "sample_job",
    "score_job",
    "export_job",
    "configs_job",
    "prepare_job",
    "compress_job",
    "decompress_job",
    "load_images",
]

PAPER_EVAL_SAMPLES = 4096  # the official protocol: importance-weighted bound, S = 4096, test set


def resolve_train_config(
    config: str | None,
    *,
    out: str,
    resume: bool,
    overrides: Sequence[tuple[str, Any]] = (),
    batch_size: int | None = None,
    lr: float | None = None,
    bits: int | None = None,
) -> FlowConfig:
    """The named config (or, resuming without one, the run's), with the command line's changes."""
    if config is None and not resume:
        raise UsageError("--config is required (see `flowpp configs`)")
    base = RunDir(out).read_config() if config is None else get_config(config)
    changes = dict(overrides)
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if lr is not None:
        changes["lr"] = lr
    resolved = base.with_changes(changes)
    if bits is not None:
        levels = 2**bits
        if resolved.num_levels not in (256, levels):
            raise UsageError(
                f"--bits {bits} asks for {levels} levels, but config {resolved.name!r} models {resolved.num_levels}"
            )
        resolved = resolved.replace(num_levels=levels)
    return resolved


def prepare_job(
    *,
    data: str,
    data_dir: str | None = None,
    download: bool = True,
    bits: int | None = None,
    force: bool = False,
    verify: bool = False,
) -> Path:
    """Decode ``data`` once into memory-mapped arrays (``flowpp prepare``); check or rebuild one."""
    levels = None if bits is None else 2**bits
    folder = prepared_path(data, data_dir, levels)
    if verify and not force:
        why = verify_prepared(data, data_dir, levels) if folder.is_dir() else "not prepared yet"
        print(f"{folder}: {why or 'whole and current (full digests checked)'}")
        if why is None:
            return folder
    folder = prepare(data, data_dir, num_levels=levels, download=download, force=force or bool(verify), log=print,
                     progress_bar=True)  # fmt: skip
    m = json.loads((folder / "manifest.json").read_text())
    sizes = {s: (v[2] - v[1] if v else 0) for s, v in m["splits"].items()}
    print(f"{folder}: {sizes['train']:,} train / {sizes['valid']:,} valid / {sizes['test']:,} test images, "
          f"{m['num_levels']} levels, {sum(f.stat().st_size for f in folder.iterdir()) / 1e6:,.1f} MB")  # fmt: skip
    return folder


def _default_dataset(config: FlowConfig) -> str | None:
    for name in (config.name, config.name.split("-")[0]):
        if name in DATASET_NAMES:
            return name
    return None


def train_job(
    config: FlowConfig,
    settings: TrainSettings,
    *,
    data: str | None,
    data_dir: str | None = None,
    download: bool = True,
    resume: bool = False,
    dry_run: bool = False,
    prepared: bool | None = None,
    processes: int = 1,
    argv: list[str] | None = None,
) -> dict:
    """Train into ``settings.out_dir``. Resuming, the dataset and validation split default to the run's.

    ``processes`` > 1 (on a CPU, outside torchrun): this process trains as rank 0 and starts the
    others, which run ``flowpp ARGV`` (the same command) once the data is ready here (so a
    download happens once)."""
    saved = RunDir(settings.out_dir).read_settings() if resume else {}
    data = data or saved.get("dataset") or _default_dataset(config)
    if data is None:
        raise UsageError(f"--data is required for config {config.name!r}")
    valid_split = settings.valid_split or saved.get("valid_split") or "valid"
    # Validating on the test set leaves nothing to hold out: train on train and valid together.
    settings = dataclasses.replace(
        settings,
        dataset=str(data),
        valid_split=valid_split,
        train_split="train+valid" if valid_split == "test" else "train",
    )
    if dry_run:
        resolved = {"config": config.to_dict(), "settings": dataclasses.asdict(settings)}
        print(json.dumps(resolved, indent=2, default=str))
        return resolved
    settings.check_budget()  # before any data is loaded
    load = dict(data_dir=data_dir, download=download, prepared=prepared)
    train_set = load_images(data, settings.train_split, config, **load)
    valid_set = load_images(data, valid_split, config, **load)
    print(
        f"data: {train_set.description}: {len(train_set):,} {settings.train_split} / {len(valid_set):,} "
        f"{valid_split} images"
    )
    settings = dataclasses.replace(settings, dataset_description=train_set.description)
    workers = contextlib.nullcontext()
    if processes > 1 and not os.environ.get("WORLD_SIZE"):
        if argv is None:
            raise UsageError("training on several processes needs the command line they run (argv)")
        threads = settings.threads if isinstance(settings.threads, int) else 1
        workers = D.LocalWorkers(processes, argv, threads)
        print(f"training on {processes} processes x {threads} thread(s) (DDP on gloo)")
    try:
        with workers:
            summary = train(
                config, settings, train_set.images, valid_set.images, num_levels=train_set.num_levels, resume=resume
            )
    finally:
        D.shutdown_distributed()
    print(json.dumps(summary, indent=2))
    return summary


def _writable(folder: Path) -> bool:
    """Whether files can be written in ``folder`` (or created under its nearest existing parent)."""
    folder = folder.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _eval_file(run: str, data: str, split: str, samples: int) -> Path:
    if Path(run).is_file():  # beside an exported file: model.eval-<data>-<split>-S<S>.json
        named = RunDir(Path(run).parent).eval_file(data, split, samples).name
        return Path(run).with_name(f"{Path(run).stem}.{named}")
    return RunDir(run).eval_file(data, split, samples)


def eval_job(
    *,
    run: str,
    data: str,
    split: str = "test",
    samples: int = 1,
    batch_size: int = 64,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    compile: bool = False,
    out: str | None = None,
    data_dir: str | None = None,
    download: bool = True,
    which: str | None = None,
    prepared: bool | None = None,
    restart: bool = False,
    chunk: int | None = None,
    progress: bool = True,
) -> dict:
    """Bits/dim of a run's EMA weights on a dataset split; written to JSON and returned.

    Under torchrun the images are shared out over the processes (the same numbers as one
    process). Per-image results are saved as chunks complete, beside the result; the same
    command run again continues from them (``restart`` discards them). ``progress``: a bar on a
    terminal, else a line every tenth of the images (or five minutes)."""
    path = Path(out) if out else _eval_file(run, data, split, samples)
    if not _writable(path.parent):
        raise UsageError(f"cannot write the result to {path}: its folder is not writable (choose --out)")
    dev = D.resolve_device(device)
    dist = D.setup_distributed(dev.type)
    if dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    say = print if dist.is_main else (lambda *a, **k: None)
    try:
        model, info, _ = load_for_command(run, dev, compile, which, quiet=not dist.is_main)
        ds = load_images(data, split, model.config, data_dir=data_dir, download=download, prepared=prepared, log=say)
        if model.config.official and samples < PAPER_EVAL_SAMPLES:
            say(
                f"note: the paper reports the importance-weighted bound with S = {PAPER_EVAL_SAMPLES} on the test "
                f"set; this is S = {samples}. For the paper's protocol: flowpp eval --run {run} --data {data} "
                f"--split test --samples {PAPER_EVAL_SAMPLES}"
            )
        x = ds.images[:limit] if limit else ds.images
        model.config.check_data(chw_shape(x), ds.num_levels, split)
        # A saved part is reused only by the same evaluation, computed in the same batches.
        key = dict(weights=weights_digest(model), data=str(data), split=split, n_images=len(x),
                   samples=samples, seed=seed, batch_size=batch_size, processes=dist.world_size,
                   chunk=chunk or default_chunk(samples))  # fmt: skip
        parts = EvalParts(path.with_name(path.name + ".parts"), key, log=say)
        if restart and dist.is_main:
            parts.remove()
        D.barrier(dist)
        report = progress and dist.is_main
        res = _evaluate_with_progress(model, x, samples, batch_size, seed, dist, parts, report)
    finally:
        D.shutdown_distributed()
    res.update(
        run=str(run),
        checkpoint=info["checkpoint"],
        step=info["step"],
        weights=info["which"],
        data=str(data),
        data_description=ds.description,
        split=split,
        config=model.config.name,
        processes=dist.world_size,
    )
    if not dist.is_main:
        return res
    per_image = path.with_name(f"{path.stem}.per_image.npy")
    columns = [res.pop("per_image_bpd")] + ([res.pop("per_image_iw_bpd")] if "per_image_iw_bpd" in res else [])
    table = np.stack(columns, axis=1)  # (N, 1 or 2): single-sample and importance-weighted bits/dim
    atomic_write(per_image, lambda f: np.save(f, table, allow_pickle=False))
    res["per_image_file"] = str(per_image)
    write_json(path, res)
    parts.remove()
    line = f"{res['n_images']} images: {res['bpd']:.4f} +- {res['bpd_se']:.4f} bits/dim (single sample)"
    if "iw_bpd" in res:
        line += f", {res['iw_bpd']:.4f} +- {res['iw_bpd_se']:.4f} (importance-weighted, S={samples})"
    print(line)
    print(f"wrote {path} (per-image bits/dim: {per_image.name})")
    return res


def _evaluate_with_progress(model, x, samples, batch_size, seed, dist, parts, report: bool) -> dict:
    run = dict(samples=samples, batch_size=batch_size, seed=seed, dist=dist, per_image=True, parts=parts)
    with progress_bar(len(x), report, "eval") as progress:
        res = evaluate_bpd(model, x, progress=progress, **run)
    if res.get("resumed_images"):
        print(f"continued a saved evaluation: {res['resumed_images']:,} images were already done", file=sys.stderr)
    return res


def sample_job(
    *,
    run: str,
    num: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    out: str = "samples.png",
    npz: str | None = None,
    scale: int = 1,
    batch_size: int = 64,
    device: str = "auto",
    compile: bool = False,
    which: str | None = None,
) -> torch.Tensor:
    """Samples of a run's EMA weights as a PNG grid (and optionally an .npz); returns them."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {temperature}")
    model, info, dev = load_for_command(run, device, compile, which)
    gen = torch.Generator(device=dev).manual_seed(seed)
    samples = torch.cat(
        [
            model.sample(min(batch_size, num - i), temperature=temperature, generator=gen).cpu()
            for i in range(0, num, batch_size)
        ]
    )
    w, h = save_grid(samples, model.config.num_levels, out, scale=scale)
    print(f"wrote {out} ({num} samples, {w}x{h} px) from {info['checkpoint']}")
    if npz:
        write_npz(npz, x=to_nhwc(samples), num_levels=np.int64(model.config.num_levels))
        print(f"wrote {npz}")
    return samples


def score_job(
    *,
    run: str,
    images: Sequence[str],
    samples: int = 16,
    seed: int = 0,
    device: str = "auto",
    compile: bool = False,
    as_json: bool = False,
    which: str | None = None,
) -> list[dict]:
    """Bits/dim of each image file under a run's EMA weights, printed as a table or JSON."""
    from .score import score_files

    model, info, _ = load_for_command(run, device, compile, which)
    rows = score_files(model, list(images), samples=samples, seed=seed)
    if as_json:
        print(
            json.dumps(
                {"run": str(run), "checkpoint": info["checkpoint"], "samples": samples, "scores": rows}, indent=2
            )
        )
    else:
        width = max([len(r["image"]) for r in rows] + [5])
        print(f"{'image':<{width}}  bits/dim")
        for r in rows:
            print(f"{r['image']:<{width}}  {r['bpd']:.4f}")
    return rows


def export_job(*, run: str, out: str, raw: bool = False, which: str | None = None, format: str = "auto") -> Path:
    """The run's best (or last) EMA weights, or its raw weights, as safetensors with a model card,
    or in the Flow++ release format (TF names and layouts) for the official code."""
    from .export import card_path, export_release_file, export_safetensors

    if format == "auto":
        format = "release" if Path(out).suffix.lower() == ".npz" else "flowpp"
    weights = "model" if raw else "ema"
    if format == "release":
        if Path(run).is_file() and (raw or which):
            raise UsageError(f"{run} is an exported file: it holds one set of weights; drop --raw / --weights")
        path, n, info = export_release_file(run, out, weights=weights, which=which)
        step = f", step {info['step']}" if info["step"] not in (None, "") else ""
        print(f"wrote {path} ({n} variables in the Flow++ release format: TensorFlow names and layouts; "
              f"{info['which']} weights{step})")  # fmt: skip
        return path
    if Path(run).is_file():
        raise UsageError(f"{run} is already an exported file; `flowpp export` writes a run's weights (or, with an "
                         ".npz --out, any model in the release format)")  # fmt: skip
    path, n, card = export_safetensors(run, out, weights=weights, which=which)
    print(f"wrote {path} ({n} tensors; {card['which']} weights, step {card['steps']}) and {card_path(path)}")
    return path


def import_job(*, file: str, config: str, out: str, overrides: Sequence[tuple[str, Any]] = ()) -> Path:
    """A Flow++ release weight file (the authors' trained models) as a flowpp export."""
    import time

    from .export import card_path, import_release_file

    resolved = get_config(config).with_changes(dict(overrides))
    start = time.perf_counter()
    path, n, card, _ = import_release_file(file, resolved, out)
    source = card["source"]
    print(
        f"read {source['variables']} variables of {Path(file).name} (SHA-256 {source['sha256'][:16]}...) as config "
        f"{resolved.name!r}: {count_parameters(resolved):,} parameters"
        + ("; it holds exponential-moving-average shadows: using them, as the official code evaluates"
           if source["ema_shadows_used"] else "")
        + (f"; ignored {source['ignored_optimizer_variables']} optimizer variables (Adam slots)"
           if source["ignored_optimizer_variables"] else "")
    )  # fmt: skip
    for r in card["reported"]:
        print(f"the release reported {r['bpd']} bits/dim on {r['data']} for this model (single-sample bound)")
    print(f"wrote {path} ({n} tensors) and {card_path(path)} in {time.perf_counter() - start:.1f} s")
    return path


def configs_job(name: str | None = None) -> None:
    if name:
        print(json.dumps(get_config(name).to_dict(), indent=2))
        return
    for key in list_configs():
        cfg = get_config(key)
        c, h, w = cfg.image_shape
        print(f"{key:<26} {c}x{h}x{w}  L={cfg.num_levels:<4} {count_parameters(cfg):>13,} parameters  {cfg.notes}")
