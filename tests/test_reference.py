"""The reference implementations reproduce every worked number of SPEC §3, §6, §8 and the §9 edge cases.

Fractions are compared exactly. These tests pin the reference itself; the backend tests then compare the
library against the reference on random traces.
"""

from fractions import Fraction as Fr

import pytest
import torch

from conftest import EXAMPLE_A, EXAMPLE_B, EXAMPLE_C, EXAMPLE_C_LENGTHS
from reference import (
    ref_basic_interval,
    ref_cache_hits,
    ref_concat_layers,
    ref_positionwise_hists,
    ref_segment_coverage,
    ref_srp_counts,
    ref_srp_score,
)


def window_counts(topk, lengths, num_experts, seg_len):
    """``C[s][w][e]`` recovered from the position-wise histograms of each sequence alone (one 1 per (p, e))."""
    result = []
    for s in range(topk.shape[0]):
        seq_lengths = None if lengths is None else lengths[s:s + 1]
        hists = ref_positionwise_hists(topk[s:s + 1], seq_lengths, num_experts, seg_len)
        assert torch.equal(hists.sum(-1), torch.ones(hists.shape[:2], dtype=torch.int64))
        result.append(hists.argmax(-1).tolist())
    return result


def assert_score(score, *, hist=None, f1=None, threshold, best_f1, best_m, act_r, support=None):
    assert score["threshold"] == threshold
    assert score["best_f1"] == best_f1
    assert score["best_m"] == best_m
    assert score["act_r"] == act_r
    if f1 is not None:
        assert score["f1"] == f1
    if support is not None:
        assert score["support"] == support


# --------------------------------------------------------------------------------------------- Example A

def test_example_a_window_counts():
    assert window_counts(EXAMPLE_A, None, 4, 2) == [[
        [2, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0],
    ]]


@pytest.mark.parametrize("expert, hist, f1, threshold, best_f1, best_m, act_r", [
    (0, [3, 3, 1], [Fr(10, 19), Fr(10, 13), Fr(4, 7)], 1, Fr(10, 13), Fr(8, 5), Fr(5, 14)),
    (1, [4, 3, 0], [Fr(6, 17), Fr(2, 3), 0], 1, Fr(2, 3), 2, Fr(3, 14)),
    (2, [3, 4, 0], [Fr(4, 9), Fr(2, 3), 0], 1, Fr(2, 3), 2, Fr(2, 7)),
    (3, [5, 2, 0], [Fr(1, 4), Fr(2, 3), 0], 1, Fr(2, 3), 2, Fr(1, 7)),
])
def test_example_a_srp_experts(expert, hist, f1, threshold, best_f1, best_m, act_r):
    counts = ref_srp_counts(EXAMPLE_A, None, 4, 2)
    assert counts[0, expert].tolist() == hist
    assert_score(ref_srp_score(counts[0, expert]), f1=f1, threshold=threshold, best_f1=best_f1,
                 best_m=best_m, act_r=act_r)


def test_example_a_srp_layer():
    counts = ref_srp_counts(EXAMPLE_A, None, 4, 2)
    layer = counts.sum(dim=(0, 1))
    assert layer.tolist() == [15, 12, 1]
    score = ref_srp_score(layer)
    assert_score(score, f1=[Fr(2, 5), Fr(7, 10), Fr(1, 4)], threshold=1, best_f1=Fr(7, 10), best_m=Fr(13, 7),
                 act_r=Fr(1, 4), support=28)
    assert score["matches"] == [14, 14, 2]
    assert score["preds"] == [56, 26, 2]
    assert score["acts"] == 14


def test_example_a_coverage():
    cov = ref_segment_coverage(EXAMPLE_A, None, 4, 2)
    assert cov.tolist() == [[8, 14, 14, 14]]
    assert [Fr(int(c), int(cov[0, -1])) for c in cov[0]] == [Fr(4, 7), 1, 1, 1]


@pytest.mark.parametrize("policy, seg_len, hits, cold", [
    ("lru", None, [2, 3, 6, 8], [1, 1, 3, 4]),
    ("lfu", None, [2, 4, 6, 8], [1, 2, 3, 4]),
    ("sch", 2, [2, 5, 6, 8], [1, 3, 3, 4]),
    ("belady", None, [2, 5, 7, 8], [1, 3, 4, 4]),
])
@pytest.mark.parametrize("lookup", ["token", "sequential"])  # k = 1: both lookups agree
def test_example_a_cache(policy, seg_len, hits, cold, lookup):
    assert ref_cache_hits(EXAMPLE_A, None, 4, policy, seg_len, True, lookup).tolist() == [hits]
    assert ref_cache_hits(EXAMPLE_A, None, 4, policy, seg_len, False, lookup).tolist() == [cold]


