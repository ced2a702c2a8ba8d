#!/usr/bin/env python
"""Memory and start-up time of multi-process training on a large prepared dataset.

    python benchmarks/bench_scale.py --images 200000 --work /tmp/scale [--nproc 2] [--json out.json]

Writes a synthetic ImageNet 64x64 in the Chrabaszcz et al. (2017) npz layout (ten
``train_data_batch_*.npz`` files and ``val_data.npz``; random pixels) under ``--work``, then
starts ``torchrun --nproc_per_node NPROC -m flowpp train`` twice on it with a small model of
ImageNet 64x64 shape: the first start prepares the data set (one process decodes, the others
wait), the second uses the preparation. For each start it reports every process's peak
resident memory (VmHWM, which counts the memory-mapped pages a process touched) and the time
from launch to the first metrics row (step 1 done).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SMALL_MODEL = ["filters=8", "blocks=1", "components=2", "heads=1", "dequant_filters=8", "dequant_blocks=1",
               "dequant_components=2", "init_batch_size=8"]  # fmt: skip


def make_imagenet64(root: Path, images: int, test_images: int = 2000) -> None:
    """Random uint8 images in the Chrabaszcz et al. layout: (n, 3*64*64) CHW-flat rows under 'data'."""
    rng = np.random.default_rng(0)
    train_dir, val_dir = root / "Imagenet64_train_npz", root / "Imagenet64_val_npz"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    per_file = -(-images // 10)
    for i in range(10):
        n = min(per_file, images - i * per_file)
        data = rng.integers(0, 256, (n, 3 * 64 * 64), dtype=np.uint8)
        np.savez(train_dir / f"train_data_batch_{i + 1}.npz", data=data, labels=np.ones(n, np.int64))
    data = rng.integers(0, 256, (test_images, 3 * 64 * 64), dtype=np.uint8)
    np.savez(val_dir / "val_data.npz", data=data, labels=np.ones(test_images, np.int64))


def _descendants(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return out


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start(data_dir: Path, out: Path, nproc: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "flowpp", "train", "--config", "imagenet64", "--data", "imagenet64", "--data-dir", str(data_dir),
           "--out", str(out), "--max-steps", str(steps), "--batch-size", str(2 * nproc), "--eval-images", "16",
           "--log-every", "1", "--no-progress", "--device", "cpu", "--threads", "1"]  # fmt: skip
    for change in SMALL_MODEL:
        cmd += ["--set", change]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    first_step = None
    metrics = out / "metrics.csv"
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            rss = _peak_rss_mb(pid)
            if rss is not None and Path(f"/proc/{pid}/cmdline").read_bytes().count(b"flowpp"):
                peaks[pid] = max(peaks.get(pid, 0.0), rss)
        if first_step is None and metrics.is_file() and len(metrics.read_text().splitlines()) > 1:
            first_step = time.monotonic() - t0
        time.sleep(0.05)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{log[-3000:]}")
    workers = sorted(v for v in peaks.values())[-nproc:]  # the training processes (not torchrun itself)
    return {
        "seconds_to_first_step": round(first_step, 2) if first_step else None,
        "seconds_total": round(time.monotonic() - t0, 1),
        "peak_rss_mb_per_process": [round(v, 1) for v in workers],
        "prepared_here": "prepared imagenet64" in log,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200_000, help="training images of the synthetic set")
    p.add_argument("--work", required=True, help="a folder for the data set and the runs (several GB)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the data set and its preparation")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    work = Path(args.work) / f"imagenet64-{args.images}"
    data_dir = work / "data"
    if not (data_dir / "imagenet64" / "Imagenet64_val_npz" / "val_data.npz").is_file():
        t0 = time.monotonic()
        make_imagenet64(data_dir / "imagenet64", args.images)
        print(f"wrote {args.images:,} synthetic images in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    shutil.rmtree(data_dir / "prepared", ignore_errors=True)
    result = {"images": args.images, "processes": args.nproc}
    for name in ("first_start", "second_start"):
        out = work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)
        result[name] = start(data_dir, out, args.nproc, args.steps)
        print(name, json.dumps(result[name]), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
