"""Exact evaluation: the single-sample dequantization bound and the importance-weighted bound.

For each image, S dequantization samples u_i ~ q(.|x) give r_i = log p(x + u_i) - log q(u_i|x);
the single-sample bound is the mean of r_i, the importance-weighted bound log mean_i exp(r_i)
(float64, max-shifted). Both are reported in bits/dim with standard errors over images.

The noise of image i comes from its own generator, seeded by (seed, i), one draw per sample:
the numbers do not depend on the batch size, on which images share a batch, or on how many
processes share the work. Under torchrun each process scores every world_size-th image and
the per-image results are all-reduced, so every process returns the same summary.

A long evaluation can be given :class:`EvalParts`: the images are then scored in chunks whose
per-image results are saved as they complete (atomically, by rank 0, each under a digest), and
a rerun skips the chunks already saved intact. The chunks and their batches are the same in
every run, so a resumed evaluation gives exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import distributed as D
from .atomic import atomic_write, atomic_write_text, json_text
from .images import chw_shape, gather, save_grid
from .model import FlowPlusPlus

__all__ = ["evaluate_bpd", "evaluate_now", "log_weights", "noise_generator", "summarize", "EvalParts", "weights_digest"]


_MASK64 = (1 << 64) - 1


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The dequantization-noise stream of image ``index`` (a CPU generator: device-independent).

    The CPU generator keeps only 32 bits of its seed, so (seed, index) is mixed (splitmix64)
    into 32 well-spread bits rather than packed side by side."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed((z ^ (z >> 31)) & 0xFFFFFFFF)


@torch.no_grad()
def log_weights(model: FlowPlusPlus, x: Tensor, generators: list[torch.Generator], samples: int) -> Tensor:
    """(samples, B) float64 r = log p(x + u) - log q(u|x) for integer images x (B, C, H, W), the
    noise of image j drawn from ``generators[j]``, one sample after another."""
    p = next(model.parameters())
    shape = (1, *x.shape[1:])
    noise = torch.stack(
        [
            torch.cat([model.dequantizer.sample_noise(shape, g, dtype=p.dtype) for _ in range(samples)])
            for g in generators
        ],
        dim=1,
    )  # (samples, B, C, H, W)
    xr = x.expand(samples, *x.shape).reshape(-1, *x.shape[1:])
    lp = model.log_prob(xr, check=False, noise=noise.reshape(-1, *x.shape[1:]).to(p.device))
    return lp.double().view(samples, x.shape[0])


def _stats(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def summarize(single_bpd: np.ndarray, iw_bpd: np.ndarray | None, samples: int) -> dict:
    mean, se = _stats(single_bpd)
    out = {"n_images": int(len(single_bpd)), "samples": int(samples), "bpd": mean, "bpd_se": se}
    if iw_bpd is not None and samples > 1:
        m, s = _stats(iw_bpd)
        out.update(iw_bpd=m, iw_bpd_se=s)
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers: which weights a saved result belongs to."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EvalParts:
    """The per-image results of one evaluation, saved chunk by chunk in ``folder``.

    ``key`` says what is evaluated (weights, data, split, S, seed, images, chunk size); parts
    saved for another key are discarded, so a rerun only ever continues the same evaluation.
    Each chunk's file name carries the SHA-256 of its values, its index and the key (one atomic
    rename writes both): a chunk changed on disk, or copied from another evaluation, fails it and
    is computed again, as is one that is unreadable, misshapen or not finite.
    """

    _NAME = re.compile(r"chunk-(\d{7})(?:-([0-9a-f]{64}))?\.npy")

    def __init__(self, folder: str | Path, key: dict[str, Any], log: Callable[[str], None] | None = None):
        self.folder, self.key, self.chunk = Path(folder), key, int(key["chunk"])
        self.log = log or (lambda _m: None)
        self._key_text = json_text(key)

    def _same_key(self) -> bool:
        """Whether the folder holds parts of this evaluation (its key.json equals ``key``)."""
        try:
            return json.loads((self.folder / "key.json").read_text()) == json.loads(self._key_text)
        except (OSError, ValueError):
            return False

    def _digest(self, index: int, values: np.ndarray) -> str:
        h = hashlib.sha256(self._key_text.encode())
        h.update(f"chunk {index} {values.shape}\n".encode())
        h.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
        return h.hexdigest()

    def _problem(self, path: Path, index: int, digest: str | None, n: int) -> tuple[str | None, np.ndarray | None]:
        """(why the chunk file cannot be used, or None; its values)."""
        if digest is None:
            return "it carries no digest", None
        if index * self.chunk >= n:
            return "it is beyond the last chunk", None
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            return f"it is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})", None
        expected = (2, min(n, (index + 1) * self.chunk) - index * self.chunk)
        if values.dtype != np.float64 or values.shape != expected:
            return f"wrong shape or dtype: {values.dtype} {values.shape}, expected float64 {expected}", None
        if not np.isfinite(values).all():
            return "it holds non-finite values", None
        if self._digest(index, values) != digest:
            return "its values do not match its digest", None
        return None, values

    def done(self, n: int) -> dict[int, np.ndarray]:
        """Chunk index -> (2, images of the chunk) float64 sums, for the intact chunks saved for
        ``n`` images; the others are named (one line) and left to be computed again."""
        if not self._same_key():
            if self.folder.exists():
                self.log(f"{self.folder}: discarding saved parts of another evaluation")
            return {}
        out: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        for path in sorted(self.folder.glob("chunk-*.npy")):
            m = self._NAME.fullmatch(path.name)
            if m is None:
                continue
            index = int(m.group(1))
            why, values = self._problem(path, index, m.group(2), n)
            if values is not None:
                out[index] = values
            elif why is not None:
                failed[index] = why
        failed = {c: why for c, why in failed.items() if c not in out}
        if failed:
            listed = [f"chunk {c} ({why})" for c, why in sorted(failed.items())]
            more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
            self.log(f"{self.folder}: computing again {len(failed)} saved part(s) that fail their checks: "
                     f"{', '.join(listed[:5])}{more}")  # fmt: skip
        return out

    def start(self) -> None:
        """Begin saving (rank 0): a fresh folder unless it holds parts of this evaluation."""
        if not self._same_key():
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            atomic_write_text(self.folder / "key.json", self._key_text)

    def save(self, index: int, values: np.ndarray) -> None:
        """Save a chunk's values (only finite ones: others would be computed again anyway)."""
        if not np.isfinite(values).all():
            return
        path = self.folder / f"chunk-{index:07d}-{self._digest(index, values)}.npy"
        atomic_write(path, lambda f: np.save(f, values, allow_pickle=False))
        for other in self.folder.glob(f"chunk-{index:07d}*.npy"):  # a damaged file this one replaces
            if other != path:
                other.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def default_chunk(samples: int) -> int:
    """Images per saved chunk: about a million model rows (images x samples), 64 to 4096 images."""
    return min(4096, max(64, (1 << 20) // samples))


@torch.no_grad()
def evaluate_bpd(
    model: FlowPlusPlus,
    images: Tensor | np.ndarray,
    *,
    samples: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    dist: D.DistInfo | None = None,
    progress: Callable[[int], None] | None = None,
    per_image: bool = False,
    parts: EvalParts | None = None,
) -> dict:
    """Bits/dim of integer images under ``model`` (put in eval mode), with S = ``samples``: an
    (N, C, H, W) tensor, or an (N, H, W, C) array or memory map read a batch at a time.

    ``batch_size`` bounds the rows of one pass (images x samples). ``progress(n)`` is told of
    each n images done (by all processes). With ``per_image``, the result also holds every
    image's bits/dim (``per_image_bpd``, and ``per_image_iw_bpd`` when S > 1). With ``parts``,
    per-image results are saved chunk by chunk and chunks saved before are not computed again.
    """
    dist = dist or D.DistInfo()
    model.eval()
    if isinstance(images, Tensor):
        model.check_images(images)
    elif chw_shape(images) != tuple(model.config.image_shape):
        model.check_images(gather(images, [0]))  # the same message as for a tensor
    device = next(model.parameters()).device
    n = images.shape[0]
    per_pass = min(samples, batch_size)  # samples of one image in one pass
    images_per_pass = max(1, batch_size // per_pass)
    chunk = parts.chunk if parts is not None else max(n, 1)
    saved = _agreed_parts(parts, n, chunk, dist)
    sums = torch.zeros(2, n, dtype=torch.float64)  # mean r, log mean exp r, per image
    for c, lo in enumerate(range(0, n, chunk)):
        hi = min(n, lo + chunk)
        if c in saved:
            sums[:, lo:hi] = torch.from_numpy(saved[c])
            if progress:
                progress(hi - lo)
            continue
        part = torch.zeros(2, hi - lo, dtype=torch.float64, device=device)
        mine = torch.arange(lo + dist.rank, hi, dist.world_size)
        for start in range(0, mine.numel(), images_per_pass):
            idx = mine[start : start + images_per_pass]
            x = gather(images, idx)
            if not isinstance(images, Tensor):
                model.check_images(x)
            x = x.to(device)
            generators = [noise_generator(seed, int(i)) for i in idx]
            r = torch.cat(
                [log_weights(model, x, generators, min(per_pass, samples - d)) for d in range(0, samples, per_pass)]
            )
            part[0, (idx - lo).to(device)] = r.mean(0)
            part[1, (idx - lo).to(device)] = torch.logsumexp(r, 0) - math.log(samples)
            if progress:
                progress(idx.numel() * dist.world_size)
        D.all_reduce_sum(part, dist)
        sums[:, lo:hi] = part.cpu()
        if parts is not None and dist.is_main:
            parts.save(c, sums[:, lo:hi].numpy())
    bpd = (-sums / model.config.nats_per_bpd).numpy()
    out = summarize(bpd[0], bpd[1], samples)
    if parts is not None:
        out["resumed_images"] = int(sum(v.shape[1] for v in saved.values()))
    if per_image:
        out["per_image_bpd"] = bpd[0].tolist()
        if samples > 1:
            out["per_image_iw_bpd"] = bpd[1].tolist()
    return out


def _agreed_parts(parts: EvalParts | None, n: int, chunk: int, dist: D.DistInfo) -> dict[int, np.ndarray]:
    """The saved chunks every process sees (the others are computed again); rank 0 opens the folder."""
    if parts is None:
        return {}
    saved = parts.done(n)
    chunks = -(-n // chunk)
    seen = torch.zeros(chunks, dtype=torch.float64)
    seen[[c for c in saved if c < chunks]] = 1.0
    D.all_reduce_sum(seen, dist)
    agreed = {c: v for c, v in saved.items() if c < chunks and seen[c] == dist.world_size}
    if dist.is_main:
        parts.start()
    D.barrier(dist)
    return agreed


def evaluate_now(
    ema: FlowPlusPlus,
    valid_x: Tensor,
    *,
    batch_size: int,
    samples: int,
    seed: int,
    grid: Path,
    dist: D.DistInfo,
) -> dict:
    """The evaluation during training: validation bits/dim (sharded, noise fixed per image), and
    on rank 0 the inverse error of 16 images and a grid of ``samples`` samples written to ``grid``."""
    res = evaluate_bpd(ema, valid_x, batch_size=batch_size, seed=1234, dist=dist)
    inv_err = float("nan")
    if dist.is_main:
        with torch.no_grad():
            p = next(ema.parameters())
            y = valid_x[:16].to(p.device).to(p.dtype) + 0.5
            inv_err = float((ema.decode(ema.encode(y)) - y).abs().max())
            g = torch.Generator(device=p.device).manual_seed(seed)
            save_grid(ema.sample(samples, generator=g), ema.config.num_levels, grid)
    return dict(valid_bpd=res["bpd"], inverse_error=inv_err)
