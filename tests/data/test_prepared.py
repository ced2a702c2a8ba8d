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
    from flowpp.data import for_config

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(for_config, "load_prepared", refuse)
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


def _small_npz(path, fmt, start=0):
    np.savez(path, x_train=fmt.make_images(30, 8, 8, 3, start=start),
             x_test=fmt.make_images(5, 8, 8, 3, start=start + 7))  # fmt: skip
    return path


def _edit_manifest(folder, change):
    path = folder / "manifest.json"
    edited = change(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))


def _split(split, *value):
    return lambda m: dict(m, splits=dict(m["splits"], **{split: list(value) if len(value) > 1 else value[0]}))


def _file_info(name, **changes):
    return lambda m: dict(m, files=dict(m["files"], **{name: dict(m["files"][name], **changes)}))


OUTSIDE = "../../../outside.npy"  # from <tmp>/d/prepared/<key>/: the array the test leaves in <tmp>


@pytest.mark.parametrize(
    "change, reason",
    [
        (_split("train", "test.npy", 0, 5), "the train split must read trainvalid.npy, not 'test.npy'"),
        (_split("train", OUTSIDE, 0, 5), "the train split must read trainvalid.npy"),
        (_split("test", "ABSOLUTE", 0, 5), "the test split must read test.npy"),
        (_split("valid", "trainvalid.npy", 0, 3), "the valid split must be the last rows of trainvalid.npy"),
        (_split("train", "trainvalid.npy", 0, 30), "the train split must be the rows of trainvalid.npy before"),
        (_split("train+valid", "trainvalid.npy", 0, 27), "the train+valid split must be all of trainvalid.npy"),
        (_split("train", "trainvalid.npy", -5, 27), "the train split reads rows -5..27 of trainvalid.npy, which"),
        (_split("train", "trainvalid.npy", 0, 99), "the train split reads rows 0..99"),
        (_split("test", "test.npy", 2, 1), "the test split reads rows 2..1"),
        (_split("test", None), "the manifest lists test.npy but has no test split"),
        (lambda m: dict(m, files=dict(m["files"], test=m["files"]["test.npy"])), "lists a file flowpp does not write"),
        (lambda m: dict(m, files=dict(m["files"], **{OUTSIDE: m["files"]["test.npy"]})), "lists a file flowpp"),
        (_split("train", "trainvalid.npy", 0, True), "its manifest is malformed"),
        (_split("train", "trainvalid.npy", 0.0, 27), "its manifest is malformed"),
        (_split("train", {"file": "trainvalid.npy"}), "its manifest is malformed"),
        (lambda m: [m], "its manifest is malformed"),
        (lambda m: "[" * 100_000 + "]" * 100_000, "its manifest is unreadable"),
        (lambda m: dict(m, files=list(m["files"])), "its manifest is malformed"),
        (lambda m: dict(m, splits="train"), "its manifest is malformed"),
        (lambda m: {k: v for k, v in m.items() if k != "splits"}, "its manifest is malformed"),
        (lambda m: dict(m, sources=3), "its manifest is malformed"),
        (lambda m: dict(m, sources=[None]), "its manifest is malformed"),
        (lambda m: dict(m, descriptions=["a"]), "its manifest is malformed"),
        (lambda m: dict(m, num_levels="256"), "its manifest is malformed"),
        (lambda m: dict(m, num_levels=300), "its manifest is malformed"),
        (_file_info("test.npy", shape="5"), "its manifest is malformed"),
        (_file_info("test.npy", spot=None), "its manifest is malformed"),
    ],
)
def test_a_manifest_that_does_not_describe_what_flowpp_wrote_is_rebuilt(tmp_path, fmt, change, reason):
    npz = _small_npz(tmp_path / "set.npz", fmt)
    outside = tmp_path / "outside.npy"  # a readable array outside the preparation (named by OUTSIDE)
    np.save(outside, np.full((5, 8, 8, 3), 255, np.uint8))
    folder = prepare(npz, tmp_path / "d", log=None)
    _edit_manifest(folder, lambda m: json.loads(json.dumps(change(m)).replace('"ABSOLUTE"', json.dumps(str(outside)))))
    msgs = []
    splits = {s: load_prepared(npz, s, tmp_path / "d", log=msgs.append) for s in ("train", "valid", "test")}
    assert "rebuilding" in msgs[0] and reason in msgs[0], msgs
    np.testing.assert_array_equal(splits["train"].images, fmt.make_images(27, 8, 8, 3))
    np.testing.assert_array_equal(splits["valid"].images, fmt.make_images(3, 8, 8, 3, start=27))
    np.testing.assert_array_equal(splits["test"].images, fmt.make_images(5, 8, 8, 3, start=7))
    assert splits["train"].num_levels == 256 and verify_prepared(npz, tmp_path / "d") is None


