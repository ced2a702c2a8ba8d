#!/usr/bin/env python
"""The Flow++ ablations (paper, Table 2) at small scale, with learning curves.

The paper trains the full model and three ablations on CIFAR-10 for the same number of steps
(not to convergence) and reports test bits/dim:

    uniform dequantization 3.292, affine coupling 3.200, no self-attention 3.193, Flow++ 3.165

This script does the same on any DATASET the ``flowpp`` command line takes, with a budget per
run (training minutes and/or steps) small enough for a CPU, and several seeds:

* ``full``            the base config;
* ``uniform-dequant`` uniform dequantization, the main flow's ``filters`` widened;
* ``affine``          affine couplings (main flow and dequantizer), ``filters`` and
                      ``dequant_filters`` widened by the same number of channels;
* ``no-attention``    every self-attention layer replaced by the same-size pointwise gated layer.

Widening rule (``make_variants``): the width is searched in steps of ``heads`` (attention needs
``filters % heads == 0``) and the width whose parameter count is closest to the full model's is
taken; a tie goes to the wider one. On the paper's ``cifar10`` config this gives exactly the
official ablation widths, 104 filters for uniform dequantization (32,324,408 parameters) and
108 for affine couplings (32,045,708), which the tests check.

Each run trains into ``OUT/<variant>/seed<k>/`` (``metrics.csv`` holds the learning curve of
validation bits/dim against images seen and wall-clock), then its EMA model is evaluated on the
report split (single-sample and importance-weighted bound with S samples, standard errors over
images) and, single-sample, on as many training images (ones the run has trained on) for the
train/report gap. A finished run leaves ``ablation-result.json`` and is skipped next time, so an
interrupted study resumes where it stopped (an unfinished run continues from its checkpoint).

Outputs in OUT: ``results.json``, ``results.md`` (per variant: mean over seeds ± standard error,
the spread between seeds, the train/report gap, and the difference from the full model on the
same images with a paired standard error) and, when matplotlib is installed (the ``plots``
extra), ``curves_images.png``, ``curves_time.png`` and ``gap.png``. ``--plot-only`` rebuilds
them from the run directories.

Budget: 8 runs of M training minutes each plus their evaluations (S = 64 importance samples per
image is 64 forward passes, so keep ``--eval-images`` small) take about 8 (M + 1.5) minutes on
2 CPU cores; measure the preset's images/s first (``flowpp train ... --max-steps 50``). With a
few thousand images per run, shorten the presets' warm-up with ``--set`` (the same for all
variants).
Several torch threads on a busy machine are many times slower than one: pass ``--threads 1``
unless the cores are idle (and, e.g., run two datasets side by side). With less than an epoch
per run the train/report gap is near zero by construction; ``--train-images N`` trains on the
first N training images only, so that each is seen several times.

The study in docs/results.md (two datasets side by side, one thread each, about an hour)::

    python benchmarks/ablations.py --data mnist.npz --config mnist --set batch_size=16 \
        --set heads=4 --set lr=0.002 --set lr_schedule=cosine --set ema_decay=0.999 \
        --out runs/ablations-mnist --steps-per-run 500 --eval-every-steps 50 --curve-images 200 \
        --seeds 0 1 --eval-samples 64 --eval-images 100 --report-split test --threads 1
    python benchmarks/ablations.py --data cifar10_train10k.npz --config cifar10-small \
        --set batch_size=16 --set heads=4 --set lr=0.002 --set lr_schedule=cosine \
        --set ema_decay=0.999 --out runs/ablations-cifar --steps-per-run 320 --eval-every-steps 40 \
        --curve-images 200 --seeds 0 1 --eval-samples 64 --eval-images 64 --report-split valid \
        --threads 1
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

try:
    import flowpp
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import flowpp

import numpy as np
import torch

from flowpp.configs import FlowConfig, parse_override

VARIANTS = ("full", "uniform-dequant", "affine", "no-attention")

#: Table 2 of the paper: CIFAR-10 test bits/dim of models trained for the same (unconverged) time.
PAPER_TABLE2 = {"full": 3.165, "uniform-dequant": 3.292, "affine": 3.200, "no-attention": 3.193}

DESCRIPTIONS = {
    "full": "Flow++ (the base config)",
    "uniform-dequant": "uniform dequantization",
    "affine": "affine coupling",
    "no-attention": "no self-attention",
}

RESULT_FILE = "ablation-result.json"
STUDY_FILE = "study.json"


# --- variants ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _count(config: FlowConfig) -> int:
    return flowpp.count_parameters(config)


def _widen(
    make: Callable[[int], FlowConfig], target: int, step: int, min_delta: int, count: Callable[[FlowConfig], int]
) -> FlowConfig:
    """``make(delta)`` for the multiple ``delta`` of ``step`` whose count is closest to ``target``.

    Counts grow with the width, so this walks from delta = 0 to the two widths around ``target``.
    Ties go to the wider config. ``min_delta`` keeps every width positive.
    """
    c0 = count(make(0))
    if c0 == target:
        return make(0)
    if c0 < target:  # widen until the count reaches the target
        prev, prev_c = 0, c0
        for _ in range(10_000):
            d = prev + step
            c = count(make(d))
            if c >= target:
                lo, hi = prev, d
                lo_c, hi_c = prev_c, c
                break
            prev, prev_c = d, c
        else:
            raise RuntimeError("could not reach the target parameter count")
    else:  # narrow until the count drops below the target (or the width would vanish)
        nxt, nxt_c = 0, c0
        while True:
            d = nxt - step
            if d < min_delta:
                return make(nxt)
            c = count(make(d))
            if c < target:
                lo, hi = d, nxt
                lo_c, hi_c = c, nxt_c
                break
            nxt, nxt_c = d, c
    return make(hi) if abs(hi_c - target) <= abs(target - lo_c) else make(lo)


def make_variants(base: FlowConfig, count: Callable[[FlowConfig], int] | None = None) -> dict[str, FlowConfig]:
    """The full model and its three ablations, widened to about the full model's parameter count.

    * uniform-dequant: ``dequantizer="uniform"``; ``filters`` widened (the dequantizer's parameters
      are gone);
    * affine: ``coupling="affine"`` (main flow and dequantizer); ``filters`` and ``dequant_filters``
      widened by the same number of channels;
    * no-attention: every ``"attention"`` mixer (main, dequantizer, context) becomes
      ``"pointwise"``, a gated layer of the same size, so nothing is widened (as in the paper).

    Widths move in steps of ``heads``; the one with the parameter count closest to the full
    model's is chosen (ties: the wider). On ``cifar10`` this reproduces the official widths.
    """
    count = count or _count
    target = count(base)
    step = base.heads
    variants = {"full": base}

    def uniform(d: int) -> FlowConfig:
        return base.replace(
            name=f"{base.name}-uniform-dequant",
            dequantizer="uniform",
            filters=base.filters + d,
            notes=f"ablation of {base.name}: uniform dequantization, filters {base.filters + d}",
        )

    variants["uniform-dequant"] = _widen(uniform, target, step, step - base.filters, count)

    def affine(d: int) -> FlowConfig:
        return base.replace(
            name=f"{base.name}-affine",
            coupling="affine",
            filters=base.filters + d,
            dequant_filters=base.dequant_filters + d,
            notes=f"ablation of {base.name}: affine couplings, filters {base.filters + d}, "
            f"dequant_filters {base.dequant_filters + d}",
        )

    variants["affine"] = _widen(affine, target, step, step - min(base.filters, base.dequant_filters), count)

    def no_attention(mixer: str) -> str:
        return "pointwise" if mixer == "attention" else mixer

    variants["no-attention"] = base.replace(
        name=f"{base.name}-no-attention",
        mixer=no_attention(base.mixer),
        dequant_mixer=no_attention(base.dequant_mixer),
        context_mixer=no_attention(base.context_mixer),
        notes=f"ablation of {base.name}: same-size pointwise gated layers instead of self-attention",
    )
    return variants


def variant_summary(variants: dict[str, FlowConfig], count: Callable[[FlowConfig], int] | None = None) -> list[dict]:
    count = count or _count
    full = count(variants["full"]) if "full" in variants else None
    rows = []
    for name, cfg in variants.items():
        n = count(cfg)
        rows.append(
            dict(
                variant=name,
                parameters=n,
                filters=cfg.filters,
                dequant_filters=cfg.dequant_filters,
                relative=(n / full - 1.0) if full else None,
            )
        )
    return rows


# --- small helpers -------------------------------------------------------------------------------


def apply_overrides(config: FlowConfig, overrides: list[str]) -> FlowConfig:
    try:
        return config.with_changes(dict(parse_override(item) for item in overrides))
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None


def _clean(obj):
    """NaN and infinities become null, so that the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> None:
    from flowpp.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _pm(mean, se, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    if se is None or not math.isfinite(se):
        return _fmt(mean, digits)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def read_curve(metrics_csv: Path) -> list[dict]:
    """Rows of metrics.csv with a validation bpd: step, images_seen, wall_seconds, train_seconds, valid_bpd.

    ``train_seconds`` (training time, evaluations excluded) is interpolated over steps from the
    logged rows where an evaluation row lacks it.
    """
    if not metrics_csv.is_file():
        return []
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit()]

    def num(r, k):
        try:
            v = float(r.get(k) or "nan")
        except ValueError:
            v = float("nan")
        return v

    timed = sorted(
        {int(r["step"]): num(r, "train_seconds") for r in rows if math.isfinite(num(r, "train_seconds"))}.items()
    )
    steps_t = np.array([0.0] + [s for s, _ in timed])
    secs_t = np.array([0.0] + [t for _, t in timed])
    curve = {}  # by step: a run resumed after its last checkpoint evaluates that step again
    for r in rows:
        v = num(r, "valid_bpd")
        if not math.isfinite(v):
            continue
        step = int(r["step"])
        ts = num(r, "train_seconds")
        if not math.isfinite(ts):
            ts = float(np.interp(step, steps_t, secs_t))
        curve[step] = dict(
            step=step,
            images_seen=int(num(r, "images_seen")),
            wall_seconds=num(r, "wall_seconds"),
            train_seconds=ts,
            valid_bpd=v,
        )
    return [curve[s] for s in sorted(curve)]


