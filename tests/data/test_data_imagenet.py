"""ImageNet32/64: van den Oord et al. PNG tars (or folders) and Chrabaszcz et al. npz batches."""

import numpy as np
import pytest
from helpers import replace_holdout

from flowpp.data import DatasetError, load_dataset


@pytest.fixture(autouse=True)
def _small_holdout(monkeypatch):
    replace_holdout(monkeypatch, "imagenet32", valid=3)
    replace_holdout(monkeypatch, "imagenet64", valid=3)


def _load(name, split, data_dir, log=None):
    return load_dataset(name, split, data_dir=data_dir, download=False, log=log)


@pytest.mark.parametrize("name, size", [("imagenet32", 32), ("imagenet64", 64)])
def test_van_den_oord_tars(data_dir, fmt, name, size, logbook):
    root = data_dir / name
    root.mkdir()
    train = fmt.make_images(8, size, size, 3)
    valid = fmt.make_images(4, size, size, 3, start=100)
    fmt.vdo_tar(root / f"train_{size}x{size}.tar", f"train_{size}x{size}", train)
    fmt.vdo_tar(root / f"valid_{size}x{size}.tar", f"valid_{size}x{size}", valid)
    tr = _load(name, "train", data_dir, logbook.append)
    va = _load(name, "valid", data_dir)
    te = _load(name, "test", data_dir)
    # sorted by member name although the archive order is shuffled
    np.testing.assert_array_equal(tr.images, train[:5])
    np.testing.assert_array_equal(va.images, train[5:])
    np.testing.assert_array_equal(te.images, valid)
    assert tr.images.shape == (5, size, size, 3) and tr.num_levels == 256
    for s in (tr, va, te):
        assert f"ImageNet{size} (van den Oord et al. 2016 PNG archives" in s.description
    assert "test = all 4 images" in te.description
    assert any("van den Oord" in m for m in logbook)


def test_van_den_oord_extracted_folders(data_dir, fmt):
    root = data_dir / "imagenet32"
    train = fmt.make_images(6, 32, 32, 3)
    valid = fmt.make_images(2, 32, 32, 3, start=70)
    fmt.png_folder(root / "train_32x32", train)
    fmt.png_folder(root / "valid_32x32", valid)
    np.testing.assert_array_equal(_load("imagenet32", "train", data_dir).images, train[:3])
    np.testing.assert_array_equal(_load("imagenet32", "valid", data_dir).images, train[3:])
    te = _load("imagenet32", "test", data_dir)
    np.testing.assert_array_equal(te.images, valid)
    assert "van den Oord" in te.description


def test_grayscale_png_in_archive_becomes_rgb(data_dir, fmt):
    root = data_dir / "imagenet32"
    root.mkdir()
    imgs = fmt.make_images(2, 32, 32, 1, start=5)
    fmt.vdo_tar(root / "valid_32x32.tar", "valid_32x32", imgs)
    te = _load("imagenet32", "test", data_dir)
    np.testing.assert_array_equal(te.images, np.repeat(imgs, 3, axis=3))


def test_wrong_png_size_in_archive(data_dir, fmt):
    root = data_dir / "imagenet32"
    root.mkdir()
    fmt.vdo_tar(root / "valid_32x32.tar", "valid_32x32", fmt.make_images(2, 64, 64, 3))
    with pytest.raises(DatasetError, match=r"valid_32x32/0000000.png.*64x64, expected 32x32"):
        _load("imagenet32", "test", data_dir)


def test_van_den_oord_partial_is_named(data_dir, fmt):
    root = data_dir / "imagenet32"
    root.mkdir()
    fmt.vdo_tar(root / "valid_32x32.tar", "valid_32x32", fmt.make_images(2, 32, 32, 3))
    with pytest.raises(DatasetError, match="train_32x32.tar"):
        _load("imagenet32", "train", data_dir)


@pytest.mark.parametrize("compressed", [False, True])
def test_chrabaszcz_npz(data_dir, fmt, compressed, logbook):
    root = data_dir / "imagenet32"
    batches = [fmt.make_images(2, 32, 32, 3, start=10 * i) for i in range(10)]
    batches[9] = fmt.make_images(1, 32, 32, 3, start=90)  # valid spans two batches
    for i, b in enumerate(batches):
        fmt.chrabaszcz_npz(root / "Imagenet32_train_npz" / f"train_data_batch_{i + 1}.npz", b, compressed)
    val = fmt.make_images(3, 32, 32, 3, start=500)
    fmt.chrabaszcz_npz(root / "Imagenet32_val_npz" / "val_data.npz", val, compressed)
    all_train = np.concatenate(batches)
    tr = _load("imagenet32", "train", data_dir, logbook.append)
    va = _load("imagenet32", "valid", data_dir)
    te = _load("imagenet32", "test", data_dir)
    np.testing.assert_array_equal(tr.images, all_train[:-3])
    np.testing.assert_array_equal(va.images, all_train[-3:])
    np.testing.assert_array_equal(te.images, val)
    assert "Chrabaszcz et al. 2017" in tr.description
    assert any("Chrabaszcz" in m for m in logbook)


def test_chrabaszcz_64(data_dir, fmt):
    root = data_dir / "imagenet64"
    val = fmt.make_images(2, 64, 64, 3, start=3)
    fmt.chrabaszcz_npz(root / "Imagenet64_val_npz" / "val_data.npz", val)
    np.testing.assert_array_equal(_load("imagenet64", "test", data_dir).images, val)
    with pytest.raises(DatasetError, match="train_data_batch_1.npz"):
        _load("imagenet64", "train", data_dir)


def test_chrabaszcz_wrong_row_length(data_dir, fmt):
    root = data_dir / "imagenet32"
    fmt.chrabaszcz_npz(root / "Imagenet32_val_npz" / "val_data.npz", fmt.make_images(2, 64, 64, 3))
    with pytest.raises(DatasetError, match=r"val_data.npz.*\(n, 3072\)"):
        _load("imagenet32", "test", data_dir)


def test_nothing_present_names_both_variants(data_dir):
    with pytest.raises(DatasetError) as ei:
        _load("imagenet64", "train", data_dir)
    msg = str(ei.value)
    for needed in (
        "train_64x64.tar",
        "valid_64x64.tar",
        "Imagenet64_train_npz/train_data_batch_1.npz",
        "Imagenet64_val_npz/val_data.npz",
        "login",
        str(data_dir / "imagenet64"),
    ):
        assert needed in msg


def test_van_den_oord_preferred_over_chrabaszcz(data_dir, fmt):
    root = data_dir / "imagenet32"
    fmt.chrabaszcz_npz(root / "Imagenet32_val_npz" / "val_data.npz", fmt.make_images(2, 32, 32, 3))
    png = fmt.make_images(3, 32, 32, 3, start=40)
    fmt.vdo_tar(root / "valid_32x32.tar", "valid_32x32", png)
    te = _load("imagenet32", "test", data_dir)
    np.testing.assert_array_equal(te.images, png)
    assert "van den Oord" in te.description
