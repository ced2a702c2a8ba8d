"""One split of a dataset as a config takes it (its levels, its image shape): from a
preparation (memory-mapped) when the dataset's entry, the caller or an earlier `flowpp prepare`
says so, else read into memory."""

from __future__ import annotations

from ..configs import FlowConfig
from .datasets import ImageSet, load_dataset, match_levels
from .prepared import existing_preparation, load_prepared, prepared_path
from .registry import DATASETS

__all__ = ["load_images"]


def _hwc(config: FlowConfig) -> tuple[int, int, int]:
    c, h, w = config.image_shape
    return (h, w, c)


def _prepared_by_default(data: str) -> bool:
    """Named datasets are prepared on first use (unless their entry says otherwise); files when asked."""
    spec = DATASETS.get(data)
    return spec is not None and spec.prepared_by_default


def load_images(
    data: str,
    split: str,
    config: FlowConfig,
    *,
    data_dir: str | None = None,
    download: bool = True,
    prepared: bool | None = None,
    log=print,
) -> ImageSet:
    """One split of ``data`` on ``config``'s levels: memory-mapped from its preparation (made on
    first use) for named datasets, or when ``prepared``, or when one made before is current (unless
    ``prepared`` is False); else read into memory."""
    levels = None if config.num_levels == 256 else config.num_levels
    try:
        if prepared or (prepared is None and _prepared_by_default(str(data))):
            return load_prepared(data, split, data_dir, num_levels=levels, download=download, log=log,
                                 expect_hwc=_hwc(config))  # fmt: skip
        if prepared is None:
            earlier = _earlier_preparation(data, split, config, data_dir, log)
            if earlier is not None:
                return earlier
    except PermissionError as e:
        if prepared:
            raise
        log(f"note: cannot write {prepared_path(data, data_dir, levels)} ({e.strerror}); reading {data} directly")
    images = load_dataset(data, split, data_dir=data_dir, download=download, expect_hwc=_hwc(config), log=log)
    return match_levels(images, config.num_levels, log=log)


def _earlier_preparation(data: str, split: str, config: FlowConfig, data_dir, log) -> ImageSet | None:
    """``split`` from a current preparation of ``data`` that `flowpp prepare` (or ``--prepare``)
    made before, on ``config``'s levels or on the source's (then reduced, as a direct read would
    be); None when there is none. A stale one is left as it is: rebuilding was not asked for."""
    say = log or (lambda _message: None)
    levels = None if config.num_levels == 256 else config.num_levels
    for candidate in dict.fromkeys([levels, None]):
        found = existing_preparation(data, data_dir, candidate)
        if found is None:
            continue
        folder, why = found
        if why is None:
            say(f"data: using the preparation of {data} in {folder} (--no-prepare reads {data} itself)")
            ds = load_prepared(data, split, data_dir, num_levels=candidate, download=False, log=log,
                               expect_hwc=_hwc(config))  # fmt: skip
            return match_levels(ds, config.num_levels, log=log)
        say(f"note: the preparation of {data} in {folder} is not current ({why}); reading {data} directly "
            "(--prepare rebuilds it)")  # fmt: skip
    return None
