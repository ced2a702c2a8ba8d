#!/usr/bin/env python
"""Training speed of a small preset alone and next to busy processes, for each way a user can
spread it over the CPU cores.

    python benchmarks/bench_contention.py [--config mnist] [--data ../shared/data/mnist.npz] \
        [--steps 60] [--batch-size B] [--busy 1] [--only "NAME|NAME"] [--json out.json]

For every setting (2 threads, PyTorch's default; 1 thread; 2 threads with a passive OpenMP wait
policy; 2, 3 or 4 single-threaded DDP processes on gloo under torchrun; ``--threads auto``, flowpp's
default; ``--procs auto``, the processes flowpp starts itself), run ``flowpp train`` for ``--steps`` steps
with the machine otherwise idle, then again next to ``--busy`` single-threaded busy loops;
images/s are the mean of metrics.csv's ``img_per_s`` after the first 10 steps. The idle and busy
runs of a setting are taken back to back, so slow drifts of a shared machine fall on both.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "mnist.npz"

# name -> (extra environment, processes under torchrun (1: none), --threads value or "procs auto")
SETTINGS = {
    "2 threads (PyTorch's default)": ({}, 1, 2),
    "1 thread": ({}, 1, 1),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1, 2),
    "2 processes x 1 thread (DDP, gloo)": ({}, 2, 1),
    "3 processes x 1 thread (DDP, gloo)": ({}, 3, 1),
    "4 processes x 1 thread (DDP, gloo)": ({}, 4, 1),
    "--threads auto (flowpp's default)": ({}, 1, "auto"),
    "--procs auto (one process more than cores, started by flowpp)": ({}, 1, "procs auto"),
}


def run(config: str, data: str, steps: int, batch: int | None, env_extra: dict, procs: int,
        threads: int | str | None, out: Path) -> float:  # fmt: skip
    args = ["train", "--config", config, "--data", data, "--out", str(out), "--max-steps", str(steps),
            "--log-every", "5", "--eval-images", "16", "--checkpoint-minutes", "0", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    if threads == "procs auto":
        args += ["--procs", "auto"]
    elif threads:
        args += ["--threads", str(threads)]
    if batch:
        args += ["--batch-size", str(batch)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    if procs > 1:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "flowpp",
        ]
    else:
        cmd = [sys.executable, "-m", "flowpp"]
    proc = subprocess.run(cmd + args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd + args} failed:\n{proc.stderr[-3000:]}")
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["img_per_s"] and int(r["step"]) > 10]
    summary = json.loads((out / "summary.json").read_text())
    print(f"  {out.name}: {summary['world_size']} process(es), threads per row {[r.get('threads') for r in rows]}, "
          f"switches {summary.get('thread_switches')}", flush=True)  # fmt: skip
    return sum(float(r["img_per_s"]) for r in rows) / len(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mnist")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--busy", type=int, default=1, help="single-threaded busy loops beside the busy runs")
    p.add_argument("--only", default=None, help="setting names separated by | (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = args.only.split("|") if args.only else list(SETTINGS)
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            env_extra, procs, threads = SETTINGS[name]
            idle = run(
                args.config, args.data, args.steps, args.batch_size, env_extra, procs, threads, Path(tmp) / f"{i}-idle"
            )
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(0.5)
                busy = run(
                    args.config,
                    args.data,
                    args.steps,
                    args.batch_size,
                    env_extra,
                    procs,
                    threads,
                    Path(tmp) / f"{i}-busy",
                )
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            table[name] = {"idle_img_per_s": round(idle, 1), "busy_img_per_s": round(busy, 1),
                           "busy_over_idle": round(busy / idle, 3)}  # fmt: skip
            print(f"{name:40s} idle {idle:7.1f}  busy {busy:7.1f}  ratio {busy / idle:.3f}", flush=True)
    result = {
        "config": args.config,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "busy_processes": args.busy,
        "settings": table,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
