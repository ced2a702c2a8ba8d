"""Crash safety: SIGKILL at random moments, exact resume, NaN recovery, hostile checkpoints, full disks."""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from helpers import FlowppProcess

import flowpp
from flowpp.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from flowpp.cli import main
from flowpp.training import TrainingDiverged, TrainSettings, train

ARGS = [
    "--config",
    "tiny",
    "--no-progress",
    "--log-every",
    "1",
    "--eval-images",
    "8",
    "--checkpoint-every",
    "1",
    "--keep-checkpoints",
    "2",
    "--device",
    "cpu",
    "--threads",  # exact resume needs a fixed thread count ("auto" may switch)
    "1",
]
STEPS = 14
# The guard's policies (tested with injected losses) do not depend on the model: `tiny` with one
# coupling per stage, half the cost of a step.
SMALL = flowpp.get_config("tiny").replace(layout=("stripe x1", "squeeze", "channel x1"), dequant_layout=("stripe x1",))


def _argv(out, data, resume):
    argv = ["train", *ARGS, "--out", str(out), "--max-steps", str(STEPS)]
    return argv + (["--resume"] if resume else ["--data", str(data)])


def _final_state(out):
    ck = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert ck["train_state"]["step"] == STEPS
    return ck


@pytest.fixture(scope="session")  # once per (xdist) process, even when its tests are spread out
def uninterrupted(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("ref") / "run"
    before = torch.get_num_threads()
    try:  # in this process: its death is not what this run is about
        assert main(_argv(out, tiny_npz, False)) == 0
    finally:
        torch.set_num_threads(before)
    return _final_state(out)


def _metric_rows(out):
    path = out / "metrics.csv"
    return path.read_text().splitlines()[1:] if path.exists() else []


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_random_points_then_resume_is_bit_exact(trial, tmp_path, tiny_npz, uninterrupted):
    rng = random.Random(1000 + trial)
    out = tmp_path / "run"
    kills, kills_while_training = 0, 0
    for attempt in range(12):
        resume = bool(list_checkpoints(out / "checkpoints"))
        proc = FlowppProcess(_argv(out, tiny_npz, resume), tmp_path / f"attempt-{attempt}.log")
        if attempt < 2:  # once training has written a new row, at a random moment of the steps or saves
            rows, deadline = len(_metric_rows(out)), time.time() + 120
            while time.time() < deadline and proc.poll() is None and len(_metric_rows(out)) <= rows:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
        elif attempt == 2:  # then at a random moment from the start (loading, or the first steps)
            time.sleep(rng.uniform(0.0, 0.8))
        if attempt < 3 and proc.poll() is None:
            training = len(_metric_rows(out)) >= 1 and not (out / "summary.json").exists()
            proc.send_signal(signal.SIGKILL)
            kills += 1
            kills_while_training += training
        if proc.wait() == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.output()[-3000:]
    else:
        pytest.fail("the run never completed")
    assert kills_while_training >= 1, "no SIGKILL landed during training: the test proved nothing"
    final = _final_state(out)
    for key in ("model", "ema"):
        for name, t in uninterrupted[key].items():
            assert torch.equal(t, final[key][name]), (trial, kills, key, name)
    assert not list((out / "checkpoints").glob("*.tmp"))


def _settings(out, **kw):
    base = dict(
        out_dir=str(out),
        max_steps=12,
        checkpoint_every=2,
        checkpoint_minutes=None,
        eval_images=8,
        progress=False,
        device="cpu",
        max_bad_steps=3,
        log_every=1,
    )
    base.update(kw)
    return TrainSettings(**base)


def _data(tiny_npz):
    z = np.load(tiny_npz)
    return z["x_train"], z["x_valid"]


def test_nan_steps_are_skipped_then_rolled_back(tmp_path, tiny_npz):
    bad_steps = {5, 6, 7, 9}

    def inject(step, loss):
        return loss * float("nan") if step in bad_steps else loss

    summary = train(SMALL, _settings(tmp_path / "run"), *_data(tiny_npz), step_hook=inject, log=lambda *_: None)
    assert summary["steps"] == 12
    assert summary["skipped_steps"] == 4 and summary["rollbacks"] == 1
    assert np.isfinite(summary["final_valid_bpd"])
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[-2].split(",")[8:10] == ["4", "1"]  # skipped_steps, rollbacks of the last training row
    for path in list_checkpoints(tmp_path / "run" / "checkpoints"):
        ck = load_checkpoint(path)
        for key in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in ck[key].values() if t.is_floating_point())
    # Re-warm: the rollback happens after the third bad step in a row (the 8th step); the step after
    # it (the 9th) starts the learning rate again from near zero.
    cfg = SMALL
    lr_after = [float(r.split(",")[4]) for r in rows[1:] if r.split(",")[0] == "9"]
    assert lr_after and lr_after[0] <= cfg.lr / cfg.warmup_steps + 1e-12


