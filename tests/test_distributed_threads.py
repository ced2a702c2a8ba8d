"""The thread tuner of `--threads auto`: all cores on an idle machine, one thread next to a busy one."""

import pytest
import torch

from flowpp.distributed import ThreadTuner


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(tuner, steps, seconds_for):
    """Feed the tuner ``steps`` step times from ``seconds_for(threads)``; the threads used per step."""
    used = []
    for _ in range(steps):
        used.append(torch.get_num_threads())
        tuner.step_done(seconds_for(torch.get_num_threads()))
    return used


def test_it_keeps_all_threads_when_they_are_faster_and_probes_ever_less_often():
    tuner = ThreadTuner(2)
    used = _run(tuner, 2000, {2: 1.0, 1: 1.3}.get)  # idle: 2 threads 30% faster
    assert tuner.switches == 0 and used[0] == 2
    assert used.count(1) / len(used) < 0.02  # the probes
    assert tuner.interval == ThreadTuner.MAX_INTERVAL


def test_it_moves_to_one_thread_when_a_neighbour_takes_a_core_and_back_when_it_leaves():
    messages = []
    tuner = ThreadTuner(2, messages.append)
    busy = _run(tuner, 200, {2: 3.0, 1: 1.1}.get)  # a busy neighbour: 2 spinning threads collapse
    assert busy[20:].count(1) / len(busy[20:]) > 0.98 and "threads: 2 -> 1" in messages[0]
    idle = _run(tuner, 1500, {2: 1.0, 1: 1.3}.get)  # the neighbour is gone
    assert idle[-200:].count(2) / 200 > 0.95 and "threads: 1 -> 2" in messages[1]
    assert tuner.switches == 2


def test_a_small_difference_does_not_flip_it():
    tuner = ThreadTuner(2)
    _run(tuner, 1000, {2: 1.0, 1: 0.97}.get)  # within the 5% margin
    assert tuner.switches == 0


def test_only_auto_on_a_cpu_with_threads_to_choose_from_gets_a_tuner():
    torch.set_num_threads(2)
    assert ThreadTuner.for_run("auto", torch.device("cpu")) is not None
    assert ThreadTuner.for_run(2, torch.device("cpu")) is None
    assert ThreadTuner.for_run(None, torch.device("cpu")) is None
    assert ThreadTuner.for_run("auto", torch.device("cuda", 0)) is None
    torch.set_num_threads(1)
    assert ThreadTuner.for_run("auto", torch.device("cpu")) is None
