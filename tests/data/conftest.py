"""Builders of small files in the official dataset formats, and a local HTTP server.

Everything is written inside pytest's tmp_path; nothing here touches the
network.  The builders are plain functions collected in the session fixture
``fmt`` so that hypothesis tests (which must not use function-scoped
fixtures) can call them too.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import socket
import struct
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import replace_mirrors
from PIL import Image

CIFAR_DIR = "cifar-10-batches-py"


# ---------------------------------------------------------------------------
# images with recognisable content
# ---------------------------------------------------------------------------


def make_images(n, h, w, c, start=0, levels=256):
    """(n, h, w, c) uint8; image k (global index start+k) differs from every other
    and every pixel depends on its row, column and channel, so a transposed or
    shifted read is detected."""
    k = np.arange(start, start + n).reshape(n, 1, 1, 1)
    y = np.arange(h).reshape(1, h, 1, 1)
    x = np.arange(w).reshape(1, 1, w, 1)
    ch = np.arange(c).reshape(1, 1, 1, c)
    return ((k * 37 + y * 3 + x * 5 + ch * 101) % levels).astype(np.uint8)


# ---------------------------------------------------------------------------
# CIFAR-10: Python-2 style protocol-2 pickles, as the official batches are
# ---------------------------------------------------------------------------


def py2_pickle(obj) -> bytes:
    """Pickle `obj` the way Python 2's cPickle (protocol 2) wrote the CIFAR-10
    batches: str (here: bytes) as BINSTRING opcodes, numpy arrays through
    numpy.core.multiarray._reconstruct / numpy.ndarray / numpy.dtype."""
    out = bytearray(b"\x80\x02")

    def emit(o):
        if isinstance(o, dict):
            out.extend(b"}")
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    emit(k)
                    emit(v)
                out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"]")
            if o:
                out.extend(b"(")
                for v in o:
                    emit(v)
                out.extend(b"e")
        elif isinstance(o, tuple):
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"t")
        elif isinstance(o, bytes):
            if len(o) < 256:
                out.extend(b"U" + bytes([len(o)]) + o)
            else:
                out.extend(b"T" + struct.pack("<i", len(o)) + o)
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))
            else:
                out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, np.dtype):
            assert o == np.uint8
            out.extend(b"cnumpy\ndtype\n")
            emit((b"u1", 0, 1))
            out.extend(b"R")
            emit((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")
        elif isinstance(o, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n")
            out.extend(b"cnumpy\nndarray\n")
            emit((0,))
            emit(b"b")
            out.extend(b"\x87R")  # TUPLE3, REDUCE
            emit((1, tuple(o.shape), o.dtype, False, np.ascontiguousarray(o).tobytes()))
            out.extend(b"b")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def cifar_batch(images, label="training batch") -> bytes:
    """A pickled batch dict as in the official files (CHW-flat uint8 rows)."""
    n = len(images)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    d = {
        b"batch_label": label.encode(),
        b"labels": [int(i % 10) for i in range(n)],
        b"data": data,
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
    }
    return py2_pickle(d)


def tar_add_bytes(tar, name, data, **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1234567890
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def cifar_tarball_bytes(per_batch=3, test_n=4, batch_blobs=None, extra=None, gz=True) -> bytes:
    """A cifar-10-python.tar.gz with 5 training batches of `per_batch` images
    (global indices 0..5*per_batch-1) and a test batch of `test_n` images
    (indices 1000..).  `batch_blobs` replaces member bytes by name; `extra`
    is a callable(tar) adding more members."""
    blobs = {}
    for b in range(5):
        imgs = make_images(per_batch, 32, 32, 3, start=b * per_batch)
        blobs[f"data_batch_{b + 1}"] = cifar_batch(imgs, f"training batch {b + 1} of 5")
    blobs["test_batch"] = cifar_batch(make_images(test_n, 32, 32, 3, start=1000), "testing batch 1 of 1")
    blobs["batches.meta"] = py2_pickle({b"label_names": [b"airplane"], b"num_cases_per_batch": per_batch})
    blobs.update(batch_blobs or {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dinfo = tarfile.TarInfo(CIFAR_DIR)
        dinfo.type = tarfile.DIRTYPE
        dinfo.mode = 0o755
        tar.addfile(dinfo)
        for name in [
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
            "test_batch",
            "batches.meta",
        ]:
            tar_add_bytes(tar, f"{CIFAR_DIR}/{name}", blobs[name])
        tar_add_bytes(tar, f"{CIFAR_DIR}/readme.html", b"<html></html>")
        if extra is not None:
            extra(tar)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def cifar_expected(per_batch=3, test_n=4):
    train = make_images(5 * per_batch, 32, 32, 3, start=0)
    test = make_images(test_n, 32, 32, 3, start=1000)
    return train, test


# ---------------------------------------------------------------------------
# MNIST IDX
# ---------------------------------------------------------------------------


def idx_bytes(images, magic=0x00000803) -> bytes:
    """IDX3 ubyte file for (n, rows, cols) or (n, rows, cols, 1) images."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 4:
        images = images[..., 0]
    n, r, c = images.shape
    return struct.pack(">IIII", magic, n, r, c) + images.tobytes()


