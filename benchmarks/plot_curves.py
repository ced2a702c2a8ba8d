"""Learning curves from run directories: valid bits/dim against wall-clock and images seen.

    python benchmarks/plot_curves.py RUN_DIR [RUN_DIR ...] --out curves.png [--labels a b ...]

Reads each run's metrics.csv (rows with a valid_bpd) and writes one PNG with two panels and a
markdown table of the points next to it (same name, .md). Needs matplotlib (`pip install
matplotlib`, or the `plots` extra).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    curves = {label: read_curve(r) for label, r in zip(labels, args.runs)}

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
