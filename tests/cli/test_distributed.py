"""DDP on CPU (gloo; under torchrun, or processes flowpp starts itself): the same numbers as one process."""

import csv
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowpp.checkpoint import list_checkpoints, load_checkpoint
from flowpp.cli import main

pytestmark = [
    pytest.mark.processes,  # torchrun and flowpp's own process groups
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
]

COMMON = ["--config", "tiny", "--no-progress", "--log-every", "1", "--device", "cpu", "--eval-images", "15"]
COMMON += ["--threads", "1"]


def here(*args, command="train"):
    """One process: run in this one (no process of its own to start), on one thread like the others."""
    before = torch.get_num_threads()
    try:
        code = main([command, *map(str, args), *(["--threads", "1"] if command == "eval" else [])])
    finally:
        torch.set_num_threads(before)
    return subprocess.CompletedProcess([command], code, "", "")


def launch(nproc, *args, timeout=240, command="train"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "flowpp", command, *map(str, args)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "flowpp",
            command,
            *map(str, args),
        ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = {int(r["step"]): float(r["train_bpd"]) for r in rows if r["train_bpd"]}
    valid = [float(r["valid_bpd"]) for r in rows if r["valid_bpd"]]
    return train, valid


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="session")  # once per (xdist) process, even when its tests are spread out
def runs(tmp_path_factory, tiny_npz):
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    assert_ok(here(*COMMON, "--data", tiny_npz, "--out", one, "--max-steps", 5))
    assert_ok(launch(2, *COMMON, "--data", tiny_npz, "--out", two, "--max-steps", 5))
    return one, two


