"""Invertible layers: ``forward(x, context) -> (y, logdet)``, ``inverse(y, context) -> (x, logdet)``."""

from .base import Flow, Inverse, Sequential, standard_normal_log_prob, sum_except_batch
from .coupling import AffineCoupling, MixtureLogisticCoupling
from .elementwise import LogitPreprocess, Sigmoid
from .norm import ElementwiseNorm, Pointwise
from .reshape import ChannelSplit, Squeeze, StripeSplit, SwapHalves

__all__ = [
    "Flow",
    "Inverse",
    "Sequential",
    "standard_normal_log_prob",
    "sum_except_batch",
    "AffineCoupling",
    "MixtureLogisticCoupling",
    "LogitPreprocess",
    "Sigmoid",
    "ElementwiseNorm",
    "Pointwise",
    "ChannelSplit",
    "Squeeze",
    "StripeSplit",
    "SwapHalves",
]
