"""Write a second 28x28x1 dataset for robustness checks: MNIST with inverted intensities,
transposed (mirrored across the diagonal), keeping only the digits 5-9.

    python benchmarks/make_transformed_mnist.py ../shared/data/mnist.npz out.npz

The presets are tuned on nothing in this file, so training on it shows whether they carry over.
"""

import sys

import numpy as np


def main(src: str, dst: str) -> None:
    z = np.load(src)
    out = {}
    for split in ("train", "test"):
        x, y = z[f"x_{split}"], z[f"y_{split}"]
        keep = y >= 5
        out[f"x_{split}"] = np.ascontiguousarray(255 - x[keep].transpose(0, 2, 1, 3))
    np.savez(dst, **out)
    print(f"wrote {dst}: train {out['x_train'].shape}, test {out['x_test'].shape}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
