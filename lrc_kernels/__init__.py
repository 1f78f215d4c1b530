"""lrc_kernels — local routing consistency of Mixture-of-Experts models (SRP, SCH and cache curves).

Importing this package is cheap: it neither imports transformers or triton nor initialises CUDA. Backends
(numba CPU loops, Triton kernels) load on first use (:mod:`lrc_kernels.dispatch` picks them); Hugging Face
glue lives in :mod:`lrc_kernels.hf`.
"""

from .analyze import Statistics, analyze, collect_statistics
from .bootstrap import basic_interval, bootstrap_indices, poisson_weights, resample_weights
from .cache import CacheCurve, cache_curve, cache_hits
from .cpu.parallel import get_num_threads, set_num_threads
from .monitor import RoutingMonitor
from .plan import (allocate_cache, best_hits_by_budget, cache_knee, cache_regret, cache_size_for, split_hits,
                   uniform_split)
from .plan_bytes import ExpertSize, SplitCost, expert_size, slots_for_gib, split_cost
from .routing import concat_layers, topk_from_logits
from .srp import (SRPScore, coverage_ratio, segment_coverage, srp, srp_counts, srp_positionwise,
                  srp_score)
from .trace import RoutingTrace

__version__ = "0.1.0"

__all__ = [
    "CacheCurve", "ExpertSize", "RoutingMonitor", "RoutingTrace", "SRPScore", "SplitCost", "Statistics",
    "allocate_cache", "analyze", "basic_interval", "best_hits_by_budget", "bootstrap_indices", "cache_curve",
    "cache_hits", "cache_knee", "cache_regret", "cache_size_for", "collect_statistics", "concat_layers",
    "coverage_ratio", "expert_size", "get_num_threads", "poisson_weights", "resample_weights",
    "segment_coverage", "set_num_threads", "slots_for_gib", "split_cost", "split_hits", "srp", "srp_counts",
    "srp_positionwise", "srp_score", "topk_from_logits", "uniform_split",
]
