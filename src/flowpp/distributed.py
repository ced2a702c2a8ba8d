"""Devices and processes: which device to run on, CPU threads, and the torchrun / DDP process
group (a no-op in single-process runs)."""

from __future__ import annotations

import datetime
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import FlowppError, UsageError

__all__ = [
    "agree",
    "DistInfo",
    "resolve_device",
    "set_threads",
    "ThreadTuner",
    "auto_processes",
    "LocalWorkers",
    "setup_distributed",
    "shutdown_distributed",
    "all_reduce_sum",
    "broadcast_module",
    "barrier",
]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available")
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r} is not a device: {e}") from None


def set_threads(threads: int | str | None) -> None:
    """CPU threads for PyTorch's intra-op parallelism (None or "auto": PyTorch's choice, which
    :class:`ThreadTuner` may then adapt)."""
    if isinstance(threads, int) and threads > 0:
        torch.set_num_threads(threads)


class ThreadTuner:
    """Trains on all of PyTorch's threads or on one, whichever is faster now.

    Several OpenMP threads that spin-wait for each other lose most of their time when another
    process takes one of the cores (the ``mnist`` preset on 2 cores: 65 images/s alone, 19 next
    to one busy process), while one thread is 25% slower on an idle machine but hardly slowed by
    a busy neighbour. So every so often the other choice is timed for a few steps, and taken
    when it is more than 5% faster; a probe whose step takes over twice as long ends at once.
    The first probe comes after a few steps; one that confirms
    the current choice doubles the interval to the next (40 steps up to 640), so on a steady
    machine a 20-minute run has about 7 probes of at most 5 steps (an estimate, by count).

    The thread count changes the order of floating-point sums in some kernels, so a run that
    switches is deterministic only to rounding; ``--threads N`` fixes the count (and exact resume).
    """

    PROBE_STEPS, FIRST_PROBE, FIRST_INTERVAL, MAX_INTERVAL, MARGIN, ABORT = 4, 6, 40, 640, 0.95, 2.0

    def __init__(self, most: int, log=None):
        self.choices = (most, 1)
        self.current, self.log = most, log or (lambda _m: None)
        self.recent: deque = deque(maxlen=8)  # step times of the current choice
        self.interval, self.countdown = self.FIRST_INTERVAL, self.FIRST_PROBE
        self.probe: list[float] | None = None  # step times of the other choice while it is tried
        self.switches = 0
        self.initial = torch.get_num_threads()
        torch.set_num_threads(most)

    @classmethod
    def for_run(cls, threads: int | str | None, device: torch.device, log=None) -> "ThreadTuner | None":
        """A tuner when ``threads`` is "auto" on a CPU with more than one thread to choose from."""
        if threads != "auto" or device.type != "cpu" or torch.get_num_threads() < 2:
            return None
        return cls(torch.get_num_threads(), log)

    def close(self) -> None:
        """Give the process back the thread count it had before training."""
        torch.set_num_threads(self.initial)

    @property
    def other(self) -> int:
        return self.choices[1] if self.current == self.choices[0] else self.choices[0]

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def step_done(self, seconds: float) -> None:
        """Record the time of the step that just ran, and set the threads of the next one."""
        if self.probe is None:
            self.recent.append(seconds)
            self.countdown -= 1
            if self.countdown <= 0 and len(self.recent) >= 3:
                self.probe = []
                torch.set_num_threads(self.other)
            return
        self.probe.append(seconds)
        now = statistics.median(self.recent)
        clearly_worse = seconds > self.ABORT * now  # e.g. spinning threads beside a busy process: stop at once
        if len(self.probe) < self.PROBE_STEPS + 1 and not clearly_worse:
            return  # (the first step after a change, which warms the pool up, is not counted)
        tried = statistics.median(self.probe[1:]) if len(self.probe) > 1 else seconds
        if not clearly_worse and tried < self.MARGIN * now:
            self.log(f"threads: {self.current} -> {self.other} (a step takes {tried:.3g} s instead of {now:.3g} s)")
            self.current, self.interval, self.switches = self.other, self.FIRST_INTERVAL, self.switches + 1
            self.recent.clear()
            self.recent.extend(self.probe[1:])
        else:
            self.interval = min(2 * self.interval, self.MAX_INTERVAL)
        self.probe, self.countdown = None, self.interval
        torch.set_num_threads(self.current)


# Each process should get at least this many images of the global batch: below it, per-operation
# overhead outweighs what another process adds.
MIN_IMAGES_PER_PROCESS = 8


