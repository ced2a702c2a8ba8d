"""The order of training batches and their dequantization noise, and a prefetching thread.

Determinism: the data order depends only on (seed, epoch), and the noise of step k only on
(seed, k), so a resumed run repeats what an uninterrupted one would have done, and W processes
see the same global batches and noise as one.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch import Tensor

from ..configs import FlowConfig
from ..errors import UsageError
from ..images import gather
from ..model import FlowPlusPlus

__all__ = ["epoch_permutation", "batch_iterator", "local_batches", "step_noise", "Prefetch"]


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_iterator(n: int, batch_size: int, seed: int, epoch: int, offset: int):
    """Yield (epoch, offset_after, indices) for consecutive global batches, epoch after epoch.

    The tail of an epoch that does not fill a batch is dropped.
    """
    if n < batch_size:
        raise UsageError(f"the training set has {n} images, fewer than one batch of {batch_size}")
    while True:
        perm = epoch_permutation(n, seed, epoch)
        while offset + batch_size <= n:
            idx = perm[offset : offset + batch_size]
            offset += batch_size
            yield epoch, offset, idx
        epoch, offset = epoch + 1, 0


def local_batches(
    train_x,
    model: FlowPlusPlus,
    config: FlowConfig,
    seed: int,
    *,
    step: int,
    epoch: int,
    offset: int,
    mine: slice,
    pin: bool = False,
):
    """(epoch, offset, images, noise) of this process's part (``mine``) of each global batch from
    ``step`` (at ``epoch``, ``offset``) on; pinned when they go to a GPU."""
    for at_epoch, at_offset, idx in batch_iterator(len(train_x), config.batch_size, seed, epoch, offset):
        x = gather(train_x, idx[mine])
        noise = step_noise(model, config, seed, step)[mine]
        yield at_epoch, at_offset, (x.pin_memory() if pin else x), (noise.pin_memory() if pin else noise)
        step += 1


class Prefetch:
    """Runs an iterator ``depth`` items ahead in a background thread (the next batch is
    gathered while the current step runs); ``depth`` 0 runs it in the caller's thread.
    The items and their order are those of the iterator: determinism is unchanged."""

    def __init__(self, items, depth: int):
        self.items, self.depth = iter(items), depth
        if depth <= 0:
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="flowpp-prefetch", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        try:
            for item in self.items:
                while not self.stopped.is_set():
                    try:
                        self.queue.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self.queue.put((False, e))

    def __next__(self):
        if self.depth <= 0:
            return next(self.items)
        ok, item = self.queue.get()
        if not ok:
            raise item
        return item

    def close(self) -> None:
        if self.depth > 0:
            self.stopped.set()
            self.thread.join(timeout=10)


def step_noise(model: FlowPlusPlus, config: FlowConfig, seed: int, step: int) -> Tensor:
    """The dequantization noise of the whole global batch of ``step`` (each rank takes its rows)."""
    g = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 17)
    return model.dequantizer.sample_noise((config.batch_size, *config.image_shape), g)
