"""The authors' released weights compress too: every architecture of the release (weight norm,
float64 mixture math, squeezes first, dequantizers without attention) codes and decodes exactly."""

from pathlib import Path

import numpy as np
import pytest

import flowpp
from flowpp.codec import compress, decompress
from flowpp.release import import_release

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "official-weights"
FIXTURES = {  # as in tests/test_release.py: sizes set, depths of the named config
    "cifar10-tiny": ("cifar10", dict(filters=8, blocks=1, components=2)),
    "imagenet32-reduced": ("imagenet32", dict(filters=8, blocks=1, components=2)),
    "imagenet64-reduced": ("imagenet64", dict(filters=8, blocks=1, components=2)),
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_an_imported_release_model_compresses_and_decompresses_exactly(name, single_thread):
    if not (OFFICIAL / f"{name}.npz").is_file():
        pytest.skip("official weight fixtures not present")
    base, sizes = FIXTURES[name]
    config = flowpp.get_config(base).with_changes(
        dict(sizes, dequant_filters=sizes["filters"], dequant_components=sizes["components"], heads=4, dropout=0.0)
    )
    model, _ = import_release(OFFICIAL / f"{name}.npz", config)
    images = np.load(OFFICIAL / f"{name}.expected.npz")["x"][:1].astype(np.uint8)  # (N, H, W, C)
    archive = compress(model, images)
    assert np.array_equal(decompress(archive, model).images, images)
    assert 8 * len(archive) < 40 * images.size  # a one-image archive: the start-up (~20 bits/value) and the image
