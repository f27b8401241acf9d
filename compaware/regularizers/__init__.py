"""Compression-aware regularizers behind one interface (:class:`Regularizer`).

Each ``compaware/conf/regularizer/<name>.yaml`` names its class in ``_target_``; the class's
constructor signature is the schema of that config node.
"""

from compaware.regularizers.base import ProximalRegularizer, Regularizer
from compaware.regularizers.lowrank import LowRank
from compaware.regularizers.lowrank_sgl import LowRankSGL
from compaware.regularizers.penalties import L1, L2
from compaware.regularizers.sgl import SGL
from compaware.regularizers.ssl import SSL
from compaware.regularizers.sws import SoftWeightSharing

__all__ = ["L1", "L2", "SGL", "SSL", "LowRank", "LowRankSGL", "ProximalRegularizer",
           "Regularizer", "SoftWeightSharing"]
