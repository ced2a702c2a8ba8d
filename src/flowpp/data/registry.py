"""The named datasets: one entry each, holding every fact about it that flowpp uses.

An entry (:class:`DatasetSpec`) says what the dataset is called (name, aliases, a summary for
help texts, a title for descriptions), which files it is read from (:class:`DataFile`: paths,
published MD5s, download mirrors), the shape and number of levels of its images, how its splits
are carved (:class:`~flowpp.data.splits.Holdout`), whether it is prepared on first use, and the
loader (:mod:`flowpp.data.loaders`) that reads it.  Code that needs a fact asks the entry:
:func:`find_dataset` for a name as a user writes it, :data:`DATASETS` by exact name.

Named datasets live in ``<data_dir>/<folder>/`` (the folder defaults to the name).  Those with
download mirrors are fetched when absent (verified by MD5); nothing touches the network when
the files are present.  The others are placed by hand, or need no files.

Entries are frozen: a variant is ``dataclasses.replace(entry, ...)`` (tests point downloads at a
local server and shrink the hold-outs this way).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

from .loaders import (
    CHRABASZCZ,
    VAN_DEN_OORD,
    load_cifar,
    load_downsampled_imagenet,
    load_idx,
    load_release_file,
    load_sklearn_digits,
)
from .splits import Holdout

__all__ = [
    "DataFile",
    "DatasetSpec",
    "DATASETS",
    "DATASET_NAMES",
    "find_dataset",
    "shares_folder",
    "help_text",
]


@dataclass(frozen=True)
class DataFile:
    """A file a named dataset is read from.

    Attributes:
        path: relative to the dataset's folder.
        split: which source it holds: ``"train"`` (of the train, valid and train+valid splits,
            and of test when the entry's hold-out carves test from it too) or ``"test"``.
        md5: the published checksum of a file that can be downloaded from the entry's mirrors.
        members: the archive members that hold the images, in order.
        label: how split descriptions name these images (default: ``path``).
        layout: for a dataset published in several layouts, which one the file belongs to.
    """

    path: str
    split: str = "train"
    md5: Optional[str] = None
    members: tuple = ()
    label: Optional[str] = None
    layout: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset (see the module docstring)."""

    name: str
    summary: str  # a few words for help texts
    title: str  # how descriptions of its splits begin
    loader: Callable  # loader(spec, root, split, download, log) -> (images, description)
    image_shape: tuple  # (H, W, C)
    holdout: Holdout
    files: tuple = ()
    mirrors: tuple = ()  # base URLs tried in order; a file's URL is base + its path
    aliases: tuple = ()
    folder: Optional[str] = None  # under the data dir; default: the name
    num_levels: int = 256
    prepared_by_default: bool = True  # decoded once into memory-mapped arrays on first use

    @property
    def folder_name(self) -> str:
        return self.folder or self.name

    def files_for(self, split: str, layout: str = "") -> tuple:
        """The files (of ``layout``) that the images of ``split`` are read from."""
        source = "test" if split == "test" and not self.holdout.test else "train"
        return tuple(f for f in self.files if f.split == source and f.layout == layout)

    def urls(self, f: DataFile) -> list:
        """Where ``f`` can be downloaded from, mirrors in order."""
        return [(b if b.endswith("/") else b + "/") + f.path for b in self.mirrors]


def _mnist_like(name: str, title: str, md5s: tuple, mirrors: tuple, aliases: tuple = ()) -> DatasetSpec:
    train, test = "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"
    return DatasetSpec(
        name=name,
        summary=f"{title}, downloaded",
        title=title,
        loader=load_idx,
        image_shape=(28, 28, 1),
        holdout=Holdout(valid=5000),
        files=(DataFile(train, "train", md5s[0]), DataFile(test, "test", md5s[1])),
        mirrors=mirrors,
        aliases=aliases,
    )


def _imagenet(size: int) -> DatasetSpec:
    s = f"{size}x{size}"
    batches = tuple(
        DataFile(f"Imagenet{size}_train_npz/train_data_batch_{i}.npz", "train", layout=CHRABASZCZ) for i in range(1, 11)
    )
    return DatasetSpec(
        name=f"imagenet{size}",
        summary=f"ImageNet {s}, placed by hand",
        title=f"ImageNet{size}",
        loader=load_downsampled_imagenet,
        image_shape=(size, size, 3),
        holdout=Holdout(valid=10000),
        files=(
            DataFile(f"train_{s}.tar", "train", layout=VAN_DEN_OORD),
            DataFile(f"valid_{s}.tar", "test", layout=VAN_DEN_OORD),
            *batches,
            DataFile(f"Imagenet{size}_val_npz/val_data.npz", "test", layout=CHRABASZCZ),
        ),
        aliases=(f"imagenet-{size}",),
    )


#: The release trains on every image and reports no held-out set; flowpp holds these out.
_CELEBA_HOLDOUT = Holdout(valid=1000, test=3000)


def _celeba(size: int, bits: int, filename: str) -> DatasetSpec:
    return DatasetSpec(
        name=f"celeba{size}-{bits}bit",
        summary=f"the Flow++ release's CelebA {size}x{size} {bits}-bit, placed by hand",
        title=f"CelebA {size}x{size}, {bits} bits",
        loader=load_release_file,
        image_shape=(size, size, 3),
        holdout=_CELEBA_HOLDOUT,
        files=(DataFile(filename),),
        folder="celeba",
        num_levels=2**bits,
    )


_CIFAR_TAR, _CIFAR_MD5 = "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
_CIFAR_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))