def auto_processes(device: str, batch_size: int) -> int:
    """The processes of ``flowpp train --procs auto``: on a CPU with C cores, C + 1 single-threaded
    ones (at most one per MIN_IMAGES_PER_PROCESS images of the global batch); 1 on a GPU, under
    torchrun, on one core, or when that leaves fewer than 3.

    Why one more process than cores: the scheduler shares the cores between runnable threads, so
    next to one busy process, C + 1 processes get (C + 1) / (C + 2) of the machine where C threads
    get C / (C + 1), and processes meet once a step (the gradient all-reduce) where OpenMP threads
    meet at every operation and spin while one of them waits for a core. Measured on 2 cores
    (``benchmarks/bench_contention.py``, docs/performance.md): 3 processes keep 0.75-0.77 of their
    idle speed next to a busy process (2 threads: 0.25-0.32), but train 5-20% slower than 2 threads
    on an idle machine, which is why this is not the default.
    """
    if os.environ.get("WORLD_SIZE") or device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return 1
    cores = torch.get_num_threads()  # PyTorch's choice: the physical cores, or OMP_NUM_THREADS
    procs = min(cores + 1, batch_size // MIN_IMAGES_PER_PROCESS) if cores >= 2 else 1
    return procs if procs >= 3 else 1


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalWorkers:
    """Runs this process as rank 0 of ``n`` on this machine, ranks 1..n-1 being child processes that
    run the same command (``python -m flowpp ARGV``), each with ``threads`` threads: what torchrun
    would do, without the user having to know it.

    Used as a context manager around training. The children print nothing (rank 0 reports); when
    one fails, the last line of its stderr is the error. A child that dies while rank 0 waits for it
    in a collective would leave rank 0 waiting for the process group's timeout, so a watchdog ends
    this process GRACE seconds after a child failed if rank 0 has not ended by then (its last
    checkpoint is safe: checkpoints are written atomically)."""

    GRACE = 30.0

    def __init__(self, n: int, argv: list[str], threads: int = 1):
        self.n, self.argv, self.threads = n, list(argv), threads
        self.children: list[tuple[int, subprocess.Popen, object]] = []
        self.done = threading.Event()
        self.killed = False

    def __enter__(self) -> "LocalWorkers":
        group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(self.n),
                 "LOCAL_WORLD_SIZE": str(self.n), "OMP_NUM_THREADS": str(self.threads)}  # fmt: skip
        self.saved_env = {k: os.environ.get(k) for k in (*group, "RANK", "LOCAL_RANK")}
        self.saved_threads = torch.get_num_threads()
        try:
            for rank in range(1, self.n):
                err = tempfile.TemporaryFile()
                env = {**os.environ, **group, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                cmd = [sys.executable, "-m", "flowpp", *self.argv]
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
                self.children.append((rank, proc, err))
        except BaseException:
            self._stop_children()
            raise
        os.environ.update(group, RANK="0", LOCAL_RANK="0")
        torch.set_num_threads(self.threads)
        threading.Thread(target=self._watch, name="flowpp-workers", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.done.set()
        if exc_type is None:
            for _, proc, _ in self.children:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
        elif self.failure() is None:  # rank 0 failed first; or a child died and is not reaped yet
            time.sleep(0.5)
        failure = self.failure()  # before stopping the rest: a child killed from outside is a failure
        self._stop_children()
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(self.saved_threads)
        if failure is not None and not isinstance(exc, FlowppError):
            raise FlowppError(failure) from exc
        return False

    def failure(self) -> str | None:
        """What the first child that failed on its own said last, or None."""
        for rank, proc, err in self.children:
            rc = proc.poll()
            if rc not in (None, 0) and not (self.killed and rc < 0):
                if rc < 0:
                    return f"training process {rank} of {self.n} was ended by {_signal_name(-rc)}"
                err.seek(0)
                lines = err.read().decode(errors="replace").strip().splitlines()
                said = lines[-1] if lines else "no output"  # an error message, or a traceback's exception
                return f"training process {rank} of {self.n} failed (exit status {rc}): {said}"
        return None

    def _stop_children(self) -> None:
        self.killed = True
        for _, proc, _ in self.children:
            if proc.poll() is None:
                proc.kill()
        for _, proc, _ in self.children:
            proc.wait()

    def _watch(self) -> None:
        failed_at = None
        while not self.done.wait(1.0):
            if failed_at is None and self.failure() is not None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > self.GRACE:
                print(f"flowpp: error: {self.failure()}", file=sys.stderr, flush=True)
                self._stop_children()
                os._exit(2)  # rank 0 is stuck in a collective: nothing else would end it


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # A DDP model in a reference cycle keeps the gloo group (and its C++ threads) alive until
        # the interpreter is torn down, where destroying them can abort the process (SIGABRT,
        # "terminate called without an active exception"): free them while Python is whole.
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_module(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dtype == torch.bool:  # gloo cannot broadcast bool tensors
                tmp = t.data.to(torch.uint8)
                dist.broadcast(tmp, src=src)
                t.data.copy_(tmp.bool())
            else:
                dist.broadcast(t.data, src=src)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def agree(
    finite: torch.Tensor,
    loss: torch.Tensor,
    stop_requested: bool,
    dist: DistInfo,
    clock: tuple[float, float] = (0.0, 0.0),
) -> tuple[bool, float, bool, tuple[float, float]]:
    """(step?, global mean loss, stop?, rank 0's ``clock``): every rank must agree to step or skip,
    and to stop on a signal, or the next collective would hang. ``clock`` is (the previous step's
    seconds, the run's wall-clock seconds): every rank takes rank 0's, so that the time budget, the
    learning rate that follows it and the timed evaluations and checkpoints are the same everywhere
    (each process's own clock differs by a little, and a learning rate that differs by a little
    makes the copies of the weights drift apart)."""
    if not dist.enabled:
        return bool(finite), float(loss), stop_requested, clock
    rank0_clock = clock if dist.is_main else (0.0, 0.0)
    votes = torch.cat(
        [
            finite.to(torch.float64).reshape(1),
            loss.double().reshape(1),
            torch.tensor([float(stop_requested), *rank0_clock], dtype=torch.float64, device=loss.device),
        ]
    )
    votes = all_reduce_sum(votes, dist).cpu()
    return (
        bool(votes[0].item() == dist.world_size),
        float(votes[1]) / dist.world_size,
        bool(votes[2] > 0),
        (float(votes[3]), float(votes[4])),
    )
