"""Prepared datasets: decoded once, memory-mapped, checked at every use, rebuilt when stale or damaged."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import replace_holdout

import flowpp
from flowpp.data import DatasetError, load_dataset
from flowpp.data.prepared import load_prepared, prepare, prepared_path, verify_prepared
from flowpp.jobs import load_images


@pytest.fixture(autouse=True)
def _small_holdout(monkeypatch):
    replace_holdout(monkeypatch, "imagenet32", valid=3)


@pytest.fixture
def imagenet(data_dir, fmt):
    """ImageNet32 in Chrabaszcz et al. npz batches: 10 train batches of 2 images, a val file of 4."""
    root = data_dir / "imagenet32"
    train = fmt.make_images(20, 32, 32, 3)
    for i in range(10):
        fmt.chrabaszcz_npz(root / "Imagenet32_train_npz" / f"train_data_batch_{i + 1}.npz", train[2 * i : 2 * i + 2])
    fmt.chrabaszcz_npz(root / "Imagenet32_val_npz" / "val_data.npz", fmt.make_images(4, 32, 32, 3, start=50))
    return data_dir


def _splits(data, data_dir, **kw):
    return {s: load_prepared(data, s, data_dir, log=None, **kw) for s in ("train", "valid", "test", "train+valid")}


def test_prepared_splits_equal_the_decoded_ones_and_are_memory_maps(imagenet):
    prepared = _splits("imagenet32", imagenet)
    for split, got in prepared.items():
        want = load_dataset("imagenet32", split, data_dir=imagenet, download=False, log=None)
        np.testing.assert_array_equal(got.images, want.images)
        assert isinstance(got.images, np.memmap) and not got.images.flags.writeable
        assert got.num_levels == 256 and got.name == "imagenet32"
    assert prepared["test"].description.startswith("ImageNet32 (Chrabaszcz")
    m = json.loads((prepared_path("imagenet32", imagenet) / "manifest.json").read_text())
    assert m["splits"]["valid"] == ["trainvalid.npy", 17, 20] and m["flowpp_version"] == flowpp.__version__
    assert len(m["sources"]) == 1 + 2 + 10 + 1 and all(len(s["sha256"] or "x" * 64) == 64 for s in m["sources"])


def test_a_current_preparation_is_used_as_it_is(imagenet):
    folder = prepare("imagenet32", imagenet, log=None)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    msgs = []
    assert prepare("imagenet32", imagenet, log=msgs.append) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before and msgs == []


def test_changed_sources_make_it_rebuild(imagenet, fmt):
    prepare("imagenet32", imagenet, log=None)
    fmt.chrabaszcz_npz(
        imagenet / "imagenet32" / "Imagenet32_val_npz" / "val_data.npz", fmt.make_images(5, 32, 32, 3, start=9)
    )
    msgs = []
    test = load_prepared("imagenet32", "test", imagenet, log=msgs.append)
    assert "sources changed" in msgs[0] and "val_data.npz" in msgs[0]
    np.testing.assert_array_equal(test.images, fmt.make_images(5, 32, 32, 3, start=9))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "unreadable"),
        (lambda p: p.write_bytes(p.read_bytes() + b"more"), "bytes, its header needs"),
        (lambda p: _flip(p, 200), "damaged"),  # within the first block the spot digest reads
        (lambda p: p.write_bytes(b"junk"), "unreadable"),
    ],
)
def test_a_damaged_preparation_is_rebuilt_not_used(imagenet, damage, reason):
    folder = prepare("imagenet32", imagenet, log=None)
    want = load_prepared("imagenet32", "train", imagenet, log=None).images.copy()
    damage(folder / "trainvalid.npy")
    msgs = []
    got = load_prepared("imagenet32", "train", imagenet, log=msgs.append)
    assert "rebuilding" in msgs[0] and reason in msgs[0]
    np.testing.assert_array_equal(got.images, want)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_only_a_full_verification_sees_damage_between_the_sampled_blocks(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "big.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))  # fmt: skip
    folder = prepare(npz, tmp_path / "data", log=None)
    _flip(folder / "trainvalid.npy", 3_000_000)  # between the 16 sampled 64 KB blocks of 6 MB
    why = verify_prepared(npz, tmp_path / "data")
    assert why == "trainvalid.npy is damaged (its digest does not match the manifest)"
    assert prepare(npz, tmp_path / "data", log=None) == folder  # the cheap check passes ...
    msgs = []
    prepare(npz, tmp_path / "data", verify=True, log=msgs.append)  # ... a full one rebuilds
    assert "damaged" in msgs[0] and verify_prepared(npz, tmp_path / "data") is None


def test_another_format_version_is_rebuilt(imagenet):
    folder = prepare("imagenet32", imagenet, log=None)
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(m, version=0)))
    msgs = []
    prepare("imagenet32", imagenet, log=msgs.append)
    assert "another format" in msgs[0]


def test_files_are_prepared_when_asked_and_levels_reduced_once(tmp_path, fmt):
    tiny_npz = tmp_path / "tiny.npz"
    np.savez(tiny_npz, x_train=fmt.make_images(30, 8, 8, 3), x_test=fmt.make_images(5, 8, 8, 3, start=7))
    config = flowpp.get_config("tiny")
    direct = load_images(str(tiny_npz), "valid", config, data_dir=tmp_path, log=None)
    assert not isinstance(direct.images, np.memmap) and not (tmp_path / "prepared").exists()
    asked = load_images(str(tiny_npz), "valid", config, data_dir=tmp_path, prepared=True, log=None)
    assert isinstance(asked.images, np.memmap)
    np.testing.assert_array_equal(asked.images, direct.images)
    five_bit = load_images(str(tiny_npz), "train", config.replace(num_levels=32), data_dir=tmp_path, prepared=True,
                           log=None)  # fmt: skip
    assert five_bit.num_levels == 32 and prepared_path(tiny_npz, tmp_path, 32).name.endswith("-L32")
    np.testing.assert_array_equal(five_bit.images, np.load(tiny_npz)["x_train"][: len(five_bit)] >> 3)


def test_an_unwritable_data_dir_falls_back_to_reading_directly(imagenet, monkeypatch):
    from flowpp import jobs

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(jobs, "load_prepared", refuse)
    msgs = []
    got = load_images("imagenet32", "test", flowpp.get_config("imagenet32"), data_dir=imagenet, log=msgs.append)
    assert len(got) == 4 and any("cannot write" in m and "reading imagenet32 directly" in m for m in msgs)


@pytest.mark.processes
def test_processes_started_together_prepare_once(imagenet):
    code = (
        "import dataclasses, sys; from flowpp.data import registry; s = registry.DATASETS['imagenet32']; "
        "registry._ENTRIES['imagenet32'] = dataclasses.replace(s, holdout=dataclasses.replace(s.holdout, valid=3)); "
        "from flowpp.data.prepared import prepare; prepare('imagenet32', sys.argv[1], log=print)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(imagenet)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("prepared imagenet32" in out for out in outputs) == 1
    assert not [p for p in os.listdir(prepared_path("imagenet32", imagenet).parent) if ".tmp-" in p]


def test_the_prepare_command(tmp_path, fmt, capsys):
    from flowpp.cli import main

    npz = tmp_path / "set.npz"
    np.savez(npz, x_train=fmt.make_images(30, 8, 8, 3), x_test=fmt.make_images(5, 8, 8, 3, start=7))
    args = ["prepare", "--data", str(npz), "--data-dir", str(tmp_path / "d")]
    assert main(args) == 0
    assert "27 train / 3 valid / 5 test images, 256 levels" in capsys.readouterr().out
    assert main([*args, "--verify"]) == 0
    assert "whole and current (full digests checked)" in capsys.readouterr().out
    assert main([*args, "--bits", "5"]) == 0 and "32 levels" in capsys.readouterr().out
    assert main(["prepare", "--data", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err


def test_a_set_without_a_test_split_is_prepared_and_says_so_when_asked_for_it(tmp_path, fmt):
    npz = tmp_path / "no-test.npz"
    np.savez(npz, x_train=fmt.make_images(30, 8, 8, 3), x_valid=fmt.make_images(4, 8, 8, 3, start=3))
    train = load_prepared(npz, "train", tmp_path / "d", log=None)
    valid = load_prepared(npz, "valid", tmp_path / "d", log=None)
    assert len(train) == 30 and len(valid) == 4
    np.testing.assert_array_equal(valid.images, fmt.make_images(4, 8, 8, 3, start=3))
    with pytest.raises(DatasetError, match="no array 'x_test'"):
        load_prepared(npz, "test", tmp_path / "d", log=None)
