"""Learning curves from run directories: valid bits/dim against wall-clock and images seen.

    python benchmarks/plot_curves.py RUN_DIR|TABLE.md [...] --out curves.png [--labels a b ...]

Reads each run's metrics.csv (rows with a valid_bpd) and writes one PNG with two panels and a
markdown table of the points next to it (same name, .md). A .md table this script wrote before
stands for the runs in it (under their labels there), so a curve outlives its run directory.
Needs matplotlib (`pip install matplotlib`, or the `plots` extra).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_curve(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("valid_bpd")]
    return [
        dict(
            step=int(r["step"]),
            images=int(r["images_seen"]),
            minutes=float(r["wall_seconds"]) / 60.0,
            train_minutes=float(r["train_seconds"]) / 60.0 if r.get("train_seconds") else None,
            valid_bpd=float(r["valid_bpd"]),
        )
        for r in rows
    ]


def read_table(path: Path) -> dict[str, list[dict]]:
    """The curves of a markdown table written by this script, by label."""
    curves: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines()[2:]:
        label, step, images, minutes, bpd = (c.strip() for c in line.strip().strip("|").split("|"))
        point = dict(step=int(step), images=int(images.replace(",", "")), minutes=float(minutes), valid_bpd=float(bpd))
        curves.setdefault(label, []).append(point)
    return curves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    run_dirs = [r for r in args.runs if r.suffix != ".md"]
    labels = args.labels or [r.name for r in run_dirs]
    if len(labels) != len(run_dirs):
        p.error(f"{len(labels)} labels for {len(run_dirs)} run directories")
    curves = {}
    for r in args.runs:
        if r.suffix == ".md":
            curves.update(read_table(r))
        else:
            curves[labels[run_dirs.index(r)]] = read_curve(r)

    lines = ["| run | step | images seen | wall-clock (min) | valid bpd |", "|---|---:|---:|---:|---:|"]
    for label, pts in curves.items():
        for q in pts:
            lines.append(f"| {label} | {q['step']} | {q['images']:,} | {q['minutes']:.1f} | {q['valid_bpd']:.4f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in curves.items():
        axes[0].plot([q["minutes"] for q in pts], [q["valid_bpd"] for q in pts], marker="o", label=label)
        axes[1].plot([q["images"] for q in pts], [q["valid_bpd"] for q in pts], marker="o", label=label)
    axes[0].set_xlabel("wall-clock (minutes)")
    axes[1].set_xlabel("images seen")
    for ax in axes:
        ax.set_ylabel("valid bits/dim (EMA)")
        ax.grid(alpha=0.3)
    axes[1].legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
