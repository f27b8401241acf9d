"""TRANSITIONAL, delete at merge: the module moved to compaware/deploy/bench.py.

compaware/compress/latency.py (owned by branch compside, not edited on branch deploy) still
imports these two names from here; at merge it imports them from compaware.deploy.bench
(``channels_last_forward``, ``median_ms``) and this file goes.
"""

from compaware.deploy.bench import channels_last_forward, median_ms

__all__ = ["channels_last_forward", "median_ms"]
