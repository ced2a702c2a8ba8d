"""flowpp: Flow++ (Ho et al., ICML 2019) in PyTorch."""

from .configs import FlowConfig, get_config, list_configs, register_config
from .model import FlowPlusPlus, count_parameters

__version__ = "0.1.0"

__all__ = ["FlowConfig", "FlowPlusPlus", "count_parameters", "get_config", "list_configs", "register_config"]