# --- one run -------------------------------------------------------------------------------------


def _protocol(args, config: FlowConfig, data_description: str) -> dict:
    return dict(
        data=str(args.data),
        data_description=data_description,
        report_split=args.report_split,
        steps_per_run=args.steps_per_run,
        minutes_per_run=args.minutes_per_run,
        eval_samples=args.eval_samples,
        eval_images=args.eval_images,
        curve_images=args.curve_images,
        train_images=args.train_images,
        eval_seed=args.eval_seed,
        config=config.to_dict(),
    )


def _protocol_diff(old: dict, new: dict) -> list[str]:
    keys = [k for k in new if k not in ("data", "data_description")]
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]


def run_one(args, variant: str, config: FlowConfig, seed: int, data: dict, log: Callable[[str], None]) -> dict | None:
    """Train and evaluate one (variant, seed); returns its result, or None when stopped by a signal."""
    from flowpp.checkpoint import list_checkpoints
    from flowpp.data.batches import epoch_permutation
    from flowpp.distributed import resolve_device
    from flowpp.evaluate import evaluate_bpd
    from flowpp.runs import load_run
    from flowpp.training import TrainSettings, train

    run_dir = Path(args.out) / variant / f"seed{seed}"
    result_path = run_dir / RESULT_FILE
    protocol = _protocol(args, config, data["description"])
    if result_path.is_file():
        old = json.loads(result_path.read_text())
        diff = _protocol_diff(old.get("protocol", {}), protocol)
        if diff:
            raise SystemExit(
                f"{result_path} was made with other settings ({', '.join(diff)} differ); "
                f"choose another --out or remove that run"
            )
        log(f"[{variant} seed {seed}] done before, skipped ({result_path})")
        return old

    settings = TrainSettings(
        out_dir=str(run_dir),
        max_steps=args.steps_per_run,
        max_minutes=args.minutes_per_run,
        eval_every=args.eval_every_steps,
        eval_minutes=args.eval_every_minutes,
        checkpoint_minutes=args.checkpoint_minutes,
        keep_checkpoints=1,
        log_every=args.log_every,
        seed=seed,
        device=args.device,
        eval_images=args.curve_images,
        eval_batch_size=args.eval_batch_size,
        num_samples=args.num_samples,
        progress=args.progress,
        dataset=str(args.data),
        dataset_description=data["description"],
        extra=dict(ablation=variant, study=str(args.out)),
    )

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    finished = False
    if summary is not None and summary.get("stopped_by") == "budget":
        old_settings = json.loads((run_dir / "settings.json").read_text())
        finished = (
            old_settings.get("max_steps") == settings.max_steps
            and old_settings.get("max_minutes") == settings.max_minutes
        )
    if finished:
        log(f"[{variant} seed {seed}] training finished before; evaluating")
    else:
        resume = bool(list_checkpoints(run_dir / "checkpoints"))
        log(
            f"[{variant} seed {seed}] {'resuming' if resume else 'training'} {config.name} "
            f"({_count(config):,} parameters) in {run_dir}"
        )
        summary = train(
            config,
            settings,
            data["train"],
            data["curve"],
            num_levels=data["num_levels"],
            resume=resume,
            log=lambda m: log(f"[{variant} seed {seed}] {m}"),
        )
        if summary.get("stopped_by") == "signal":
            return None

    # Final evaluation of the EMA weights.
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    model, info = load_run(run_dir, device)
    if info.get("step") != summary["steps"]:
        raise RuntimeError(f"{run_dir}: newest checkpoint is at step {info.get('step')}, the run at {summary['steps']}")

    report_x = data["report"][: args.eval_images]
    report = evaluate_bpd(
        model, report_x, samples=args.eval_samples, batch_size=args.eval_batch_size, seed=args.eval_seed, per_image=True
    )
    n_train = data["train"].shape[0]
    # Training images this run has trained on: its first batches (epoch 0's order) come first.
    order = epoch_permutation(n_train, seed, 0)[: min(args.eval_images, n_train)]
    seen = min(1.0, summary["images_seen"] / max(1, len(order)))
    train_x = data["train"][order.sort().values]
    train_eval = evaluate_bpd(model, train_x, samples=1, batch_size=args.eval_batch_size, seed=args.eval_seed)
    gap = report["bpd"] - train_eval["bpd"]
    gap_se = math.sqrt(report["bpd_se"] ** 2 + train_eval["bpd_se"] ** 2)  # nan with one image
    result = dict(
        variant=variant,
        seed=seed,
        config_name=config.name,
        parameters=_count(config),
        filters=config.filters,
        dequant_filters=config.dequant_filters,
        steps=summary["steps"],
        images_seen=summary["images_seen"],
        train_seconds=summary["train_seconds"],
        epochs=summary["images_seen"] / n_train,
        n_train=n_train,
        checkpoint_step=info.get("step"),
        report_split=args.report_split,
        report=report,
        train_subset=train_eval,
        train_subset_seen_fraction=seen,
        gap=gap,
        gap_se=gap_se,
        eval_seconds=time.perf_counter() - t0,
        protocol=protocol,
    )
    _write_json(result_path, result)
    line = f"[{variant} seed {seed}] {args.report_split} bpd {_pm(report['bpd'], report['bpd_se'], 4)}"
    if "iw_bpd" in report:
        line += f", IW (S={args.eval_samples}) {_pm(report['iw_bpd'], report['iw_bpd_se'], 4)}"
    log(line + f"; train {_fmt(train_eval['bpd'], 4)}, gap {_fmt(gap, 4)}")
    return result


