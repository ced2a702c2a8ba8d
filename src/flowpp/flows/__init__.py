"""Invertible layers: ``forward(x, context) -> (y, logdet)``, ``inverse(y, context) -> (x, logdet)``."""
from .base import Flow, Sequential, sum_except_batch
from .coupling import AffineCoupling, MixtureLogisticCoupling
from .elementwise import LogitPreprocess, Sigmoid
from .norm import ElementwiseNorm, Pointwise
from .reshape import ChannelMerge, ChannelSplit, Squeeze, StripeMerge, StripeSplit, SwapHalves

__all__ = [
    "Flow", "Sequential", "sum_except_batch", "AffineCoupling", "MixtureLogisticCoupling", "LogitPreprocess",
    "Sigmoid", "ElementwiseNorm", "Pointwise", "ChannelMerge", "ChannelSplit", "Squeeze", "StripeMerge",
    "StripeSplit", "SwapHalves",
]
