"""Smoke tests of the benchmark scripts (tiny config, CPU, one timed run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _assert_a_whole_cpu_bench(doc, batch_size):
    """What one run of bench.py on the tiny config (all measurements, one thread) must hold."""
    meta, m = doc["meta"], doc["metrics"]
    for key in (
        "config",
        "batch_size",
        "dtype",
        "device",
        "device_name",
        "cpu_model",
        "threads",
        "torch_version",
        "data_source",
        "commit",
    ):
        assert key in meta, key
    assert meta["config"] == "tiny" and meta["batch_size"] == batch_size and meta["threads"] == 1

    for key in ("train_img_per_s", "logprob_img_per_s"):
        assert m[key]["value"] > 0 and m[key]["unit"] == "img/s"
        assert m[key]["min"] <= m[key]["value"] <= m[key]["max"]
    assert m["sample_seconds_per_image"]["value"] > 0
    assert m["sample_to_forward_ratio"]["value"] > 0
    assert m["sample_in_range"]["value"] is True

    assert m["inverse_max_abs_err_float32"]["value"] < 1e-2  # pixels
    assert m["inverse_max_abs_err_float64"]["value"] < 1e-8
    for tag, tol in (("float32", 1e-3), ("float64", 1e-10)):
        for T in ("0.5", "1.0"):
            assert m[f"latent_roundtrip_rel_err_{tag}_T{T}"]["value"] < tol
            assert m[f"latent_roundtrip_nonfinite_{tag}_T{T}"]["value"] == 0

    assert m["train_peak_rss_bytes"]["value"] > 10 * 2**20  # from the child process
    assert m["train_flops_per_step"]["value"] > 0
    assert m["train_achieved_flops_per_s"]["value"] > 0
    assert m["matmul_float32_flops_per_s"]["value"] > 0
    assert 0 < m["train_fraction_of_matmul_float32"]["value"] < 10
    assert 0 < m["logprob_bpd"]["value"] < 100


def test_bench_only_and_cpu_bf16_is_ignored(tmp_path):
    out = tmp_path / "s.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--config",
        "tiny",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--only",
        "logprob",
        "--bf16",
        "--quiet",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["meta"]["bf16"] is False and doc["meta"]["bf16_requested"] is True
    assert any("CUDA-only" in n for n in doc["notes"])
    assert "logprob_img_per_s" in doc["metrics"] and "train_img_per_s" not in doc["metrics"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_quick_cpu_runs_every_step_and_a_whole_bench(tmp_path):
    out = tmp_path / "out"
    env = _env()
    env["OUT"] = str(out)
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(GPU_CHECK), "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = {p.stem for p in out.glob("*.json")}
    assert {"cifar10_b64_fp32", "sample8_fp32", "imagenet64_b8_fp32"} <= names
    # on a CPU the bfloat16 steps would repeat the float32 ones (bench.py ignores --bf16 there)
    assert not any(n.endswith("_bf16") for n in names)
    assert "skipped: cifar10_b64_bf16 sample8_bf16 imagenet64_b8_bf16" in proc.stdout
    assert (out / "summary.txt").read_text().strip()
    # its first step is the whole bench.py on the tiny config (one thread, every measurement)
    assert "train_img_per_s" in (out / "cifar10_b64_fp32.log").read_text()  # the table
    _assert_a_whole_cpu_bench(json.loads((out / "cifar10_b64_fp32.json").read_text()), batch_size=4)


def test_flop_count_includes_cpu_attention():
    """The CPU flash-attention kernel is counted (FlopCounterMode alone counts it as zero)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCH.parent))
    bench.register_cpu_attention_flops()
    b, h, n, m, d = 2, 3, 16, 24, 8
    q = torch.randn(b, h, n, d, requires_grad=True)
    k, v = torch.randn(b, h, m, d, requires_grad=True), torch.randn(b, h, m, d, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 4 * b * h * n * m * d
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert fc.get_total_flops() == 10 * b * h * n * m * d  # five matmuls: scores recomputed, dV, dP, dQ, dK


def test_bench_data_measures_the_data_path(tmp_path):
    import numpy as np

    npz = tmp_path / "set.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))  # fmt: skip
    out = tmp_path / "data.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--data", str(npz), "--seconds", "0.2",
           "--batch-size", "16", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=_env(), capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    assert result["images"] == 270 and result["image_shape"] == [32, 32, 3]
    for key in ("img_per_s_gather_nhwc", "img_per_s_gather_nchw_storage", "img_per_s_gather_and_noise"):
        assert result[key] > 0


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_photo_patches_stay_inside_their_columns():
    import numpy as np

    patches = _load_script("make_photo_patches")
    # Red = column index: a box average of columns in [start, stop) stays in that range.
    photo = np.zeros((200, 256, 3), np.uint8)
    photo[..., 0] = np.arange(256, dtype=np.uint8)
    rng = np.random.default_rng(0)
    train = patches.cut_patches(photo, 64, (0, 192), rng)
    test = patches.cut_patches(photo, 64, (192, 256), rng)
    assert train.shape == test.shape == (64, 32, 32, 3) and train.dtype == np.uint8
    assert train[..., 0].max() < 192 <= test[..., 0].min()
    # Both orientations occur (red rises or falls along a row) and several scales (spread of red).
    rising = train[:, 0, -1, 0] > train[:, 0, 0, 0]
    assert rising.any() and (~rising).any()
    assert len({abs(int(p[0, -1, 0]) - int(p[0, 0, 0])) for p in train}) > 2


def test_plot_curves_reads_its_own_tables_back(tmp_path):
    plot = _load_script("plot_curves")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,images_seen,train_bpd,valid_bpd,wall_seconds,train_seconds\n"
        "10,320,5.0,,6,6\n20,640,4.0,3.5,12,11\n40,1280,3.0,2.25,30,27\n"
    )
    first = tmp_path / "first.png"
    assert plot.main([str(run), "--out", str(first), "--labels", "before"]) == 0
    assert plot.read_table(first.with_suffix(".md")) == {
        "before": [
            dict(step=20, images=640, minutes=0.2, valid_bpd=3.5),
            dict(step=40, images=1280, minutes=0.5, valid_bpd=2.25),
        ]
    }
    both = tmp_path / "both.png"
    assert plot.main([str(first.with_suffix(".md")), str(run), "--out", str(both), "--labels", "after"]) == 0
    assert set(plot.read_table(both.with_suffix(".md"))) == {"before", "after"} and both.stat().st_size > 0


