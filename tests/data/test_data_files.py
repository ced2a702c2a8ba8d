"""User datasets: .npz files and folders of PNG images; read_images; digits; ImageSet."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from flowpp.data import DATASET_NAMES, DatasetError, ImageSet, load_dataset
from flowpp.score import read_images

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _load(path, split="train"):
    return load_dataset(str(path), split, download=False, log=None)


# --- npz ----------------------------------------------------------------------


def test_npz_with_holdout(tmp_path, fmt):
    x_train = fmt.make_images(25, 6, 5, 3)
    x_test = fmt.make_images(4, 6, 5, 3, start=300)
    p = tmp_path / "toy.npz"
    np.savez(p, x_train=x_train, x_test=x_test)
    tr, va, te = (_load(p, s) for s in ("train", "valid", "test"))
    # valid = last ceil(10%) = 3 of 25
    np.testing.assert_array_equal(tr.images, x_train[:22])
    np.testing.assert_array_equal(va.images, x_train[22:])
    np.testing.assert_array_equal(te.images, x_test)
    assert tr.name == "toy" and tr.num_levels == 256
    assert "npz file" in tr.description and "train = first 22" in tr.description


def test_npz_with_x_valid_nhw_and_levels(tmp_path, fmt):
    p = tmp_path / "gray.npz"
    x_train = fmt.make_images(5, 4, 4, 1, levels=4)[..., 0]
    x_valid = fmt.make_images(2, 4, 4, 1, start=9, levels=4)[..., 0]
    x_test = fmt.make_images(3, 4, 4, 1, start=20, levels=4)[..., 0]
    np.savez_compressed(p, x_train=x_train, x_valid=x_valid, x_test=x_test, num_levels=np.int32(4))
    tr, va, te = (_load(p, s) for s in ("train", "valid", "test"))
    assert tr.images.shape == (5, 4, 4, 1) and tr.num_levels == 4
    np.testing.assert_array_equal(tr.images[..., 0], x_train)
    np.testing.assert_array_equal(va.images[..., 0], x_valid)
    np.testing.assert_array_equal(te.images[..., 0], x_test)


def test_npz_value_out_of_range(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(
        p, x_train=np.full((3, 2, 2, 1), 5, np.uint8), x_test=np.zeros((1, 2, 2, 1), np.uint8), num_levels=np.array(4)
    )
    with pytest.raises(DatasetError, match="pixel value 5 is out of range for 4 levels"):
        _load(p)


@pytest.mark.parametrize(
    "arrays, split, match",
    [
        (dict(x_train=np.zeros((3, 2, 2, 1), np.uint8)), "test", "no array 'x_test'"),
        (dict(x_test=np.zeros((3, 2, 2, 1), np.uint8)), "train", "no array 'x_train'"),
        (
            dict(x_train=np.zeros((3, 2, 2, 1), np.float32), x_test=np.zeros((1, 2, 2, 1), np.uint8)),
            "train",
            "dtype float32; it must be uint8",
        ),
        (dict(x_train=np.zeros((3, 4), np.uint8), x_test=np.zeros((1, 2, 2, 1), np.uint8)), "train", r"shape \(3, 4\)"),
        (dict(x_train=np.zeros((0, 2, 2, 1), np.uint8), x_test=np.zeros((1, 2, 2, 1), np.uint8)), "train", "empty"),
        (
            dict(x_train=np.zeros((3, 2, 2, 1), np.uint8), x_test=np.zeros((1, 3, 2, 1), np.uint8)),
            "test",
            "x_train images are",
        ),
        (
            dict(
                x_train=np.zeros((3, 2, 2, 1), np.uint8),
                x_test=np.zeros((1, 2, 2, 1), np.uint8),
                num_levels=np.array(300),
            ),
            "train",
            "outside 2..256",
        ),
        (
            dict(
                x_train=np.zeros((3, 2, 2, 1), np.uint8),
                x_test=np.zeros((1, 2, 2, 1), np.uint8),
                num_levels=np.array(2.5),
            ),
            "train",
            "one integer",
        ),
        (
            dict(x_train=np.zeros((1, 2, 2, 1), np.uint8), x_test=np.zeros((1, 2, 2, 1), np.uint8)),
            "train",
            "need more than 1",
        ),
    ],
)
def test_npz_refusals(tmp_path, arrays, split, match):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(DatasetError, match=match):
        _load(p, split)


def test_npz_object_array_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.npz"
    obj = np.empty(1, dtype=object)
    obj[0] = Evil()
    np.savez(p, x_train=obj, x_test=np.zeros((1, 2, 2, 1), np.uint8))
    with pytest.raises(DatasetError, match="object dtype"):
        _load(p)
    assert not marker.exists()


def test_npz_header_lying_about_size(tmp_path):
    import zipfile

    p = tmp_path / "lie.npz"
    hdr = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2), np.uint8))
    hdr["shape"] = (100000, 100000)
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, hdr)
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x_train.npy", buf.getvalue() + b"\x00" * 4)
    with pytest.raises(DatasetError, match="header declares"):
        _load(p)


@pytest.mark.skipif(not (SHARED / "mnist.npz").is_file(), reason="shared MNIST copy not present")
def test_shared_mnist_npz_splits():
    tr, va, te = (_load(SHARED / "mnist.npz", s) for s in ("train", "valid", "test"))
    assert (len(tr), len(va), len(te)) == (55000, 5000, 10000)
    assert tr.images.shape[1:] == (28, 28, 1) and tr.num_levels == 256


@pytest.mark.skipif(not (SHARED / "cifar10_train10k.npz").is_file(), reason="shared CIFAR copy not present")
def test_shared_cifar_npz_uses_x_valid_and_needs_x_test():
    tr, va = (_load(SHARED / "cifar10_train10k.npz", s) for s in ("train", "valid"))
    assert (len(tr), len(va)) == (9000, 1000) and tr.images.shape[1:] == (32, 32, 3)
    with pytest.raises(DatasetError, match="x_test"):
        _load(SHARED / "cifar10_train10k.npz", "test")


# --- PNG folders ------------------------------------------------------------------


def test_flat_folder_split(tmp_path, fmt):
    imgs = fmt.make_images(11, 5, 7, 3)
    root = tmp_path / "pics"
    fmt.png_folder(root / "a", imgs[:6], prefix="x")  # nested: a/x_0000.png ...
    fmt.png_folder(root, imgs[6:], prefix="y")  # top level: y_0000.png ...
    tr, va, te = (_load(root, s) for s in ("train", "valid", "test"))
    # sorted relative paths: a/x_* before y_*; valid = last ceil(11/10) = 2
    np.testing.assert_array_equal(tr.images, imgs[:9])
    np.testing.assert_array_equal(va.images, imgs[9:])
    np.testing.assert_array_equal(te.images, va.images)
    assert tr.images.shape == (9, 5, 7, 3) and tr.name == "pics"
    assert "test = valid (no test/ subfolder)" in te.description


def test_folder_with_split_subfolders(tmp_path, fmt):
    root = tmp_path / "ds"
    tr_i = fmt.make_images(4, 3, 3, 1)
    va_i = fmt.make_images(2, 3, 3, 1, start=10)
    te_i = fmt.make_images(3, 3, 3, 1, start=20)
    fmt.png_folder(root / "train", tr_i)
    fmt.png_folder(root / "test", te_i)
    tr, va, te = (_load(root, s) for s in ("train", "valid", "test"))
    np.testing.assert_array_equal(tr.images, tr_i[:3])
    np.testing.assert_array_equal(va.images, tr_i[3:])
    np.testing.assert_array_equal(te.images, te_i)
    assert tr.images.shape[-1] == 1
    fmt.png_folder(root / "valid", va_i)
    tr, va = (_load(root, s) for s in ("train", "valid"))
    np.testing.assert_array_equal(tr.images, tr_i)
    np.testing.assert_array_equal(va.images, va_i)


def test_folder_wrong_size_names_first_offender(tmp_path, fmt):
    root = tmp_path / "mixed"
    fmt.png_folder(root, fmt.make_images(3, 4, 4, 3))
    (root / "img_0001.png").write_bytes(fmt.png_bytes(fmt.make_images(1, 5, 4, 3)[0]))
    (root / "img_0002.png").write_bytes(fmt.png_bytes(fmt.make_images(1, 6, 4, 3)[0]))
    with pytest.raises(DatasetError, match=r"img_0001.png: image is 4x5 RGB but .*img_0000.png is 4x4 RGB"):
        _load(root)


def test_folder_mixed_modes(tmp_path, fmt):
    root = tmp_path / "modes"
    fmt.png_folder(root, fmt.make_images(2, 4, 4, 3))
    (root / "img_0001.png").write_bytes(fmt.png_bytes(fmt.make_images(1, 4, 4, 1)[0]))
    with pytest.raises(DatasetError, match=r"img_0001.png: image is 4x4 L"):
        _load(root)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1", "I;16"])
def test_folder_unsupported_mode(tmp_path, fmt, mode):
    root = tmp_path / "m"
    fmt.png_folder(root, fmt.make_images(2, 4, 4, 3))
    (root / "img_0000.png").write_bytes(fmt.png_bytes(fmt.make_images(1, 4, 4, 3)[0], mode=mode))
    with pytest.raises(DatasetError, match=r"img_0000.png: image mode .* \(4x4\) is not supported"):
        _load(root)


def test_empty_folders(tmp_path, fmt):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no PNG images"):
        _load(root)
    fmt.png_folder(root / "train", fmt.make_images(3, 2, 2, 1))
    (root / "test").mkdir()
    with pytest.raises(DatasetError, match="test/ subfolder holds no PNG"):
        _load(root, "test")


def test_single_image_folder(tmp_path, fmt):
    root = tmp_path / "one"
    fmt.png_folder(root, fmt.make_images(1, 2, 2, 3))
    with pytest.raises(DatasetError, match="need at least 2"):
        _load(root)


def test_garbage_png_in_folder(tmp_path, fmt):
    root = tmp_path / "g"
    fmt.png_folder(root, fmt.make_images(2, 2, 2, 3))
    (root / "img_0001.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match="img_0001.png"):
        _load(root)


def test_truncated_png_in_folder(tmp_path, fmt):
    root = tmp_path / "t"
    imgs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    fmt.png_folder(root, imgs)
    data = (root / "img_0000.png").read_bytes()
    (root / "img_0000.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DatasetError, match="img_0000.png"):
        _load(root)


# --- dispatch, names, ImageSet -------------------------------------------------


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load_dataset("nope", log=None)
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("mnist", "training", log=None)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DatasetError, match="unsupported dataset file"):
        load_dataset(str(tmp_path / "x.csv"), log=None)
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_named_dataset_loads_or_says_which_file_to_place(name, tmp_path):
    if name == "digits":  # bundled with scikit-learn: always there
        assert load_dataset(name, "test", data_dir=tmp_path, log=None).num_levels == 17
        return
    with pytest.raises(DatasetError) as err:
        load_dataset(name, "train", data_dir=tmp_path, download=False, log=None)
    assert str(tmp_path) in str(err.value) and ("not found" in str(err.value) or "Place" in str(err.value))


def test_data_dir_env_default(tmp_path, fmt, monkeypatch):
    root = tmp_path / "envdir" / "mnist"
    root.mkdir(parents=True)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(fmt.idx_gz_bytes(fmt.make_images(2, 28, 28, 1)))
    monkeypatch.setenv("FLOWPP_DATA_DIR", str(tmp_path / "envdir"))
    assert len(load_dataset("mnist", "test", download=False, log=None)) == 2


def test_imageset_validation():
    ok = ImageSet(np.zeros((2, 3, 3, 1), np.uint8), 256, "n", "d")
    assert len(ok) == 2 and ok.image_shape == (3, 3, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.name = "other"
    for bad in (np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 3, 1), np.float32), np.zeros((0, 3, 3, 1), np.uint8)):
        with pytest.raises(DatasetError):
            ImageSet(bad, 256, "n", "d")
    with pytest.raises(DatasetError):
        ImageSet(np.zeros((1, 1, 1, 1), np.uint8), 1, "n", "d")


# --- digits -------------------------------------------------------------------


def test_digits():
    pytest.importorskip("sklearn")
    tr, va, te = (load_dataset("digits", s, log=None) for s in ("train", "valid", "test"))
    assert (len(tr), len(va), len(te)) == (1293, 144, 360)
    assert tr.images.shape[1:] == (8, 8, 1) and tr.num_levels == 17
    assert max(int(s.images.max()) for s in (tr, va, te)) == 16
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.uint8)[..., None]
    np.testing.assert_array_equal(np.concatenate([tr.images, va.images, te.images]), x)
    if (SHARED / "digits8x8.npz").is_file():
        with np.load(SHARED / "digits8x8.npz") as z:
            np.testing.assert_array_equal(te.images, z["x_test"])
        assert len(_load(SHARED / "digits8x8.npz", "valid")) == 144


def test_digits_read_without_importing_sklearn_are_sklearns_digits(monkeypatch):
    pytest.importorskip("sklearn")
    from flowpp.data import loaders

    direct = loaders.bundled_digits()  # read from scikit-learn's package data, as load_digits does
    assert direct is not None and direct.shape == (1797, 8, 8)
    monkeypatch.setattr(loaders, "bundled_digits", lambda: None)  # a layout this does not know
    through_sklearn = load_dataset("digits", "test", log=None).images[..., 0]
    np.testing.assert_array_equal(direct[-360:], through_sklearn)


def test_digits_without_sklearn(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetError, match="pip install scikit-learn"):
        load_dataset("digits", log=None)


# --- read_images ----------------------------------------------------------------


def test_read_images(tmp_path, fmt, logbook):
    from PIL import Image

    rgb = fmt.make_images(1, 5, 4, 3)[0]
    gray = fmt.make_images(1, 3, 2, 1)[0]
    (tmp_path / "a.png").write_bytes(fmt.png_bytes(rgb))
    (tmp_path / "b.png").write_bytes(fmt.png_bytes(gray))
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    np.savez(tmp_path / "d.npz", labels=np.arange(2), x=fmt.make_images(2, 2, 2, 1)[..., 0])
    out = read_images([str(tmp_path / n) for n in ("a.png", "b.png", "c.jpg", "d.npz")], log=logbook.append)
    names = [n for n, _ in out]
    assert names == ["a.png", "b.png", "c.jpg", "d.npz[0]", "d.npz[1]"]
    np.testing.assert_array_equal(out[0][1], rgb)
    np.testing.assert_array_equal(out[1][1], gray)
    assert out[2][1].shape == (5, 4, 3) and out[2][1].dtype == np.uint8
    assert np.abs(out[2][1].astype(int) - rgb).max() < 40  # lossy JPEG
    np.testing.assert_array_equal(out[3][1], fmt.make_images(2, 2, 2, 1)[0])
    assert len(logbook) == 4


def test_read_images_refusals(tmp_path, fmt):
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    (tmp_path / "rgba.png").write_bytes(fmt.png_bytes(fmt.make_images(1, 2, 2, 3)[0], mode="RGBA"))
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + b"\x00" * 20)
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 2, 2), np.float32))
    cases = [
        ("missing.png", "no such file"),
        ("a.gif", "unsupported file type"),
        ("rgba.png", "mode 'RGBA'"),
        ("fake.png", "fake.png"),
        ("f.npz", "no uint8 array"),
    ]
    for name, match in cases:
        with pytest.raises(DatasetError, match=match):
            read_images([tmp_path / name])
    with pytest.raises(DatasetError, match="is a directory"):
        read_images([tmp_path])
