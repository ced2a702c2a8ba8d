"""Fuzzing: corrupted or truncated files give a DatasetError or a well-formed load, never
another exception and never a hang."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import replace_holdout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowpp.data import DatasetError, ImageSet, load_dataset
from flowpp.data.cifar_pickle import cifar_batch_images
from flowpp.score import read_images

# The autouse fixtures (offline URLs, env) are the same for every example.
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def mutation():
    """A list of (relative position, new byte) overwrites and an optional
    truncation point, both as fractions of the file length."""
    flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6)
    cut = st.one_of(st.none(), st.floats(0, 1, exclude_max=True))
    return st.tuples(flips, cut)


def apply(data: bytes, mut) -> bytes:
    flips, cut = mut
    buf = bytearray(data)
    for pos, value in flips:
        buf[int(pos * len(buf))] = value
    if cut is not None:
        buf = buf[: int(cut * len(buf))]
    return bytes(buf)


def check_load(fn, expect_tail):
    """fn() must return a well-formed ImageSet (images (N,)+expect_tail) or raise DatasetError."""
    try:
        result = fn()
    except DatasetError:
        return None
    assert isinstance(result, ImageSet)
    assert result.images.dtype == np.uint8 and result.images.ndim == 4
    assert result.images.shape[0] > 0 and result.images.shape[1:] == expect_tail
    return result


@pytest.fixture(scope="module")
def blobs(fmt):
    import io

    make_images = fmt.make_images
    buf = io.BytesIO()
    np.savez(buf, x_train=make_images(12, 6, 6, 3), x_test=make_images(3, 6, 6, 3, start=50))
    npz = buf.getvalue()
    buf = io.BytesIO()
    np.savez_compressed(
        buf, x_train=make_images(12, 6, 6, 1), x_test=make_images(3, 6, 6, 1, start=50), num_levels=np.array(256)
    )
    rng = np.random.default_rng(1)
    return {
        "cifar": fmt.cifar_tarball_bytes(per_batch=2, test_n=2),
        "cifar_plain": fmt.cifar_tarball_bytes(per_batch=2, test_n=2, gz=False),
        "batch": fmt.cifar_batch(make_images(2, 32, 32, 3)),
        "idx": fmt.idx_gz_bytes(make_images(6, 28, 28, 1)),
        "npz": npz,
        "npz_z": buf.getvalue(),
        "png": fmt.png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
    }


@FUZZ
@given(mut=mutation(), plain=st.booleans(), split=st.sampled_from(["train", "test"]))
def test_fuzz_cifar_tarball(blobs, monkeypatch, mut, plain, split):
    replace_holdout(monkeypatch, "cifar10", valid=2)
    data = apply(blobs["cifar_plain" if plain else "cifar"], mut)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "cifar10"
        root.mkdir()
        (root / "cifar-10-python.tar.gz").write_bytes(data)
        check_load(lambda: load_dataset("cifar10", split, data_dir=d, download=False, log=None), (32, 32, 3))


@FUZZ
@given(mut=mutation())
def test_fuzz_cifar_batch_pickle(blobs, mut):
    data = apply(blobs["batch"], mut)
    try:
        out = cifar_batch_images(data, "batch")
    except DatasetError:
        return
    assert out.dtype == np.uint8 and out.shape[1:] == (32, 32, 3)


@FUZZ
@given(mut=mutation(), raw_bytes=st.binary(max_size=64))
def test_fuzz_idx_gz(blobs, mut, raw_bytes):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "mnist"
        root.mkdir()
        p = root / "t10k-images-idx3-ubyte.gz"
        for data in (apply(blobs["idx"], mut), raw_bytes):
            p.write_bytes(data)
            check_load(lambda: load_dataset("mnist", "test", data_dir=d, download=False, log=None), (28, 28, 1))


@FUZZ
@given(mut=mutation(), which=st.sampled_from(["npz", "npz_z"]), split=st.sampled_from(["train", "valid", "test"]))
def test_fuzz_npz(blobs, mut, which, split):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.npz"
        p.write_bytes(apply(blobs[which], mut))
        c = 3 if which == "npz" else 1
        check_load(lambda: load_dataset(str(p), split, log=None), (6, 6, c))
        try:
            out = read_images([p])
        except DatasetError:
            return
        assert all(a.dtype == np.uint8 and a.ndim == 3 for _, a in out)


@FUZZ
@given(mut=mutation())
def test_fuzz_png(blobs, mut):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "pics"
        root.mkdir()
        (root / "a.png").write_bytes(blobs["png"])
        (root / "b.png").write_bytes(apply(blobs["png"], mut))
        check_load(lambda: load_dataset(str(root), "train", log=None), (8, 8, 3))
        try:
            out = read_images([root / "b.png"])
        except DatasetError:
            return
        assert out[0][1].dtype == np.uint8 and out[0][1].ndim == 3