def test_two_processes_match_one(runs):
    (t1, v1), (t2, v2) = losses(runs[0]), losses(runs[1])
    assert sorted(t1) == sorted(t2) == [1, 2, 3, 4, 5]
    for step in t1:
        assert abs(t1[step] - t2[step]) < 1e-5, (step, t1[step], t2[step])
    # Sharded evaluation (15 images: 8 + 7 per rank) all-reduces sums and counts.
    assert len(v1) == len(v2) == 1 and abs(v1[0] - v2[0]) < 1e-6
    s2 = json.loads((runs[1] / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["steps"] == 5 and s2["images_seen"] == 40
    c1 = load_checkpoint(list_checkpoints(runs[0] / "checkpoints")[-1])
    c2 = load_checkpoint(list_checkpoints(runs[1] / "checkpoints")[-1])
    for name, t in c1["model"].items():
        assert torch.allclose(t.double(), c2["model"][name].double(), atol=1e-4), name


def test_resume_across_world_sizes(runs, tmp_path, tiny_npz):
    one, two = runs
    reference = tmp_path / "ref"
    assert_ok(here(*COMMON, "--data", tiny_npz, "--out", reference, "--max-steps", 8))
    ref, _ = losses(reference)
    # 2 processes -> 1 process
    a = tmp_path / "a"
    subprocess.run(["cp", "-r", str(two), str(a)], check=True)
    assert_ok(here(*COMMON, "--out", a, "--resume", "--max-steps", 8))
    # 1 process -> 2 processes (started by flowpp; the 2 processes of `runs` came from torchrun)
    b = tmp_path / "b"
    subprocess.run(["cp", "-r", str(one), str(b)], check=True)
    assert_ok(here(*COMMON, "--out", b, "--resume", "--max-steps", 8, "--procs", 2))
    for run_dir in (a, b):
        got, _ = losses(run_dir)
        assert sorted(got) == list(range(1, 9))
        for step in (6, 7, 8):
            assert abs(got[step] - ref[step]) < 1e-4, (run_dir.name, step, got[step], ref[step])
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8


def test_flowpp_starts_its_own_processes_and_an_uneven_batch_matches_one_process(tmp_path, tiny_npz, capsys):
    # --procs 3 without torchrun; a global batch of 7 splits 2 + 2 + 3, and each process's loss is
    # weighted by its share, so the steps are those of one process. Timed evaluations and checkpoints
    # follow rank 0's clock on every process (or the processes would stop agreeing on what comes next).
    common = [*COMMON, "--data", tiny_npz, "--max-steps", 4, "--batch-size", 7]
    timed = ["--eval-minutes", "0.001", "--checkpoint-minutes", "0.001"]
    one, three = tmp_path / "one", tmp_path / "three"
    assert_ok(here(*common, "--out", one, "--procs", 1, *timed))
    capsys.readouterr()
    assert_ok(here(*common, "--out", three, "--procs", 3, *timed))  # rank 0 here, ranks 1 and 2 started by flowpp
    assert "training on 3 processes x 1 thread(s)" in capsys.readouterr().out
    assert not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))  # this process is itself again
    assert not torch.distributed.is_initialized()
    (t1, v1), (t3, v3) = losses(one), losses(three)
    assert sorted(t1) == sorted(t3) == [1, 2, 3, 4]
    for step in t1:
        assert abs(t1[step] - t3[step]) < 1e-5, (step, t1[step], t3[step])
    assert len(v3) >= 2 and abs(v1[-1] - v3[-1]) < 1e-5
    summary = json.loads((three / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["images_seen"] == 28 and summary["threads"] == 1


def test_a_batch_smaller_than_the_processes_fails_cleanly(tmp_path, tiny_npz, capsys):
    # refused before any process is started, so this one can ask
    proc = here(*COMMON, "--data", tiny_npz, "--out", tmp_path / "bad", "--max-steps", 2, "--batch-size", 2,
                "--procs", 3)  # fmt: skip
    err = capsys.readouterr().err
    assert proc.returncode == 2
    assert "must be at least the number of processes (3)" in err
    assert "Traceback" not in err and not (tmp_path / "bad" / "checkpoints").exists()


def test_evaluation_on_two_processes_matches_one(runs, tiny_npz, tmp_path):
    common = ["--run-dir", runs[0], "--data", tiny_npz, "--split", "test", "--samples", 8, "--device", "cpu"]
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}.json"
        run = here if nproc == 1 else functools.partial(launch, nproc)
        assert_ok(run(*common, "--batch-size", 16, "--out", out, command="eval"))
        results[nproc] = json.loads(out.read_text()), np.load(tmp_path / f"eval{nproc}.per_image.npy")
    (one, per_one), (two, per_two) = results[1], results[2]
    assert one["processes"] == 1 and two["processes"] == 2 and one["n_images"] == two["n_images"] == 24
    for key in ("bpd", "iw_bpd", "bpd_se", "iw_bpd_se"):
        assert abs(one[key] - two[key]) < 1e-9, key
    np.testing.assert_allclose(per_one, per_two, rtol=0, atol=1e-9)


def _process_of_rank(rank: int, out) -> int | None:
    """The pid of the `flowpp train --out OUT` process of that rank (Linux: read from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc")
def test_a_worker_killed_from_outside_ends_the_run_with_one_line_and_a_summary(tmp_path, tiny_npz):
    import signal
    import time

    from helpers import FlowppProcess

    out = tmp_path / "run"
    argv = ["train", *COMMON, "--data", tiny_npz, "--out", out, "--max-steps", 100000, "--procs", 2]
    parent = FlowppProcess(argv, tmp_path / "train.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and parent.poll() is None:
        metrics = out / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    worker = _process_of_rank(1, out)
    assert worker is not None, parent.output()[-2000:]
    os.kill(worker, signal.SIGKILL)
    assert parent.wait(timeout=120) == 2, parent.output()[-3000:]
    said = parent.output()
    assert "Traceback" not in said and said.strip().splitlines()[-1] == (
        "flowpp: error: training process 1 of 2 was ended by SIGKILL"
    ), said[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "failed" and summary["world_size"] == 2 and summary["steps"] >= 3
