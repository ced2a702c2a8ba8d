"""Lossless compression with a Flow++ model: bits-back coding of the dequantization noise and
local bits-back coding through the flow (Ho, Lohn & Abbeel, 2019), on constriction's stack ANS.

``compress(model, images)`` returns an archive (bytes); ``decompress(data, model)`` returns the
images exactly, or raises :class:`CodecError` with one line saying why it cannot.
"""

from .archive import Decompressed, compress, decompress, read_header
from .entropy import CodecError

__all__ = ["compress", "decompress", "read_header", "Decompressed", "CodecError"]
