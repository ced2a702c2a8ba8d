#!/usr/bin/env python
"""Flow++ benchmark: training / log_prob / sampling speed, inverse accuracy, peak memory and FLOP/s.

    python benchmarks/bench.py --config cifar10 --batch-size 8 --json out.json \
        [--device cpu|cuda] [--threads N] [--dtype float32|float64] [--repeats R] [--warmup W] \
        [--bf16] [--compile] [--only train,logprob,sample,inverse,memory,flops] [--data X.npz]

    python benchmarks/bench.py --summarize DIR     # one table from the JSON files in DIR

Every timing is taken after ``--warmup`` untimed runs, over ``--repeats`` timed runs, and is
reported as median [min, max]. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import flowpp
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import flowpp
from flowpp.nets import Conditioner, ContextNet  # noqa: E402

SECTIONS = ("train", "logprob", "sample", "inverse", "memory", "flops")
# The shared CIFAR-10 sample, when a checkout has one next to it (or inside it); never required.
DEFAULT_DATA = [
    REPO_ROOT.parent / "shared" / "data" / "cifar10_train10k.npz",
    REPO_ROOT / "shared" / "data" / "cifar10_train10k.npz",
]


# --- small helpers --------------------------------------------------------------------------------


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean(obj):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float):
        return _finite_or_none(obj)
    return obj


class Results:
    """Metrics as name -> {value, unit, [min, max, n]}, plus notes, in insertion order."""

    def __init__(self):
        self.metrics: dict[str, dict] = {}
        self.notes: list[str] = []

    def add(self, name: str, value, unit: str, lo=None, hi=None, n: int | None = None, **extra):
        m = {"value": value, "unit": unit}
        if lo is not None:
            m["min"], m["max"] = lo, hi
        if n is not None:
            m["n"] = n
        m.update(extra)
        self.metrics[name] = m

    def note(self, text: str):
        print(f"note: {text}", flush=True)
        self.notes.append(text)


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v == 0 or not math.isfinite(v):
        return f"{v}"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4g}"


def print_table(metrics: dict[str, dict], file=sys.stdout) -> None:
    rows = []
    for name, m in metrics.items():
        value = _fmt(m["value"])
        if "min" in m:
            value += f"  [{_fmt(m['min'])}, {_fmt(m['max'])}]"
        rows.append((name, value, m.get("unit", "")))
    w0 = max([len("metric")] + [len(r[0]) for r in rows])
    w1 = max([len("value (median [min, max])")] + [len(r[1]) for r in rows])
    print(f"{'metric':<{w0}}  {'value (median [min, max])':<{w1}}  unit", file=file)
    print(f"{'-' * w0}  {'-' * w1}  ----", file=file)
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}", file=file)
    file.flush()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    def run(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None}
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "src")
        return {"commit": head.stdout.strip(), "src_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


# --- bf16 autocast and torch.compile of the conditioner networks -----------------------------------


def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels.

    Its registry covers the CUDA attention kernels only, so on CPU the attention matmuls (about
    a fifth of a CIFAR-10 forward pass) would count as zero FLOPs and the fraction of peak would
    be understated. Same formulas as for the CUDA flash kernels: 4 B h N M d forward (two matmuls),
    10 B h N M d backward (five: the scores are recomputed).
    """
    from torch.utils import flop_counter as fc

    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return
    fwd = ops._scaled_dot_product_flash_attention_for_cpu
    bwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd not in fc.flop_registry and fwd.default not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry and bwd.default not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class _Slot(nn.Module):
    """Stands in for one conditioner network; runs it under bf16 autocast and/or compiled."""

    def __init__(self, inner: nn.Module, accel: "Accelerator"):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_accel", accel)  # not a submodule

    def forward(self, *args, **kwargs):
        accel = self._accel
        fn = accel.compiled.get(id(self.inner), self.inner) if accel.use_compiled else self.inner
        if not accel.autocast:
            return fn(*args, **kwargs)
        dtype = args[0].dtype
        with torch.autocast(accel.device_type, dtype=torch.bfloat16):
            out = fn(*args, **kwargs)
        return out.to(dtype)  # the couplings' elementwise mixture math stays in the model's dtype


