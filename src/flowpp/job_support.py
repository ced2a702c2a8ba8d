"""What the commands of :mod:`flowpp.jobs` share: loading a model by its run or file, saying so
on stderr, and progress for long work (a bar on a terminal, occasional lines in a log)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from . import distributed as D
from .errors import UsageError
from .runs import RunDir

__all__ = ["load_for_command", "to_stderr", "progress_bar", "ProgressLines"]


def load_for_command(run: str, device: str | torch.device, compile: bool, which: str | None = None, quiet=False):
    """(model, info, device) from a run directory or an exported .safetensors file; says which weights
    (and which damaged newer checkpoints it skipped) on stderr, unless ``quiet``."""
    log = None if quiet else to_stderr
    dev = device if isinstance(device, torch.device) else D.resolve_device(device)
    if Path(run).is_file():
        from .export import load_with_metadata

        if which == "last":
            raise UsageError(f"{run} is an exported file: it holds one set of weights; drop --weights last")
        model, meta = load_with_metadata(run, dev)
        info = {"checkpoint": str(run), "step": meta.get("step"), "which": f"exported ({meta.get('which', '?')})"}
    else:
        model, info = RunDir(run).load_model(dev, log=log, which=which)
    if not quiet:
        step = f", step {info['step']}" if info["step"] not in (None, "") else ""
        print(f"weights: {info['which']}{step} ({info['checkpoint']})", file=sys.stderr)
    if compile:
        model.compile_networks()
    return model, info, dev


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class ProgressLines:
    """Progress as occasional lines on stderr: each tenth of the images, or every ``seconds``."""

    def __init__(self, total: int, seconds: float = 300.0, label: str = "eval"):
        import time

        self.clock, self.total, self.seconds, self.label = time.monotonic, total, seconds, label
        self.done = self.reported = 0
        self.start = self.last = self.clock()

    def __call__(self, n: int) -> None:
        self.done += n
        now = self.clock()
        tenth = max(1, -(-self.total // 10))
        due = self.done // tenth > self.reported // tenth or self.done >= self.total or now - self.last >= self.seconds
        if not due or self.done == self.reported:
            return
        rate = self.done / max(now - self.start, 1e-9)  # saved chunks of a resumed evaluation count too
        percent = 100 * self.done // max(self.total, 1)
        print(f"{self.label}: {self.done:,}/{self.total:,} images ({percent}%), {rate:,.1f} img/s", file=sys.stderr)
        self.reported, self.last = self.done, now


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, what: str):
    """A callback taking the number of images just done (None when not ``enabled``): a bar on a
    terminal, a few whole lines in a log rather than a bar's every redraw."""
    if not enabled:
        yield None
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr, desc=what) as bar:
            yield bar.update
        return
    yield ProgressLines(total, label=what)
