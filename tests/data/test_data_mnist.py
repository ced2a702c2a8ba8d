"""MNIST / Fashion-MNIST from official IDX gz files."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import replace_holdout

from flowpp.data import DATASETS, DatasetError, load_dataset
from flowpp.data.idx_files import parse_idx_images

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _write(root, fmt, n_train=7, n_test=3):
    root.mkdir(parents=True, exist_ok=True)
    train = fmt.make_images(n_train, 28, 28, 1)
    test = fmt.make_images(n_test, 28, 28, 1, start=500)
    (root / "train-images-idx3-ubyte.gz").write_bytes(fmt.idx_gz_bytes(train))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(fmt.idx_gz_bytes(test))
    return train, test


@pytest.mark.parametrize("name, title", [("mnist", "MNIST"), ("fashion-mnist", "Fashion-MNIST")])
def test_splits(data_dir, fmt, monkeypatch, name, title):
    replace_holdout(monkeypatch, name, valid=2)
    train, test = _write(data_dir / name, fmt)
    tr = load_dataset(name, "train", data_dir=data_dir, download=False, log=None)
    va = load_dataset(name, "valid", data_dir=data_dir, download=False, log=None)
    te = load_dataset(name, "test", data_dir=data_dir, download=False, log=None)
    np.testing.assert_array_equal(tr.images, train[:5])
    np.testing.assert_array_equal(va.images, train[5:])
    np.testing.assert_array_equal(te.images, test)
    assert tr.images.shape[1:] == (28, 28, 1) and tr.num_levels == 256
    assert tr.description.startswith(title + " (official IDX files")
    assert tr.name == name


def test_aliases(data_dir, fmt, monkeypatch):
    replace_holdout(monkeypatch, "fashion-mnist", valid=2)
    _write(data_dir / "fashion-mnist", fmt)
    assert load_dataset("Fashion_MNIST", "test", data_dir=data_dir, download=False, log=None).name == "fashion-mnist"


def test_uncompressed_file_accepted(data_dir, fmt):
    root = data_dir / "mnist"
    root.mkdir()
    test = fmt.make_images(4, 28, 28, 1, start=9)
    (root / "t10k-images-idx3-ubyte").write_bytes(fmt.idx_bytes(test))
    te = load_dataset("mnist", "test", data_dir=data_dir, download=False, log=None)
    np.testing.assert_array_equal(te.images, test)


def test_real_split_sizes():
    assert DATASETS["mnist"].holdout.valid == DATASETS["fashion-mnist"].holdout.valid == 5000


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic"),  # labels file magic
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic"),  # float type
        (lambda b: b[:-1], "holds"),  # one byte short
        (lambda b: b + b"\x00", "holds"),  # one byte long
        (lambda b: b[:4] + struct.pack(">I", 10**6) + b[8:], "holds"),  # lies about N
        (lambda b: b[:4] + struct.pack(">III", 3, 14, 56) + b[16:], "14x56"),
        (lambda b: b[:4] + struct.pack(">I", 0) + b[8:16], "empty"),
        (lambda b: b[:10], "too short"),
    ],
)
def test_idx_header_validation(fmt, mutate, match):
    raw = fmt.idx_bytes(fmt.make_images(3, 28, 28, 1))
    assert parse_idx_images(raw, "f", expect_hw=(28, 28)).shape == (3, 28, 28, 1)
    with pytest.raises(DatasetError, match=match):
        parse_idx_images(mutate(raw), "f", expect_hw=(28, 28))


def test_broken_gzip_is_dataset_error(data_dir, fmt):
    root = data_dir / "mnist"
    root.mkdir()
    good = fmt.idx_gz_bytes(fmt.make_images(3, 28, 28, 1))
    for bad in (good[: len(good) // 2], b"not gzip at all", good[:-4] + b"\xff\xff\xff\xff"):
        (root / "t10k-images-idx3-ubyte.gz").write_bytes(bad)
        with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
            load_dataset("mnist", "test", data_dir=data_dir, download=False, log=None)


def test_gzip_bomb_refused(data_dir, monkeypatch):
    from flowpp.data import formats as datasets

    monkeypatch.setattr(datasets, "_IDX_MAX", 1000)
    root = data_dir / "mnist"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 100000))
    with pytest.raises(DatasetError, match="more than 1000 bytes"):
        load_dataset("mnist", "test", data_dir=data_dir, download=False, log=None)


@pytest.mark.skipif(not (SHARED / "mnist.npz").is_file(), reason="shared MNIST copy not present")
def test_real_mnist_through_idx_format(data_dir):
    """The complete MNIST, re-encoded in the official IDX gz format, splits 55,000 /
    5,000 / 10,000 with the real hold-out size and is read pixel-exact."""
    with np.load(SHARED / "mnist.npz", allow_pickle=False) as z:
        x_train, x_test = z["x_train"], z["x_test"]
    root = data_dir / "mnist"
    root.mkdir()
    for name, x in (("train-images-idx3-ubyte.gz", x_train), ("t10k-images-idx3-ubyte.gz", x_test)):
        header = struct.pack(">IIII", 0x803, len(x), 28, 28)
        (root / name).write_bytes(gzip.compress(header + x.tobytes(), compresslevel=1))
    tr = load_dataset("mnist", "train", data_dir=data_dir, download=False, log=None)
    va = load_dataset("mnist", "valid", data_dir=data_dir, download=False, log=None)
    te = load_dataset("mnist", "test", data_dir=data_dir, download=False, log=None)
    assert (len(tr), len(va), len(te)) == (55000, 5000, 10000)
    np.testing.assert_array_equal(tr.images, x_train[:55000])
    np.testing.assert_array_equal(va.images, x_train[55000:])
    np.testing.assert_array_equal(te.images, x_test)