_ENTRIES: dict = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar10",
            summary="CIFAR-10, downloaded",
            title="CIFAR-10",
            loader=load_cifar,
            image_shape=(32, 32, 3),
            holdout=Holdout(valid=5000),
            files=(
                DataFile(_CIFAR_TAR, "train", _CIFAR_MD5, _CIFAR_BATCHES, label="data_batch_1..5"),
                DataFile(_CIFAR_TAR, "test", _CIFAR_MD5, ("cifar-10-batches-py/test_batch",), label="test_batch"),
            ),
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            aliases=("cifar-10", "cifar"),
        ),
        _mnist_like(
            "mnist",
            "MNIST",
            ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "9fb629c4189551a2d022fa330f9573f3"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        ),
        _mnist_like(
            "fashion-mnist",
            "Fashion-MNIST",
            ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "bef4ecab320f06d8554ea6380940ec79"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            aliases=("fashionmnist", "fmnist"),
        ),
        _imagenet(32),
        _imagenet(64),
        DatasetSpec(
            name="digits",
            summary="scikit-learn's 8x8 digits, offline",
            title="scikit-learn digits",
            loader=load_sklearn_digits,
            image_shape=(8, 8, 1),
            holdout=Holdout(valid=Fraction(1, 10), test=360),
            num_levels=17,
            prepared_by_default=False,  # small and embedded: decoding it takes no time
        ),
        _celeba(64, 5, "celeba_full_64x64_5bit.npy"),
        _celeba(64, 3, "celeba_full_64x64_3bit.npy"),
        _celeba(128, 5, "celeba_128pixels_5bit_full.npy"),
    )
}

#: The entries by name (read-only; it follows the views below when they replace an entry).
DATASETS = types.MappingProxyType(_ENTRIES)

#: The names :func:`flowpp.data.load_dataset` knows.
DATASET_NAMES = tuple(_ENTRIES)


def find_dataset(dataset) -> Optional[DatasetSpec]:
    """The entry ``dataset`` names, in any case, with ``_`` for ``-`` or by an alias; None for
    anything else (a path)."""
    if not isinstance(dataset, str):
        return None
    key = dataset.strip().lower().replace("_", "-")
    return next((s for s in _ENTRIES.values() if key == s.name or key in s.aliases), None)


def shares_folder(spec: DatasetSpec) -> bool:
    """Whether other entries keep their files in ``spec``'s folder too."""
    return sum(s.folder_name == spec.folder_name for s in _ENTRIES.values()) > 1


def help_text() -> str:
    """The named datasets, each with its summary, for help texts."""
    return ", ".join(f"{s.name} ({s.summary})" for s in _ENTRIES.values())
