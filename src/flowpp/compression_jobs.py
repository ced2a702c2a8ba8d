"""The compress and decompress commands: images from files or a dataset into one archive, and back."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .data.for_config import load_images
from .errors import UsageError
from .job_support import load_for_command, progress_bar, to_stderr

__all__ = ["compress_job", "decompress_job"]


def compress_job(
    *,
    run: str,
    images: Sequence[str] = (),
    out: str,
    data: str | None = None,
    split: str = "test",
    limit: int | None = None,
    data_dir: str | None = None,
    download: bool = True,
    device: str = "cpu",
    which: str | None = None,
    grid_bits: int = 18,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Compress PNG files, an .npz (key 'x') or a dataset split into one archive with a run's model."""
    from .atomic import atomic_write_bytes
    from .codec import compress
    from .codec.files import read_inputs

    target = Path(out)
    if target.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    if target.is_dir():
        raise UsageError(f"{out} is a directory; --out names the archive file")
    if bool(images) == bool(data):
        raise UsageError("give either image files or --data NAME, not both or neither")
    model, info, _ = load_for_command(run, device, False, which)
    cfg = model.config
    if data:
        x = load_images(data, split, cfg, data_dir=data_dir, download=download, log=to_stderr).images
        x, names = np.ascontiguousarray(x[:limit] if limit else x), None
    else:
        x, names = read_inputs(list(images), tuple(cfg.image_shape), cfg.num_levels)
    with progress_bar(len(x), progress, "compress") as bar:
        archive = compress(model, x, names, grid_bits=grid_bits, progress=bar)
    atomic_write_bytes(target, archive)
    dims = x.size
    summary = {"archive": str(target), "images": int(len(x)), "bytes": len(archive), "bpd": 8 * len(archive) / dims}
    print(f"wrote {target}: {_count(len(x))}, {len(archive):,} bytes, {summary['bpd']:.4f} bits/dim")
    return summary


def decompress_job(
    *, archive: str, out: str, run: str, device: str = "cpu", which: str | None = None, progress: bool = True
) -> list[Path]:
    """Decode an archive with the run's model and write its images into the folder ``out``."""
    from .codec import decompress
    from .codec.files import check_outputs, write_outputs

    path = Path(archive)
    if not path.is_file():
        raise UsageError(f"{archive}: no such file" if not path.exists() else f"{archive}: not a regular file")
    data = path.read_bytes()
    from .codec import read_header

    header, _ = read_header(data)  # a damaged archive is refused before the model is loaded
    check_outputs(out, header["images"]["names"])  # and a folder that cannot take the images
    model, info, _ = load_for_command(run, device, False, which)
    with progress_bar(header["images"]["count"], progress, "decompress") as bar:
        result = decompress(data, model, progress=bar)
    written = write_outputs(out, result.images, result.names, model.config.num_levels)
    what = _count(len(written), "PNG file") if result.names is not None else str(written[0])
    print(f"decoded {_count(len(result.images))} exactly; wrote {what} in {out}")
    return written


def _count(n: int, thing: str = "image") -> str:
    return f"{n:,} {thing}" + ("" if n == 1 else "s")
