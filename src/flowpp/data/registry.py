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

:data:`VALID_SIZES`, :data:`URLS` and :data:`MD5`, the tables these facts were kept in before,
remain as dict-like views of the entries: setting an item replaces the entry (tests point
downloads at a local server and shrink the hold-outs this way).  So do this module's attributes
``CELEBA_TEST`` and ``CELEBA_VALID``, the hold-out of the Flow++ release's CelebA files.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import MutableMapping
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
    "VALID_SIZES",
    "URLS",
    "MD5",
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


# ---------------------------------------------------------------------------
# the tables that predate the entries, as views of them
# ---------------------------------------------------------------------------


class _View(MutableMapping):
    """One fact of the entries by dataset name: reading asks the entries, setting an item replaces
    the entry.  ``has`` says which entries have the fact at all."""

    def __init__(self, has: Callable, get: Callable, put: Callable, drop: Optional[Callable] = None):
        self._has, self._get, self._put, self._drop = has, get, put, drop

    def __getitem__(self, name):
        spec = _ENTRIES.get(name)
        if spec is None or not self._has(spec):
            raise KeyError(name)
        return self._get(spec)

    def __setitem__(self, name, value) -> None:
        _ENTRIES[name] = self._put(_ENTRIES[name], value)

    def __delitem__(self, name) -> None:
        if self._drop is None or name not in self:
            raise KeyError(name)
        _ENTRIES[name] = self._drop(_ENTRIES[name])

    def __iter__(self):
        return iter([n for n, s in _ENTRIES.items() if self._has(s)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


def _with_md5(spec: DatasetSpec, path: str, md5: Optional[str]) -> DatasetSpec:
    files = tuple(dataclasses.replace(f, md5=md5) if f.path == path else f for f in spec.files)
    return dataclasses.replace(spec, files=files)


class _Checksums(MutableMapping):
    """The published MD5 of each downloadable file of one entry, by file name."""

    def __init__(self, name: str):
        self._name = name

    def _files(self) -> dict:
        return {f.path: f.md5 for f in _ENTRIES[self._name].files if f.md5}

    def __getitem__(self, path):
        return self._files()[path]

    def __setitem__(self, path, md5) -> None:
        if path not in self._files():
            raise KeyError(path)
        _ENTRIES[self._name] = _with_md5(_ENTRIES[self._name], path, md5)

    def __delitem__(self, path) -> None:
        self[path] = None

    def __iter__(self):
        return iter(self._files())

    def __len__(self) -> int:
        return len(self._files())

    def __repr__(self) -> str:
        return repr(dict(self))


def _set_checksums(spec: DatasetSpec, md5s) -> DatasetSpec:
    for path, md5 in dict(md5s).items():
        spec = _with_md5(spec, path, md5)
    return spec


#: How many images at the end of the training file form the valid split (datasets with an
#: official test file).
VALID_SIZES = _View(
    has=lambda s: isinstance(s.holdout.valid, int) and not s.holdout.test,
    get=lambda s: s.holdout.valid,
    put=lambda s, v: dataclasses.replace(s, holdout=dataclasses.replace(s.holdout, valid=v)),
)

#: Base URLs (mirrors, tried in order) of the downloadable datasets; a file's URL is base + file name.
URLS = _View(
    has=lambda s: bool(s.mirrors),
    get=lambda s: list(s.mirrors),
    put=lambda s, v: dataclasses.replace(s, mirrors=tuple(v)),
    drop=lambda s: dataclasses.replace(s, mirrors=()),
)

#: Published MD5 checksums of the downloadable files (as listed by the dataset authors and in
#: torchvision), by dataset and file name.
MD5 = _View(
    has=lambda s: any(f.md5 for f in s.files),
    get=lambda s: _Checksums(s.name),
    put=_set_checksums,
)


def _release_files() -> list:
    return [n for n, s in _ENTRIES.items() if s.loader is load_release_file]


def _set_release_holdout(**sizes) -> None:
    for name in _release_files():
        spec = _ENTRIES[name]
        _ENTRIES[name] = dataclasses.replace(spec, holdout=dataclasses.replace(spec.holdout, **sizes))


class _Module(types.ModuleType):
    """This module, with the hold-out of the release's CelebA files as attributes that read and
    set those entries (as when they were constants of their own)."""

    @property
    def CELEBA_TEST(self) -> int:
        return _ENTRIES[_release_files()[0]].holdout.test

    @CELEBA_TEST.setter
    def CELEBA_TEST(self, value: int) -> None:
        _set_release_holdout(test=value)

    @property
    def CELEBA_VALID(self) -> int:
        return _ENTRIES[_release_files()[0]].holdout.valid

    @CELEBA_VALID.setter
    def CELEBA_VALID(self, value: int) -> None:
        _set_release_holdout(valid=value)


sys.modules[__name__].__class__ = _Module
