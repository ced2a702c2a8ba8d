"""Downloads against a local HTTP server: checksum, atomic write, errors, no network when present."""

import os

import numpy as np
import pytest
from helpers import published_md5, replace_holdout, replace_md5, replace_mirrors

from flowpp.data import DatasetError, load_dataset
from flowpp.data.download import fetch


def _leftovers(folder):
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_cifar_download_success(http_dir, data_dir, fmt, monkeypatch, logbook):
    served, url = http_dir
    blob = fmt.cifar_tarball_bytes(per_batch=2, test_n=3)
    (served / "cifar-10-python.tar.gz").write_bytes(blob)
    replace_mirrors(monkeypatch, "cifar10", [url])
    replace_md5(monkeypatch, "cifar10", "cifar-10-python.tar.gz", fmt.md5_bytes(blob))
    te = load_dataset("cifar10", "test", data_dir=data_dir, log=logbook.append)
    np.testing.assert_array_equal(te.images, fmt.cifar_expected(2, 3)[1])
    root = data_dir / "cifar10"
    assert _leftovers(root) == ["cifar-10-python.tar.gz"]  # no temp files
    assert (root / "cifar-10-python.tar.gz").read_bytes() == blob
    assert any("downloading" in m for m in logbook) and any("MD5 verified" in m for m in logbook)


def test_wrong_checksum_refused_and_nothing_kept(http_dir, data_dir, fmt, monkeypatch):
    served, url = http_dir
    (served / "cifar-10-python.tar.gz").write_bytes(fmt.cifar_tarball_bytes(per_batch=2))
    replace_mirrors(monkeypatch, "cifar10", [url])  # the official MD5 stays: mismatch
    with pytest.raises(DatasetError) as ei:
        load_dataset("cifar10", "test", data_dir=data_dir, log=None)
    msg = str(ei.value)
    assert "checksum mismatch" in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert "cifar-10-python.tar.gz" in msg and "nothing was saved" in msg
    assert _leftovers(data_dir / "cifar10") == []


def test_http_404(http_dir, data_dir, monkeypatch):
    _, url = http_dir
    replace_mirrors(monkeypatch, "mnist", [url])
    with pytest.raises(DatasetError, match="HTTP 404") as ei:
        load_dataset("mnist", "test", data_dir=data_dir, log=None)
    assert "t10k-images-idx3-ubyte.gz" in str(ei.value)
    assert _leftovers(data_dir / "mnist") == []


def test_mirror_fallback(http_dir, data_dir, fmt, monkeypatch, logbook):
    served, url = http_dir
    test = fmt.make_images(3, 28, 28, 1)
    blob = fmt.idx_gz_bytes(test)
    (served / "t10k-images-idx3-ubyte.gz").write_bytes(blob)
    replace_mirrors(monkeypatch, "fashion-mnist", [fmt.closed_port_url(), url + "missing/", url])
    replace_md5(monkeypatch, "fashion-mnist", "t10k-images-idx3-ubyte.gz", fmt.md5_bytes(blob))
    te = load_dataset("fashion-mnist", "test", data_dir=data_dir, log=logbook.append)
    np.testing.assert_array_equal(te.images, test)
    assert sum("downloading" in m for m in logbook) == 3
    assert _leftovers(data_dir / "fashion-mnist") == ["t10k-images-idx3-ubyte.gz"]


def test_offline_error_names_file_and_place(data_dir):
    # URLS point at a closed port (autouse fixture): like being offline.
    with pytest.raises(DatasetError) as ei:
        load_dataset("mnist", "train", data_dir=data_dir, log=None)
    msg = str(ei.value)
    assert "cannot connect" in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(data_dir / "mnist" / "train-images-idx3-ubyte.gz") in msg
    assert _leftovers(data_dir / "mnist") == []


def test_no_network_when_file_present(data_dir, fmt, monkeypatch):
    # The URL is a closed port: any network attempt would fail the load.
    replace_holdout(monkeypatch, "cifar10", valid=2)
    root = data_dir / "cifar10"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(fmt.cifar_tarball_bytes(per_batch=2))

    def no_network(*a, **k):
        raise AssertionError("network used although the file is present")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    tr = load_dataset("cifar10", "train", data_dir=data_dir, download=True, log=None)
    assert tr.images.shape == (8, 32, 32, 3)


def test_fetch_truncated_response(tmp_path, fmt):
    """A server that announces more bytes than it sends leaves no file."""
    import http.server
    import threading

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        dest = tmp_path / "out" / "f.bin"
        with pytest.raises(DatasetError, match="f.bin"):
            fetch(
                [f"http://127.0.0.1:{server.server_address[1]}/f.bin"],
                dest,
                fmt.md5_bytes(b"x" * 1000),
                timeout=5,
                log=None,
            )
        assert _leftovers(dest.parent) == []
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_existing_good_file_is_replaced_only_after_verification(http_dir, tmp_path, fmt):
    served, url = http_dir
    (served / "f.bin").write_bytes(b"new content")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old content")
    with pytest.raises(DatasetError, match="checksum mismatch"):
        fetch([url + "f.bin"], dest, fmt.md5_bytes(b"something else"), log=None)
    assert dest.read_bytes() == b"old content"
    fetch([url + "f.bin"], dest, fmt.md5_bytes(b"new content"), log=None)
    assert dest.read_bytes() == b"new content"
    assert _leftovers(tmp_path) == ["f.bin", "served"]


def test_published_checksums_recorded():
    assert published_md5("cifar10", "cifar-10-python.tar.gz") == "c58f30108f718f92721af3b95e74349a"
    assert published_md5("mnist", "train-images-idx3-ubyte.gz") == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert published_md5("mnist", "t10k-images-idx3-ubyte.gz") == "9fb629c4189551a2d022fa330f9573f3"
    assert published_md5("fashion-mnist", "train-images-idx3-ubyte.gz") == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert published_md5("fashion-mnist", "t10k-images-idx3-ubyte.gz") == "bef4ecab320f06d8554ea6380940ec79"