def test_example_a_sch_lookahead_lengths():
    assert ref_cache_hits(EXAMPLE_A, None, 4, "sch", 1, True, "token").tolist() == [[2, 3, 6, 8]]
    assert ref_cache_hits(EXAMPLE_A, None, 4, "sch", 8, True, "token").tolist() == [[2, 4, 7, 8]]


# --------------------------------------------------------------------------------------------- Example B

def test_example_b_window_counts():
    assert window_counts(EXAMPLE_B, None, 4, 3) == [[[2, 1, 2, 1], [1, 1, 2, 2], [0, 2, 2, 2], [1, 2, 1, 2]]]


@pytest.mark.parametrize("expert, hist, f1, threshold, best_f1, best_m, act_r", [
    (0, [1, 2, 1, 0], [Fr(1, 2), Fr(8, 13), Fr(4, 7), 0], 1, Fr(8, 13), Fr(9, 4), Fr(1, 3)),
    (1, [0, 2, 2, 0], [Fr(2, 3), Fr(2, 3), Fr(2, 3), 0], 0, Fr(2, 3), 2, Fr(1, 2)),
    (2, [0, 1, 3, 0], [Fr(14, 19), Fr(14, 19), Fr(3, 4), 0], 2, Fr(3, 4), Fr(9, 7), Fr(7, 12)),
    (3, [0, 1, 3, 0], [Fr(14, 19), Fr(14, 19), Fr(3, 4), 0], 2, Fr(3, 4), Fr(9, 7), Fr(7, 12)),
])
def test_example_b_srp_experts(expert, hist, f1, threshold, best_f1, best_m, act_r):
    counts = ref_srp_counts(EXAMPLE_B, None, 4, 3)
    assert counts[0, expert].tolist() == hist
    assert_score(ref_srp_score(counts[0, expert]), f1=f1, threshold=threshold, best_f1=best_f1,
                 best_m=best_m, act_r=act_r)


def test_example_b_srp_layer():
    layer = ref_srp_counts(EXAMPLE_B, None, 4, 3).sum(dim=(0, 1))
    assert layer.tolist() == [1, 6, 9, 0]
    score = ref_srp_score(layer)
    assert_score(score, f1=[Fr(2, 3), Fr(16, 23), Fr(12, 17), 0], threshold=2, best_f1=Fr(12, 17),
                 best_m=Fr(9, 8), act_r=Fr(1, 2), support=16)
    assert score["matches"] == [24, 24, 18, 0]
    assert score["preds"] == [48, 45, 27, 0]
    assert score["acts"] == 24


def test_example_b_coverage():
    cov = ref_segment_coverage(EXAMPLE_B, None, 4, 3)
    assert cov.tolist() == [[8, 16, 21, 24]]
    assert [Fr(int(c), int(cov[0, -1])) for c in cov[0]] == [Fr(1, 3), Fr(2, 3), Fr(7, 8), 1]


@pytest.mark.parametrize("policy, seg_len, token, sequential, token_cold", [
    ("lru", None, [1, 6, 9, 12], [1, 2, 9, 12], [0, 4, 6, 8]),
    ("lfu", None, [1, 5, 9, 12], [1, 2, 8, 12], [0, 3, 6, 8]),
    ("belady", None, [1, 6, 10, 12], [1, 6, 10, 12], [0, 4, 7, 8]),
    ("sch", 2, [1, 7, 10, 12], [1, 5, 10, 12], [0, 5, 7, 8]),
])
def test_example_b_cache(policy, seg_len, token, sequential, token_cold):
    assert ref_cache_hits(EXAMPLE_B, None, 4, policy, seg_len, True, "token").tolist() == [token]
    assert ref_cache_hits(EXAMPLE_B, None, 4, policy, seg_len, True, "sequential").tolist() == [sequential]
    assert ref_cache_hits(EXAMPLE_B, None, 4, policy, seg_len, False, "token").tolist() == [token_cold]


# --------------------------------------------------------------------------------------------- Example C

def test_example_c_window_counts():
    assert window_counts(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2) == [
        [[1, 1, 1, 0], [0, 0, 1, 0], [1, 0, 1, 0]],
        [[0, 0, 1, 2], [0, 0, 1, 2]],
    ]


def test_example_c_srp_layer():
    layer = ref_srp_counts(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2).sum(dim=(0, 1))
    assert layer.tolist() == [10, 8, 2]
    score = ref_srp_score(layer)
    assert_score(score, f1=[Fr(6, 13), Fr(3, 4), Fr(1, 2)], threshold=1, best_f1=Fr(3, 4), best_m=Fr(5, 3),
                 act_r=Fr(3, 10), support=20)
    assert score["matches"] == [12, 12, 4]
    assert score["preds"] == [40, 20, 4]
    assert score["acts"] == 12


