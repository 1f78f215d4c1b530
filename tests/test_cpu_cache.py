"""CPU cache backend cases that test_cache_backends.py does not reach: a deep model-level stack and the size guard.

The property tests there draw at most 64 cache slots, where LFU, Belady and SCH run the branch-free scan kernel.
At model level the stack holds ``n·E`` slots: LRU takes its depth from a count over all of them up to
``LRU_COUNT_MAX_SLOTS`` and from a Fenwick tree above, and the other policies run the scan kernel up to
``SCAN_MAX_SLOTS`` slots and the branching walk above. A few hundred slots are checked here with both kernels
of each against the one-cache-per-size reference (a short trace keeps the reference fast), and the walk's
block skips and the tree on random small stacks.
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrc_kernels
from conftest import assert_equal_ints, generate_trace, random_lengths, routing_traces
from lrc_kernels import dispatch
from lrc_kernels._checks import check_topk
from lrc_kernels.cpu import cache as cpu_cache
from reference import ref_cache_hits, ref_concat_layers

NUM_LAYERS, NUM_EXPERTS, NUM_SLOTS, NUM_TOKENS, NUM_SEQUENCES = 6, 48, 3, 40, 3


@functools.lru_cache(maxsize=None)
def _model_stream():
    """``(stream [S, T, n·k], lengths [S])``: sticky layers with dropped slots, joined layer-major."""
    layers = torch.stack([generate_trace("sticky", NUM_SEQUENCES, NUM_TOKENS, NUM_SLOTS, NUM_EXPERTS,
                                         drop_prob=0.1, seed=layer) for layer in range(NUM_LAYERS)])
    return ref_concat_layers(layers, NUM_EXPERTS), random_lengths(NUM_SEQUENCES, NUM_TOKENS, seed=4)


@functools.lru_cache(maxsize=None)
def _reference_hits(policy, seg_len, free_slot_hits, lookup):
    """The reference once per option set; both kernels are compared with it."""
    stream, lengths = _model_stream()
    return ref_cache_hits(stream, lengths, NUM_LAYERS * NUM_EXPERTS, policy, seg_len, free_slot_hits, lookup)


@pytest.mark.parametrize("lookup", ["token", "sequential"])
@pytest.mark.parametrize("free_slot_hits", [True, False], ids=["free", "cold"])
@pytest.mark.parametrize("policy, seg_len", [("lru", None), ("lfu", None), ("belady", None), ("sch", 1), ("sch", 3),
                                             ("sch", 20)], ids=["lru", "lfu", "belady", "sch1", "sch3", "sch20"])
@pytest.mark.parametrize("scan_max_slots", [0, 1 << 30], ids=["walk", "scan"])
def test_model_level_stack_matches_reference(policy, seg_len, free_slot_hits, lookup, scan_max_slots, monkeypatch):
    # the same switch picks LRU's count (scan) or its Fenwick tree (walk)
    monkeypatch.setattr(cpu_cache, "SCAN_MAX_SLOTS", scan_max_slots)
    monkeypatch.setattr(cpu_cache, "LRU_COUNT_MAX_SLOTS", scan_max_slots)
    stream, lengths = _model_stream()
    num_slots = NUM_LAYERS * NUM_EXPERTS
    hits = lrc_kernels.cache_hits(stream, num_slots, policy, seg_len=seg_len, lengths=lengths,
                                  free_slot_hits=free_slot_hits, lookup=lookup, backend="cpu")
    assert_equal_ints(hits, _reference_hits(policy, seg_len, free_slot_hits, lookup))


@pytest.mark.parametrize("lookup", ["token", "sequential"])
@pytest.mark.parametrize("scan_max_slots, lru_count_max_slots", [(0, 1 << 30), (1 << 30, 0)],
                         ids=["walk-and-count", "scan-and-tree"])
def test_one_call_runs_caches_of_different_kernels(scan_max_slots, lru_count_max_slots, lookup, monkeypatch):
    """``cache_hits_many`` picks a kernel per cache; each cache's hits equal the reference's."""
    monkeypatch.setattr(cpu_cache, "SCAN_MAX_SLOTS", scan_max_slots)
    monkeypatch.setattr(cpu_cache, "LRU_COUNT_MAX_SLOTS", lru_count_max_slots)
    stream, lengths = _model_stream()
    num_slots = NUM_LAYERS * NUM_EXPERTS
    ids, ids_lengths, _ = check_topk(stream, num_slots, lengths=lengths)
    caches = [("lru", None), ("lfu", None), ("belady", None), ("sch", 1), ("sch", 3), ("sch", 20)]
    hits = cpu_cache.cache_hits_many(ids, ids_lengths, num_slots, caches, True, lookup)
    assert hits.shape == (NUM_SEQUENCES, len(caches), num_slots)
    for c, (policy, seg_len) in enumerate(caches):
        assert_equal_ints(hits[:, c], _reference_hits(policy, seg_len, True, lookup))


@settings(max_examples=40, deadline=None)
@given(routing_traces(max_e=40, max_k=5, max_t=60, max_s=2), st.sampled_from([1, 2, 3]),
       st.sampled_from([("lfu", None), ("belady", None), ("sch", 1), ("sch", 4)]), st.booleans(),
       st.sampled_from(["token", "sequential"]))
def test_walk_with_block_skips_matches_reference(trace, log_block, policy_config, free_slot_hits, lookup):
    """The deep-stack walk on small stacks with blocks of 2, 4 or 8 positions, so that skips happen often."""
    topk, lengths, num_experts, _ = trace
    policy, seg_len = policy_config
    expected = ref_cache_hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits, lookup)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_cache, "SCAN_MAX_SLOTS", 0)
        patch.setattr(cpu_cache, "LOG_SKIP_BLOCK", log_block)
        hits = lrc_kernels.cache_hits(topk, num_experts, policy, seg_len=seg_len, lengths=lengths,
                                      free_slot_hits=free_slot_hits, lookup=lookup, backend="cpu")
    assert torch.equal(hits, expected)


@settings(max_examples=40, deadline=None)
@given(routing_traces(max_e=40, max_k=5, max_t=60, max_s=2), st.booleans(), st.sampled_from(["token", "sequential"]))
def test_lru_tree_matches_reference(trace, free_slot_hits, lookup):
    """The Fenwick-tree LRU of deep stacks, forced on small ones."""
    topk, lengths, num_experts, _ = trace
    expected = ref_cache_hits(topk, lengths, num_experts, "lru", None, free_slot_hits, lookup)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_cache, "LRU_COUNT_MAX_SLOTS", 0)
        hits = lrc_kernels.cache_hits(topk, num_experts, "lru", lengths=lengths, free_slot_hits=free_slot_hits,
                                      lookup=lookup, backend="cpu")
    assert torch.equal(hits, expected)


def test_slot_count_guard_names_the_limit():
    """T·k >= 2^31 slots per sequence would overflow the packed pair keys; the CPU backend declares the limit
    and the dispatcher refuses before any work (a stride-0 view allocates nothing)."""
    topk = torch.zeros(1, 1, 1, dtype=torch.int32).expand(1, 1 << 28, 8)
    with pytest.raises(ValueError, match=r"backend: 'cpu' needs T\*k < 2\^31 .* T\*k = 2147483648"):
        dispatch.choose_backend("cache_hits", "cpu", topk, 8, "lfu")
