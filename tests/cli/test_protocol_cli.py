"""The official protocol from the command line: n-bit data, training on train+valid with the test
set for validation, and the paper's evaluation reminder."""

import json

import numpy as np
import pytest
from PIL import Image

from flowpp.cli import main

TRAIN = ["train", "--config", "tiny", "--no-progress", "--eval-images", "16", "--log-every", "5", "--threads", "1"]


def run(*argv):
    return main([str(a) for a in argv])


def test_five_bit_model_trains_evaluates_and_scores_below_five_bits(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run5"
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 60, "--bits", 5, "--set", "lr=0.005") == 0
    printed = capsys.readouterr().out
    assert "reducing 8-bit pixels to 5 bits (x >> 3)" in printed
    assert json.loads((out / "config.json").read_text())["num_levels"] == 32
    # The model has never seen the test images; a uniform model of 32 levels costs exactly 5 bits/dim.
    assert run("eval", "--run", out, "--data", tiny_npz, "--split", "test", "--samples", 4) == 0
    res = json.loads((out / "eval-tiny-test-S4.json").read_text())
    assert res["n_images"] == 24 and res["iw_bpd"] < res["bpd"] < 5.0
    # An 8-bit PNG is reduced the same way (x >> 3) when scored.
    test = np.load(tiny_npz)["x_test"]
    Image.fromarray(test[0]).save(tmp_path / "t0.png")
    np.savez(tmp_path / "t0.npz", x=test[:1] >> 3)
    capsys.readouterr()
    assert (
        run("score", "--run", out, tmp_path / "t0.png", tmp_path / "t0.npz", "--json", "--samples", 2, "--seed", 1) == 0
    )
    png_bpd, npz_bpd = (r["bpd"] for r in json.loads(capsys.readouterr().out)["scores"])
    assert png_bpd < 5.0 and abs(png_bpd - npz_bpd) < 0.2


def test_bits_must_agree_with_an_n_bit_config(tmp_path, tiny_npz, capsys):
    assert (
        run(*TRAIN, "--data", tiny_npz, "--out", tmp_path / "r", "--max-steps", 1, "--set", "num_levels=8", "--bits", 5)
        == 2
    )
    assert "--bits 5 asks for 32 levels, but config 'tiny' models 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: N must be 1..8
        run(*TRAIN, "--data", tiny_npz, "--out", tmp_path / "r", "--max-steps", 1, "--bits", 9)


def test_valid_split_test_trains_on_train_and_valid(tmp_path, tiny_npz, capsys):
    out = tmp_path / "paper"
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 2, "--valid-split", "test") == 0
    printed = capsys.readouterr().out
    assert "112 train+valid / 24 test images" in printed  # 96 x_train + 16 x_valid
    settings = json.loads((out / "settings.json").read_text())
    assert settings["train_split"] == "train+valid" and settings["valid_split"] == "test"
    # a resume keeps the run's protocol unless told otherwise
    assert run("train", "--resume", "--out", out, "--max-steps", 3, "--no-progress") == 0
    assert "112 train+valid / 24 test images" in capsys.readouterr().out


def test_eval_of_an_official_config_states_the_papers_protocol(tmp_path, tiny_npz, capsys):
    out = tmp_path / "official"
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 1, "--set", "official=true") == 0
    capsys.readouterr()
    assert run("eval", "--run", out, "--data", tiny_npz, "--split", "test", "--limit", 4) == 0
    printed = capsys.readouterr().out
    assert "S = 4096" in printed and "--split test --samples 4096" in printed
    assert (
        run(
            "eval",
            "--run",
            tmp_path / "official",
            "--data",
            tiny_npz,
            "--limit",
            1,
            "--samples",
            4096,
            "--batch-size",
            4096,
        )
        == 0
    )
    assert "S = 4096 on the test" not in capsys.readouterr().out
