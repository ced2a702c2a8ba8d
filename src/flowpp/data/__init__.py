"""Datasets for Flow++: loading, downloading and safely parsing image data.

Public API::

    from flowpp.data import load_dataset, ImageSet, DatasetError, read_images, DATASET_NAMES

    train = load_dataset("cifar10", "train")   # ImageSet: images (N,H,W,C) uint8
    train.images.shape, train.num_levels, train.description

This package knows nothing about models: it returns ``uint8`` NHWC numpy
arrays with values in ``0..num_levels-1`` and raises :class:`DatasetError`
(a ``ValueError``) for every refusal.
"""

from .datasets import (
    ALL_SPLITS,
    DATASET_NAMES,
    MD5,
    SPLITS,
    URLS,
    VALID_SIZES,
    ImageSet,
    default_data_dir,
    load_dataset,
    match_levels,
)
from .errors import DatasetError
from .formats import read_images

__all__ = [
    "load_dataset",
    "ImageSet",
    "DatasetError",
    "read_images",
    "DATASET_NAMES",
    "SPLITS",
    "URLS",
    "MD5",
    "VALID_SIZES",
    "default_data_dir",
    "match_levels",
    "ALL_SPLITS",
]
