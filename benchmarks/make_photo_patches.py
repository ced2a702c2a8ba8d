"""Write a 32x32 colour dataset that is not CIFAR-10: patches of the two photographs that ship
with scikit-learn (``china.jpg``, ``flower.jpg``), cut at several scales.

    python benchmarks/make_photo_patches.py out.npz [--train 20000] [--test 2000] [--seed 0]

Each patch is a random square of side 32, 48, 64, 96 or 128 pixels, shrunk to 32x32 by box
averaging and mirrored at random. Training patches come from the left three quarters of each
photograph and test patches from the right quarter, so no test pixel was seen in training.
The presets are tuned on nothing in this file, so training on it shows whether they carry over.
Needs scikit-learn and Pillow (the ``test`` extra).
"""

import argparse

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

SIDES = (32, 48, 64, 96, 128)
TRAIN_FRACTION = 0.75


def cut_patches(photo: np.ndarray, n: int, columns: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``n`` 32x32x3 uint8 patches whose pixels all lie in ``columns`` [start, stop) of ``photo``."""
    height = photo.shape[0]
    start, stop = columns
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        side = int(rng.choice([s for s in SIDES if s <= min(height, stop - start)]))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(start, stop - side + 1))
        patch = Image.fromarray(photo[top : top + side, left : left + side]).resize((32, 32), Image.BOX)
        patch = np.asarray(patch)
        out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = load_sample_images().images
    splits = {"train": [], "test": []}
    for photo in photos:
        cut = int(photo.shape[1] * TRAIN_FRACTION)
        splits["train"].append(cut_patches(photo, args.train // len(photos), (0, cut), rng))
        splits["test"].append(cut_patches(photo, args.test // len(photos), (cut, photo.shape[1]), rng))
    out = {f"x_{k}": rng.permutation(np.concatenate(v)) for k, v in splits.items()}
    np.savez(args.out, **out)
    print(f"wrote {args.out}: train {out['x_train'].shape}, test {out['x_test'].shape}")


if __name__ == "__main__":
    main()