@pytest.mark.parametrize("expert, hist, threshold, best_f1, best_m, act_r", [
    (0, [3, 2, 0], 1, Fr(2, 3), 2, Fr(1, 5)),
    (1, [4, 1, 0], 1, Fr(2, 3), 2, Fr(1, 10)),
    (2, [0, 5, 0], 0, Fr(2, 3), 2, Fr(1, 2)),  # θ 0 and 1 tie
    (3, [3, 0, 2], 1, 1, 1, Fr(2, 5)),  # θ 1 and 2 tie
])
def test_example_c_srp_experts(expert, hist, threshold, best_f1, best_m, act_r):
    pooled = ref_srp_counts(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2).sum(dim=0)
    assert pooled[expert].tolist() == hist
    assert_score(ref_srp_score(pooled[expert]), threshold=threshold, best_f1=best_f1, best_m=best_m, act_r=act_r)


def test_example_c_srp_expert_3_of_sequence_0():
    hist = ref_srp_counts(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2)[0, 3]
    assert hist.tolist() == [3, 0, 0]
    assert_score(ref_srp_score(hist), threshold=0, best_f1=0, best_m=0, act_r=0, support=3)


def test_example_c_coverage():
    cov = ref_segment_coverage(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2)
    assert cov.tolist() == [[3, 5, 6, 6], [4, 6, 6, 6]]
    pooled = cov.sum(0)
    assert [Fr(int(c), int(pooled[-1])) for c in pooled] == [Fr(7, 12), Fr(11, 12), 1, 1]


@pytest.mark.parametrize("policy, seg_len, hits", [
    ("lru", None, [[2, 3, 5, 5], [2, 5, 5, 5]]),
    ("lfu", None, [[2, 3, 5, 5], [2, 5, 5, 5]]),
    ("sch", 2, [[2, 3, 5, 5], [2, 5, 5, 5]]),  # trap: look-ahead is the empty token 2, LRU decides
    ("sch", 3, [[2, 4, 5, 5], [2, 5, 5, 5]]),
    ("belady", None, [[2, 4, 5, 5], [2, 5, 5, 5]]),
])
def test_example_c_cache(policy, seg_len, hits):
    assert ref_cache_hits(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, policy, seg_len, True, "token").tolist() == hits


def test_example_c_cold_lru():
    cold = ref_cache_hits(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, "lru", None, False, "token")
    assert cold.tolist() == [[1, 1, 2, 2], [1, 3, 3, 3]]


@pytest.mark.parametrize("policy, hit_rate", [
    ("lru", [Fr(2, 5), Fr(4, 5), 1, 1]),
    ("belady", [Fr(2, 5), Fr(9, 10), 1, 1]),
])
def test_example_c_hit_rate(policy, hit_rate):
    hits = ref_cache_hits(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, policy, None, True, "token")
    references = [5, 5]  # N_s: valid ids within each length
    assert [int((EXAMPLE_C[s, :EXAMPLE_C_LENGTHS[s]] >= 0).sum()) for s in range(2)] == references
    rates = [sum(Fr(int(hits[s, m]), references[s]) for s in range(2)) / 2 for m in range(4)]
    assert rates == hit_rate


def test_example_c_ignoring_lengths_is_the_trap():
    assert ref_cache_hits(EXAMPLE_C, None, 4, "lru", None, True, "token")[1].tolist() == [2, 5, 6, 7]


@pytest.mark.parametrize("position, hist, threshold, best_f1, best_m, act_r, support", [
    (0, [3, 4, 1], 1, Fr(3, 4), Fr(5, 3), Fr(3, 8), 8),
    (1, [5, 2, 1], 1, Fr(4, 5), Fr(3, 2), Fr(1, 4), 8),
    (2, [2, 2, 0], 1, Fr(2, 3), 2, Fr(1, 4), 4),  # sequence 0 only
])
def test_example_c_positionwise(position, hist, threshold, best_f1, best_m, act_r, support):
    hists = ref_positionwise_hists(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2)
    assert hists.shape == (3, 4, 3)
    layer = hists[position].sum(0)
    assert layer.tolist() == hist
    assert_score(ref_srp_score(layer), threshold=threshold, best_f1=best_f1, best_m=best_m, act_r=act_r,
                 support=support)


def test_example_c_bootstrap():
    per_sequence = ref_srp_counts(EXAMPLE_C, EXAMPLE_C_LENGTHS, 4, 2).sum(dim=1)
    assert per_sequence.tolist() == [[6, 6, 0], [4, 2, 2]]
    estimate = ref_srp_score(per_sequence.sum(0))["best_f1"]
    weights = torch.tensor([[2, 1, 1, 0], [0, 1, 1, 2]])  # [S, B]: columns (2,0), (1,1), (1,1), (0,2)
    replicates = [ref_srp_score((weights[:, b, None] * per_sequence).sum(0))["best_f1"] for b in range(4)]
    assert replicates == [Fr(2, 3), Fr(3, 4), Fr(3, 4), Fr(6, 7)]
    assert ref_basic_interval(estimate, replicates, 0.5) == (Fr(9, 14), Fr(3, 4))


