"""How many processes `flowpp train` starts on a CPU, and what happens when one of them fails."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from flowpp import distributed as D
from flowpp.errors import FlowppError
from flowpp.training import Every as _Every


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def set_cores(n):
        monkeypatch.setattr(D.torch, "get_num_threads", lambda: n)

    return set_cores


def test_auto_processes_is_one_more_than_the_cores_on_a_cpu(cores):
    cores(2)
    assert D.auto_processes("cpu", 32) == 3
    cores(4)
    assert D.auto_processes("cpu", 64) == 5


def test_auto_processes_leaves_each_process_enough_of_the_batch(cores):
    cores(4)
    assert D.auto_processes("cpu", 32) == 32 // D.MIN_IMAGES_PER_PROCESS
    cores(2)
    assert D.auto_processes("cpu", 16) == 1  # 2 processes of 8: not worth it (see auto_processes)
    assert D.auto_processes("cpu", 24) == 3


def test_auto_processes_is_one_on_one_core_a_gpu_or_under_torchrun(cores, monkeypatch):
    cores(1)
    assert D.auto_processes("cpu", 64) == 1
    cores(8)
    assert D.auto_processes("cuda", 64) == 1
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    assert D.auto_processes("auto", 64) == 1
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: False)
    assert D.auto_processes("auto", 80) == 9
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.auto_processes("cpu", 64) == 1


def test_timers_follow_the_clock_they_are_given():
    every = _Every(steps=None, minutes=1.0, now=100.0)
    assert not every.due(1, 159.0) and every.due(2, 160.0)
    every.reset(160.0)
    assert not every.due(3, 219.9) and every.due(4, 221.0)
    assert _Every(steps=5, minutes=None, now=0.0).due(10, 0.0)


@pytest.mark.processes
def test_a_worker_that_fails_is_reported_with_what_it_said(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads, env = torch.get_num_threads(), dict(os.environ)
    workers = D.LocalWorkers(2, ["train", "--out", str(tmp_path), "--no-such-option"])
    expected = r"training process 1 of 2 failed \(exit status 2\): .*unrecognized arguments: --no-such-option$"
    with pytest.raises(FlowppError, match=expected):
        with workers:
            assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "2" and torch.get_num_threads() == 1
            deadline = time.monotonic() + 60
            while workers.failure() is None and time.monotonic() < deadline:
                time.sleep(0.2)
    assert dict(os.environ) == env and torch.get_num_threads() == threads  # all given back


@pytest.mark.processes
def test_rank_0_stuck_waiting_for_a_failed_worker_ends_with_its_error(tmp_path):
    # Rank 0 blocked in a collective never returns to Python: the watchdog ends the process.
    script = textwrap.dedent(
        """
        import time
        from flowpp import distributed as D
        D.LocalWorkers.GRACE = 1.0
        with D.LocalWorkers(2, ["train", "--out", "unused", "--no-such-option"]):
            time.sleep(120)  # stands for a collective that waits for the dead worker
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert "flowpp: error: training process 1 of 2 failed" in proc.stderr
    assert "unrecognized arguments: --no-such-option" in proc.stderr