def test_a_run_ending_on_unhealthy_steps_keeps_its_last_good_weights(tmp_path, tiny_npz, monkeypatch):
    # Parameters corrupted behind the optimizer's back (say, a bad device) during step 2: no
    # checkpoint is written from then on, and the run ends with the weights of the step-2 checkpoint.
    from flowpp.training import loop as train_module

    created = []

    class Spy(train_module.FlowPlusPlus):
        def __init__(self, cfg):
            super().__init__(cfg)
            created.append(self)

    monkeypatch.setattr(train_module, "FlowPlusPlus", Spy)

    def hook(step, loss):
        if step == 2:
            for p in created[0].parameters():
                p.data.fill_(float("nan"))
        return loss

    msgs = []
    summary = train(
        flowpp.get_config("tiny"),
        _settings(tmp_path / "run", max_steps=6, max_bad_steps=100),
        *_data(tiny_npz),
        step_hook=hook,
        log=msgs.append,
    )
    names = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-00000002.pt"]
    assert sum("not writing a checkpoint: the last step was unhealthy" in m for m in msgs) == 1  # step 4
    assert any("keeps the weights of" in m for m in msgs)
    assert summary["checkpoint"].endswith("checkpoint-00000002.pt") and summary["stopped_by"] == "budget"
    assert np.isfinite(summary["final_valid_bpd"])
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-00000002.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in created[0].state_dict().items())


