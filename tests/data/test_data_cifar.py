"""CIFAR-10 from the official python-version tarball (small fake batches)."""

import pickle

import numpy as np
import pytest
from helpers import replace_holdout

from flowpp.data import DATASETS, DatasetError, ImageSet, load_dataset
from flowpp.data.cifar_pickle import cifar_batch_images, restricted_loads


@pytest.fixture
def cifar_root(data_dir, fmt, monkeypatch):
    """data_dir/cifar10/cifar-10-python.tar.gz with 5x3 training and 4 test images;
    valid = last 4 training images."""
    root = data_dir / "cifar10"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(fmt.cifar_tarball_bytes(per_batch=3, test_n=4))
    replace_holdout(monkeypatch, "cifar10", valid=4)
    return root


def test_splits_shapes_and_pixels(cifar_root, data_dir, fmt, logbook):
    train_all, test = fmt.cifar_expected(per_batch=3, test_n=4)
    tr = load_dataset("cifar10", "train", data_dir=data_dir, download=False, log=logbook.append)
    va = load_dataset("cifar10", "valid", data_dir=data_dir, download=False, log=None)
    te = load_dataset("cifar10", "test", data_dir=data_dir, download=False, log=None)
    for s in (tr, va, te):
        assert isinstance(s, ImageSet)
        assert s.images.dtype == np.uint8 and s.images.ndim == 4
        assert s.num_levels == 256 and s.name == "cifar10"
        assert s.images.flags.c_contiguous
    assert tr.images.shape == (11, 32, 32, 3)
    assert va.images.shape == (4, 32, 32, 3)
    assert te.images.shape == (4, 32, 32, 3)
    # train = first 15-4 training images in batch order, valid = the last 4,
    # each decoded from CHW rows to HWC exactly.
    np.testing.assert_array_equal(tr.images, train_all[:11])
    np.testing.assert_array_equal(va.images, train_all[11:])
    np.testing.assert_array_equal(te.images, test)
    assert "CIFAR-10" in tr.description and "train = first 11" in tr.description
    assert "valid = last 4" in va.description
    assert "test_batch" in te.description
    assert any("cifar10 train: 11 images 32x32x3" in m for m in logbook)


def test_real_split_sizes_are_45000_5000():
    assert DATASETS["cifar10"].holdout.valid == 5000


def test_too_few_training_images_for_holdout(cifar_root, data_dir, monkeypatch):
    replace_holdout(monkeypatch, "cifar10", valid=15)
    with pytest.raises(DatasetError, match="need more than 15"):
        load_dataset("cifar10", "train", data_dir=data_dir, download=False, log=None)


def test_extracted_folder_is_read(data_dir, fmt, monkeypatch):
    replace_holdout(monkeypatch, "cifar10", valid=2)
    folder = data_dir / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        (folder / f"data_batch_{b + 1}").write_bytes(fmt.cifar_batch(fmt.make_images(2, 32, 32, 3, start=2 * b)))
    (folder / "test_batch").write_bytes(fmt.cifar_batch(fmt.make_images(3, 32, 32, 3, start=50)))
    va = load_dataset("cifar10", "valid", data_dir=data_dir, download=False, log=None)
    np.testing.assert_array_equal(va.images, fmt.make_images(2, 32, 32, 3, start=8))
    te = load_dataset("cifar10", "test", data_dir=data_dir, download=False, log=None)
    np.testing.assert_array_equal(te.images, fmt.make_images(3, 32, 32, 3, start=50))
    assert "extracted batches" in te.description


def test_missing_member_is_named(data_dir, fmt):
    import io
    import tarfile

    root = data_dir / "cifar10"
    root.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        fmt.tar_add_bytes(tar, "cifar-10-batches-py/test_batch", fmt.cifar_batch(fmt.make_images(2, 32, 32, 3)))
    (root / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    assert load_dataset("cifar10", "test", data_dir=data_dir, download=False, log=None).images.shape[0] == 2
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset("cifar10", "train", data_dir=data_dir, download=False, log=None)


def test_absent_without_download_names_file_and_place(data_dir):
    with pytest.raises(DatasetError) as ei:
        load_dataset("cifar10", "train", data_dir=data_dir, download=False, log=None)
    msg = str(ei.value)
    assert "cifar-10-python.tar.gz" in msg and str(data_dir / "cifar10") in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg


# --- the unpickler itself ---------------------------------------------------


def test_py2_batch_pickle_roundtrip(fmt):
    imgs = fmt.make_images(5, 32, 32, 3, start=7)
    out = cifar_batch_images(fmt.cifar_batch(imgs), "batch")
    np.testing.assert_array_equal(out, imgs)


@pytest.mark.parametrize("protocol", [3, 4])
def test_python3_pickles_of_the_same_dict_load(fmt, protocol):
    imgs = fmt.make_images(2, 32, 32, 3)
    d = {
        b"batch_label": b"x",
        b"labels": [1, 2],
        b"filenames": [b"a", b"b"],
        b"data": imgs.transpose(0, 3, 1, 2).reshape(2, 3072),
    }
    np.testing.assert_array_equal(cifar_batch_images(pickle.dumps(d, protocol=protocol), "b"), imgs)
    # str keys (a latin-1/str re-pickle) are accepted too
    d2 = {k.decode(): v for k, v in d.items()}
    np.testing.assert_array_equal(cifar_batch_images(pickle.dumps(d2, protocol=protocol), "b"), imgs)


def test_python3_protocol5_array_is_refused():
    # At protocol 5 numpy pickles arrays as in-band buffers (BYTEARRAY8 and
    # numpy._core.numeric._frombuffer), which the official batches never use.
    d = {b"data": np.zeros((1, 3072), np.uint8)}
    with pytest.raises(DatasetError, match="BYTEARRAY8|_frombuffer"):
        restricted_loads(pickle.dumps(d, protocol=5), "b")


def test_python3_protocol2_needs_codecs_and_is_refused(fmt):
    # Python 3 writes bytes at protocol 2 through _codecs.encode: not a name a
    # real (Python 2) batch uses, so it is refused like any other global.
    d = {b"data": np.zeros((1, 3072), np.uint8)}
    with pytest.raises(DatasetError, match="_codecs.encode"):
        restricted_loads(pickle.dumps(d, protocol=2), "b")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({b"data": np.zeros((2, 3071), np.uint8)}, r"shape \(n, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32)}, "uint8"),
        ({b"labels": [1]}, "no 'data'"),
        ({b"data": [1, 2, 3]}, "found list"),
        ({b"data": np.zeros((0, 3072), np.uint8)}, "no images"),
    ],
)
def test_wrong_batch_contents(bad, match):
    with pytest.raises(DatasetError, match=match):
        cifar_batch_images(pickle.dumps(bad, protocol=4), "batch")


def test_not_a_dict():
    with pytest.raises(DatasetError, match="expected a pickled dict"):
        cifar_batch_images(pickle.dumps([1, 2], protocol=4), "batch")
