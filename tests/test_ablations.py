"""benchmarks/ablations.py: the ablation variants and a miniature end-to-end study."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flowpp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("flowpp_bench_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _strip(config):
    return config.replace(name="-", notes="")


def test_cifar10_variants_reproduce_the_official_ablation_widths(ablations):
    base = flowpp.get_config("cifar10")
    v = ablations.make_variants(base)
    assert list(v) == ["full", "uniform-dequant", "affine", "no-attention"]
    assert v["full"] is base
    # The paper's ablation models, as registered from the official code.
    for name, official in (
        ("uniform-dequant", "cifar10-uniform-dequant"),
        ("affine", "cifar10-affine"),
        ("no-attention", "cifar10-no-attention"),
    ):
        assert _strip(v[name]) == _strip(flowpp.get_config(official)), name
    counts = {r["variant"]: r["parameters"] for r in ablations.variant_summary(v)}
    assert counts == {
        "full": 31_443_440,
        "uniform-dequant": 32_324_408,
        "affine": 32_045_708,
        "no-attention": 31_443_440,
    }
    assert (v["uniform-dequant"].filters, v["uniform-dequant"].dequant_filters) == (104, 96)
    assert (v["affine"].filters, v["affine"].dequant_filters) == (108, 108)


@pytest.mark.parametrize("name", ["mnist", "cifar10-small", "tiny"])
def test_small_preset_variants_are_the_closest_in_parameters(ablations, name):
    base = flowpp.get_config(name)
    count = ablations._count
    target = count(base)
    v = ablations.make_variants(base)
    assert v["uniform-dequant"].dequantizer == "uniform" and v["uniform-dequant"].coupling == base.coupling
    assert v["affine"].coupling == "affine" and v["affine"].dequantizer == base.dequantizer
    assert "attention" not in (
        v["no-attention"].mixer,
        v["no-attention"].dequant_mixer,
        v["no-attention"].context_mixer,
    )
    assert count(v["no-attention"]) == target  # same-size replacement, nothing widened
    for key, widened in (("uniform-dequant", ("filters",)), ("affine", ("filters", "dequant_filters"))):
        cfg = v[key]
        delta = cfg.filters - base.filters
        assert delta % base.heads == 0 and all(getattr(cfg, f) % base.heads == 0 for f in widened)
        assert all(getattr(cfg, f) - getattr(base, f) == delta for f in widened)
        # How close the count can get depends on the preset (widths move in steps of `heads`), so the
        # rule itself is checked: no neighbouring width is closer.
        err = abs(count(cfg) - target)
        for d in (delta - base.heads, delta + base.heads):  # no neighbouring width is closer
            other = cfg.replace(**{f: getattr(base, f) + d for f in widened})
            assert abs(count(other) - target) >= err


def test_read_curve_interpolates_training_time(ablations, tmp_path):
    from flowpp.runs import METRIC_FIELDS

    rows = [
        dict(step=10, images_seen=80, train_bpd=5.0, train_seconds=2.0, wall_seconds=2.5),
        dict(step=15, images_seen=120, valid_bpd=4.5, wall_seconds=4.0),
        dict(step=20, images_seen=160, train_bpd=4.0, train_seconds=4.0, wall_seconds=5.0),
        dict(step=20, images_seen=160, valid_bpd=4.2, train_seconds=4.0, wall_seconds=6.0),
    ]
    lines = [",".join(METRIC_FIELDS)] + [",".join(str(r.get(k, "")) for k in METRIC_FIELDS) for r in rows]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    curve = ablations.read_curve(tmp_path / "metrics.csv")
    assert [(c["step"], c["images_seen"], c["valid_bpd"]) for c in curve] == [(15, 120, 4.5), (20, 160, 4.2)]
    assert curve[0]["train_seconds"] == pytest.approx(3.0) and curve[0]["wall_seconds"] == 4.0


def _tiny_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        **{
            k: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
            for k, n in (("x_train", 48), ("x_valid", 12), ("x_test", 12))
        },
    )
    return path


def test_end_to_end_study_resume_and_plot_only(ablations, tmp_path, restore_threads):
    data = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "study"
    argv = [
        "--data",
        str(data),
        "--config",
        "tiny",
        "--out",
        str(out),
        "--steps-per-run",
        "3",
        "--eval-every-steps",
        "2",
        "--seeds",
        "0",
        "--variants",
        "full,affine",
        "--eval-samples",
        "2",
        "--eval-images",
        "6",
        "--curve-images",
        "6",
        "--num-samples",
        "1",
        "--threads",
        "1",
        "--report-split",
        "test",
    ]
    logs: list[str] = []
    assert ablations.main(argv, log=logs.append) == 0
    text = "\n".join(logs)
    assert "uniform-dequant" in text and "(not run)" in text  # all counts are printed

    res = json.loads((out / "results.json").read_text())
    assert list(res["variants"]) == ["full", "affine"]
    for name, row in res["variants"].items():
        assert row["steps"] == 3 and row["images_seen"] == 24 and row["seeds"] == [0]
        assert row["n_images"] == 6 and row["samples"] == 2 and row["report_split"] == "test"
        for key in ("bpd", "iw_bpd", "train_bpd", "gap"):
            assert np.isfinite(row[key]["mean"]) and np.isfinite(row[key]["se"]), (name, key)
        assert row["iw_bpd"]["mean"] <= row["bpd"]["mean"] + 1e-9  # the IW bound is the tighter one
        assert row["gap"]["mean"] == pytest.approx(row["bpd"]["mean"] - row["train_bpd"]["mean"])
        assert row["paper_cifar10_bpd"] == ablations.PAPER_TABLE2[name]
    assert res["variants"]["full"]["delta_vs_full"]["mean"] == 0.0
    aff = res["variants"]["affine"]
    full_iw = res["variants"]["full"]["iw_bpd"]["mean"]
    assert aff["delta_vs_full"]["mean"] == pytest.approx(aff["iw_bpd"]["mean"] - full_iw)
    assert aff["parameters"] == flowpp.count_parameters(ablations.make_variants(flowpp.get_config("tiny"))["affine"])
    runs = {r["variant"]: r for r in res["runs"]}
    assert [c["step"] for c in runs["full"]["curve"]] == [2, 3]  # a learning curve, not one point
    assert all(c["images_seen"] == 8 * c["step"] for c in runs["full"]["curve"])
    assert "per_image_bpd" not in runs["full"]["report"]
    json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))

    md = (out / "results.md").read_text()
    assert "| full | 57,984 |" in md and "| affine |" in md and "3.165" in md and "3.200" in md
    assert "test IW bpd" in md
    for name in ("full", "affine"):
        run = out / name / "seed0"
        assert (run / "metrics.csv").is_file() and (run / "checkpoints").is_dir()
        assert json.loads((run / ablations.RESULT_FILE).read_text())["steps"] == 3
    try:
        import matplotlib  # noqa: F401

        have_mpl = True
    except ImportError:
        have_mpl = False
    pngs = ("curves_images.png", "curves_time.png", "gap.png")
    assert all((out / p).is_file() for p in pngs) == have_mpl

    # Running again skips the finished runs; other evaluation settings are refused.
    logs.clear()
    assert ablations.main(argv, log=logs.append) == 0
    assert sum("skipped" in m for m in logs) == 2 and not any("] training " in m for m in logs)
    with pytest.raises(SystemExit, match="other settings"):
        ablations.main([a if a != "6" else "5" for a in argv], log=logs.append)

    # --plot-only rebuilds the table and plots from the run directories alone.
    for f in ("results.json", "results.md") + pngs:
        (out / f).unlink(missing_ok=True)
    assert ablations.main(["--out", str(out), "--plot-only"], log=logs.append) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["variants"]["affine"]["iw_bpd"] == res["variants"]["affine"]["iw_bpd"]
    assert (out / "results.md").read_text() == md
    assert all((out / p).is_file() for p in pngs) == have_mpl


def test_plot_only_without_runs_fails_clearly(ablations, tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        ablations.main(["--out", str(tmp_path), "--plot-only"], log=lambda m: None)


def test_paired_delta_pairs_images_and_reports_each_seed(ablations):
    def run(variant, seed, values):
        return dict(variant=variant, seed=seed, report=dict(per_image_iw_bpd=list(values), per_image_bpd=list(values)))

    full0, full1 = [3.0, 4.0, 5.0, 6.0], [3.1, 4.2, 4.9, 6.3]
    results = [
        run("full", 0, full0),
        run("full", 1, full1),
        run("affine", 0, [v + d for v, d in zip(full0, (0.10, 0.12, 0.08, 0.10))]),
        run("affine", 1, [v + 0.2 for v in full1]),
    ]
    d = ablations.paired_delta(results, "affine")
    assert d["per_seed"] == pytest.approx([0.10, 0.20])
    assert d["mean"] == pytest.approx(0.15) and d["seed_sd"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    # The image-to-image spread (values 3..6) cancels: only the spread of the differences is left.
    se0 = np.std([0.10, 0.12, 0.08, 0.10], ddof=1) / 2
    assert d["se"] == pytest.approx(np.sqrt(se0**2 + 0.0) / 2)
    assert ablations._delta(d) == "+0.150 ± 0.004 (seeds +0.100, +0.200)"
    assert ablations.paired_delta(results, "no-attention") is None
