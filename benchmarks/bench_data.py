#!/usr/bin/env python
"""The training data path alone, in images/s: batches gathered from a prepared (memory-mapped)
dataset in the training order, turned into (B, C, H, W) tensors, with and without the
dequantization noise of each step. No model runs.

    python benchmarks/bench_data.py [--data ../shared/data/cifar10_train10k.npz] [--threads 1] \
        [--batch-size 64] [--seconds 5] [--json out.json]

The data set is prepared (``flowpp prepare``) into a temporary data directory first, then
read back from the page cache, as every start after the first does. Also compares the layout
flowpp stores (NHWC: one contiguous run per image, permuted per batch) with NCHW storage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import flowpp
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import flowpp

from flowpp.data.batches import batch_iterator, step_noise  # noqa: E402
from flowpp.data.prepared import load_prepared  # noqa: E402 (after the path fix above)
from flowpp.images import gather  # noqa: E402

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10_train10k.npz"


def rate(make_batch, batch_size: int, seconds: float) -> float:
    """Images per second of ``make_batch(step)``, timed over about ``seconds`` after a warm-up."""
    for step in range(20):
        make_batch(step)
    done, step, t0 = 0, 20, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        make_batch(step)
        done, step = done + batch_size, step + 1
    return done / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a named dataset or an .npz file")
    p.add_argument("--data-dir", default=None, help="where to prepare it (default: a temporary folder)")
    p.add_argument("--config", default="cifar10", help="the config whose noise the full path draws")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        t0 = time.perf_counter()
        train = load_prepared(args.data, "train", data_dir, log=None).images
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = load_prepared(args.data, "train", data_dir, log=None).images  # checked, not rebuilt
        again = time.perf_counter() - t0
        n, bs = len(train), args.batch_size
        np.asarray(train).sum()  # into the page cache, as after the first epoch
        order = batch_iterator(n, bs, 0, 0, 0)
        batches = [next(order)[2] for _ in range(max(1, n // bs))]
        model = flowpp.FlowPlusPlus(flowpp.get_config(args.config).replace(filters=4, blocks=1, components=2))
        config = model.config.replace(batch_size=bs)
        nchw = np.ascontiguousarray(np.asarray(train).transpose(0, 3, 1, 2))

        def nhwc_gather(step):
            return gather(train, batches[step % len(batches)])

        def nchw_gather(step):
            return torch.from_numpy(nchw[batches[step % len(batches)].numpy()])

        def with_noise(step):
            return nhwc_gather(step), step_noise(model, config, 0, step)

        result = {
            "data": str(args.data),
            "images": n,
            "image_shape": list(train.shape[1:]),
            "batch_size": bs,
            "threads": args.threads,
            "prepare_seconds_first": round(first, 2),
            "prepare_seconds_check": round(again, 3),
            "img_per_s_gather_nhwc": round(rate(nhwc_gather, bs, args.seconds)),
            "img_per_s_gather_nchw_storage": round(rate(nchw_gather, bs, args.seconds)),
            "img_per_s_gather_and_noise": round(rate(with_noise, bs, args.seconds)),
            "torch": torch.__version__,
        }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