@pytest.fixture(scope="session")
def healthy_run(tmp_path_factory, tiny_npz):
    """A healthy 40-step run (a checkpoint and an evaluation every 10 steps), trained once per
    process; `_healthy_run` copies it for a test to attack."""
    out = tmp_path_factory.mktemp("healthy") / "run"
    args = ["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "40"]
    before = torch.get_num_threads()
    try:
        assert main([*args, "--checkpoint-every", "10", "--eval-every", "10"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _healthy_run(out, healthy_run):
    shutil.copytree(healthy_run, out)


def test_divergence_to_large_finite_weights_stops_and_keeps_the_good_model(tmp_path, healthy_run, capsys):
    # The attack: resume a healthy run with a huge learning rate, a checkpoint every step and
    # rotation keeping 2. Before the guard, diverged (finite) weights were checkpointed, the good
    # ones rotated away, and the run ended with exit 0.
    out = tmp_path / "run"
    _healthy_run(out, healthy_run)
    good = out / "checkpoints" / "checkpoint-00000040.pt"
    good_bytes, best_bytes = good.read_bytes(), (out / "best.pt").read_bytes()
    capsys.readouterr()
    resume = ["train", "--resume", "--out", str(out), "--no-progress", "--log-every", "1", "--max-steps", "200"]
    code = main([*resume, "--lr", "10", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--max-bad-steps", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "training diverged" in err and "checkpoint-00000040.pt" in err and "best.pt" in err
    assert good.read_bytes() == good_bytes and (out / "best.pt").read_bytes() == best_bytes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "diverged" and summary["lr_scale"] == 0.25 and summary["steps"] < 200
    # Whatever was written after the resume came from healthy steps, close to the good loss.
    for path in list_checkpoints(out / "checkpoints"):
        state = load_checkpoint(path)["train_state"]
        assert state["healthy_streak"] >= 1 and state["recent_losses"][-1] < 1.25 * np.median(state["recent_losses"])


def test_a_run_broken_by_its_first_update_keeps_no_best_model(tmp_path, tiny_npz, capsys):
    # The attack: a learning rate that breaks the weights in the first update. The evaluation at
    # step 10, from those weights (over 1,000 bits/dim), was kept as best.pt right after the
    # checkpoint of the same step was refused, and the exit message called it "its best model".
    out = tmp_path / "run"
    argv = ["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "200", "--lr", "5",
            "--eval-every", "10", "--checkpoint-every", "10"]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "step 10: valid bpd" in captured.out and "not kept as the best model" in captured.out
    assert "training diverged" in captured.err and "its best model" not in captured.err
    assert "no best model" in captured.err
    assert not (out / "best.pt").exists() and not list_checkpoints(out / "checkpoints")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_checkpoint"] is None and summary["best_valid_bpd"] is None


def _bits_per_dim(path, images):
    """The loss of a checkpoint's weights (not their EMA) on ``images``, with fixed noise."""
    ck = load_checkpoint(path)
    model = flowpp.FlowPlusPlus(flowpp.FlowConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).long()
    with torch.no_grad():
        return model.eval().bits_per_dim(x, generator=torch.Generator().manual_seed(0)).mean().item()


def test_the_checkpoint_after_the_update_that_breaks_the_weights_is_never_good(tmp_path, tiny_npz, healthy_run, capsys):
    # The attack: resume a healthy run with --lr 5 and a checkpoint every step. The first update
    # blows the weights up, but its step was judged by its loss, computed before the update: the
    # checkpoint after it was written (its norm grew less than 10x) and every rollback went back
    # to it, "its last good checkpoint".
    out = tmp_path / "run"
    _healthy_run(out, healthy_run)
    capsys.readouterr()
    resume = ["train", "--resume", "--out", str(out), "--no-progress", "--log-every", "1", "--max-steps", "200"]
    code = main([*resume, "--lr", "5", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--max-bad-steps", "3"])
    captured = capsys.readouterr()
    assert code == 2
    rollbacks = [line for line in captured.out.splitlines() if line.startswith("rolled back to")]
    assert len(rollbacks) == 3 and all("checkpoint-00000040.pt;" in line for line in rollbacks), rollbacks
    assert "step 41: not writing a checkpoint: the updated weights are unhealthy" in captured.out
    assert "its last good checkpoint is" in captured.err and "checkpoint-00000040.pt" in captured.err
    # Whatever checkpoint there is holds weights whose own loss is healthy (close to step 40's).
    train_images = _data(tiny_npz)[0][:16]
    good = _bits_per_dim(out / "checkpoints" / "checkpoint-00000040.pt", train_images)
    for path in list_checkpoints(out / "checkpoints"):
        assert _bits_per_dim(path, train_images) < 1.25 * good, path.name


def test_a_loss_spike_is_skipped_and_a_persistent_one_rolled_back(tmp_path, tiny_npz):
    spikes = {20, 24, 25, 26}  # one alone (skipped), then three in a row (rolled back)

    def inject(step, loss):
        return loss * 3 if step in spikes else loss

    msgs = []
    summary = train(
        SMALL,
        _settings(tmp_path / "run", max_steps=96, checkpoint_every=4),
        *_data(tiny_npz),
        step_hook=inject,
        log=msgs.append,
    )
    assert summary["skipped_steps"] == 4 and summary["rollbacks"] == 1 and summary["stopped_by"] == "budget"
    assert summary["lr_scale"] == 1.0  # a first rollback only re-warms
    assert sum("over 1.25 x the recent median" in m for m in msgs) == 4
    assert any("rolled back to" in m and "checkpoint-00000024.pt" in m for m in msgs)
    # 64 healthy steps later (a re-warm, at least 64 steps) the series is closed: step 24 may go.
    assert any("step 91: healthy for 64 steps since the last rollback" in m for m in msgs)
    last = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])["train_state"]
    assert last["rollbacks_in_row"] == 0 and last["rollback_step"] is None
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "checkpoint-00000092.pt",
        "checkpoint-00000096.pt",
    ]


def test_a_run_unhealthy_before_its_first_checkpoint_stops_and_says_so(tmp_path, tiny_npz):
    # Skipping cannot help when the weights themselves went bad and nothing was saved yet: the
    # loss stays high, so the run stops and says to start again rather than to resume.
    msgs = []
    with pytest.raises(TrainingDiverged, match="before its first checkpoint.*Start again with a lower --lr"):
        train(
            SMALL.replace(warmup_steps=100),  # still warming up at step 20
            _settings(tmp_path / "run", max_steps=200, checkpoint_every=100),
            *_data(tiny_npz),
            step_hook=lambda step, loss: loss * 3 if step >= 20 else loss,
            log=msgs.append,
        )
    assert sum("no checkpoint to roll back to yet" in m for m in msgs) == 3
    assert any("with no checkpoint to roll back to; stopping" in m for m in msgs)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_the_first_checkpoint_comes_at_the_end_of_the_warm_up_so_a_blow_up_at_the_peak_rolls_back(tmp_path, tiny_npz):
    # tiny warms up over 10 steps; the timed checkpoints would come only at step 100.
    msgs = []
    summary = train(
        SMALL,
        _settings(tmp_path / "run", max_steps=40, checkpoint_every=100),
        *_data(tiny_npz),
        step_hook=lambda step, loss: loss * 3 if 20 <= step < 25 else loss,
        log=msgs.append,
    )
    assert summary["rollbacks"] == 1 and summary["stopped_by"] == "budget"
    assert any(m.startswith("rolled back to") and "checkpoint-00000010.pt;" in m for m in msgs), msgs
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "checkpoint-00000010.pt",
        "checkpoint-00000040.pt",
    ]


def test_after_a_rollback_the_guard_judges_against_the_losses_of_the_checkpoint_it_went_back_to(tmp_path, tiny_npz):
    # Halved losses from step 10 make the recent median half of what the weights of the step-10
    # checkpoint give; after the spikes at 50-52 roll back there, steps judged against that
    # median would all look like spikes (and the run would stop as diverged).
    def hook(step, loss):
        return loss * 3 if 50 <= step < 53 else loss * 0.5 if 10 <= step < 50 else loss

    msgs = []
    summary = train(
        SMALL,
        _settings(tmp_path / "run", max_steps=70, checkpoint_every=100),
        *_data(tiny_npz),
        step_hook=hook,
        log=msgs.append,
    )
    assert summary["rollbacks"] == 1 and summary["stopped_by"] == "budget", msgs
    assert summary["skipped_steps"] == 3
    assert any(m.startswith("rolled back to") and "checkpoint-00000010.pt;" in m for m in msgs), msgs


def test_the_spike_guard_can_be_turned_off(tmp_path, tiny_npz):
    summary = train(
        SMALL,
        _settings(tmp_path / "run", max_steps=24, spike_ratio=None),
        *_data(tiny_npz),
        step_hook=lambda step, loss: loss * 3 if step == 20 else loss,
        log=lambda *_: None,
    )
    assert summary["skipped_steps"] == 0


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoints" / "checkpoint-00000001.pt"
    path.parent.mkdir()
    torch.save({"format": "flowpp-checkpoint", "version": 1, "config": {}, "model": Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="checkpoint-00000001.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_corrupted_checkpoints_are_refused(tmp_path):
    state = {"config": flowpp.get_config("tiny").to_dict(), "model": {"w": torch.randn(1000)}}
    good = save_checkpoint(tmp_path / "checkpoint-00000001.pt", state)
    data = good.read_bytes()
    trunc = tmp_path / "checkpoint-00000002.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint-00000002.pt"):
        load_checkpoint(trunc)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad = tmp_path / "checkpoint-00000003.pt"
    bad.write_bytes(bytes(flipped))
    (tmp_path / "checkpoint-00000003.pt.sha256").write_text((tmp_path / "checkpoint-00000001.pt.sha256").read_text())
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(bad)
    # --resume-style lookup skips the broken newer files and finds the good one
    from flowpp.checkpoint import latest_checkpoint

    msgs = []
    path, ck = latest_checkpoint(tmp_path, log=msgs.append)
    assert path == good and torch.equal(ck["model"]["w"], state["model"]["w"])
    assert len(msgs) == 2


def test_checkpoint_of_another_config_is_refused(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["components"] = 5
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-00000002.pt" in err and "components" in err


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, tiny_npz, monkeypatch):
    import flowpp.checkpoint as ckmod

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckmod.torch, "save", failing_save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left on device"):
        train(flowpp.get_config("tiny"), _settings(out, max_steps=6), *_data(tiny_npz), log=lambda *_: None)
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["checkpoint-00000002.pt"]
    assert load_checkpoint(ckpts[0])["train_state"]["step"] == 2
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_unwritable_run_dir_is_a_clear_error(tmp_path, tiny_npz, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(blocker / "run"), "--max-steps", "1"]) == 2
    assert "file" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_npz):
    out = tmp_path / "run"
    argv = ["train", *ARGS, "--data", tiny_npz, "--out", out, "--max-steps", "100000"]
    proc = FlowppProcess(argv, tmp_path / "train.log")
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.csv").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(_metric_rows(out)) < 3:  # a few steps in
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "signal"
    ck = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert ck["train_state"]["step"] == summary["steps"] > 0


def test_a_damaged_checkpoint_without_its_digest_is_refused(tmp_path):
    state = {"config": flowpp.get_config("tiny").to_dict(), "model": {"w": torch.arange(4096.0)}}
    path = save_checkpoint(tmp_path / "checkpoint-00000001.pt", state)
    (tmp_path / "checkpoint-00000001.pt.sha256").unlink()
    assert torch.equal(load_checkpoint(path)["model"]["w"], state["model"]["w"])  # intact: loads
    data = bytearray(path.read_bytes())
    at = data.find(torch.arange(4096.0).numpy().tobytes()[4000:4016])
    assert at > 0
    data[at] ^= 0x01  # one flipped bit inside the weight tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        load_checkpoint(path)


def test_bad_values_and_incomplete_checkpoints_are_one_line_errors(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(tmp_path / "x"), "--max-steps", "1",
                 "--set", "filters=-3"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == (
        "flowpp: error: config 'tiny': filters=-3, expected a whole number from 1 to 65536"
    )
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, lr="fast")))
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 2
    assert "lr='fast'" in capsys.readouterr().err
    (out / "config.json").write_text(json.dumps(cfg))
    newest = list_checkpoints(out / "checkpoints")[-1]
    ck = load_checkpoint(newest)
    del ck["optimizer"]
    save_checkpoint(newest, {k: v for k, v in ck.items() if k not in ("format", "version")})
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 2
    assert "cannot resume training: it lacks optimizer" in capsys.readouterr().err
    del ck["ema"]
    save_checkpoint(newest, {k: v for k, v in ck.items() if k not in ("format", "version")})
    (out / "best.pt").unlink()
    assert main(["sample", "--run", str(out), "-n", "1", "--out", str(tmp_path / "s.png")]) == 2
    assert "holds no 'ema' weights" in capsys.readouterr().err


