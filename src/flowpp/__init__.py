"""flowpp: Flow++ (Ho et al., ICML 2019) in PyTorch."""

from .configs import FlowConfig, get_config, list_configs, register_config
from .model import FlowPlusPlus, count_parameters


def load(path, device="cpu") -> FlowPlusPlus:
    """A ready model (eval mode) from a file written by `flowpp export` (see :func:`flowpp.export.load`)."""
    from .export import load as _load

    return _load(path, device)


def import_release(path, config) -> FlowPlusPlus:
    """A model (eval mode) holding the weights of a Flow++ release ``.npz`` file (the authors'
    trained models) for a config or config name (see :func:`flowpp.release.import_release`)."""
    from .release import import_release as _import

    return _import(path, config)[0]


__version__ = "0.1.0"

__all__ = [
    "FlowConfig",
    "FlowPlusPlus",
    "count_parameters",
    "get_config",
    "list_configs",
    "register_config",
    "load",
    "import_release",
]