def idx_gz_bytes(images) -> bytes:
    return gzip.compress(idx_bytes(images), compresslevel=6, mtime=0)


# ---------------------------------------------------------------------------
# PNG, tar of PNGs, npz
# ---------------------------------------------------------------------------


def png_bytes(arr, mode=None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def vdo_tar(path, folder, images, shuffle=True, extra=None):
    """A van den Oord et al. style tar: `folder`/NNNNNNN.png members.  Member
    order in the archive is shuffled; readers must sort by name."""
    names = [f"{folder}/{i:07d}.png" for i in range(len(images))]
    order = list(range(len(images)))
    if shuffle:
        order = list(np.random.default_rng(0).permutation(len(images)))
    with tarfile.open(path, "w") as tar:
        for i in order:
            tar_add_bytes(tar, names[i], png_bytes(images[i]))
        if extra is not None:
            extra(tar)
    return path


def chrabaszcz_npz(path, images, compressed=False):
    """A Chrabaszcz et al. batch: 'data' (n, 3*S*S) CHW-flat, plus labels/mean."""
    n, s = images.shape[0], images.shape[1]
    data = images.transpose(0, 3, 1, 2).reshape(n, 3 * s * s)
    save = np.savez_compressed if compressed else np.savez
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save(path, data=data, labels=np.arange(1, n + 1, dtype=np.int64), mean=np.zeros(3 * s * s, dtype=np.float64))
    return path


def png_folder(root, images, prefix="img", mode=None):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = root / f"{prefix}_{i:04d}.png"
        p.write_bytes(png_bytes(img, mode))
        paths.append(p)
    return paths


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="session")
def fmt():
    """The builders above, as attributes (usable inside hypothesis tests)."""
    return types.SimpleNamespace(
        make_images=make_images,
        py2_pickle=py2_pickle,
        cifar_batch=cifar_batch,
        tar_add_bytes=tar_add_bytes,
        cifar_tarball_bytes=cifar_tarball_bytes,
        cifar_expected=cifar_expected,
        idx_bytes=idx_bytes,
        idx_gz_bytes=idx_gz_bytes,
        png_bytes=png_bytes,
        vdo_tar=vdo_tar,
        chrabaszcz_npz=chrabaszcz_npz,
        png_folder=png_folder,
        md5_bytes=md5_bytes,
        closed_port_url=closed_port_url,
        CIFAR_DIR=CIFAR_DIR,
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """(served_dir, base_url): a local HTTP server on 127.0.0.1 serving a folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "datasets"
    d.mkdir()
    return d


@pytest.fixture
def logbook():
    """A list; pass ``logbook.append`` as ``log`` to record messages."""
    return []


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the internet or the user's cache: every download URL
    points at a closed local port (tests that serve files override this), and
    FLOWPP_DATA_DIR points into tmp_path."""
    from flowpp.data import DATASETS

    dead = closed_port_url()
    for name, spec in DATASETS.items():
        if spec.mirrors:
            replace_mirrors(monkeypatch, name, [dead])
    monkeypatch.setenv("FLOWPP_DATA_DIR", str(tmp_path / "env-data-dir"))
