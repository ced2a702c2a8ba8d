"""The whole training source ("train+valid"), n-bit reduction and the release's CelebA files."""

import numpy as np
import pytest
from helpers import replace_holdout

from flowpp.data import ALL_SPLITS, DatasetError, ImageSet, load_dataset, match_levels


def _load(path, split, **kw):
    return load_dataset(str(path), split, download=False, log=None, **kw)


def test_train_valid_is_the_held_out_source_in_order(tmp_path, fmt):
    x_train = fmt.make_images(25, 6, 5, 3)
    p = tmp_path / "toy.npz"
    np.savez(p, x_train=x_train, x_test=fmt.make_images(4, 6, 5, 3, start=300))
    both = _load(p, "train+valid")
    np.testing.assert_array_equal(both.images, x_train)
    np.testing.assert_array_equal(both.images, np.concatenate([_load(p, "train").images, _load(p, "valid").images]))
    assert "train+valid = all 25 images" in both.description


def test_train_valid_concatenates_an_explicit_x_valid(tmp_path, fmt):
    x_train, x_valid = fmt.make_images(5, 4, 4, 3), fmt.make_images(2, 4, 4, 3, start=50)
    p = tmp_path / "v.npz"
    np.savez(p, x_train=x_train, x_valid=x_valid, x_test=fmt.make_images(1, 4, 4, 3))
    np.testing.assert_array_equal(_load(p, "train+valid").images, np.concatenate([x_train, x_valid]))
    np.savez(p, x_train=x_train, x_valid=fmt.make_images(2, 4, 5, 3), x_test=fmt.make_images(1, 4, 4, 3))
    with pytest.raises(DatasetError, match="'x_valid' images are"):
        _load(p, "train+valid")


def test_train_valid_of_png_folders(tmp_path, fmt):
    imgs = fmt.make_images(7, 4, 4, 3)
    fmt.png_folder(tmp_path / "ds" / "train", imgs[:5])
    fmt.png_folder(tmp_path / "ds" / "valid", imgs[5:])
    np.testing.assert_array_equal(_load(tmp_path / "ds", "train+valid").images, imgs)
    fmt.png_folder(tmp_path / "flat", imgs)
    np.testing.assert_array_equal(_load(tmp_path / "flat", "train+valid").images, imgs)


def test_train_valid_of_a_named_dataset(data_dir):
    digits = {s: load_dataset("digits", s, log=None) for s in ("train", "valid", "train+valid")}
    np.testing.assert_array_equal(
        digits["train+valid"].images, np.concatenate([digits["train"].images, digits["valid"].images])
    )
    with pytest.raises(DatasetError, match="unknown split 'all'"):
        load_dataset("digits", "all", log=None)


def test_match_levels_reduces_8_bit_data_like_the_release():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    data = ImageSet(images=x, num_levels=256, name="ramp", description="a ramp")
    five = match_levels(data, 32)
    assert five.num_levels == 32 and five.images.dtype == np.uint8
    np.testing.assert_array_equal(five.images, x // 8)
    np.testing.assert_array_equal(match_levels(data, 8).images, x >> 5)
    assert "reduced to 5 bits (x >> 3)" in five.description
    assert match_levels(five, 32) is five
    with pytest.raises(DatasetError, match="has 32 levels but the model expects 8"):
        match_levels(five, 8)
    with pytest.raises(DatasetError, match="expects 17"):
        match_levels(data, 17)


@pytest.fixture
def small_celeba(monkeypatch):
    for name in ("celeba64-5bit", "celeba64-3bit", "celeba128-5bit"):
        replace_holdout(monkeypatch, name, test=3, valid=2)


def test_celeba_reads_the_release_file_and_holds_out_valid_and_test(data_dir, small_celeba):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, size=(12, 64, 64, 3), dtype=np.uint8)
    (data_dir / "celeba").mkdir()
    np.save(data_dir / "celeba" / "celeba_full_64x64_5bit.npy", x)
    parts = {s: load_dataset("celeba64-5bit", s, data_dir=data_dir, log=None) for s in ALL_SPLITS}
    assert all(p.num_levels == 32 for p in parts.values())
    np.testing.assert_array_equal(parts["train"].images, x[:7])
    np.testing.assert_array_equal(parts["valid"].images, x[7:9])
    np.testing.assert_array_equal(parts["test"].images, x[9:])
    np.testing.assert_array_equal(parts["train+valid"].images, x[:9])


def test_celeba_errors_name_the_file_and_the_problem(data_dir, small_celeba):
    with pytest.raises(DatasetError, match=r"celeba_full_64x64_3bit\.npy in .*celeba/"):
        load_dataset("celeba64-3bit", "train", data_dir=data_dir, log=None)
    root = data_dir / "celeba"
    root.mkdir()
    np.save(root / "celeba_full_64x64_3bit.npy", np.full((8, 64, 64, 3), 9, np.uint8))
    with pytest.raises(DatasetError, match="pixel value 9 .* 3-bit file holds values 0..7"):
        load_dataset("celeba64-3bit", "train", data_dir=data_dir, log=None)
    np.save(root / "celeba_128pixels_5bit_full.npy", np.zeros((8, 64, 64, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"expected uint8 images of shape \(N, 128, 128, 3\)"):
        load_dataset("celeba128-5bit", "train", data_dir=data_dir, log=None)
    (root / "celeba_full_64x64_5bit.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match="not a readable .npy array"):
        load_dataset("celeba64-5bit", "train", data_dir=data_dir, log=None)
    np.save(root / "celeba_full_64x64_5bit.npy", np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(DatasetError, match="need more than 5"):
        load_dataset("celeba64-5bit", "train", data_dir=data_dir, log=None)


def test_an_npz_of_the_wrong_image_shape_is_refused_before_decompressing(tmp_path, monkeypatch):
    from flowpp.data import npz_files as formats

    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x_train=np.zeros((300, 256, 256, 3), np.uint8), x_test=np.zeros((1, 8, 8, 3), np.uint8))
    assert bomb.stat().st_size < 1_000_000  # 59 MB declared inside

    def never(self, key):
        raise AssertionError(f"{key} was decompressed")

    monkeypatch.setattr(formats.NpzReader, "read", never)
    with pytest.raises(DatasetError, match=r"\(H, W, C\) = \(256, 256, 3\), but the model expects \(8, 8, 3\)"):
        load_dataset(str(bomb), "train", log=None, expect_hwc=(8, 8, 3))
