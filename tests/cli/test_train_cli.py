"""End-to-end command-line tests on tiny data: the files and numbers each command produces."""

import csv
import json
import math
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import flowpp
from flowpp.checkpoint import list_checkpoints, load_checkpoint
from flowpp.cli import main
from flowpp.schedules import learning_rate

TRAIN = ["train", "--config", "tiny", "--no-progress", "--eval-images", "16", "--log-every", "1", "--threads", "1"]


def run(*argv):
    return main([str(a) for a in argv])


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")  # once per (xdist) process, even when its tests are spread out
def trained(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 6, "--eval-every", 3) == 0
    return out


def test_train_writes_the_run_directory(trained):
    for name in ("config.json", "settings.json", "metrics.csv", "summary.json"):
        assert (trained / name).is_file(), name
    cfg = json.loads((trained / "config.json").read_text())
    assert flowpp.FlowConfig.from_dict(cfg) == flowpp.get_config("tiny")
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["images_seen"] == 6 * 8
    assert math.isfinite(summary["final_valid_bpd"]) and 0 < summary["final_valid_bpd"] < 12
    assert summary["final_inverse_error"] < 1e-2
    rows = read_metrics(trained)
    assert list(rows[0]) == [
        "step",
        "images_seen",
        "train_bpd",
        "valid_bpd",
        "lr",
        "img_per_s",
        "inverse_error",
        "grad_norm",
        "skipped_steps",
        "rollbacks",
        "train_seconds",
        "wall_seconds",
        "threads",
    ]
    train_rows = [r for r in rows if r["train_bpd"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5, 6]
    cfg = flowpp.get_config("tiny")
    for r in train_rows:  # the logged lr is the schedule's lr of that step
        assert float(r["lr"]) == pytest.approx(learning_rate(cfg, int(r["step"]) - 1, int(r["step"]) / 6), rel=1e-5)
    assert any(r["valid_bpd"] for r in rows if r["step"] == "3")
    ckpts = list_checkpoints(trained / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint-00000006.pt"]
    ck = load_checkpoint(ckpts[-1])
    assert ck["train_state"]["step"] == 6 and set(ck) >= {"model", "ema", "optimizer", "rng", "config"}
    grids = sorted((trained / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000003.png", "step-00000006.png"]
    with Image.open(grids[-1]) as im:  # 64 samples of 8x8 in an 8x8 grid with 1 px padding
        assert im.size == (8 * 9 + 1, 8 * 9 + 1) and im.mode == "RGB"


def test_resume_continues_from_saved_step_and_lr(tmp_path, tiny_npz):
    out = tmp_path / "run"
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 4) == 0
    assert (
        run(
            "train",
            "--resume",
            "--out",
            out,
            "--max-steps",
            7,
            "--no-progress",
            "--log-every",
            "1",
            "--eval-images",
            "16",
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["resumed_from"].endswith("checkpoint-00000004.pt")
    rows = [r for r in read_metrics(out) if r["train_bpd"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    cfg = flowpp.get_config("tiny")
    assert float(rows[4]["lr"]) == pytest.approx(learning_rate(cfg, 4, 5 / 7), rel=1e-5)
    ck = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert ck["train_state"]["images_seen"] == 7 * 8


def test_resume_is_exact(tmp_path, tiny_npz):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(*TRAIN, "--data", tiny_npz, "--out", a, "--max-steps", 6) == 0
    assert run(*TRAIN, "--data", tiny_npz, "--out", b, "--max-steps", 3) == 0
    assert (
        run(
            "train",
            "--resume",
            "--out",
            b,
            "--max-steps",
            6,
            "--no-progress",
            "--eval-images",
            "16",
            "--log-every",
            "1",
        )
        == 0
    )
    ca = load_checkpoint(list_checkpoints(a / "checkpoints")[-1])
    cb = load_checkpoint(list_checkpoints(b / "checkpoints")[-1])
    for key in ("model", "ema"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), (key, name)
    ta = [r["train_bpd"] for r in read_metrics(a) if r["train_bpd"]]
    tb = [r["train_bpd"] for r in read_metrics(b) if r["train_bpd"]]
    assert ta == tb


def test_the_first_metrics_row_after_a_resume_covers_the_same_steps(tmp_path, tiny_npz):
    # Rows every 4 steps, checkpoints every 3; a crash in step 7 resumes from the step-6 checkpoint,
    # mid-window: the resumed row at step 8 must still average steps 5-8.
    from flowpp.training import TrainSettings, train

    z = np.load(tiny_npz)
    data = (z["x_train"], z["x_valid"])

    def settings(out):
        return TrainSettings(out_dir=str(out), max_steps=8, log_every=4, checkpoint_every=3, checkpoint_minutes=None,
                             eval_images=8, progress=False, device="cpu")  # fmt: skip

    def crash(step, loss):
        if step == 6:
            raise RuntimeError("simulated crash")
        return loss

    quiet = lambda *_: None  # noqa: E731
    a, b = tmp_path / "a", tmp_path / "b"
    train(flowpp.get_config("tiny"), settings(a), *data, log=quiet)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(flowpp.get_config("tiny"), settings(b), *data, log=quiet, step_hook=crash)
    train(flowpp.get_config("tiny"), settings(b), *data, log=quiet, resume=True)
    rows_a = {r["step"]: r["train_bpd"] for r in read_metrics(a) if r["train_bpd"]}
    rows_b = {r["step"]: r["train_bpd"] for r in read_metrics(b) if r["train_bpd"]}
    assert set(rows_a) == set(rows_b) == {"4", "8"} and rows_b == rows_a


def test_refuses_to_overwrite_and_checks_config_on_resume(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 2) == 0
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 2) == 2
    assert "--resume" in capsys.readouterr().err
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 4, "--resume", "--set", "filters=16") == 2
    err = capsys.readouterr().err
    assert "another config" in err and "filters" in err
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint-00000002.pt"]  # nothing lost


def test_eval_single_and_importance_weighted(trained, tiny_npz, tmp_path):
    out = tmp_path / "eval.json"
    assert (
        run(
            "eval",
            "--run",
            trained,
            "--data",
            tiny_npz,
            "--split",
            "test",
            "--samples",
            4,
            "--out",
            out,
            "--weights",
            "last",
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n_images"] == 24 and res["samples"] == 4 and res["split"] == "test"
    assert res["iw_bpd"] <= res["bpd"]  # log-mean-exp >= mean, image by image
    assert res["bpd_se"] > 0 and res["iw_bpd_se"] > 0
    assert res["checkpoint"].endswith("checkpoint-00000006.pt")
    assert run("eval", "--run", trained, "--data", tiny_npz, "--split", "test") == 0
    single = json.loads((trained / "eval-tiny-test-S1.json").read_text())
    assert "iw_bpd" not in single and single["n_images"] == 24


def test_sample_grid_and_npz(trained, tmp_path):
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert run("sample", "--run", trained, "-n", 10, "--seed", 3, "--out", png, "--npz", npz) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (4 * 9 + 1, 3 * 9 + 1)
    x = np.load(npz)["x"]
    assert x.shape == (10, 8, 8, 3) and x.dtype == np.uint8
    png2, npz2 = tmp_path / "grid2.png", tmp_path / "s2.npz"
    assert run("sample", "--run", trained, "-n", 10, "--seed", 3, "--out", png2, "--npz", npz2) == 0
    assert np.array_equal(np.load(npz2)["x"], x)  # same seed, same samples


def test_score_pngs_and_npz(trained, tmp_path, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    npz = tmp_path / "more.npz"
    np.savez(npz, x=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    capsys.readouterr()
    assert run("score", "--run", trained, *paths, npz, "--json", "--samples", 2) == 0
    res = json.loads(capsys.readouterr().out)
    names = [r["image"] for r in res["scores"]]
    assert names == ["img0.png", "img1.png", "more.npz[0]", "more.npz[1]", "more.npz[2]"]
    assert all(0 < r["bpd"] < 20 for r in res["scores"])
    assert run("score", "--run", trained, *paths) == 0
    assert "img1.png" in capsys.readouterr().out
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(wrong)
    assert run("score", "--run", trained, wrong) == 2
    err = capsys.readouterr().err
    assert "wrong.png" in err and "16x16" in err and "8x8" in err


def test_dry_run_prints_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert (
        run(
            "train",
            "--config",
            "cifar10",
            "--data",
            "cifar10",
            "--out",
            out,
            "--dry-run",
            "--batch-size",
            "32",
            "--set",
            "dropout=0.1",
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["batch_size"] == 32 and printed["config"]["dropout"] == 0.1
    assert printed["config"]["filters"] == 96
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "eval", "sample", "score", "export", "import", "configs"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: flowpp " + command in capsys.readouterr().out


def test_clear_errors(tmp_path, tiny_npz, capsys):
    assert run(*TRAIN, "--data", tmp_path / "missing.npz", "--out", tmp_path / "r", "--max-steps", 1) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert run("train", "--config", "mnist", "--data", tiny_npz, "--out", tmp_path / "r2", "--max-steps", 1) == 2
    assert "(1, 28, 28)" in capsys.readouterr().err
    assert run("train", "--config", "nope", "--data", tiny_npz, "--out", tmp_path / "r3", "--max-steps", 1) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err
    assert run("eval", "--run", tmp_path / "no-run", "--data", tiny_npz) == 2
    assert "no-run" in capsys.readouterr().err
    assert run("sample", "--run", tmp_path, "--out", tmp_path / "x.png") == 2
    assert "no readable checkpoint" in capsys.readouterr().err


def test_configs_lists_parameter_counts(capsys):
    assert run("configs") == 0
    out = capsys.readouterr().out
    assert "31,443,440" in out and "168,955,724" in out and "73,489,960" in out


def test_export_safetensors(trained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    out = tmp_path / "w.safetensors"
    assert run("export", "--run", trained, "--out", out) == 0
    tensors = safetensors.load_file(str(out))
    model = flowpp.FlowPlusPlus(flowpp.get_config("tiny"))
    model.load_state_dict(tensors)
    ck = load_checkpoint(list_checkpoints(trained / "checkpoints")[-1])
    for k, v in ck["ema"].items():
        assert torch.equal(tensors[k], v)


@pytest.mark.parametrize("command", ["eval", "sample", "score"])
def test_compile_flag_compiles_the_loaded_model(trained, tiny_npz, tmp_path, monkeypatch, command):
    # The compiled numbers themselves are checked in tests/test_model.py; here only the wiring.
    calls = []
    monkeypatch.setattr(flowpp.FlowPlusPlus, "compile_networks", lambda self, **kw: calls.append(self) or self)
    png = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    args = {
        "eval": ("--data", tiny_npz, "--split", "test", "--limit", 4, "--out", tmp_path / "e.json"),
        "sample": ("-n", 2, "--out", tmp_path / "s.png"),
        "score": (png, "--samples", 1),
    }[command]
    assert run(command, "--run", trained, *args) == 0
    assert len(calls) == 0
    assert run(command, "--run", trained, *args, "--compile") == 0
    assert len(calls) == 1 and isinstance(calls[0], flowpp.FlowPlusPlus)


def test_training_from_a_memory_map_with_prefetching_is_the_same_training(tmp_path, tiny_npz):
    # The prepared path (batches gathered from a memory map, a background thread running ahead)
    # trains exactly as the plain one: the same batches, noise and steps.
    from flowpp.training import TrainSettings, train

    z = np.load(tiny_npz)
    np.save(tmp_path / "train.npy", z["x_train"])
    mapped = np.load(tmp_path / "train.npy", mmap_mode="r")

    def settings(out, prefetch):
        return TrainSettings(out_dir=str(out), max_steps=6, log_every=1, checkpoint_minutes=None, eval_images=8,
                             progress=False, device="cpu", prefetch=prefetch)  # fmt: skip

    quiet = lambda *_: None  # noqa: E731
    a, b = tmp_path / "a", tmp_path / "b"
    train(flowpp.get_config("tiny"), settings(a, 0), z["x_train"], z["x_valid"], log=quiet)
    train(flowpp.get_config("tiny"), settings(b, 2), mapped, z["x_valid"], log=quiet)
    assert [r["train_bpd"] for r in read_metrics(a)] == [r["train_bpd"] for r in read_metrics(b)]
    ca, cb = (load_checkpoint(list_checkpoints(r / "checkpoints")[-1]) for r in (a, b))
    assert all(torch.equal(t, cb["model"][k]) for k, t in ca["model"].items())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_score_refuses_a_pipe_named_like_an_image_instead_of_waiting_on_it(trained, tmp_path, capsys):
    fifo = tmp_path / "stream.png"
    os.mkfifo(fifo)

    def unblock():  # were it opened for reading, this writer would end the wait (and the test would fail)
        time.sleep(10)
        with open(fifo, "wb") as f:
            f.write(b"not a png")

    threading.Thread(target=unblock, daemon=True).start()
    started = time.monotonic()
    assert run("score", "--run", trained, fifo) == 2
    assert "stream.png: is not a regular file" in capsys.readouterr().err
    assert time.monotonic() - started < 10
