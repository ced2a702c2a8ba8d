"""Helpers shared by the tests (imported; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from flowpp.flows import ElementwiseNorm


def perturb_parameters(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter away from its (near-identity) initial value.

    Additive N(0, scale^2) noise everywhere, except the scales of ElementwiseNorm, which are
    multiplied by exp(N(0, scale^2)) so that they stay positive (a negative scale would be
    clamped at 1e-10 and the layer would stop being invertible).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                if isinstance(mod, ElementwiseNorm) and name.startswith("scales"):
                    p.mul_(noise.exp())
                else:
                    p.add_(noise)


# --- changes to the dataset registry's entries for one test (monkeypatch undoes them) -----------


def replace_entry(monkeypatch, name: str, **changes) -> None:
    import dataclasses

    from flowpp.data import registry

    monkeypatch.setitem(registry._ENTRIES, name, dataclasses.replace(registry.DATASETS[name], **changes))


def replace_holdout(monkeypatch, name: str, **sizes) -> None:
    """E.g. ``valid=2``: a smaller held-out split, so that tiny fixture files can be split."""
    import dataclasses

    from flowpp.data import DATASETS

    replace_entry(monkeypatch, name, holdout=dataclasses.replace(DATASETS[name].holdout, **sizes))


def replace_mirrors(monkeypatch, name: str, urls) -> None:
    replace_entry(monkeypatch, name, mirrors=tuple(urls))


def replace_md5(monkeypatch, name: str, path: str, md5: str) -> None:
    import dataclasses

    from flowpp.data import DATASETS

    files = tuple(dataclasses.replace(f, md5=md5) if f.path == path else f for f in DATASETS[name].files)
    replace_entry(monkeypatch, name, files=files)


def published_md5(name: str, path: str) -> str:
    from flowpp.data import DATASETS

    return next(f.md5 for f in DATASETS[name].files if f.path == path)


# --- `flowpp ...` in a process of its own, for the tests about a process's death ------------------

_FORKSERVER = None


def _forkserver():
    """A fork server that has imported flowpp and torch (with the dynamo modules every optimizer
    pulls in) once: its children start in milliseconds instead of the 4-5 s of a fresh
    interpreter, and are still processes of their own that a signal can kill at any moment."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["flowpp.cli", "flowpp.training", "torch._dynamo", "helpers"])
    return _FORKSERVER


def _run_flowpp(argv: list[str], log: str, threads: int | None) -> None:
    import os
    import sys

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if threads:
        torch.set_num_threads(threads)
    from flowpp.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class FlowppProcess:
    """``flowpp ARGV`` in a child process (forked from a server with flowpp imported), its output
    in ``log``; ``threads`` sets PyTorch's intra-op threads first, as OMP_NUM_THREADS would."""

    def __init__(self, argv, log, threads: int | None = 1):
        self.log = log
        self._process = _forkserver().Process(target=_run_flowpp, args=([str(a) for a in argv], str(log), threads))
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig) -> None:
        import os

        os.kill(self.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise TimeoutError(f"flowpp still running after {timeout} s")
        return self._process.exitcode

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def output(self) -> str:
        from pathlib import Path

        path = Path(self.log)
        return path.read_text(errors="replace") if path.exists() else ""
