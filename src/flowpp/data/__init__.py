"""Datasets for Flow++: loading, downloading and safely parsing image data.

Public API::

    from flowpp.data import load_dataset, ImageSet, DatasetError, DATASET_NAMES

    train = load_dataset("cifar10", "train")   # ImageSet: images (N,H,W,C) uint8
    train.images.shape, train.num_levels, train.description

The named datasets are the entries of :mod:`flowpp.data.registry`; every file format is parsed
in :mod:`flowpp.data.formats` and every split carved by :mod:`flowpp.data.splits`.  This package
knows nothing about models: it returns ``uint8`` NHWC numpy arrays with values in
``0..num_levels-1`` and raises :class:`DatasetError` (a ``ValueError``) for every refusal.
"""

from .datasets import ImageSet, default_data_dir, load_dataset, match_levels
from .errors import DatasetError
from .registry import DATASET_NAMES, DATASETS, DatasetSpec, find_dataset
from .splits import ALL_SPLITS, SPLITS

__all__ = [
    "load_dataset",
    "ImageSet",
    "DatasetError",
    "DATASET_NAMES",
    "DATASETS",
    "DatasetSpec",
    "find_dataset",
    "SPLITS",
    "default_data_dir",
    "match_levels",
    "ALL_SPLITS",
]