class Accelerator:
    """Puts a switchable bf16-autocast / torch.compile wrapper around every conditioner network
    (the coupling conditioners and the dequantizer's context network), from outside the library."""

    def __init__(self, model: nn.Module, device_type: str):
        self.device_type = device_type
        self.autocast = False
        self.use_compiled = False
        self.compiled: dict[int, nn.Module] = {}
        self.slots = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, (Conditioner, ContextNet))
        ]
        self.installed = False

    def install(self):
        for parent, name, inner in self.slots:
            parent._modules[name] = _Slot(inner, self)
        self.installed = True

    def uninstall(self):
        for parent, name, inner in self.slots:
            parent._modules[name] = inner
        self.installed = False

    @contextlib.contextmanager
    def removed(self):
        was = self.installed
        if was:
            self.uninstall()
        try:
            yield
        finally:
            if was:
                self.install()

    def compile(self):
        import torch._dynamo as dynamo

        for key in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, max(getattr(dynamo.config, key), 64))
        for _, _, inner in self.slots:
            self.compiled[id(inner)] = torch.compile(inner)


# --- the benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.res = Results()
        self.device = torch.device(args.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
        self.cuda = self.device.type == "cuda"
        self.sections = set(args.only)

    # timing
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_fn(self, fn, warmup: int | None = None, repeats: int | None = None) -> list[float]:
        warmup = self.args.warmup if warmup is None else warmup
        repeats = self.args.repeats if repeats is None else repeats
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return times

    def add_rate(self, name: str, times: list[float], images: int):
        med, lo, hi = _stats(times)
        self.res.add(name, images / med, "img/s", images / hi, images / lo, n=len(times))

    def add_time(self, name: str, times: list[float], per: int = 1, unit: str = "s"):
        med, lo, hi = _stats(times)
        self.res.add(name, med / per, unit, lo / per, hi / per, n=len(times))

    # setup
    def load_images(self, n: int) -> tuple[torch.Tensor, str]:
        cfg = self.cfg
        a = self.args
        path = Path(a.data) if a.data else None
        if path is None and tuple(cfg.image_shape) == (3, 32, 32) and cfg.num_levels == 256:
            path = next((p for p in DEFAULT_DATA if p.is_file()), None)
        if path is not None:
            with np.load(path, allow_pickle=False) as f:
                arr = f["x_train"][:n]
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).long()
            if tuple(x.shape[1:]) != tuple(cfg.image_shape) or int(x.max()) >= cfg.num_levels:
                raise SystemExit(
                    f"--data {path.name}: images {tuple(x.shape[1:])} do not fit config "
                    f"{cfg.name!r} {tuple(cfg.image_shape)} with {cfg.num_levels} levels"
                )
            if len(x) < n:  # repeat to fill the batch
                x = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]
            return x, f"real images from {path.name} (x_train[:{min(n, len(arr))}])"
        g = torch.Generator().manual_seed(self.args.seed)
        x = torch.randint(0, cfg.num_levels, (n, *cfg.image_shape), generator=g)
        return x, "random integer images (uniform over all levels; no real data for this config)"

    def setup(self):
        a = self.args
        torch.manual_seed(a.seed)
        if a.checkpoint:
            from flowpp.checkpoint import load_checkpoint

            ck = load_checkpoint(a.checkpoint)
            self.cfg = flowpp.FlowConfig.from_dict(ck["config"])
            state = ck.get(a.weights) or ck["model"]
        else:
            self.cfg = flowpp.get_config(a.config)
            state = None
        cfg = self.cfg
        self.model = flowpp.FlowPlusPlus(cfg).to(self.device, self.dtype)
        if a.activation_checkpointing:
            self.model.set_activation_checkpointing(True)
        if state is not None:
            self.model.load_state_dict(state)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        x, self.data_source = self.load_images(a.batch_size)
        self.x = x.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(a.seed + 1)
        self.noise = self.model.dequantizer.sample_noise(self.x.shape, gen, self.device, self.dtype)
        self.y = self.x.to(self.dtype) + torch.rand(self.x.shape, generator=gen, device=self.device, dtype=self.dtype)
        self.bpd_scale = 1.0 / (cfg.num_dims * math.log(2.0))
        t0 = time.perf_counter()
        did_init = self.model.initialize(self.x)
        self.sync()
        self.init_seconds = time.perf_counter() - t0
        self.res.add(
            "init_seconds",
            self.init_seconds,
            "s",
            note="model.initialize on the batch (one-off)" if did_init else "loaded an initialised checkpoint",
        )
        self.snapshot = [t.detach().clone() for t in self.model.state_dict().values()]

        self.accel = None
        self.bf16_active = False
        if a.bf16:
            if not self.cuda:
                self.res.note("--bf16 is CUDA-only: ignored on this device, everything runs in " + a.dtype)
            elif not torch.cuda.is_bf16_supported():
                self.res.note("--bf16: this GPU does not support bf16: ignored")
            else:
                self.bf16_active = True
        if self.bf16_active or a.compile:
            self.accel = Accelerator(self.model, self.device.type)
            self.accel.install()
        if self.bf16_active:
            self.res.note(
                "bf16: the conditioner networks (coupling conditioners and the dequantizer's context "
                "network) run under torch.autocast(bfloat16) through a wrapper in this benchmark (the "
                "library has no autocast option); their outputs are cast back to "
                + a.dtype
                + " so the mixture-CDF couplings stay in "
                + a.dtype
            )

    def restore(self):
        with torch.no_grad():
            for t, s in zip(self.model.state_dict().values(), self.snapshot):
                t.copy_(s)

    @torch.no_grad()
    def eval_log_prob(self) -> torch.Tensor:
        self.model.eval()
        return self.model.log_prob(self.x, check=False, noise=self.noise)

    # training
    def make_step(self):
        model, cfg = self.model, self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
        last = {}

        def step():
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = -model.log_prob(self.x, check=False, noise=self.noise).mean() * self.bpd_scale
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            last["loss"] = loss.detach()

        def cleanup():
            opt.zero_grad(set_to_none=True)
            opt.state.clear()

        return step, cleanup, last

    def bench_train(self):
        B = self.args.batch_size
        step, cleanup, last = self.make_step()
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        rss_before, maxrss_before = current_rss_bytes(), max_rss_bytes()
        times = self.time_fn(step)
        self.train_step_seconds = statistics.median(times)
        self.add_rate("train_img_per_s", times, B)
        self.add_time("train_step_seconds", times)
        self.res.add("train_loss_bpd", float(last["loss"]), "bits/dim", note="loss of the last timed step")
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            self.res.add(
                "train_peak_memory_bytes",
                peak,
                "bytes",
                note="torch.cuda.max_memory_allocated during the training steps (Adam state included)",
            )
            self.res.add("memory_before_train_bytes", before, "bytes", note="parameters and inputs")
        elif self.args.report_rss:
            maxrss_after = max_rss_bytes()
            self.res.add(
                "train_peak_rss_bytes", maxrss_after, "bytes", note="ru_maxrss of this process after the training steps"
            )
            self.res.add("rss_before_train_bytes", rss_before, "bytes", note="VmRSS before the first step")
            self.res.add("train_rss_increase_bytes", maxrss_after - (rss_before or 0), "bytes")
            self.res.add(
                "train_set_process_peak",
                maxrss_after > maxrss_before,
                "bool",
                note="false: the peak was reached before training (e.g. during init), so the "
                "training peak is at most the reported value",
            )
        cleanup()
        del step
        self.restore()

    def bench_logprob(self):
        B = self.args.batch_size
        times = self.time_fn(self.eval_log_prob)
        self.add_rate("logprob_img_per_s", times, B)
        lp = self.eval_log_prob()
        self.res.add(
            "logprob_bpd",
            float((-lp * self.bpd_scale).mean()),
            "bits/dim",
            note="eval-mode bits/dim of the batch (one dequantization sample)",
        )

    def bench_sample(self):
        B = self.args.batch_size
        model = self.model
        model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed + 2)
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        s_times = self.time_fn(lambda: model.sample(B, 1.0, gen))
        if self.cuda:
            self.res.add("sample_peak_memory_bytes", torch.cuda.max_memory_allocated(self.device), "bytes")

        @torch.no_grad()
        def fwd():
            return model.flow(self.y)

        f_times = self.time_fn(fwd)
        self.add_time("sample_seconds_per_image", s_times, per=B, unit="s/img")
        self.add_time("sample_batch_seconds", s_times)
        self.add_time("flow_forward_batch_seconds", f_times)
        self.res.add(
            "sample_to_forward_ratio",
            statistics.median(s_times) / statistics.median(f_times),
            "x",
            note="median model.sample(B) time / median no-grad model.flow(y) time, same batch",
        )
        s = model.sample(B, 1.0, gen)
        self.res.add("sample_in_range", bool(s.min() >= 0 and s.max() < self.cfg.num_levels), "bool")

    # inverse accuracy
    @torch.no_grad()
    def _inverse_errors(self, model: nn.Module, dtype: torch.dtype, tag: str):
        model.eval()
        y = self.y.to(dtype)
        y2 = model.decode(model.encode(y))
        err = (y - y2).abs()
        self.res.add(
            f"inverse_max_abs_err_{tag}", float(err.max()), "pixels", note="max |y - decode(encode(y))|, y = x + U[0,1)"
        )
        self.res.add(f"inverse_nonfinite_{tag}", int((~torch.isfinite(y2)).sum()), "count")
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed + 3)
        for T in (0.5, 1.0):
            z = (
                torch.randn(
                    (self.args.batch_size, *self.model.latent_shape),
                    generator=gen,
                    device=self.device,
                    dtype=torch.float64,
                ).to(dtype)
                * T
            )
            z2 = model.encode(model.decode(z))
            d = (z - z2).abs()
            self.res.add(
                f"latent_roundtrip_rel_err_{tag}_T{T}",
                float(d.max() / z.abs().max()),
                "relative",
                note="max |z - encode(decode(z))| / max |z|, z ~ N(0, T^2)",
            )
            self.res.add(f"latent_roundtrip_nonfinite_{tag}_T{T}", int((~torch.isfinite(z2)).sum()), "count")

    def bench_inverse(self):
        self.res.note(f"inverse accuracy measured on {self.data_source}")
        acc = self.accel
        if acc is not None:
            saved = acc.autocast, acc.use_compiled
            acc.autocast = acc.use_compiled = False
        try:
            for dtype, tag in ((torch.float32, "float32"), (torch.float64, "float64")):
                if dtype == self.dtype:
                    self._inverse_errors(self.model, dtype, tag)
                    continue
                with acc.removed() if acc is not None else contextlib.nullcontext():
                    other = copy.deepcopy(self.model).to(dtype)
                self._inverse_errors(other, dtype, tag)
                del other
            if acc is not None and self.bf16_active:
                acc.autocast = True
                self._inverse_errors(self.model, self.dtype, "bf16")
        finally:
            if acc is not None:
                acc.autocast, acc.use_compiled = saved

    # memory
    def bench_memory(self):
        if self.cuda:
            if "train_peak_memory_bytes" not in self.res.metrics:
                step, cleanup, _ = self.make_step()
                self.sync()
                torch.cuda.reset_peak_memory_stats(self.device)
                step()
                self.sync()
                self.res.add(
                    "train_peak_memory_bytes",
                    torch.cuda.max_memory_allocated(self.device),
                    "bytes",
                    note="torch.cuda.max_memory_allocated during one training step",
                )
                cleanup()
                self.restore()
            return
        # CPU: the peak RSS is a process high-water mark, so measure a training step in a fresh process.
        a = self.args
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--only",
                "train",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--report-rss",
                "--quiet",
                "--json",
                str(out),
                "--device",
                a.device,
                "--dtype",
                a.dtype,
                "--batch-size",
                str(a.batch_size),
                "--seed",
                str(a.seed),
            ]
            cmd += ["--checkpoint", a.checkpoint, "--weights", a.weights] if a.checkpoint else ["--config", a.config]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            if a.activation_checkpointing:
                cmd += ["--activation-checkpointing"]
            if a.data:
                cmd += ["--data", a.data]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                self.res.note("memory: the child process failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
                return
            child = json.loads(out.read_text())["metrics"]
        for key in (
            "train_peak_rss_bytes",
            "rss_before_train_bytes",
            "train_rss_increase_bytes",
            "train_set_process_peak",
        ):
            if key in child:
                m = dict(child[key])
                m["note"] = (m.get("note", "") + " (fresh process: build, init, one training step)").strip()
                self.res.metrics[key] = m

    # FLOPs
    def bench_flops(self):
        from torch.utils.flop_counter import FlopCounterMode

        register_cpu_attention_flops()
        acc = self.accel
        step, cleanup, _ = self.make_step()
        if acc is not None:
            saved = acc.use_compiled
            acc.use_compiled = False  # count on the eager graph
        try:
            self.model.train()
            with FlopCounterMode(display=False) as fc:
                loss = -self.model.log_prob(self.x, check=False, noise=self.noise).mean() * self.bpd_scale
                loss.backward()
            flops = fc.get_total_flops()
        finally:
            if acc is not None:
                acc.use_compiled = saved
        self.model.zero_grad(set_to_none=True)
        self.restore()
        self.res.add(
            "train_flops_per_step",
            int(flops),
            "FLOP",
            note="FlopCounterMode, forward + backward (matmul/conv/attention only; elementwise ops not counted)",
        )
        if getattr(self, "train_step_seconds", None) is None:
            times = self.time_fn(step)
            self.train_step_seconds = statistics.median(times)
        cleanup()
        achieved = flops / self.train_step_seconds
        self.res.add("train_achieved_flops_per_s", achieved, "FLOP/s")

        peaks = {self.args.dtype: self.matmul_flops(self.dtype)}
        if self.cuda and self.bf16_active:
            peaks["bfloat16"] = self.matmul_flops(torch.bfloat16)
        for name, (med, lo, hi, n) in peaks.items():
            self.res.add(
                f"matmul_{name}_flops_per_s",
                med,
                "FLOP/s",
                lo,
                hi,
                note=f"square {name} matmul of size {n}, {torch.get_num_threads()} threads"
                if not self.cuda
                else f"square {name} matmul of size {n}",
            )
            self.res.add(f"train_fraction_of_matmul_{name}", achieved / med, "fraction")

    def matmul_flops(self, dtype: torch.dtype):
        n = self.args.matmul_size or (8192 if self.cuda else 2048)
        g = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn((n, n), generator=g, device=self.device).to(dtype)
        b = torch.randn((n, n), generator=g, device=self.device).to(dtype)
        reps = 10 if self.cuda else 3
        times = self.time_fn(lambda: torch.mm(a, b), warmup=2 if self.cuda else 1, repeats=reps)
        f = 2.0 * n**3
        med, lo, hi = _stats(times)
        return f / med, f / hi, f / lo, n

    # bf16 / compile checks
    def check_bf16(self):
        acc = self.accel
        acc.autocast = False
        ref = self.eval_log_prob()
        acc.autocast = True
        got = self.eval_log_prob()
        d = float(((got - ref).abs() * self.bpd_scale).max())
        self.res.add(
            "bf16_logprob_max_abs_diff_bpd",
            d,
            "bits/dim",
            note=f"bf16 conditioners vs {self.args.dtype}, same inputs and dequantization noise, eval mode",
        )

    def check_compile(self):
        acc = self.accel
        t0 = time.perf_counter()
        try:
            acc.compile()
            acc.use_compiled = False
            ref = self.eval_log_prob()
            acc.use_compiled = True
            got = self.eval_log_prob()  # first call compiles
            self.sync()
        except Exception as e:  # noqa: BLE001 - any failure means: run without compile
            acc.use_compiled = False
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            self.res.add("compile_ok", False, "bool")
            self.res.note(f"--compile failed, continuing without it: {type(e).__name__}: {msg}")
            return
        self.res.add("compile_ok", True, "bool", note="torch.compile of every conditioner network")
        self.res.add("compile_first_call_seconds", time.perf_counter() - t0, "s")
        d = float(((got - ref).abs() * self.bpd_scale).max())
        self.res.add("compile_logprob_max_abs_diff_bpd", d, "bits/dim", note="compiled vs eager, same inputs")

    # main
    def run(self):
        a = self.args
        t_start = time.perf_counter()
        self.setup()
        if self.bf16_active:
            self.check_bf16()
        if a.compile:
            self.check_compile()
        for name in SECTIONS:
            if name in self.sections:
                if not a.quiet:
                    print(f"[{time.perf_counter() - t_start:7.1f}s] {name} ...", flush=True)
                getattr(self, f"bench_{name}")()
        self.res.add("total_seconds", time.perf_counter() - t_start, "s")
        return self.report()

    def report(self):
        a = self.args
        meta = {
            "config": self.cfg.name,
            "batch_size": a.batch_size,
            "dtype": a.dtype,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.cuda else cpu_model(),
            "cpu_model": cpu_model(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "bf16": self.bf16_active,
            "bf16_requested": a.bf16,
            "bf16_scope": "conditioners" if self.bf16_active else None,
            "compile": a.compile,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "sections": [s for s in SECTIONS if s in self.sections],
            "data_source": self.data_source,
            "num_params": self.num_params,
            "seed": a.seed,
            "checkpoint": Path(a.checkpoint).name if a.checkpoint else None,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **git_commit(),
        }
        if self.cuda:
            meta["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
            meta["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        doc = {"meta": meta, "metrics": self.res.metrics, "notes": self.res.notes}
        if not a.quiet:
            print(
                f"\nFlow++ benchmark: config {meta['config']}, batch {a.batch_size}, {a.dtype}"
                f"{' + bf16 conditioners' if self.bf16_active else ''}{' + compile' if a.compile else ''}, "
                f"{meta['device']} ({meta['device_name']}), {meta['threads']} threads, torch {meta['torch_version']}"
            )
            print(f"data: {self.data_source}\n")
            print_table(self.res.metrics)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
        return doc


# --- summary of several runs ------------------------------------------------------------------------

SUMMARY_KEYS = [
    ("train_img_per_s", "train img/s"),
    ("logprob_img_per_s", "log_prob img/s"),
    ("sample_seconds_per_image", "sample s/img"),
    ("sample_batch_seconds", "sample batch s"),
    ("sample_to_forward_ratio", "sample/fwd"),
    ("inverse_max_abs_err_float32", "inv err f32 px"),
    ("inverse_max_abs_err_float64", "inv err f64 px"),
    ("inverse_max_abs_err_bf16", "inv err bf16 px"),
    ("train_peak_memory_bytes", "peak mem B"),
    ("train_peak_rss_bytes", "peak RSS B"),
    ("train_achieved_flops_per_s", "FLOP/s"),
    ("train_fraction_of_matmul_float32", "frac f32 mm"),
    ("bf16_logprob_max_abs_diff_bpd", "bf16 diff bpd"),
    ("compile_logprob_max_abs_diff_bpd", "compile diff bpd"),
]


def summarize(directory: str) -> int:
    files = sorted(Path(directory).glob("*.json"))
    docs = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "metrics" in doc and "meta" in doc:
            docs.append((f.stem, doc))
    if not docs:
        print(f"no benchmark JSON files in {directory}")
        return 1
    for stem, doc in docs:
        meta, m = doc["meta"], doc["metrics"]
        head = (
            f"{stem}: {meta['config']} batch {meta['batch_size']} {meta['dtype']}"
            f"{' +bf16' if meta.get('bf16') else ''}{' +compile' if meta.get('compile') else ''}"
            f" on {meta['device_name']}"
        )
        print(head)
        for key, label in SUMMARY_KEYS:
            if key in m:
                print(f"    {label:<18} {_fmt(m[key]['value'])}")
        if "sample_batch_seconds" in m and meta["batch_size"] == 8 and meta["config"] == "cifar10":
            v = m["sample_batch_seconds"]["value"]
            print(
                f"    sample 8 CIFAR-10 images warm: {_fmt(v)} s (paper 0.32 s, goal < 0.1 s: "
                f"{'met' if v is not None and v < 0.1 else 'not met'})"
            )
    return 0


# --- command line -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="cifar10", help="model config name (flowpp.list_configs())")
    p.add_argument("--checkpoint", default=None, help="measure a trained flowpp checkpoint (its config is used)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="which weights of --checkpoint")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="conditioners under bf16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the conditioner networks")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute the conditioner networks in the backward pass (less training memory)",
    )
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--data",
        default=None,
        help="npz with uint8 NHWC 'x_train' (default: the shared CIFAR-10 "
        "sample next to the repository, for 32x32x3 configs, when present)",
    )
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="size of the peak-FLOP/s matmul (default 2048 on CPU, 8192 on CUDA)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all numbers and machine info here")
    p.add_argument("--report-rss", action="store_true", help=argparse.SUPPRESS)  # child mode of 'memory'
    p.add_argument("--quiet", action="store_true", help="no table")
    p.add_argument("--summarize", default=None, metavar="DIR", help="print a summary of the JSON files in DIR")
    args = p.parse_args(argv)
    if args.summarize is None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in only if s not in SECTIONS]
        if bad:
            p.error(f"--only: unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
        args.only = only
        if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
            p.error("--batch-size and --repeats must be >= 1 and --warmup >= 0")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available in this torch build")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        return summarize(args.summarize)
    if args.threads:
        torch.set_num_threads(args.threads)
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
