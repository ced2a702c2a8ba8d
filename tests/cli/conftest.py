import numpy as np
import pytest


def _images(rng, n):
    # Smooth random images: a learnable structure, so a few steps of training lower the loss.
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    ramp = np.linspace(-40, 40, 8)[None, :, None, None] + np.linspace(-20, 20, 8)[None, None, :, None]
    noise = rng.integers(-10, 11, size=(n, 8, 8, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """An .npz dataset shaped for the `tiny` config: 8x8x3, 256 levels."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=_images(rng, 96), x_valid=_images(rng, 16), x_test=_images(rng, 24))
    return path
