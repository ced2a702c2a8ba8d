"""The run directory: its layout, creation rules and reading a run back."""

import os
import socket
import subprocess
import sys

import pytest

import flowpp
from flowpp.checkpoint import CheckpointError
from flowpp.errors import FlowppError, RunError
from flowpp.runs import RunDir


def test_layout_is_known_in_one_place(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.sample_grid(12) == tmp_path / "r" / "samples" / "step-00000012.png"
    assert run.eval_file("cifar10", "test", 4096).name == "eval-cifar10-test-S4096.json"
    assert run.eval_file("data/my.set.npz", "valid", 1).name == "eval-my.set-valid-S1.json"
    assert run.checkpoints == tmp_path / "r" / "checkpoints"


def test_create_refuses_a_run_with_checkpoints_unless_resuming(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create(resume=False)
    assert run.samples.is_dir()
    run.save_checkpoint(3, {"config": {}, "model": {}}, keep=2)
    (run.checkpoints / ".checkpoint-00000004.pt.x.tmp").write_text("half")
    with pytest.raises(RunError, match="already holds checkpoints.*--resume"):
        run.create(resume=False)
    run.create(resume=True)
    assert not list(run.checkpoints.glob("*.tmp"))  # an interrupted write is cleared on resume
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="cannot create run directory"):
        RunDir(blocker / "r").create(resume=False)


def test_checkpoint_rotation_keeps_the_newest(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 5):
        run.save_checkpoint(step, {"config": {}, "model": {}}, keep=2)
    assert sorted(p.name for p in run.checkpoints.glob("*.pt")) == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]
    assert run.latest_checkpoint()[0].name == "checkpoint-00000004.pt"


def test_config_settings_and_errors(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunError, match="not a flowpp run directory"):
        run.read_config()
    assert run.read_settings() == {}
    run.write_config(flowpp.get_config("tiny"))
    assert run.read_config() == flowpp.get_config("tiny")
    run.config_file.write_text('{"name": "tiny", "filterz": 1}')
    with pytest.raises(RunError, match="not a valid flowpp config"):
        run.read_config()
    with pytest.raises(RunError, match="does not exist"):
        RunDir(tmp_path / "missing").load_model()
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        run.load_model()
    assert issubclass(RunError, FlowppError) and issubclass(CheckpointError, FlowppError)


def test_one_writer_at_a_time(tmp_path):
    first = RunDir(tmp_path / "r")
    first.create(resume=False)
    (first.checkpoints).mkdir()
    in_flight = first.checkpoints / ".checkpoint-00000005.pt.abc.tmp"
    in_flight.write_text("being written by the live run")
    second = RunDir(tmp_path / "r")
    with pytest.raises(RunError, match=r"in use by a running training \(pid \d+ on \S+\)"):
        second.create(resume=True)
    assert in_flight.exists()  # the live run's temporary file was not cleaned up under it
    first.unlock()
    second.create(resume=True)
    assert not in_flight.exists()
    second.unlock()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flowpp.runs import RunDir; r = RunDir(sys.argv[1]); "
         "r.create(False); print('locked', flush=True); time.sleep(60)", str(tmp_path / "r")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"pid {holder.pid} on "):
            RunDir(tmp_path / "r").create(resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / "r" / ".lock").read_text()  # the dead run's note is still there
    taker = RunDir(tmp_path / "r")
    taker.create(resume=True)
    assert (tmp_path / "r" / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    taker.unlock()


def test_a_damaged_checkpoint_does_not_take_a_good_ones_place(tmp_path):
    run = RunDir(tmp_path)
    for step in (1, 2):
        run.save_checkpoint(step, {"config": {}, "model": {"w": list(range(100))}}, keep=2)
    newest = run.checkpoints / "checkpoint-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:-40])  # damaged after it was written (disk, copy, ...)
    fresh = RunDir(tmp_path)  # a resumed run: nothing verified yet in this process
    msgs = []
    fresh.save_checkpoint(3, {"config": {}, "model": {}}, keep=2, log=msgs.append)
    kept = sorted(p.name for p in fresh.checkpoints.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000001.pt", "checkpoint-00000003.pt"]  # the good step-1 one stays
    assert (fresh.checkpoints / "checkpoint-00000002.pt.unreadable").exists() and "damaged" in msgs[0]
    fresh.save_checkpoint(4, {"config": {}, "model": {}}, keep=2)
    assert sorted(p.name for p in fresh.checkpoints.glob("checkpoint-*.pt")) == [
        "checkpoint-00000003.pt",
        "checkpoint-00000004.pt",
    ]