# ------------------------------------------------------------------------------------------ SPEC §3 and §6

@pytest.mark.parametrize("num_replicates, confidence, lp, up", [
    (1000, 0.95, 25, 975), (100, 0.95, 3, 97), (20, 0.95, 1, 19), (11, 0.90, 1, 10), (100, 0.99, 1, 99),
])
def test_basic_interval_indices(num_replicates, confidence, lp, up):
    # With r_(i) = i and est = 0 the bounds are (-up, -lp).
    assert ref_basic_interval(0, list(range(num_replicates)), confidence) == (-up, -lp)


@pytest.mark.parametrize("num_replicates, confidence", [(19, 0.95), (10, 0.90), (99, 0.99)])
def test_basic_interval_rejects_too_few_replicates(num_replicates, confidence):
    with pytest.raises(ValueError, match="num_bootstrap"):
        ref_basic_interval(0, list(range(num_replicates)), confidence)


def test_model_level_stream_example():
    layers = torch.tensor([[[[0], [1], [0], [1]]], [[[1], [1], [0], [0]]]])  # [n=2, S=1, T=4, k=1]
    stream = ref_concat_layers(layers, 2)
    assert stream.tolist() == [[[0, 3], [1, 3], [0, 2], [1, 2]]]
    assert ref_cache_hits(stream, None, 4, "lru", None, True, "token").tolist() == [[3, 4, 6, 8]]
    assert ref_cache_hits(stream, None, 4, "lru", None, True, "sequential").tolist() == [[1, 4, 6, 8]]


# ----------------------------------------------------------------------------------------- SPEC §9 edges

@pytest.mark.parametrize("num_tokens, lengths", [(0, None), (3, None), (6, torch.tensor([0])), (6, torch.tensor([3]))])
def test_no_window(num_tokens, lengths):
    topk = torch.arange(num_tokens * 2).remainder(4).reshape(1, num_tokens, 2)
    counts = ref_srp_counts(topk, lengths, 4, 4)
    assert torch.equal(counts, torch.zeros(1, 4, 5, dtype=torch.int64))
    assert_score(ref_srp_score(counts.sum((0, 1))), threshold=0, best_f1=0, best_m=0, act_r=None, support=0)
    assert ref_positionwise_hists(topk, lengths, 4, 4).shape == (0, 4, 5)
    assert torch.equal(ref_segment_coverage(topk, lengths, 4, 4), torch.zeros(1, 4, dtype=torch.int64))


def test_zero_sequences():
    topk = torch.zeros(0, 5, 2, dtype=torch.int64)
    assert ref_srp_counts(topk, None, 4, 2).shape == (0, 4, 3)
    assert ref_segment_coverage(topk, None, 4, 2).shape == (0, 4)
    assert ref_cache_hits(topk, None, 4, "lru").shape == (0, 4)


@pytest.mark.parametrize("policy, seg_len", [("lru", None), ("lfu", None), ("belady", None), ("sch", 2)])
def test_all_minus_one(policy, seg_len):
    topk = torch.full((1, 5, 2), -1)
    score = ref_srp_score(ref_srp_counts(topk, None, 4, 2).sum((0, 1)))
    assert_score(score, threshold=0, best_f1=0, best_m=0, act_r=0, support=16)
    assert ref_cache_hits(topk, None, 4, policy, seg_len).tolist() == [[0, 0, 0, 0]]


@pytest.mark.parametrize("policy, seg_len", [("lru", None), ("lfu", None), ("belady", None), ("sch", 3)])
def test_k_equals_e(policy, seg_len):
    # Every row is a permutation of all E experts: every count is L and the cache holds m of each row.
    topk = torch.tensor([[[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0]]])
    score = ref_srp_score(ref_srp_counts(topk, None, 3, 3).sum((0, 1)))
    assert_score(score, f1=[1, 1, 1, 1], threshold=0, best_f1=1, best_m=1, act_r=1)
    assert ref_cache_hits(topk, None, 3, policy, seg_len).tolist() == [[5, 10, 15]]


@pytest.mark.parametrize("policy, seg_len", [("lru", None), ("lfu", None), ("belady", None), ("sch", 2)])
def test_single_expert(policy, seg_len):
    topk = torch.tensor([[[0], [-1], [0], [0]]])
    assert ref_cache_hits(topk, None, 1, policy, seg_len).tolist() == [[3]]
    assert ref_cache_hits(topk, None, 1, policy, seg_len, free_slot_hits=False).tolist() == [[2]]
