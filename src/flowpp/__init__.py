"""flowpp: Flow++ (Ho et al., ICML 2019) in PyTorch."""

from .configs import FlowConfig, get_config, list_configs, register_config
from .model import FlowPlusPlus, count_parameters


def load(path, device="cpu") -> FlowPlusPlus:
    """A ready model (eval mode) from a file written by `flowpp export` (see :func:`flowpp.export.load`)."""
    from .export import load as _load

    return _load(path, device)


__version__ = "0.1.0"

__all__ = ["FlowConfig", "FlowPlusPlus", "count_parameters", "get_config", "list_configs", "register_config", "load"]
