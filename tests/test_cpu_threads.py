"""The CPU kernels give identical integers for every thread count (lrc_kernels.cpu.parallel).

The slice threshold is lowered to one reference so that even these small batches are cut into one slice per
thread; each result is compared with one thread and with the plain reference.
"""

import pytest
import torch

import lrc_kernels
from conftest import TraceCase
from lrc_kernels._checks import check_topk
from lrc_kernels.cpu import cache as cpu_cache
from lrc_kernels.cpu import parallel
from reference import ref_cache_hits, ref_concat_layers, ref_segment_coverage, ref_srp_counts

THREAD_COUNTS = (1, 2, 3, 7)
CASES = [TraceCase("sticky", 16, 4, 60, 8, 0.9, num_sequences=7, drop_prob=0.2, with_lengths=True),
         TraceCase("zipf", 12, 3, 40, 5, 1.2, num_sequences=5)]


@pytest.fixture
def tiny_slices(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_REFERENCES_PER_SLICE", 1)
    yield
    lrc_kernels.set_num_threads(None)


def _for_every_thread_count(compute):
    results = []
    for threads in THREAD_COUNTS:
        lrc_kernels.set_num_threads(threads)
        results.append(compute())
    for result in results[1:]:
        assert torch.equal(result, results[0])
    return results[0]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_srp_kernels(case, tiny_slices):
    topk, lengths, num_experts, seg_len = case.build()
    counts = _for_every_thread_count(
        lambda: lrc_kernels.srp_counts(topk, num_experts, seg_len, lengths=lengths, backend="cpu"))
    assert torch.equal(counts, ref_srp_counts(topk, lengths, num_experts, seg_len))
    pooled = _for_every_thread_count(
        lambda: lrc_kernels.srp_counts(topk, num_experts, seg_len, lengths=lengths, pool="experts", backend="cpu"))
    assert torch.equal(pooled, counts.sum(1))
    several = _for_every_thread_count(lambda: torch.stack([score.best_f1 for score in lrc_kernels.srp(
        topk, num_experts, [seg_len, 1, 3], lengths=lengths, backend="cpu").values()]))
    assert torch.equal(several[0], lrc_kernels.srp_score(pooled.sum(0)).best_f1)
    coverage = _for_every_thread_count(
        lambda: lrc_kernels.segment_coverage(topk, num_experts, seg_len, lengths=lengths, backend="cpu"))
    assert torch.equal(coverage, ref_segment_coverage(topk, lengths, num_experts, seg_len))


@pytest.mark.parametrize("deep_kernels", [False, True], ids=["scan-count", "walk-tree"])
@pytest.mark.parametrize("policy, seg_len", [("lru", None), ("lfu", None), ("belady", None), ("sch", 4)])
def test_cache_kernels_layer_and_model_level(policy, seg_len, deep_kernels, tiny_slices, monkeypatch):
    if deep_kernels:  # the kernels of stacks deeper than these small ones
        monkeypatch.setattr(cpu_cache, "SCAN_MAX_SLOTS", 0)
        monkeypatch.setattr(cpu_cache, "LRU_COUNT_MAX_SLOTS", 0)
    topk, lengths, num_experts, _ = CASES[0].build()
    hits = _for_every_thread_count(lambda: lrc_kernels.cache_hits(topk, num_experts, policy, seg_len=seg_len,
                                                                  lengths=lengths, backend="cpu"))
    assert torch.equal(hits, ref_cache_hits(topk, lengths, num_experts, policy, seg_len))
    layers = torch.stack([topk, topk.flip(1), topk.roll(1, dims=1)])
    stream = ref_concat_layers(layers, num_experts)
    model_hits = _for_every_thread_count(lambda: lrc_kernels.cache_hits(stream, 3 * num_experts, policy,
                                                                        seg_len=seg_len, backend="cpu"))
    assert torch.equal(model_hits, ref_cache_hits(stream, None, 3 * num_experts, policy, seg_len))


def test_several_caches_in_one_call(tiny_slices):
    """One call for every cache of a stream, sliced over threads: the same integers as one call per cache."""
    topk, lengths, num_experts, _ = CASES[0].build()
    ids, ids_lengths, _ = check_topk(topk, num_experts, lengths=lengths)
    caches = [("lru", None), ("lfu", None), ("belady", None), ("sch", 2), ("sch", 16)]
    several = _for_every_thread_count(lambda: cpu_cache.cache_hits_many(ids, ids_lengths, num_experts, caches, True,
                                                                        "token"))
    for c, (policy, seg_len) in enumerate(caches):
        assert torch.equal(several[:, c], ref_cache_hits(topk, lengths, num_experts, policy, seg_len))


def test_model_level_srp_pools_layers(tiny_slices):
    topk, lengths, num_experts, seg_len = CASES[1].build()
    layers = torch.stack([topk, topk.flip(1)])
    expected = ref_srp_counts(layers[0], lengths, num_experts, seg_len).sum(dim=(0, 1)) \
        + ref_srp_counts(layers[1], lengths, num_experts, seg_len).sum(dim=(0, 1))
    reference = lrc_kernels.srp_score(expected)
    for threads in THREAD_COUNTS:
        lrc_kernels.set_num_threads(threads)
        score = lrc_kernels.srp(layers, num_experts, seg_len, level="model", lengths=lengths, backend="cpu")
        assert (score.best_f1, score.threshold, score.support) == (reference.best_f1, reference.threshold,
                                                                   reference.support)


def test_thread_count_option():
    assert lrc_kernels.get_num_threads() == parallel.available_cores()
    with pytest.raises(ValueError, match="num_threads"):
        lrc_kernels.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        lrc_kernels.set_num_threads(2.0)
    assert parallel.slice_bounds(10, 10 * parallel.MIN_REFERENCES_PER_SLICE, 3) == [0, 3, 6, 10]
    assert parallel.slice_bounds(10, parallel.MIN_REFERENCES_PER_SLICE - 1, 3) == [0, 10]


def test_a_pool_handed_out_still_runs_after_a_larger_one_replaces_it():
    # Thread A takes the pool, thread B then needs more threads: A's submit must still run, not raise.
    handed_to_a = parallel._executor(1)
    larger = parallel._executor(handed_to_a._max_workers + 1)
    assert larger is not handed_to_a
    assert handed_to_a.submit(sum, [1, 2]).result() == 3
