"""The public API stays importable under every name and path it had (a compatibility test for moves)."""

import importlib

import pytest

import lrc_kernels
import lrc_kernels.hf

# Pinned on purpose: removing or renaming a public name must fail here, not in a user's code (new names may
# be added to __all__ without touching this list).
TOP_LEVEL = """
    CacheCurve ExpertSize RoutingMonitor RoutingTrace SRPScore SplitCost Statistics allocate_cache analyze
    basic_interval best_hits_by_budget bootstrap_indices cache_curve cache_hits cache_knee cache_regret
    cache_size_for collect_statistics concat_layers coverage_ratio expert_size get_num_threads poisson_weights
    resample_weights segment_coverage set_num_threads slots_for_gib split_cost split_hits srp srp_counts
    srp_positionwise srp_score topk_from_logits uniform_split
""".split()
HF = "LRCCallback RouterSite RoutingMonitor RoutingRecorder RoutingTap find_routers require_transformers".split()
# (module, name) pairs that code written against earlier layouts imports directly
MODULE_PATHS = [
    ("lrc_kernels.hf.monitor", "RoutingMonitor"), ("lrc_kernels.monitor", "RoutingMonitor"),
    ("lrc_kernels.hf.recorder", "RoutingRecorder"), ("lrc_kernels.hf.routers", "find_routers"),
    ("lrc_kernels.hf.callbacks", "LRCCallback"), ("lrc_kernels.hf.callbacks", "RoutingTap"),
    ("lrc_kernels.srp", "srp"), ("lrc_kernels.cache", "cache_curve"), ("lrc_kernels.routing", "concat_layers"),
    ("lrc_kernels.bootstrap", "resample_weights"), ("lrc_kernels.trace", "RoutingTrace"),
    ("lrc_kernels.analyze", "analyze"), ("lrc_kernels.plan", "allocate_cache"),
]


def test_top_level_names():
    assert set(TOP_LEVEL) <= set(lrc_kernels.__all__)
    for name in lrc_kernels.__all__:
        assert getattr(lrc_kernels, name) is not None, name


def test_hf_names():
    assert set(HF) <= set(lrc_kernels.hf.__all__)
    for name in lrc_kernels.hf.__all__:
        assert getattr(lrc_kernels.hf, name) is not None, name


def test_one_monitor_class_under_every_path():
    assert lrc_kernels.RoutingMonitor is lrc_kernels.hf.RoutingMonitor
    for module, name in MODULE_PATHS:
        assert getattr(importlib.import_module(module), name) is not None, (module, name)
    assert importlib.import_module("lrc_kernels.hf.monitor").RoutingMonitor is lrc_kernels.RoutingMonitor


def test_the_lightning_callback_stays_out_of_star_imports():
    pytest.importorskip("lightning")
    assert "LRCLightningCallback" not in lrc_kernels.hf.__all__
    assert lrc_kernels.hf.LRCLightningCallback is not None