def test_a_second_training_beside_a_live_one_is_refused(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    argv = ["train", *ARGS, "--data", tiny_npz, "--out", out, "--max-steps", "100000"]
    live = FlowppProcess(argv, tmp_path / "live.log")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(out / "checkpoints"):
            time.sleep(0.1)
        assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress"]) == 2
        assert "in use by a running training (pid" in capsys.readouterr().err
        assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "3"]) == 2
        assert live.poll() is None  # the live run goes on
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait()
    assert live.returncode == 0, live.output()[-2000:]
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "signal"


def test_a_killed_evaluation_continues_where_it_stopped(tmp_path, tiny_npz):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "2"]) == 0
    base = ["eval", "--run", out, "--data", tiny_npz, "--samples", "64", "--chunk", "2", "--batch-size", "128",
            "--device", "cpu"]  # fmt: skip
    before = torch.get_num_threads()
    try:  # the uninterrupted evaluation, in this process, on one thread as the killed one
        assert main([*map(str, base), "--threads", "1", "--out", str(tmp_path / "whole.json")]) == 0
    finally:
        torch.set_num_threads(before)
    target = tmp_path / "resumed.json"
    parts = tmp_path / "resumed.json.parts"
    proc = FlowppProcess([*base, "--out", target], tmp_path / "killed.log")
    deadline = time.monotonic() + 120
    while len(list(parts.glob("chunk-*.npy"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(list(parts.glob("chunk-*.npy")))
    assert not target.exists() and 3 <= saved < 12, saved  # killed half-way: 24 images, 12 chunks
    again = FlowppProcess([*base, "--out", target], tmp_path / "again.log")
    assert again.wait() == 0, again.output()[-2000:]
    assert f"{2 * saved} images were already done" in again.output()
    whole, resumed = json.loads((tmp_path / "whole.json").read_text()), json.loads(target.read_text())
    for key in ("bpd", "iw_bpd", "bpd_se", "iw_bpd_se", "n_images"):
        assert resumed[key] == whole[key], key
    assert not parts.exists()  # finished: the parts are gone, the per-image table stays
    assert np.array_equal(np.load(tmp_path / "resumed.per_image.npy"), np.load(tmp_path / "whole.per_image.npy"))


def test_a_resume_after_a_kill_at_the_end_writes_the_final_row_once(tmp_path, tiny_npz):
    # The kill came after the final checkpoint and the final row, before the process ended:
    # resuming finishes the run again and must not add a second final row.
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "3"]) == 0
    first = _metric_rows(out)
    (out / "summary.json").unlink()
    assert main(["train", *ARGS, "--resume", "--out", str(out), "--max-steps", "3"]) == 0
    again = _metric_rows(out)
    final_rows = [r for r in again if r.split(",")[0] == "3" and r.split(",")[2] == "" and r.split(",")[4] == ""]
    assert len(final_rows) == 1, again
    assert len(again) == len(first)
    assert [r.split(",")[:4] for r in again] == [r.split(",")[:4] for r in first]


@pytest.mark.parametrize("option", ["--seed", "--threads"])
def test_numbers_too_large_for_the_libraries_are_one_line_errors(option, tmp_path, tiny_npz, capsys):
    argv = ["train", *ARGS, "--data", str(tiny_npz), "--out", str(tmp_path / "r"), "--max-steps", "1"]
    with pytest.raises(SystemExit) as e:
        main([*argv, option, "99999999999999999999999"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and option in err and "expected a whole number from" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name, damage, said",
    [
        ("settings.json", b"[1, 2]", "holds a JSON list"),
        ("config.json", b"[" * 100_000 + b"]" * 100_000, "not the JSON of a flowpp config"),
        ("settings.json", bytes(range(256)) * 8, "not the JSON of the run's settings"),
        ("metrics.csv", bytes(range(128, 256)) * 20, "metrics.csv is damaged"),
    ],
    ids=["settings-a-list", "config-nested", "settings-bytes", "metrics-bytes"],
)
def test_a_damaged_run_file_on_resume_is_one_line_and_touches_nothing(name, damage, said, tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    assert main(["train", *ARGS, "--data", str(tiny_npz), "--out", str(out), "--max-steps", "2"]) == 0
    (out / name).write_bytes(damage)
    checkpoints = {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")}
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err and name in err, err
    assert {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")} == checkpoints
    assert (out / name).read_bytes() == damage