# --- aggregation, tables and plots ---------------------------------------------------------------


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _seed_stats(values: list[float], ses: list[float] | None = None) -> dict:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    out = dict(
        mean=float(v.mean()) if len(v) else float("nan"),
        seed_sd=float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        n=int(len(v)),
    )
    if ses is not None:
        s = np.array([_num(x) for x in ses], dtype=float)
        # Standard error (over evaluation images) of the mean over seeds.
        out["se"] = float(np.sqrt((s**2).sum()) / len(s)) if len(s) and np.isfinite(s).all() else float("nan")
    return out


def collect(out: Path) -> list[dict]:
    """The finished runs under ``out`` (variants in the paper's order, then seeds), with their curves."""
    results = []
    for path in out.glob(f"*/seed*/{RESULT_FILE}"):
        r = json.loads(path.read_text())
        r["curve"] = read_curve(path.parent / "metrics.csv")
        results.append(r)
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(results, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def paired_delta(results: list[dict], variant: str) -> dict | None:
    """``variant`` minus ``full`` on the same report images, seed by seed (IW bound when present).

    Per-image differences cancel most of the image-to-image spread, so this standard error is far
    smaller than the two unpaired ones; the mean over seeds gets sqrt(sum se^2) / n. That standard
    error covers the choice of images only; ``per_seed`` shows how much the difference moves
    between training seeds, often the larger uncertainty.
    """
    by_seed = {(r["variant"], r["seed"]): r for r in results}
    means, ses = [], []
    for (v, seed), r in by_seed.items():
        f = by_seed.get(("full", seed))
        if v != variant or f is None:
            continue
        key = (
            "per_image_iw_bpd"
            if "per_image_iw_bpd" in r["report"] and "per_image_iw_bpd" in f["report"]
            else "per_image_bpd"
        )
        a, b = r["report"].get(key), f["report"].get(key)
        if a is None or b is None or len(a) != len(b):
            continue
        d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
        means.append(float(d.mean()))
        ses.append(float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"))
    if not means:
        return None
    return dict(_seed_stats(means, ses), per_seed=means)


def aggregate(results: list[dict]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for r in results:  # already in order
        by_variant.setdefault(r["variant"], []).append(r)
    table = {}
    for variant, rs in by_variant.items():
        rep = [r["report"] for r in rs]
        row = dict(
            variant=variant,
            description=DESCRIPTIONS.get(variant, variant),
            seeds=[r["seed"] for r in rs],
            parameters=rs[0]["parameters"],
            filters=rs[0]["filters"],
            dequant_filters=rs[0]["dequant_filters"],
            steps=_seed_stats([r["steps"] for r in rs])["mean"],
            images_seen=_seed_stats([r["images_seen"] for r in rs])["mean"],
            epochs=_seed_stats([r["epochs"] for r in rs])["mean"],
            train_seconds=_seed_stats([r["train_seconds"] for r in rs])["mean"],
            report_split=rs[0]["report_split"],
            n_images=rep[0]["n_images"],
            samples=rep[0]["samples"],
            bpd=_seed_stats([x["bpd"] for x in rep], [x["bpd_se"] for x in rep]),
            iw_bpd=_seed_stats([x.get("iw_bpd") for x in rep], [x.get("iw_bpd_se") for x in rep])
            if all("iw_bpd" in x for x in rep)
            else None,
            train_bpd=_seed_stats([r["train_subset"]["bpd"] for r in rs], [r["train_subset"]["bpd_se"] for r in rs]),
            gap=_seed_stats([r["gap"] for r in rs], [r["gap_se"] for r in rs]),
            paper_cifar10_bpd=PAPER_TABLE2.get(variant),
        )
        table[variant] = row
    for row in table.values():
        row["delta_vs_full"] = paired_delta(results, row["variant"])
        p = PAPER_TABLE2.get(row["variant"])
        row["paper_delta_vs_full"] = (p - PAPER_TABLE2["full"]) if p is not None else None
    return table


def _delta(d: dict | None) -> str:
    if not d or not math.isfinite(d["mean"]):
        return "–"
    se = d.get("se")
    text = f"{d['mean']:+.3f}" + (f" ± {se:.3f}" if se is not None and math.isfinite(se) else "")
    if len(d.get("per_seed") or []) > 1:
        text += " (seeds " + ", ".join(f"{x:+.3f}" for x in d["per_seed"]) + ")"
    return text


def write_markdown(path: Path, table: dict, study: dict) -> None:
    any_row = next(iter(table.values()), None)
    split = any_row["report_split"] if any_row else study.get("report_split", "test")
    samples = any_row["samples"] if any_row else study.get("eval_samples")
    lines = ["# Flow++ ablations at small scale", ""]
    lines.append(
        f"Data: `{study.get('data')}` ({study.get('data_description', '')}); base config "
        f"`{study.get('config')}`; budget per run: "
        + ", ".join(
            x
            for x in (
                f"{study['minutes_per_run']} training minutes" if study.get("minutes_per_run") else "",
                f"{study['steps_per_run']} steps" if study.get("steps_per_run") else "",
            )
            if x
        )
        + f"; seeds {study.get('seeds')}."
    )
    lines.append("")
    lines.append(
        f"{split} bits/dim of the EMA weights on {any_row['n_images'] if any_row else '?'} {split} images: "
        f"single-sample bound and importance-weighted bound (S = {samples}); mean over seeds ± standard "
        f'error over images (of that mean); "seed sd" is the spread between seeds. "train" is the '
        f"single-sample bound on as many training images the run trained on; gap = {split} − train. "
        f"Δ full: IW bound minus the full model's on the same images and seeds, ± the paired standard "
        f"error of the per-image differences, then each seed's difference in brackets. "
        f"The paper's numbers are CIFAR-10 "
        f"test bits/dim (Table 2), for reference only."
    )
    lines.append("")
    head = [
        "variant",
        "params",
        "filters",
        "steps",
        "images seen",
        "epochs",
        f"{split} bpd",
        f"{split} IW bpd",
        "seed sd (IW)",
        "train bpd",
        "gap",
        "Δ full (paired)",
        "paper",
        "paper Δ",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
    for row in table.values():
        iw = row["iw_bpd"]
        filt = f"{row['filters']}" + (f"/{row['dequant_filters']}" if row["variant"] != "uniform-dequant" else "")
        cells = [
            row["variant"],
            f"{row['parameters']:,}",
            filt,
            f"{row['steps']:.0f}",
            f"{row['images_seen']:,.0f}",
            f"{row['epochs']:.2f}",
            _pm(row["bpd"]["mean"], row["bpd"]["se"]),
            _pm(iw["mean"], iw["se"]) if iw else "–",
            _fmt((iw or row["bpd"])["seed_sd"]),
            _pm(row["train_bpd"]["mean"], row["train_bpd"]["se"]),
            _pm(row["gap"]["mean"], row["gap"]["se"]),
            "reference" if row["variant"] == "full" else _delta(row["delta_vs_full"]),
            _fmt(row["paper_cifar10_bpd"]),
            (f"{row['paper_delta_vs_full']:+.3f}" if row["paper_delta_vs_full"] is not None else "–"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "filters: main flow / dequantizer. Seeds per variant: "
        + ", ".join(f"{v} {row['seeds']}" for v, row in table.items())
        + "."
    )
    plots = study.get("plots")
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots) + "."]
    path.write_text("\n".join(lines) + "\n")


_COLORS = {"full": "tab:blue", "uniform-dequant": "tab:red", "affine": "tab:green", "no-attention": "tab:orange"}


def make_plots(out: Path, results: list[dict], table: dict, log: Callable[[str], None]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'flowpp[plots]'): no plots")
        return []
    written = []
    for key, xlabel, fname, scale in (
        ("images_seen", "training images seen", "curves_images.png", 1.0),
        ("train_seconds", "training wall-clock (minutes, evaluations excluded)", "curves_time.png", 1 / 60),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labelled = set()
        for r in results:
            c = r.get("curve") or []
            if not c:
                continue
            v = r["variant"]
            ax.plot(
                [p[key] * scale for p in c],
                [p["valid_bpd"] for p in c],
                marker="o",
                ms=3,
                lw=1.2,
                color=_COLORS.get(v),
                alpha=0.85,
                label=None if v in labelled else DESCRIPTIONS.get(v, v),
            )
            labelled.add(v)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits/dim (EMA, single sample)")
        ax.set_title("Flow++ ablations: learning curves (one line per seed)")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)

    if table:
        names = list(table)
        xs = np.arange(len(names))
        split = next(iter(table.values()))["report_split"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        tr = [table[n]["train_bpd"]["mean"] for n in names]
        rp = [table[n]["bpd"]["mean"] for n in names]
        a1.bar(xs - 0.2, tr, 0.4, label="train (seen images)", color="0.6")
        a1.bar(xs + 0.2, rp, 0.4, label=split, color=[_COLORS.get(n, "tab:gray") for n in names])
        finite = [x for x in tr + rp if math.isfinite(x)]
        if finite:
            lo, hi = min(finite), max(finite)
            a1.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
        a1.set_xticks(xs, names, rotation=15)
        a1.set_ylabel("bits/dim (single sample)")
        a1.set_title(f"train vs {split}")
        a1.legend()
        gaps = [table[n]["gap"]["mean"] for n in names]
        errs = [table[n]["gap"].get("se", float("nan")) for n in names]
        a2.bar(
            xs,
            gaps,
            0.6,
            yerr=[e if math.isfinite(e) else 0 for e in errs],
            capsize=4,
            color=[_COLORS.get(n, "tab:gray") for n in names],
        )
        for r in results:
            if r["variant"] in names and r.get("gap") is not None:
                a2.plot(names.index(r["variant"]), r["gap"], "k.", ms=6)
        a2.axhline(0, color="k", lw=0.8)
        a2.set_xticks(xs, names, rotation=15)
        a2.set_ylabel(f"{split} − train bits/dim")
        a2.set_title("generalization gap (dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "gap.png", dpi=120)
        plt.close(fig)
        written.append("gap.png")
    return written


def report(out: Path, log: Callable[[str], None] = print) -> dict:
    """Rebuild results.json, results.md and the plots from the run directories in ``out``."""
    study_path = out / STUDY_FILE
    study = json.loads(study_path.read_text()) if study_path.is_file() else {}
    results = collect(out)
    if not results:
        raise SystemExit(f"no finished runs ({RESULT_FILE}) under {out}")
    table = aggregate(results)
    plots = make_plots(out, results, table, log)
    study = dict(study, plots=plots)
    runs = []
    for r in results:  # per-image values stay in the run directories
        r = {k: v for k, v in r.items() if k != "protocol"}
        r["report"] = {k: v for k, v in r["report"].items() if not k.startswith("per_image")}
        runs.append(r)
    _write_json(out / "results.json", dict(study=study, variants=table, runs=runs, paper_table2_cifar10=PAPER_TABLE2))
    write_markdown(out / "results.md", table, study)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f" and {', '.join(plots)}" if plots else ""))
    return table


# --- command line --------------------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("--data", help="DATASET, as for `flowpp train --data`: a name or a path to an .npz / PNG folder")
    p.add_argument("--data-dir", default=None, help="where named datasets live")
    p.add_argument("--no-download", action="store_true", help="never download named datasets")
    p.add_argument("--config", default="mnist", help="base config (the full model)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base config before the variants are made (repeatable)",
    )
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--minutes-per-run", type=float, default=None, help="training minutes per run (evaluation excluded)")
    p.add_argument("--steps-per-run", type=int, default=None, help="training steps per run")
    p.add_argument("--eval-every-minutes", type=float, default=None, help="learning-curve evaluation cadence")
    p.add_argument("--eval-every-steps", type=int, default=None, help="learning-curve evaluation cadence")
    p.add_argument("--curve-images", type=int, default=500, help="validation images per learning-curve point")
    p.add_argument(
        "--report-split",
        default="test",
        choices=["test", "valid"],
        help="split of the final evaluation (learning curves always use valid)",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=1000,
        help="images of the report split (and of the training set, for the gap) in the final evaluation",
    )
    p.add_argument("--eval-samples", type=int, default=64, help="S of the importance-weighted bound")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the final evaluation's dequantization noise")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="train on only the first N training images (more epochs in the same budget)",
    )
    p.add_argument("--num-samples", type=int, default=16, help="samples drawn at each learning-curve evaluation")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint cadence (for resuming)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--plot-only", action="store_true", help="only rebuild results and plots from --out")
    return p


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        report(out, log)
        return 0
    if not args.data:
        raise SystemExit("--data is required (except with --plot-only)")
    if args.minutes_per_run is None and args.steps_per_run is None:
        raise SystemExit("give the budget per run: --minutes-per-run and/or --steps-per-run")
    variants_wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants_wanted if v not in VARIANTS]
    if bad or not variants_wanted:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if args.eval_samples < 1 or args.eval_images < 1 or args.curve_images < 1:
        raise SystemExit("--eval-samples, --eval-images and --curve-images must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_every_minutes is None and args.eval_every_steps is None:  # about 6 points per curve
        if args.minutes_per_run:
            args.eval_every_minutes = args.minutes_per_run / 6
        else:
            args.eval_every_steps = max(1, args.steps_per_run // 6)

    from flowpp.data import load_dataset
    from flowpp.images import to_nchw

    base = apply_overrides(flowpp.get_config(args.config), args.overrides)
    all_variants = make_variants(base)
    variants = {v: all_variants[v] for v in VARIANTS if v in variants_wanted}
    log("parameter counts (widths searched in steps of heads; closest to the full model):")
    for row in variant_summary(all_variants):
        mark = "" if row["variant"] in variants else "  (not run)"
        log(
            f"  {row['variant']:<16} {row['parameters']:>12,}  filters {row['filters']:>4}  dequant_filters "
            f"{row['dequant_filters']:>4}  {row['relative']:+.2%}{mark}"
        )

    quiet = None
    kw = dict(data_dir=args.data_dir, download=not args.no_download, log=quiet)
    train_set = load_dataset(args.data, "train", **kw)
    curve_set = load_dataset(args.data, "valid", **kw)
    report_set = curve_set if args.report_split == "valid" else load_dataset(args.data, args.report_split, **kw)
    train_x = to_nchw(train_set.images[: args.train_images] if args.train_images else train_set.images)
    curve_x = to_nchw(curve_set.images[: args.curve_images])
    report_x = to_nchw(report_set.images[: args.eval_images])
    for x, what in ((train_x, "training"), (curve_x, "validation"), (report_x, args.report_split)):
        base.check_data(x.shape[1:], train_set.num_levels, what)
    description = f"train: {train_set.description}; valid: {curve_set.description}"
    if args.report_split != "valid":
        description += f"; {args.report_split}: {report_set.description}"
    log(
        f"data: {train_x.shape[0]:,} training, {curve_x.shape[0]:,} learning-curve, "
        f"{report_x.shape[0]:,} {args.report_split} images"
    )
    data = dict(train=train_x, curve=curve_x, report=report_x, num_levels=train_set.num_levels, description=description)

    out.mkdir(parents=True, exist_ok=True)
    study = dict(
        data=str(args.data),
        data_description=description,
        config=args.config,
        overrides=args.overrides,
        variants=list(variants),
        seeds=args.seeds,
        minutes_per_run=args.minutes_per_run,
        steps_per_run=args.steps_per_run,
        eval_samples=args.eval_samples,
        eval_images=args.eval_images,
        report_split=args.report_split,
        curve_images=args.curve_images,
        train_images=args.train_images,
        parameter_counts={r["variant"]: r["parameters"] for r in variant_summary(all_variants)},
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
    )
    _write_json(out / STUDY_FILE, study)

    t0 = time.monotonic()
    for seed in args.seeds:  # all variants of a seed first: an interrupted study still compares them
        for variant, config in variants.items():
            result = run_one(args, variant, config, seed, data, log)
            if result is None:
                log(f"stopped by a signal; run the same command again to resume ({time.monotonic() - t0:.0f} s)")
                if collect(out):
                    report(out, log)
                return 130
    log(f"study done in {(time.monotonic() - t0) / 60:.1f} minutes")
    report(out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
