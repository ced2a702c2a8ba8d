"""`flowpp eval` (and the commands that read a run's weights) against damaged inputs, and its progress reports."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

import flowpp.evaluate
from flowpp.cli import main

TRAIN = ["train", "--config", "tiny", "--no-progress", "--eval-images", "8", "--checkpoint-every", "1",
         "--keep-checkpoints", "2", "--device", "cpu", "--threads", "1"]  # fmt: skip


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(autouse=True)
def _threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_npz):
    """A tiny run of two steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    before = torch.get_num_threads()
    try:
        assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 2) == 0
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture
def damaged(trained, tmp_path):
    """A copy of the run whose newest checkpoint lost its last bytes (a disk, a copy cut short)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    newest = out / "checkpoints" / "checkpoint-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:-40])
    return out


def _skipped(text):
    return [line for line in text.splitlines() if "skipping" in line and "checkpoint-00000002.pt" in line]


def test_a_forged_saved_part_of_an_evaluation_is_computed_again_and_said(trained, tiny_npz, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    base = ("eval", "--run", trained, "--data", tiny_npz, "--samples", 4, "--chunk", 2, "--limit", 8,
            "--batch-size", 8, "--device", "cpu", "--threads", 1, "--no-progress")  # fmt: skip
    assert run(*base, "--out", tmp_path / "whole.json") == 0
    target, parts = tmp_path / "resumed.json", tmp_path / "resumed.json.parts"
    real, calls = flowpp.evaluate.log_weights, []

    def interrupted_in_the_third_chunk(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(flowpp.evaluate, "log_weights", interrupted_in_the_third_chunk)
        assert run(*base, "--out", target) == 2
    (chunk_one,) = parts.glob("chunk-0000001*.npy")
    np.save(chunk_one, np.zeros((2, 2)), allow_pickle=False)  # well-formed, and wrong
    capsys.readouterr()
    assert run(*base, "--out", target) == 0
    said = capsys.readouterr()
    lines = [line for line in (said.out + said.err).splitlines() if "chunk 1 " in line]
    assert len(lines) == 1 and "digest" in lines[0], said
    assert "2 images were already done" in said.err
    whole, resumed = json.loads((tmp_path / "whole.json").read_text()), json.loads(target.read_text())
    for key in ("bpd", "iw_bpd", "bpd_se", "iw_bpd_se", "n_images"):
        assert resumed[key] == whole[key], key
    assert np.array_equal(np.load(tmp_path / "resumed.per_image.npy"), np.load(tmp_path / "whole.per_image.npy"))


def test_eval_progress_without_a_terminal_is_a_few_lines_and_none_with_no_progress(trained, tiny_npz, tmp_path,
                                                                                     capsys):  # fmt: skip
    base = ("eval", "--run", trained, "--data", tiny_npz, "--batch-size", 1, "--device", "cpu", "--threads", 1)
    assert run(*base, "--out", tmp_path / "a.json") == 0  # 24 images, one at a time: 24 updates
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if re.match(r"eval: \d+/24 images", line)]
    assert "\r" not in err and "%|" not in err, err  # no bar redrawn in a log file
    assert 1 <= len(progress) <= 11 and progress[-1].startswith("eval: 24/24 images (100%)"), err
    assert run(*base, "--no-progress", "--out", tmp_path / "b.json") == 0
    err = capsys.readouterr().err
    assert "eval: " not in err and "%|" not in err, err


def test_commands_say_which_damaged_checkpoint_they_skip(damaged, tiny_npz, tmp_path, capsys):
    assert run("sample", "--run", damaged, "--weights", "last", "-n", 2, "--out", tmp_path / "s.png",
               "--device", "cpu") == 0  # fmt: skip
    assert len(_skipped(capsys.readouterr().err)) == 1
    image = tmp_path / "one.npz"
    np.savez(image, x=np.load(tiny_npz)["x_test"][:1])
    assert run("score", "--run", damaged, "--weights", "last", image, "--samples", 1, "--device", "cpu") == 0
    assert len(_skipped(capsys.readouterr().err)) == 1
    assert run("eval", "--run", damaged, "--weights", "last", "--data", tiny_npz, "--limit", 2, "--no-progress",
               "--device", "cpu") == 0  # fmt: skip
    said = capsys.readouterr()
    assert len(_skipped(said.err)) == 1 and not _skipped(said.out)


def test_resume_says_once_which_damaged_checkpoint_it_skips(damaged, capsys):
    assert run(*TRAIN, "--out", damaged, "--resume", "--max-steps", 3) == 0
    said = capsys.readouterr()
    assert len(_skipped(said.out + said.err)) == 1, said
