"""Data-dependent initialisation as an explicit, one-time step.

Layers that initialise from data inherit :class:`DataDependentInit`. They carry a boolean
``initialized`` buffer (saved in ``state_dict``) and look at their input only while
:func:`data_dependent_init` is active, so the training hot path never checks a tensor flag.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["DataDependentInit", "data_dependent_init", "is_initialized"]


class DataDependentInit:
    """Mixin for modules with a data-dependent initialisation step."""

    _ddi_active: bool = False

    def _register_init_flag(self) -> None:
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _should_init(self) -> bool:
        # The Python attribute is checked first: outside init mode there is no host sync.
        return self._ddi_active and not bool(self.initialized)

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)


@contextlib.contextmanager
def data_dependent_init(module: nn.Module) -> Iterator[None]:
    """Within this block, each not-yet-initialised layer of ``module`` sets its parameters
    from the first input it sees, then marks itself done."""
    layers = [m for m in module.modules() if isinstance(m, DataDependentInit)]
    for m in layers:
        m._ddi_active = True
    try:
        with torch.no_grad():
            yield
    finally:
        for m in layers:
            m._ddi_active = False


def is_initialized(module: nn.Module) -> bool:
    """True when every data-dependent layer in ``module`` has been initialised."""
    return all(bool(m.initialized) for m in module.modules() if isinstance(m, DataDependentInit))
