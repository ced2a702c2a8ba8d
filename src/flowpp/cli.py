"""The ``flowpp`` command line: argument parsing only; the work is done by the job modules."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_DATASETS_HELP = ("cifar10, mnist, fashion-mnist, imagenet32, imagenet64, digits, a path to an .npz file "
                  "(x_train, x_test, optional x_valid; uint8 NHWC) or a folder of PNG images")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


PAPER_EVAL_SAMPLES = 4096  # the official protocol: importance-weighted bound, S = 4096, test set

_COMPILE_HELP = ("torch.compile the conditioner networks first: faster over many images, after the first batch "
                 "of each shape compiles (needs a C++ compiler on CPU)")


def _parse_override(text: str) -> tuple[str, object]:
    from .configs import parse_override

    try:
        return parse_override(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--set: {e}") from None


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import list_configs

    p = argparse.ArgumentParser(prog="flowpp", formatter_class=_Formatter,
                                description="Flow++ normalizing flows: train, evaluate, sample and score.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # train ----------------------------------------------------------------------------------
    t = sub.add_parser("train", formatter_class=_Formatter, help="train a model into a run directory",
                       description="Train a Flow++ model. Writes config.json, settings.json, metrics.csv, "
                                   "checkpoints/, samples/ and summary.json into --out.")
    g = t.add_argument_group("model and data")
    g.add_argument("--config", default=None, help=f"named config: {', '.join(list_configs())} "
                   "(with --resume: taken from the run when omitted)")
    g.add_argument("--data", default=None, help=f"DATASET: {_DATASETS_HELP} (default: the config's name when "
                   "it is a dataset)")
    g.add_argument("--data-dir", default=None, help="where named datasets live (default: $FLOWPP_DATA_DIR or "
                   "~/.cache/flowpp/data)")
    g.add_argument("--valid-split", default=None, choices=["valid", "test"],
                   help="split used for validation during training; 'test' trains on train and valid together "
                        "(for CIFAR-10 all 50,000 images) and validates on the test set, as the paper did "
                        "(default: valid; with --resume, the run's)")
    g.add_argument("--bits", type=int, default=None, choices=range(1, 9), metavar="N",
                   help="reduce 8-bit data to N bits (x >> (8 - N)) and model 2^N levels (default: the config's "
                        "levels; 8-bit data is reduced automatically for an n-bit config)")
    g.add_argument("--no-download", action="store_true", help="never download; fail if files are missing")
    g.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                   help="override a config field, e.g. --set filters=64 --set dropout=0.1 (repeatable)")
    g = t.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="global batch (default: the config's)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training time (evaluation and checkpoints not counted)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order, noise and dropout")
    g = t.add_argument_group("evaluation, checkpoints and output")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g.add_argument("--eval-every", type=_positive_int, default=None, help="evaluate every N steps (default: at the end)")
    g.add_argument("--eval-minutes", type=float, default=None, help="evaluate every M minutes of wall-clock")
    g.add_argument("--eval-images", type=_positive_int, default=1000, help="validation images per evaluation")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None, help="checkpoint every N steps")
    g.add_argument("--checkpoint-minutes", type=float, default=10.0, help="checkpoint every M minutes")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--max-bad-steps", type=_positive_int, default=5,
                   help="non-finite steps in a row before rolling back to the last checkpoint")
    g.add_argument("--log-every", type=_positive_int, default=10, help="write a metrics row every N steps")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--bf16", action="store_true", help="run the conditioner networks under bfloat16 autocast "
                   "(for GPUs with bf16; the mixture math and log-dets stay float32)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the conditioner networks in the backward pass: far less memory, ~1/3 more time")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config and settings, then exit")

    # eval -----------------------------------------------------------------------------------
    e = sub.add_parser("eval", formatter_class=_Formatter, help="bits/dim of a run on a dataset split",
                       description="Evaluate the EMA weights of a run's newest checkpoint. With --samples S > 1 "
                                   "also the importance-weighted bound (float64 log-mean-exp over S "
                                   "dequantization samples per image).")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--data", required=True, help=f"DATASET: {_DATASETS_HELP}")
    e.add_argument("--data-dir", default=None, help="where named datasets live")
    e.add_argument("--split", default="test", choices=["train", "valid", "test"], help="which split")
    e.add_argument("--samples", type=_positive_int, default=1, help="dequantization samples per image (S)")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch")
    e.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N images")
    e.add_argument("--seed", type=int, default=0, help="seed of the dequantization noise")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda")
    e.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    e.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    e.add_argument("--out", default=None, help="JSON file (default: RUN/eval-<data>-<split>-S<S>.json)")
    e.add_argument("--no-download", action="store_true", help="never download")

    # sample ---------------------------------------------------------------------------------
    s = sub.add_parser("sample", formatter_class=_Formatter, help="draw samples from a run",
                       description="Sample z ~ N(0, T^2 I) and invert the main flow with the EMA weights.")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("-n", "--num", type=_positive_int, default=64, help="number of samples")
    s.add_argument("--temperature", type=float, default=1.0, help="prior temperature T")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--out", default="samples.png", help="PNG grid to write")
    s.add_argument("--npz", default=None, help="also save the integer samples (N, H, W, C) uint8 as 'x' in this .npz")
    s.add_argument("--scale", type=_positive_int, default=1, help="enlarge the grid by this integer factor")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="samples per batch")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda")
    s.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    s.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")

    # score ----------------------------------------------------------------------------------
    c = sub.add_parser("score", formatter_class=_Formatter, help="bits/dim of given image files",
                       description="Bits/dim of each PNG/JPEG image, or each image in an .npz, under a run's "
                                   "model (e.g. for out-of-distribution detection). 8-bit pixels are mapped to "
                                   "the config's levels.")
    c.add_argument("--run", required=True, help="run directory")
    c.add_argument("images", nargs="+", help="PNG/JPEG files or .npz files")
    c.add_argument("--samples", type=_positive_int, default=16, help="dequantization samples per image")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--seed", type=int, default=0, help="seed of the dequantization noise")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda")
    c.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    c.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")

    # export ---------------------------------------------------------------------------------
    x = sub.add_parser("export", formatter_class=_Formatter, help="export a run's weights to safetensors",
                       description="Write the EMA (or raw) weights of a run's newest checkpoint as safetensors, "
                                   "with the config as metadata.")
    x.add_argument("--run", required=True, help="run directory")
    x.add_argument("--out", required=True, help=".safetensors file to write")
    x.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights")

    # configs --------------------------------------------------------------------------------
    k = sub.add_parser("configs", formatter_class=_Formatter, help="list the named configs with parameter counts")
    k.add_argument("name", nargs="?", default=None, help="show one config in full")
    return p


def _err(msg: str) -> int:
    print(f"flowpp: error: {msg}", file=sys.stderr)
    return 2


def _resolve_config(args):
    from . import get_config
    from .runs import run_config

    if args.resume and args.config is None:
        config = run_config(args.out)
    else:
        if args.config is None:
            raise ValueError("--config is required (see `flowpp configs`)")
        config = get_config(args.config)
    changes = dict(args.overrides)
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.lr is not None:
        changes["lr"] = args.lr
    config = config.with_changes(changes)
    if args.bits is not None:
        levels = 2 ** args.bits
        if config.num_levels not in (256, levels):
            raise ValueError(f"--bits {args.bits} asks for {levels} levels, but config {config.name!r} models "
                             f"{config.num_levels}")
        config = config.replace(num_levels=levels)
    return config


def _default_dataset(config) -> str | None:
    from .data import DATASET_NAMES

    for name in (config.name, config.name.split("-")[0]):
        if name in DATASET_NAMES:
            return name
    return None


def cmd_train(args) -> int:
    from .data import load_dataset, match_levels
    from .train import TrainSettings, train

    config = _resolve_config(args)
    data, valid_split = args.data, args.valid_split
    if args.resume:
        prev = Path(args.out) / "settings.json"
        saved = json.loads(prev.read_text()) if prev.is_file() else {}
        data = data or saved.get("dataset") or None
        valid_split = valid_split or saved.get("valid_split")
    valid_split = valid_split or "valid"
    data = data or _default_dataset(config)
    if data is None:
        raise ValueError(f"--data is required for config {config.name!r}")
    settings = TrainSettings(
        out_dir=args.out, max_steps=args.max_steps, max_minutes=args.max_minutes, eval_every=args.eval_every,
        eval_minutes=args.eval_minutes, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every, seed=args.seed, device=args.device,
        eval_images=args.eval_images, keep_checkpoints=args.keep_checkpoints, max_bad_steps=args.max_bad_steps,
        progress=not args.no_progress, bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing, dataset=str(data),
        # Validating on the test set leaves nothing to hold out: train on train and valid together.
        train_split="train+valid" if valid_split == "test" else "train", valid_split=valid_split,
    )
    if args.dry_run:
        print(json.dumps({"config": config.to_dict(), "settings": dataclasses.asdict(settings)}, indent=2,
                         default=str))
        return 0
    if args.max_steps is None and args.max_minutes is None:
        raise ValueError("give --max-steps and/or --max-minutes")
    download = not args.no_download
    train_split = settings.train_split
    train_set = match_levels(load_dataset(data, train_split, data_dir=args.data_dir, download=download),
                             config.num_levels, log=print)
    valid_set = match_levels(load_dataset(data, valid_split, data_dir=args.data_dir, download=download),
                             config.num_levels)
    print(f"data: {train_set.description}: {len(train_set.images):,} {train_split} / {len(valid_set.images):,} "
          f"{valid_split} images")
    settings.dataset_description = train_set.description
    from .distributed import shutdown_distributed

    try:
        summary = train(config, settings, train_set.images, valid_set.images, num_levels=train_set.num_levels,
                        resume=args.resume)
    finally:
        shutdown_distributed()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    import torch

    from .atomic import write_json
    from .data import load_dataset, match_levels
    from .evaluate import evaluate_bpd
    from .runs import load_run
    from .train import check_dataset_fits, resolve_device

    device = resolve_device(args.device)
    model, info = load_run(args.run, device, log=print)
    if args.compile:
        model.compile_networks()
    ds = match_levels(load_dataset(args.data, args.split, data_dir=args.data_dir, download=not args.no_download),
                      model.config.num_levels, log=print)
    if model.config.official and args.samples < PAPER_EVAL_SAMPLES:
        print(f"note: the paper reports the importance-weighted bound with S = {PAPER_EVAL_SAMPLES} on the test "
              f"set; this is S = {args.samples}. For the paper's protocol: flowpp eval --run {args.run} "
              f"--data {args.data} --split test --samples {PAPER_EVAL_SAMPLES}")
    x = torch.from_numpy(ds.images.transpose(0, 3, 1, 2).copy())
    if args.limit:
        x = x[: args.limit]
    check_dataset_fits(model.config, x, ds.num_levels, args.split)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    from tqdm import tqdm

    bar = tqdm(total=x.shape[0], unit="img", dynamic_ncols=True, file=sys.stderr)
    batches = (x[i: i + args.batch_size] for i in range(0, x.shape[0], args.batch_size))
    res = evaluate_bpd(model, batches, samples=args.samples, device=device, generator=gen, progress=bar.update)
    bar.close()
    res.update(run=str(args.run), checkpoint=info["checkpoint"], step=info["step"], weights="ema",
               data=str(args.data), data_description=ds.description, split=args.split, config=model.config.name)
    tag = Path(str(args.data)).stem if ("/" in str(args.data) or "." in str(args.data)) else str(args.data)
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{tag}-{args.split}-S{args.samples}.json"
    write_json(out, res)
    line = f"{res['n_images']} images: {res['bpd']:.4f} +- {res['bpd_se']:.4f} bits/dim (single sample)"
    if "iw_bpd" in res:
        line += f", {res['iw_bpd']:.4f} +- {res['iw_bpd_se']:.4f} (importance-weighted, S={args.samples})"
    print(line)
    print(f"wrote {out}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .atomic import write_npz
    from .images import save_grid
    from .runs import load_run
    from .train import resolve_device

    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    device = resolve_device(args.device)
    model, info = load_run(args.run, device)
    if args.compile:
        model.compile_networks()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    chunks = []
    for i in range(0, args.num, args.batch_size):
        chunks.append(model.sample(min(args.batch_size, args.num - i), temperature=args.temperature,
                                   generator=gen).cpu())
    samples = torch.cat(chunks)
    w, h = save_grid(samples, model.config.num_levels, args.out, scale=args.scale)
    print(f"wrote {args.out} ({args.num} samples, {w}x{h} px) from {info['checkpoint']}")
    if args.npz:
        write_npz(args.npz, x=samples.permute(0, 2, 3, 1).numpy().astype(np.uint8),
                  num_levels=np.int64(model.config.num_levels))
        print(f"wrote {args.npz}")
    return 0


def cmd_score(args) -> int:
    from .runs import load_run
    from .score import score_files
    from .train import resolve_device

    device = resolve_device(args.device)
    model, info = load_run(args.run, device)
    if args.compile:
        model.compile_networks()
    rows = score_files(model, args.images, samples=args.samples, seed=args.seed, device=device)
    if args.json:
        print(json.dumps({"run": str(args.run), "checkpoint": info["checkpoint"], "samples": args.samples,
                          "scores": rows}, indent=2))
    else:
        width = max([len(r["image"]) for r in rows] + [5])
        print(f"{'image':<{width}}  bits/dim")
        for r in rows:
            print(f"{r['image']:<{width}}  {r['bpd']:.4f}")
    return 0


def cmd_export(args) -> int:
    from .export import export_safetensors

    path, n = export_safetensors(args.run, args.out, weights=args.weights)
    print(f"wrote {path} ({n} tensors)")
    return 0


def cmd_configs(args) -> int:
    from . import count_parameters, get_config, list_configs

    if args.name:
        print(json.dumps(get_config(args.name).to_dict(), indent=2))
        return 0
    for name in list_configs():
        cfg = get_config(name)
        c, h, w = cfg.image_shape
        print(f"{name:<26} {c}x{h}x{w}  L={cfg.num_levels:<4} {count_parameters(cfg):>13,} parameters  {cfg.notes}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "score": cmd_score, "export": cmd_export,
            "configs": cmd_configs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DatasetError

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, CheckpointError, DatasetError) as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"{e.strerror or e}: {e.filename or ''}".strip())
    except KeyboardInterrupt:
        return _err("interrupted")
