"""Hostile and broken input: every refusal is a DatasetError and nothing runs or is written."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from helpers import replace_holdout

from flowpp.data import DatasetError, load_dataset
from flowpp.data.cifar_pickle import cifar_batch_images, restricted_loads
from flowpp.data.tar_files import SafeTar, read_tar_stream


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    replace_holdout(monkeypatch, "cifar10", valid=2)
    replace_holdout(monkeypatch, "imagenet32", valid=1)


def _cifar(data_dir, blob, split="train"):
    root = data_dir / "cifar10"
    root.mkdir(exist_ok=True)
    (root / "cifar-10-python.tar.gz").write_bytes(blob)
    return load_dataset("cifar10", split, data_dir=data_dir, download=False, log=None)


def _evil_pickle(marker, protocol):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # str key: at protocols < 3 Python 3 pickles bytes through _codecs.encode,
    # which would be refused before the payload is even reached.
    return pickle.dumps({"data": Evil()}, protocol=protocol)


# --- pickles ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_malicious_pickle_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "pwned"
    with pytest.raises(DatasetError, match=r"refusing to load global (posix|nt)\.system"):
        cifar_batch_images(_evil_pickle(marker, protocol), "evil_batch")
    assert not marker.exists()


def test_malicious_batch_inside_tarball(tmp_path, data_dir, fmt):
    marker = tmp_path / "pwned"
    blob = fmt.cifar_tarball_bytes(per_batch=2, batch_blobs={"data_batch_3": _evil_pickle(marker, 2)})
    with pytest.raises(DatasetError, match=r"data_batch_3.*refusing to load global"):
        _cifar(data_dir, blob)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # protocol 0 GLOBAL
        b"c__builtin__\nexec\n(S'import os'\ntR.",  # python-2 name
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04eval\x93.",  # STACK_GLOBAL
        b"(cos\nsystem\nS'true'\no.",  # OBJ
        b"(S'true'\nios\nsystem\n.",  # INST
        b"\x80\x02\x82\x01.",  # EXT1 (copyreg registry)
        b"\x80\x02Pfoo\n.",  # persistent id
        b"cnumpy\nload\n.",  # other numpy names
        b"cnumpy.core.multiarray\nscalar\n.",
    ],
)
def test_forbidden_opcodes_and_globals(payload):
    with pytest.raises(DatasetError):
        restricted_loads(payload, "p")


def test_allowed_names_with_unexpected_arguments():
    # _reconstruct asked to preallocate a huge array / build a subclass: refused.
    huge = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85U\x01b\x87R."
    with pytest.raises(DatasetError, match="_reconstruct"):
        restricted_loads(huge, "p")
    odd_dtype = b"\x80\x02cnumpy\ndtype\nU\x01O\x89\x88\x87R."
    with pytest.raises(DatasetError, match="dtype"):
        restricted_loads(odd_dtype, "p")


def _array_pickle(
    state_tail: bytes, dtype_state: bytes = b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
) -> bytes:
    """A py2-style pickle {'data': array} whose array state can be tampered with."""
    return (
        b"\x80\x02}(U\x04data"
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n(K\x00tU\x01b\x87R"
        b"(K\x01" + state_tail + b"tbu."
    ).replace(b"DTYPE", b"cnumpy\ndtype\n(U\x02u1K\x00K\x01tR" + dtype_state)


def test_tampered_array_states():
    ok = _array_pickle(b"(K\x01M\x00\x0ctDTYPE\x89T\x00\x0c\x00\x00" + b"\x07" * 3072)
    arr = cifar_batch_images(ok, "p")
    assert arr.shape == (1, 32, 32, 3) and (arr == 7).all()
    bad = {
        "short data": _array_pickle(b"(K\x01M\x00\x0ctDTYPE\x89U\x03abc"),
        "negative dim": _array_pickle(b"(J\xff\xff\xff\xffM\x00\x0ctDTYPE\x89U\x03abc"),
        "dtype state": _array_pickle(
            b"(K\x01M\x00\x0ctDTYPE\x89T\x00\x0c\x00\x00" + b"\x07" * 3072,
            dtype_state=b"(K\x03U\x01|N(U\x01aK\x01tNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        ),
        "not a dtype": _array_pickle(b"(K\x01M\x00\x0ctU\x02u1\x89T\x00\x0c\x00\x00" + b"\x07" * 3072),
    }
    for why, payload in bad.items():
        with pytest.raises(DatasetError):
            cifar_batch_images(payload, why)
    # ndarray is only a token: calling it (to allocate) fails
    with pytest.raises(DatasetError):
        restricted_loads(b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85R.", "p")
    # a length field far beyond the data is refused before any allocation
    with pytest.raises(DatasetError, match="BYTEARRAY8|remain"):
        restricted_loads(b"\x80\x05\x96" + (2**60).to_bytes(8, "little") + b"abc.", "p")
    with pytest.raises(DatasetError, match="remain"):
        restricted_loads(b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc.", "p")


def test_truncated_pickle(fmt):
    blob = fmt.cifar_batch(fmt.make_images(2, 32, 32, 3))
    for cut in (1, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(DatasetError):
            cifar_batch_images(blob[:cut], "b")


# --- tar members ----------------------------------------------------------------


def _member(tar, name, kind, data=b"x", linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "name, kind, link, match",
    [
        ("../evil", tarfile.REGTYPE, "", r"'\.\.' path component"),
        ("cifar-10-batches-py/../../evil", tarfile.REGTYPE, "", "path traversal"),
        ("/etc/evil", tarfile.REGTYPE, "", "absolute path"),
        ("C:\\evil", tarfile.REGTYPE, "", "absolute path"),
        ("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd", "link"),
        ("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch", "link"),
        ("cifar-10-batches-py/dev", tarfile.CHRTYPE, "", "device"),
        ("cifar-10-batches-py/fifo", tarfile.FIFOTYPE, "", "device, FIFO"),
    ],
)
def test_unsafe_tar_members_refuse_the_archive(tmp_path, data_dir, fmt, name, kind, link, match):
    blob = fmt.cifar_tarball_bytes(per_batch=2, extra=lambda tar: _member(tar, name, kind, linkname=link))
    with pytest.raises(DatasetError, match=match):
        _cifar(data_dir, blob, "test")
    # nothing was extracted anywhere
    assert not (tmp_path / "evil").exists() and not (data_dir / "evil").exists()
    assert sorted(os.listdir(data_dir / "cifar10")) == ["cifar-10-python.tar.gz"]


def test_symlink_in_place_of_a_batch(data_dir, fmt):
    def extra(tar):
        _member(tar, "cifar-10-batches-py/test_batch", tarfile.SYMTYPE, linkname="/etc/passwd")

    with pytest.raises(DatasetError, match="link"):
        _cifar(data_dir, fmt.cifar_tarball_bytes(per_batch=2, extra=extra), "test")


def test_duplicate_member_refused(data_dir, fmt):
    def extra(tar):
        fmt.tar_add_bytes(tar, "cifar-10-batches-py/test_batch", fmt.cifar_batch(fmt.make_images(1, 32, 32, 3)))

    with pytest.raises(DatasetError, match="appears twice"):
        _cifar(data_dir, fmt.cifar_tarball_bytes(per_batch=2, extra=extra), "test")


def test_unsafe_member_in_png_tar(data_dir, fmt):
    root = data_dir / "imagenet32"
    root.mkdir()
    fmt.vdo_tar(
        root / "valid_32x32.tar",
        "valid_32x32",
        fmt.make_images(2, 32, 32, 3),
        extra=lambda tar: _member(tar, "valid_32x32/x.png", tarfile.SYMTYPE, linkname="../../y"),
    )
    with pytest.raises(DatasetError, match="link"):
        load_dataset("imagenet32", "test", data_dir=data_dir, download=False, log=None)


def test_oversized_member_refused(tmp_path):
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w") as tar:
        info = tarfile.TarInfo("big")
        info.size = 5000
        tar.addfile(info, io.BytesIO(b"\x00" * 5000))
    with pytest.raises(DatasetError, match="more than the 100 expected"):
        read_tar_stream(p, ["big"], max_member_bytes=100)
    with SafeTar(p) as t:
        with pytest.raises(DatasetError, match="more than the 100 expected"):
            t.read("big", 100)


# --- corrupted / truncated archives ------------------------------------------------


def test_corrupted_and_truncated_cifar_tarball(data_dir, fmt):
    good = fmt.cifar_tarball_bytes(per_batch=2)
    corrupted = bytearray(good)
    for i in range(100, len(corrupted), 97):
        corrupted[i] ^= 0x5A
    for bad in (b"", b"junk" * 100, good[: len(good) // 2], good[:200], bytes(corrupted)):
        with pytest.raises(DatasetError, match="cifar-10-python.tar.gz"):
            _cifar(data_dir, bad)


def test_truncated_uncompressed_png_tar(data_dir, fmt):
    root = data_dir / "imagenet32"
    root.mkdir()
    p = fmt.vdo_tar(root / "valid_32x32.tar", "valid_32x32", fmt.make_images(3, 32, 32, 3))
    data = p.read_bytes()
    p.write_bytes(data[:1500])
    with pytest.raises(DatasetError, match="valid_32x32"):
        load_dataset("imagenet32", "test", data_dir=data_dir, download=False, log=None)


def test_corrupted_npz(tmp_path):
    p = tmp_path / "d.npz"
    np.savez_compressed(
        p, x_train=np.arange(4000, dtype=np.uint8).reshape(10, 20, 20, 1) % 7, x_test=np.zeros((2, 20, 20, 1), np.uint8)
    )
    good = p.read_bytes()
    for bad in (good[: len(good) // 2], b"PK\x03\x04" + b"\x00" * 50, b"not a zip"):
        p.write_bytes(bad)
        with pytest.raises(DatasetError, match="d.npz"):
            load_dataset(str(p), "train", log=None)
    # flip bytes inside the compressed x_train data: CRC or zlib catches it
    p.write_bytes(good)
    flipped = bytearray(good)
    start = good.index(b"x_train.npy") + len("x_train.npy") + 20  # inside its deflate data
    for i in range(start, start + 20):
        flipped[i] ^= 0xFF
    p.write_bytes(bytes(flipped))
    with pytest.raises(DatasetError, match="d.npz"):
        load_dataset(str(p), "train", log=None)
