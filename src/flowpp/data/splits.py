"""How every dataset is divided into train, valid and test: :func:`carve`, the one split function.

Splits are deterministic and never shuffle.  A dataset's :class:`Holdout` says how many images
form the valid split, at the end of the training source (the official training file), and
where the test split comes from: a source of its own (an official test file), or the last
images of the one source, before which the valid images are held out.  ``"train+valid"`` is
the whole training source, train and valid together (e.g. the official CIFAR-10 protocol: all
50,000 training images, validated on the test set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

import numpy as np

from .errors import DatasetError

__all__ = ["SPLITS", "ALL_SPLITS", "Holdout", "carve", "take"]

SPLITS = ("train", "valid", "test")
#: What :func:`flowpp.data.load_dataset` accepts: the three splits and the whole training source.
ALL_SPLITS = SPLITS + ("train+valid",)


@dataclass(frozen=True)
class Holdout:
    """How many images are held out of a dataset's training source.

    Attributes:
        valid: the valid split, the last images of the training source: a count, or a
            :class:`~fractions.Fraction` of the source, rounded up (exact: no float rounding).
        test: with 0, the test split is a source of its own; else the last ``test`` images of the
            one source are the test split, and the valid split is held out of those before them.
        max_valid: at most this many valid images (for a fractional ``valid``).
    """

    valid: Union[int, Fraction]
    test: int = 0
    max_valid: Optional[int] = None

    def valid_count(self, n: int) -> int:
        """The number of valid images held out of a training source of ``n``."""
        if isinstance(self.valid, int):
            return self.valid
        count = math.ceil(self.valid * n)
        return count if self.max_valid is None else min(count, self.max_valid)


def carve(n: int, split: str, holdout: Holdout, what: str) -> tuple:
    """``(start, stop, detail)``: which of the ``n`` images of ``what`` form ``split``, and a
    description of them.  ``what`` is the training source, or the test source for the test split
    of a dataset whose test split is a source of its own.

    Raises:
        DatasetError: when the source is too small to hold out what ``holdout`` asks for.
    """
    n_test = holdout.test
    if split == "test" and not n_test:
        return 0, n, f"test = all {n} images of {what}"
    if n_test:
        n_valid = holdout.valid_count(n - n_test)
        if n <= n_test + n_valid:
            raise DatasetError(
                f"{what}: holds {n} images; need more than {n_test + n_valid} to hold out the valid and test splits"
            )
        if split == "test":
            return n - n_test, n, f"test = last {n_test} of {n} images"
        n, what = n - n_test, f"the first {n - n_test} of {n} images"
    else:
        n_valid = holdout.valid_count(n)
    if n <= n_valid:
        raise DatasetError(
            f"{what} holds {n} images; need more than {n_valid} to hold out {n_valid} for the valid split"
        )
    if split == "train+valid":
        return 0, n, f"train+valid = all {n} images of {what}"
    if split == "train":
        return 0, n - n_valid, f"train = first {n - n_valid} of the {n} images of {what}"
    return n - n_valid, n, f"valid = last {n_valid} of the {n} images of {what}"


def take(x: np.ndarray, split: str, holdout: Holdout, what: str) -> tuple:
    """``(images, detail)``: the part of the images ``x`` of ``what`` that forms ``split``
    (see :func:`carve`), for a source read whole."""
    start, stop, detail = carve(len(x), split, holdout, what)
    part = x[start:stop]
    if stop - start < len(x) and split != "train":
        part = part.copy()  # do not keep the whole source alive for a small part of it
    return part, detail