@pytest.mark.processes
def test_bench_contention_tiny(tmp_path):
    # The digits data is built in; one setting (the torchrun one, whose command is the one that
    # can go wrong), idle and next to one busy loop: each run is a whole `flowpp train`.
    out = tmp_path / "contention.json"
    only = "2 processes x 1 thread (DDP, gloo)"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_contention.py"), "--config", "digits", "--data", "digits",
           "--steps", "12", "--batch-size", "8", "--only", only, "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["batch_size"] == 8 and doc["busy_processes"] == 1
    assert set(doc["settings"]) == set(only.split("|"))
    for row in doc["settings"].values():
        assert row["idle_img_per_s"] > 0 and row["busy_img_per_s"] > 0
        idle, busy = row["idle_img_per_s"], row["busy_img_per_s"]  # rounded to 0.1; the ratio to 0.001
        rounding = busy / idle * (0.05 / idle + 0.05 / busy) + 5e-4
        assert row["busy_over_idle"] == pytest.approx(busy / idle, abs=rounding)
    assert proc.stdout.count("2 process(es)") == 2


def test_bench_codecs_measures_every_classical_codec_and_the_models_bound(tmp_path):
    import numpy as np

    from flowpp.cli import main as flowpp_main

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_codecs

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(0, 3, (46, 8, 8, 3)), axis=2).clip(0, 255).astype(np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=smooth[:16], x_valid=smooth[16:22], x_test=smooth[22:])
    run_dir = tmp_path / "run"
    train = ["train", "--config", "tiny", "--data", data, "--out", run_dir, "--max-steps", 2, "--no-progress",
             "--eval-images", 6, "--threads", 1]  # fmt: skip
    assert flowpp_main([str(a) for a in train]) == 0
    out = tmp_path / "codecs.json"
    result = bench_codecs.main(["--run", str(run_dir), "--data", str(data), "--split", "test", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["n_images"] == 24 and result["image_shape"] == [8, 8, 3]
    codecs = result["codecs"]
    assert set(codecs) == {"PNG (level 9)", "WebP lossless", "JPEG 2000 lossless", "JPEG XL lossless"}
    for row in codecs.values():  # every image decoded to its pixels, or main would have stopped
        assert 0 < row["mosaic_bits_per_dim"] < row["bits_per_dim"]  # headers paid once
        assert row["bits_per_dim"] == pytest.approx(8 * row["bytes"] / (24 * 8 * 8 * 3))
        assert row["encode_img_per_s"] > 0 and row["decode_img_per_s"] > 0
    best = min(min(r["bits_per_dim"], r["mosaic_bits_per_dim"]) for r in codecs.values())
    assert min(codecs[result["best_classical"]][k] for k in ("bits_per_dim", "mosaic_bits_per_dim")) == best
    assert 0 < result["model_bound_bpd"] < 20
    row = result["flowpp"]  # the archive decoded to the images' pixels, or main would have stopped
    assert row["bits_per_dim"] == pytest.approx(8 * row["bytes"] / (24 * 8 * 8 * 3))
    assert row["bits_per_dim"] > row["coded_images_bpd"] > 0 and row["seed_bits"] >= row["first_image_borrow_bits"]
    assert 0 < row["lead_images"] < 24 and row["lead_bits"] > 0  # a lead, then bits-back images
    assert set(row["archives"]) == {"1", "10", "24"} and row["archives"]["24"]["bytes"] == row["bytes"]
    assert row["compress_vs_loglik"] > 0 and row["decompress_vs_loglik"] > 0
    assert row["log_prob_in_coder_batches_vs_batch"] > 0  # the networks' floor at the coder's batch sizes


def test_bench_codecs_refuses_a_codec_that_does_not_give_the_pixels_back():
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_codecs

    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    with pytest.raises(SystemExit, match="not lossless"):
        bench_codecs.measure_codec(lambda im: im.tobytes(), lambda b, c: np.zeros((4, 4, c), np.uint8), images)