def test_a_manifest_on_other_levels_than_its_folder_is_for_is_rebuilt(tmp_path, fmt):
    npz = _small_npz(tmp_path / "set.npz", fmt)
    folder = prepare(npz, tmp_path / "d", num_levels=32, log=None)
    _edit_manifest(folder, lambda m: dict(m, num_levels=256))
    msgs = []
    train = load_prepared(npz, "train", tmp_path / "d", num_levels=32, log=msgs.append)
    assert "rebuilding" in msgs[0] and "the manifest says 256 levels, this preparation is for 32" in msgs[0]
    assert train.num_levels == 32


def test_a_prepared_file_outside_its_folder_is_not_read(tmp_path, fmt):
    npz = _small_npz(tmp_path / "set.npz", fmt)
    folder = prepare(npz, tmp_path / "d", log=None)
    test = folder / "test.npy"
    moved = tmp_path / "elsewhere.npy"
    test.rename(moved)
    test.symlink_to(moved)  # the same bytes, but read from outside the folder
    msgs = []
    prepare(npz, tmp_path / "d", log=msgs.append)
    assert "rebuilding" in msgs[0] and "test.npy is not a file inside" in msgs[0]
    assert not (folder / "test.npy").is_symlink()


def _rewrite_keeping_size_and_mtime(path, fmt):
    st = path.stat()
    _small_npz(path, fmt, start=100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_verify_compares_the_sources_digests_and_rebuilds_a_stale_preparation(tmp_path, fmt):
    npz = _small_npz(tmp_path / "set.npz", fmt)
    folder = prepare(npz, tmp_path / "d", log=None)
    _rewrite_keeping_size_and_mtime(npz, fmt)
    assert prepare(npz, tmp_path / "d", log=None) == folder  # the cheap check cannot see it (documented)
    why = verify_prepared(npz, tmp_path / "d")
    assert why == f"its sources changed since it was prepared ({npz}: its SHA-256 differs from the manifest's)"
    msgs = []
    prepare(npz, tmp_path / "d", verify=True, log=msgs.append)
    assert "rebuilding" in msgs[0] and "SHA-256 differs" in msgs[0]
    test = load_prepared(npz, "test", tmp_path / "d", log=None)
    np.testing.assert_array_equal(test.images, fmt.make_images(5, 8, 8, 3, start=107))
    assert verify_prepared(npz, tmp_path / "d") is None


def test_the_prepare_command_does_not_call_a_stale_preparation_current(tmp_path, fmt, capsys):
    from flowpp.cli import main

    npz = _small_npz(tmp_path / "set.npz", fmt)
    args = ["prepare", "--data", str(npz), "--data-dir", str(tmp_path / "d")]
    assert main(args) == 0
    _rewrite_keeping_size_and_mtime(npz, fmt)
    capsys.readouterr()
    assert main([*args, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "whole and current" not in out and "SHA-256 differs" in out and "27 train / 3 valid / 5 test" in out
    assert main([*args, "--verify"]) == 0 and "whole and current (full digests checked)" in capsys.readouterr().out
    test = load_prepared(npz, "test", tmp_path / "d", log=None)
    np.testing.assert_array_equal(test.images, fmt.make_images(5, 8, 8, 3, start=107))


def test_verify_sees_pixel_values_above_the_manifests_levels(tmp_path, fmt):
    npz = tmp_path / "five-bit.npz"
    np.savez(npz, x_train=fmt.make_images(30, 8, 8, 3, levels=32), num_levels=32)
    folder = prepare(npz, tmp_path / "d", log=None)
    data = np.load(folder / "trainvalid.npy", mmap_mode="r+")
    data[12, 3, 3, 0] = 200  # rewritten with its digests, as a tool that trusted the manifest might
    data.flush()
    del data
    _edit_manifest(folder, lambda m: dict(m, files=dict(m["files"], **{
        "trainvalid.npy": _digests_of(folder / "trainvalid.npy")})))  # fmt: skip
    assert verify_prepared(npz, tmp_path / "d") == "trainvalid.npy holds pixel value 200, the manifest says 32 levels"


def _digests_of(path):
    from flowpp.data.prepared import _digests

    return _digests(path)


def test_train_uses_the_preparation_that_flowpp_prepare_made(tmp_path, fmt, monkeypatch, capsys):
    from flowpp import jobs
    from flowpp.cli import main

    npz = _small_npz(tmp_path / "set.npz", fmt)
    data_dir = str(tmp_path / "d")
    assert main(["prepare", "--data", str(npz), "--data-dir", data_dir]) == 0
    seen = {}

    def train(config, settings, train_images, valid_images, **kw):
        seen.update(train=train_images, valid=valid_images)
        return {}

    monkeypatch.setattr(jobs, "train", train)
    train_args = ["train", "--config", "tiny", "--data", str(npz), "--data-dir", data_dir,
                  "--out", str(tmp_path / "run"), "--max-steps", "1"]  # fmt: skip
    capsys.readouterr()
    assert main(train_args) == 0
    out = capsys.readouterr().out
    assert isinstance(seen["train"], np.memmap) and isinstance(seen["valid"], np.memmap)
    assert f"using the preparation of {npz}" in out
    np.testing.assert_array_equal(seen["train"], fmt.make_images(27, 8, 8, 3))
    assert main([*train_args, "--no-prepare"]) == 0 and not isinstance(seen["train"], np.memmap)


def test_an_existing_preparation_is_used_only_while_it_is_current(tmp_path, fmt):
    npz = _small_npz(tmp_path / "set.npz", fmt)
    config = flowpp.get_config("tiny")
    folder = prepare(npz, tmp_path, log=None)
    msgs = []
    got = load_images(str(npz), "valid", config, data_dir=tmp_path, log=msgs.append)
    assert isinstance(got.images, np.memmap) and any("using the preparation" in m for m in msgs)
    five_bit = load_images(str(npz), "train", config.replace(num_levels=32), data_dir=tmp_path, log=None)
    assert five_bit.num_levels == 32 and not prepared_path(npz, tmp_path, 32).exists()
    np.testing.assert_array_equal(five_bit.images, fmt.make_images(27, 8, 8, 3) >> 3)
    _small_npz(npz, fmt, start=100)
    os.utime(npz, ns=(1, 1))  # a change the cheap check sees
    before = (folder / "manifest.json").read_text()
    msgs = []
    got = load_images(str(npz), "valid", config, data_dir=tmp_path, log=msgs.append)
    assert not isinstance(got.images, np.memmap)
    np.testing.assert_array_equal(got.images, fmt.make_images(3, 8, 8, 3, start=127))
    assert any("is not current" in m and "--prepare" in m for m in msgs), msgs
    assert (folder / "manifest.json").read_text() == before  # left as it is: preparing was not asked for
