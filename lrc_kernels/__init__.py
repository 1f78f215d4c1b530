"""lrc_kernels — local routing consistency of Mixture-of-Experts models (SRP, SCH and cache curves).

Importing this package is cheap: it neither imports transformers or triton nor initialises CUDA. Backends
(numba CPU loops, Triton kernels) load on first use; Hugging Face glue lives in :mod:`lrc_kernels.hf`.
"""

from .bootstrap import basic_interval, bootstrap_indices, poisson_weights, resample_weights
from .cache import CacheCurve, cache_curve, cache_hits
from .cpu.parallel import get_num_threads, set_num_threads
from .routing import concat_layers, topk_from_logits
from .srp import (SRPScore, coverage_ratio, segment_coverage, srp, srp_counts, srp_positionwise,
                  srp_score)
from .trace import RoutingTrace

__version__ = "0.1.0"

__all__ = [
    "CacheCurve", "RoutingTrace", "SRPScore", "basic_interval", "bootstrap_indices", "cache_curve", "cache_hits",
    "concat_layers", "coverage_ratio", "get_num_threads", "poisson_weights", "resample_weights",
    "segment_coverage", "set_num_threads", "srp", "srp_counts", "srp_positionwise", "srp_score",
    "topk_from_logits",
]
