#!/usr/bin/env python
"""flowpp's bits-back codec against the lossless codecs people use today, on the same held-out
images: the compression table of docs/compression.md.

    python benchmarks/bench_codecs.py --config digits --data digits --split test [--limit 1000]
    python benchmarks/bench_codecs.py --run RUN --data cifar10 --split test --limit 1000 --json out.json

Each image is compressed on its own (a file per image, as PNG users store them) with PNG (zlib
level 9), WebP lossless (level 100, method 6), JPEG 2000 (reversible 5/3 wavelet) and JPEG XL
(lossless, effort 9), all through `imagecodecs`; every image must decode to its exact pixels.
Bits/dim are 8 x the bytes of all files over the images' values (N x H x W x C); the same images
tiled into one mosaic image show each codec with its headers paid once. With ``--run``
(a run directory or an exported file) the model's single-sample bound on the same images is
reported too, and flowpp compresses the images into one archive with it (``flowpp.codec``):
its size in bits/dim with everything counted (header, seed, checksums, the lead images that
JPEG XL codes), its overhead over the bound (against the average bound, and for the bits-back
images against the bound at the very noise the coder used), the
start-up cost (archives of the first 1 and 10 images, and of all of them), and the time to
compress and decompress as a ratio to the model's log-likelihood on the same images (the
evaluator, S = 1, same threads; passes interleaved, log-likelihood, compress, decompress,
log-likelihood, ..., ``--repeats`` of each coder pass and one more of the log-likelihood, each
timed by its fastest pass; every pass must give the same archive), and the model's own
log_prob in the coder's batch sizes against its time in full batches: the floor the networks
alone set where the stack can only lend to small batches. Every archive must decode to the exact pixels.
Gray images go to WebP as three equal channels (it has no gray mode), which its colour
transforms make nearly free. Speeds are images per second on this machine, ``--threads``
threads (1 by default; the classical codecs always run on one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))


def _codecs():
    import imagecodecs as ic

    def gray_as_rgb(img):
        return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img

    def plane(img):  # PNG, JPEG 2000 and JPEG XL take (H, W) for one channel
        return img[:, :, 0] if img.shape[2] == 1 else img

    def webp_decode(data, channels):
        out = ic.webp_decode(data)
        if channels == 1:
            if not (out[:, :, :1] == out[:, :, 1:3]).all():
                raise ValueError("WebP changed a gray image's channels")
            return out[:, :, :1]
        return out[:, :, :channels]

    return {
        "PNG (level 9)": (lambda im: ic.png_encode(plane(im), level=9), lambda b, c: ic.png_decode(b)),
        "WebP lossless": (
            lambda im: ic.webp_encode(gray_as_rgb(im), level=100, lossless=True, method=6, numthreads=1),
            webp_decode,
        ),
        "JPEG 2000 lossless": (
            lambda im: ic.jpeg2k_encode(plane(im), reversible=True, numthreads=1),
            lambda b, c: ic.jpeg2k_decode(b, numthreads=1),
        ),
        "JPEG XL lossless": (
            lambda im: ic.jpegxl_encode(plane(im), lossless=True, effort=9, numthreads=1),
            lambda b, c: ic.jpegxl_decode(b, numthreads=1),
        ),
    }


def measure_codec(encode, decode, images: np.ndarray) -> dict:
    """Bits/dim and speeds of one codec over NHWC uint8 ``images``, each image a file of its own."""
    n, h, w, c = images.shape
    t0 = time.perf_counter()
    files = [bytes(encode(np.ascontiguousarray(im))) for im in images]
    t1 = time.perf_counter()
    decoded = [decode(f, c) for f in files]
    t2 = time.perf_counter()
    for i, (im, back) in enumerate(zip(images, decoded)):
        if not np.array_equal(np.asarray(back).reshape(h, w, c), im):
            raise SystemExit(f"image {i} does not decode to its pixels: the codec is not lossless here")
    total = sum(len(f) for f in files)
    mosaic = _mosaic(images)
    packed = bytes(encode(mosaic))
    if not np.array_equal(np.asarray(decode(packed, c)).reshape(mosaic.shape), mosaic):
        raise SystemExit("the mosaic does not decode to its pixels: the codec is not lossless here")
    return {"bits_per_dim": 8 * total / (n * h * w * c), "bytes": total,
            "encode_img_per_s": n / (t1 - t0), "decode_img_per_s": n / (t2 - t1),
            "mosaic_bits_per_dim": 8 * len(packed) / (n * h * w * c), "mosaic_bytes": len(packed)}  # fmt: skip


def _mosaic(images: np.ndarray) -> np.ndarray:
    """All images tiled in one (rows of ceil(sqrt(N)), the last row filled with zeros): the codec's
    headers paid once, as a bits-back archive pays its start-up cost once."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * cols, h, w, c), np.uint8)
    grid[:n] = images
    return np.ascontiguousarray(
        grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    )


def load_model(source: str):
    """A run directory's model (its best weights) or an exported file's, in eval mode."""
    import flowpp
    from flowpp.runs import load_run

    return flowpp.load(source) if Path(source).is_file() else load_run(source)[0]


