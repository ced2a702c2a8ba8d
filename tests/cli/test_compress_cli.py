"""flowpp compress / decompress: PNG files by name, arrays, dataset splits, and refusals."""

import numpy as np
import pytest
import torch
from helpers import perturb_parameters
from PIL import Image

import flowpp
from flowpp.cli import main
from flowpp.export import save_export


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_npz):
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(flowpp.get_config("tiny"))
    model.initialize(torch.from_numpy(np.load(tiny_npz)["x_train"][:16]).permute(0, 3, 1, 2).long())
    perturb_parameters(model, 0.05, seed=1)
    return save_export(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", {}, {})[0]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_png_files_come_back_with_their_names_and_pixels(model_file, tiny_npz, tmp_path, capsys):
    images = np.load(tiny_npz)["x_test"][:3]
    pngs = []
    for i, img in enumerate(images):
        pngs.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(pngs[-1])
    archive = tmp_path / "a.fpp"
    assert run("compress", "--run", model_file, *pngs, "--out", archive, "--no-progress") == 0
    assert "3 images" in capsys.readouterr().out
    assert run("decompress", archive, "--run", model_file, "--out", tmp_path / "out", "--no-progress") == 0
    assert "wrote 3 PNG files in" in capsys.readouterr().out
    assert run("compress", "--run", model_file, pngs[0], "--out", tmp_path / "one.fpp", "--no-progress") == 0
    assert run("decompress", tmp_path / "one.fpp", "--run", model_file, "--out", tmp_path / "one", "--no-progress") == 0
    out = capsys.readouterr().out
    assert ": 1 image, " in out and "wrote 1 PNG file in" in out
    for i, img in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"img{i}.png")), img)


def test_arrays_and_dataset_splits_come_back_as_images_npz(model_file, tiny_npz, tmp_path):
    x = np.load(tiny_npz)["x_test"][:4]
    np.savez(tmp_path / "in.npz", x=x)
    assert run("compress", "--run", model_file, tmp_path / "in.npz", "--out", tmp_path / "a.fpp") == 0
    assert run("decompress", tmp_path / "a.fpp", "--run", model_file, "--out", tmp_path / "o1") == 0
    assert np.array_equal(np.load(tmp_path / "o1" / "images.npz")["x"], x)
    args = ("--data", tiny_npz, "--split", "test", "--limit", 2, "--no-prepare", "--out", tmp_path / "b.fpp")
    assert run("compress", "--run", model_file, *args) == 0
    assert run("decompress", tmp_path / "b.fpp", "--run", model_file, "--out", tmp_path / "o2") == 0
    assert np.array_equal(np.load(tmp_path / "o2" / "images.npz")["x"], x[:2])


def test_nothing_is_replaced_and_a_damaged_archive_writes_nothing(model_file, tiny_npz, tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "in.npz", x=np.load(tiny_npz)["x_test"][:1])
    archive = tmp_path / "a.fpp"
    archive.write_bytes(b"keep me")
    assert run("compress", "--run", model_file, tmp_path / "in.npz", "--out", archive) == 2
    assert "already exists" in capsys.readouterr().err and archive.read_bytes() == b"keep me"
    assert run("compress", "--run", model_file, tmp_path / "in.npz", "--out", archive, "--force") == 0
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "images.npz").write_bytes(b"mine")
    import flowpp.codec

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the output could not be written")

    monkeypatch.setattr(flowpp.codec, "decompress", no_decoding)  # refused before decoding
    assert run("decompress", archive, "--run", model_file, "--out", tmp_path / "o") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "o" / "images.npz").read_bytes() == b"mine"
    (tmp_path / "a-file").write_bytes(b"mine too")
    assert run("decompress", archive, "--run", model_file, "--out", tmp_path / "a-file") == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_bytes() == b"mine too"
    monkeypatch.undo()
    data = archive.read_bytes()
    (tmp_path / "bad.fpp").write_bytes(data[:-5])
    assert run("decompress", tmp_path / "bad.fpp", "--run", model_file, "--out", tmp_path / "new") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowpp: error: archive truncated") and not (tmp_path / "new").exists()


def test_inputs_that_cannot_round_trip_are_refused(model_file, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "gray.png")
    assert run("compress", "--run", model_file, tmp_path / "gray.png", "--out", tmp_path / "a.fpp") == 2
    assert "the model takes" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", y=np.zeros((1, 8, 8, 3), np.uint8))
    assert run("compress", "--run", model_file, tmp_path / "wrong.npz", "--out", tmp_path / "a.fpp") == 2
    assert "no array 'x'" in capsys.readouterr().err
    assert run("compress", "--run", model_file, "--out", tmp_path / "a.fpp") == 2
    assert "either image files or --data" in capsys.readouterr().err
    assert not (tmp_path / "a.fpp").exists()
