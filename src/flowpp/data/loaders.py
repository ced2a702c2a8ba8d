"""How a named dataset is read, one loader per kind of source; every fact comes from the entry.

A loader is called as ``loader(spec, root, split, download, log)`` with the dataset's
:class:`~flowpp.data.registry.DatasetSpec` and its folder, parses the files with the parser of
their format (:mod:`flowpp.data.formats`), carves the split with :func:`~flowpp.data.splits.carve`
and returns ``(images, description)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from .download import fetch
from .errors import DatasetError
from .formats import NpyImages, NpzBatches, PngImages, decode_pngs, read_cifar, read_idx
from .splits import carve, take

if TYPE_CHECKING:
    from .registry import DataFile, DatasetSpec

__all__ = ["load_cifar", "load_idx", "load_downsampled_imagenet", "load_release_file", "load_sklearn_digits"]

Log = Optional[Callable[[str], object]]

#: The two published layouts of downsampled ImageNet (``DataFile.layout``), preferred first.
VAN_DEN_OORD = "van den Oord et al. 2016"
CHRABASZCZ = "Chrabaszcz et al. 2017"


def _ensure_file(spec: DatasetSpec, root: Path, f: DataFile, download: bool, log: Log) -> Path:
    """Path of ``root/f.path``, downloading it first if absent and allowed."""
    path = root / f.path
    if path.is_file():
        return path
    urls = spec.urls(f)
    where = urls[0] if urls else "the dataset's site"
    if not download:
        raise DatasetError(
            f"{spec.name}: {path} not found (download=False). Download {f.path} "
            f"from {where} (MD5 {f.md5}) and place it in {root}/, or allow downloading."
        )
    return fetch(urls, path, f.md5, log=log)


def load_cifar(spec: DatasetSpec, root: Path, split: str, download: bool, log: Log) -> tuple:
    """CIFAR python batches: members of the official tarball, or the files they were extracted to."""
    (f,) = spec.files_for(split)
    if not (root / f.path).is_file() and all((root / m).is_file() for m in f.members):
        # Already extracted (e.g. by torchvision): read the batch files.
        x = read_cifar(root, f.members)
        origin = f"extracted batches in {(root / f.members[0]).parent}"
    else:
        tar_path = _ensure_file(spec, root, f, download, log)
        x, origin = read_cifar(tar_path, f.members), str(tar_path)
    part, detail = take(x, split, spec.holdout, f.label or f.path)
    return part, f"{spec.title} (official python-version batches, {origin}); {detail}"


def load_idx(spec: DatasetSpec, root: Path, split: str, download: bool, log: Log) -> tuple:
    """Official IDX files, gzip-compressed (downloaded when absent) or already decompressed."""
    (f,) = spec.files_for(split)
    raw = root / f.path[: -len(".gz")]
    if not (root / f.path).is_file() and raw.is_file():
        source = raw
    else:
        source = _ensure_file(spec, root, f, download, log)
    x = read_idx(source, expect_hw=spec.image_shape[:2])
    part, detail = take(x, split, spec.holdout, source.name)
    return part, f"{spec.title} (official IDX files, {source}); {detail}"


def load_downsampled_imagenet(spec: DatasetSpec, root: Path, split: str, download: bool, log: Log) -> tuple:
    """Downsampled ImageNet, placed by hand (the sites need a login) in either published layout:
    van den Oord et al.'s PNG archives (or their extracted folders), the data Flow++ reports on,
    else Chrabaszcz et al.'s npz batches."""
    size = spec.image_shape[0]
    vdo = {s: root / spec.files_for(s, VAN_DEN_OORD)[0].path for s in ("train", "test")}
    vdo_dir = {s: p.with_suffix("") for s, p in vdo.items()}
    ch = {s: [root / f.path for f in spec.files_for(s, CHRABASZCZ)] for s in ("train", "test")}
    role = spec.files_for(split, VAN_DEN_OORD)[0].split  # which source: the training or the test archive
    has_vdo = any(p.is_file() for p in vdo.values()) or any(p.is_dir() for p in vdo_dir.values())
    has_ch = any(p.is_file() for p in ch["train"] + ch["test"])
    if has_vdo:
        if vdo[role].is_file():
            src = vdo[role]
        elif vdo_dir[role].is_dir():
            src = vdo_dir[role]
        else:
            raise DatasetError(
                f"{spec.name}: found van den Oord et al. files in {root}/ but not {vdo[role].name} "
                f"(nor the extracted folder {vdo_dir[role].name}/). Place {vdo[role].name} in "
                f"{root}/ (from the downsampled-ImageNet page of van den Oord et al. 2016)."
            )
        if log is not None:
            log(f"{spec.name}: reading van den Oord et al. 2016 PNG archive {src}")
        with PngImages(src) as png:
            if not len(png):
                raise DatasetError(f"{src}: the archive holds no PNG files" if src.is_file() else
                                   f"{src}/: the folder holds no PNG files")  # fmt: skip
            start, stop, detail = carve(len(png), split, spec.holdout, src.name if src.is_file() else f"{src.name}/")
            x = decode_pngs([(png, i) for i in range(start, stop)], spec.image_shape, src.name, log,
                            expect_size=(size, size), gray_to_rgb=True)  # fmt: skip
        title = f"{spec.title} (van den Oord et al. 2016 PNG archives, {src})"
    elif has_ch:
        files = ch[role]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            archive = ch["train"][0].parent.name[: -len("_npz")]
            raise DatasetError(
                f"{spec.name}: found Chrabaszcz et al. 2017 npz files in {root}/ but these are missing: "
                + ", ".join(missing)
                + f". Download the {archive} / _val npz archives from image-net.org (login needed) and unpack "
                "them there."
            )
        if log is not None:
            log(f"{spec.name}: reading Chrabaszcz et al. 2017 npz batches from {files[0].parent}")
        batches = NpzBatches(files, size)
        what = files[0].parent.name + "/" + (files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}")
        start, stop, detail = carve(len(batches), split, spec.holdout, what)
        x = batches.read(start, stop, what, log)
        title = f"{spec.title} (Chrabaszcz et al. 2017 downsampled-ImageNet npz batches, {files[0].parent})"
    else:
        first, last, val = ch["train"][0], ch["train"][-1], ch["test"][0]
        raise DatasetError(
            f"{spec.name}: no ImageNet files in {root}/ and they cannot be downloaded automatically "
            "(the sites need a login). Place either\n"
            f"  (a) van den Oord et al. 2016 (what Flow++ used): {vdo['train'].name} and "
            f"{vdo['test'].name} (or their extracted folders {vdo_dir['train'].name}/, "
            f"{vdo_dir['test'].name}/), or\n"
            f"  (b) Chrabaszcz et al. 2017: {first.relative_to(root).as_posix()} .. {last.name} and "
            f"{val.relative_to(root).as_posix()}\n"
            f"in {root}/."
        )
    return x, f"{title}; {detail}"


