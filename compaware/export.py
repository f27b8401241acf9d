"""TRANSITIONAL, delete at merge: the module moved to compaware/deploy/export.py.

compaware/compress/latency.py (owned by branch compside, not edited on branch deploy) still
imports these two names from here; at merge it imports them from compaware.deploy.export
(``compile_inductor``, ``onnxruntime_forward``) and this file goes.
"""

from compaware.deploy.export import compile_inductor, onnxruntime_forward

__all__ = ["compile_inductor", "onnxruntime_forward"]