def model_bound(model, images: np.ndarray, batch_size: int, seed: int) -> float:
    """The model's single-sample bound (S = 1) in bits/dim on ``images``."""
    import torch

    from flowpp.evaluate import evaluate_bpd

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).long()
    return float(evaluate_bpd(model, x, samples=1, batch_size=batch_size, seed=seed)["bpd"])


def _log_prob_in_batches(model, x, batches: list[int], batch_size: int, passes: int) -> float:
    """The model's log_prob on the bits-back images in the coder's batch sizes over its time in
    batches of ``batch_size`` (fastest of interleaved passes): the floor the networks alone set
    on the coder's time where the stack only lends to small batches."""
    import torch

    def run(sizes):
        def go():
            with torch.no_grad():
                start = 0
                for size in sizes:
                    model.log_prob(x[start : start + size], generator=torch.Generator().manual_seed(0))
                    start += size

        return _timed(go)[1]

    even = [min(batch_size, len(x) - i) for i in range(0, len(x), batch_size)]
    times = [(run(batches), run(even)) for _ in range(passes)]
    return min(t for t, _ in times) / min(t for _, t in times)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure_flowpp(
    model, images: np.ndarray, batch_size: int, seed: int, startup_sizes=(1, 10), repeats: int = 2
) -> dict:
    """One archive of all ``images`` (exact decoding checked), its rate against the model's bound,
    its speed against the model's log-likelihood (``repeats`` passes each), and the start-up cost
    of small archives."""
    import math

    import torch

    from flowpp.codec import compress, decompress, read_header
    from flowpp.evaluate import evaluate_bpd

    n = images.shape[0]
    dims = int(np.prod(images.shape[1:]))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).long()

    # Interleaved passes, each timing the fastest of its passes: the machine is shared, and a slow
    # moment should fall on both sides of a ratio. The log-likelihood gets one pass more.
    def loglik():
        return _timed(lambda: evaluate_bpd(model, x, samples=1, batch_size=batch_size, seed=seed, per_image=True))

    stats: dict = {}
    loglik_runs, compress_runs, decompress_runs = [loglik()], [], []
    for _ in range(repeats):
        compress_runs.append(_timed(lambda: compress(model, images, stats=stats)))
        decompress_runs.append(_timed(lambda: decompress(compress_runs[-1][0], model)))
        loglik_runs.append(loglik())
    likelihood = loglik_runs[0][0]
    per_image_bits = np.asarray(likelihood["per_image_bpd"], dtype=np.float64) * dims
    t_loglik, t_compress, t_decompress = (min(t for _, t in r) for r in (loglik_runs, compress_runs, decompress_runs))
    archive = compress_runs[0][0]
    if any(a != archive for a, _ in compress_runs):
        raise SystemExit("compressing the same images twice gave two different archives")
    if not all(np.array_equal(d.images, images) for d, _ in decompress_runs):
        raise SystemExit("the flowpp archive does not decode to the images' pixels")
    lead = stats["lead_images"]  # the first images, coded by JPEG XL into the bottom of the stack
    networks_floor = None
    if lead < n:
        networks_floor = _log_prob_in_batches(model, x[lead:], stats["batches"], batch_size, repeats + 1)
    coded = at_noise = None
    if lead < n:  # the bits-back images: their coded bits against the bound at the noise the coder drew
        with torch.no_grad():
            noise = stats["noise"].to(next(model.parameters()).dtype)
            coded_x = x[lead:]
            at_noise = sum(
                -model.log_prob(coded_x[i : i + batch_size], noise=noise[i : i + batch_size]).double().sum().item()
                for i in range(0, n - lead, batch_size)
            ) / (math.log(2) * (n - lead) * dims)
        coded = sum(stats["image_bits"]) / ((n - lead) * dims)
    header, words = read_header(archive)
    row = {
        "bits_per_dim": 8 * len(archive) / (n * dims),
        "bytes": len(archive),
        "bound_bpd": float(likelihood["bpd"]),
        "bound_at_coder_noise_bpd": at_noise,
        "coded_images_bpd": coded,
        "overhead_vs_bound_bpd": 8 * len(archive) / (n * dims) - float(likelihood["bpd"]),
        "coding_overhead_at_noise_bpd": None if coded is None else coded - at_noise,
        "lead_images": lead,
        "lead_bits": stats["lead_bits"],
        "lead_over_bound_bits": stats["lead_bits"] - float(per_image_bits[:lead].sum()),
        "seed_bits": stats["seed_bits"],
        "first_image_borrow_bits": stats["first_borrow_bits"],
        "header_and_digest_bytes": len(archive) - 4 * len(words),
        "batches": len(stats["batches"]),
        "loglik_s": t_loglik,
        "compress_s": t_compress,
        "decompress_s": t_decompress,
        "compress_vs_loglik": t_compress / t_loglik,
        "decompress_vs_loglik": t_decompress / t_loglik,
        "encode_img_per_s": n / t_compress,
        "decode_img_per_s": n / t_decompress,
        "check_bytes_per_image": header["coder"]["check_bytes"],
        "log_prob_in_coder_batches_vs_batch": networks_floor,
    }
    startup = {}
    for size in [s for s in startup_sizes if s < n] + [n]:
        small = archive if size == n else compress(model, images[:size])
        if size != n and not np.array_equal(decompress(small, model).images, images[:size]):
            raise SystemExit(f"the archive of {size} images does not decode to their pixels")
        extra = 8 * len(small) - float(per_image_bits[:size].sum())
        startup[str(size)] = {"bytes": len(small), "bits_per_dim": 8 * len(small) / (size * dims),
                              "over_bound_bits": extra, "over_bound_bpd": extra / (size * dims)}  # fmt: skip
    row["archives"] = startup
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset name or file, as for flowpp eval")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=1000, help="the first N images of the split")
    p.add_argument(
        "--config", default=None, help="the config whose levels and shape the data takes (default: the run's)"
    )
    p.add_argument("--run", default=None, help="a run directory or exported model: report its bound on the same images")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model (flowpp and its bound)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes of compress and decompress (fastest counts)")
    p.add_argument("--no-flowpp", dest="flowpp", action="store_false", help="with --run: the bound only, no archive")
    args = p.parse_args(argv)

    import torch

    import flowpp
    from flowpp.data.for_config import load_images

    torch.set_num_threads(args.threads)
    model = load_model(args.run) if args.run else None
    if args.config:
        config = flowpp.get_config(args.config)
    elif model is not None:
        config = model.config
    else:
        raise SystemExit("bench_codecs.py: give --config or --run (the data's levels and shape come from it)")
    images = np.asarray(load_images(args.data, args.split, config, data_dir=args.data_dir, log=lambda *_: None).images)
    images = images[: args.limit]
    n, h, w, c = images.shape
    print(f"{n} images {h}x{w}x{c} of {args.data} ({args.split}), {config.num_levels} levels")
    table = {name: measure_codec(enc, dec, images) for name, (enc, dec) in _codecs().items()}
    for name, row in table.items():
        each, mosaic = row["bits_per_dim"], row["mosaic_bits_per_dim"]
        speeds = f"encode {row['encode_img_per_s']:8.0f} img/s, decode {row['decode_img_per_s']:8.0f} img/s"
        print(f"{name:20s} {each:7.3f} bits/dim a file each, {mosaic:7.3f} as one mosaic; {speeds}")
    best = min(table, key=lambda k: min(table[k]["bits_per_dim"], table[k]["mosaic_bits_per_dim"]))
    result = {"data": args.data, "split": args.split, "n_images": n, "image_shape": [h, w, c],
              "num_levels": config.num_levels, "codecs": table, "best_classical": best}  # fmt: skip
    if args.run:
        result["model"] = args.run
        result["model_bound_bpd"] = model_bound(model, images, args.batch_size, args.seed)
        bound = result["model_bound_bpd"]
        print(f"{'Flow++ bound (S = 1)':20s} {bound:7.3f} bits/dim (what a bits-back codec on it can approach)")
        if args.flowpp:
            row = result["flowpp"] = measure_flowpp(model, images, args.batch_size, args.seed, repeats=args.repeats)
            overheads = f"{row['overhead_vs_bound_bpd']:+.4f} over the bound"
            if row["coding_overhead_at_noise_bpd"] is not None:
                overheads += f"; coding {row['coding_overhead_at_noise_bpd']:+.4f} at the coder's noise"
            speeds = f"encode {row['encode_img_per_s']:.1f} img/s, decode {row['decode_img_per_s']:.1f} img/s"
            print(f"{'flowpp archive':20s} {row['bits_per_dim']:7.3f} bits/dim, all counted ({overheads}); {speeds}")
            ratios = f"compress {row['compress_vs_loglik']:.2f}x, decompress {row['decompress_vs_loglik']:.2f}x"
            print(f"{'':20s} {ratios} the log-likelihood's {row['loglik_s']:.2f} s")
            floor = row["log_prob_in_coder_batches_vs_batch"]
            if floor is not None:
                print(f"{'':20s} the model's log_prob in the coder's {row['batches']} batches takes "
                      f"{floor:.2f}x its time in batches of {args.batch_size}")  # fmt: skip
            borrow = row["first_image_borrow_bits"]
            print(f"{'':20s} seed {row['seed_bits']} bits, of which a lead of {row['lead_images']} images in "
                  f"{row['lead_bits']} bits ({row['lead_over_bound_bits']:+.0f} over their bound); the first "
                  f"bits-back image borrows {0 if borrow is None else borrow:.0f}")  # fmt: skip
            for size, a in row["archives"].items():
                images = f"{size:>5} image" + ("" if int(size) == 1 else "s")
                print(f"{'':20s} archive of {images}: {a['bytes']:8d} bytes, {a['bits_per_dim']:.3f} bits/dim, "
                      f"{a['over_bound_bits']:.0f} bits over the bound")  # fmt: skip
    print(f"best classical codec: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
