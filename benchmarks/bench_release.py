"""What a user of the authors' trained models can expect: the time of `flowpp import` of a
full-size release file, and the full-size models' log-likelihood throughput (so the time of
`flowpp eval` on a test set).

The release files are not reachable from here, so a full-size model with random weights is
written in the release format first; import and evaluation cost the same for any weights.

    python benchmarks/bench_release.py --models cifar10 --images 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import flowpp
from flowpp.export import import_release_file
from flowpp.release import write_release


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar10", "imagenet32", "imagenet64"])
    p.add_argument("--batch", type=int, default=16, help="images per log-likelihood pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per model (after one warm-up)")
    p.add_argument("--images", type=int, default=10000, help="test-set size to compute the eval time for")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        config = flowpp.get_config(name)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            source, _ = write_release(flowpp.FlowPlusPlus(config), Path(tmp) / f"flowpp_{name}_model.npz")
            size = source.stat().st_size / 1e6
            start = time.perf_counter()
            _, _, _, model = import_release_file(source, config, Path(tmp) / f"{name}.safetensors")
            imported = time.perf_counter() - start
        print(f"{name}: import of a {size:.0f} MB release file (read, check, write safetensors + card): "
              f"{imported:.1f} s")  # fmt: skip
        x = torch.randint(0, config.num_levels, (args.batch, *config.image_shape))
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model.log_prob(x[:1])
            flops = counter.get_total_flops()
            model.log_prob(x)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.log_prob(x)
                times.append(time.perf_counter() - start)
        per_image = min(times) / args.batch
        per_set = args.images * per_image
        print(f"{name}: {flops / 1e9:.1f} GFLOP per image (conv/matmul/attention); log-likelihood "
              f"{1 / per_image:.2f} img/s (best of {args.repeats} batches of {args.batch}; all "
              f"{[round(t, 2) for t in times]} s) -> {args.images} images at S=1 take {per_set / 60:.1f} min, "
              f"at S=4096 {4096 * per_set / 86400:.0f} days; at 100 TFLOP/s sustained (an estimate for one "
              f"GPU): {args.images * flops / 100e12:.1f} s at S=1")  # fmt: skip


if __name__ == "__main__":
    main()