def load_release_file(spec: DatasetSpec, root: Path, split: str, download: bool, log: Log) -> tuple:
    """A pre-quantized ``.npy`` file of the Flow++ release (CelebA), placed by hand; every split is
    carved out of it (the release trains on every image and reports no held-out set)."""
    (f,) = spec.files_for(split)
    path = root / f.path
    if not path.is_file():
        raise DatasetError(
            f"{spec.name}: {path} not found. The Flow++ release's pre-quantized CelebA files need a manual "
            f"download (links in the release's flows_celeba/README.md): place {f.path} in {root}/."
        )
    images = NpyImages(path, spec.image_shape)
    start, stop, detail = carve(len(images), split, spec.holdout, str(path))
    part, top = images.read(start, stop)
    if top >= spec.num_levels:
        bits = spec.num_levels.bit_length() - 1
        raise DatasetError(
            f"{path}: pixel value {top} in the {split} split, but a {bits}-bit file holds values "
            f"0..{spec.num_levels - 1}"
        )
    return part, f"{spec.title} (Flow++ release file {path}); {detail}"


def bundled_digits() -> np.ndarray | None:
    """The (1797, 8, 8) images of scikit-learn's ``digits.csv.gz``, read straight from its package
    data, as ``load_digits`` reads them; None when the file is not where scikit-learn keeps it.
    Importing scikit-learn itself takes about 2 seconds, longer than a demo's data takes to read."""
    import importlib.util

    found = importlib.util.find_spec("sklearn")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    try:
        data = np.loadtxt(path, delimiter=",")
    except (OSError, ValueError):
        return None
    if data.ndim != 2 or data.shape[1] != 65:
        return None
    return data[:, :-1].reshape(-1, 8, 8)


def load_sklearn_digits(spec: DatasetSpec, root: Path, split: str, download: bool, log: Log) -> tuple:
    """The digits scikit-learn bundles (UCI optdigits): no files, nothing to download."""
    imgs = bundled_digits()
    if imgs is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DatasetError(
                f"the {spec.name!r} dataset needs scikit-learn: pip install scikit-learn (or pip install "
                "'flowpp[digits]')"
            ) from exc
        try:
            imgs = np.asarray(load_digits().images)
        except Exception as exc:  # noqa: BLE001 - a broken scikit-learn install
            raise DatasetError(f"{spec.name}: scikit-learn could not load its bundled digits ({exc})") from exc
    h, w, _ = spec.image_shape
    top = spec.num_levels - 1
    if (
        imgs.ndim != 3
        or imgs.shape[1:] != (h, w)
        or len(imgs) <= spec.holdout.test
        or not np.all(imgs == np.round(imgs))
        or imgs.min() < 0
        or imgs.max() > top
    ):
        raise DatasetError(f"{spec.name}: unexpected data from scikit-learn (shape {imgs.shape})")
    x = imgs.astype(np.uint8)[..., None]
    part, detail = take(x, split, spec.holdout, "scikit-learn's digits")
    return part, f"{spec.title} (UCI optdigits {h}x{w}, values 0..{top}); {detail}"
