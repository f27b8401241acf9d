"""Compressors: model in, new smaller model out (:class:`Compressor`).

Each ``compaware/conf/compress/<name>.yaml`` names its class in ``_target_``.
"""

from compaware.compress.base import Compressor, Report
from compaware.compress.magnitude import Magnitude
from compaware.compress.prune import Prune, PruneSVD
from compaware.compress.quantize import KMeans, Quantize
from compaware.compress.ssl import ShapeDepth
from compaware.compress.svd import SVD

__all__ = ["SVD", "Compressor", "KMeans", "Magnitude", "Prune", "PruneSVD", "Quantize", "Report",
           "ShapeDepth"]
