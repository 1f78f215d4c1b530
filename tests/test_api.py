"""The public API against the SPEC §6, §8 and §9 numbers, bootstrap intervals, and input validation."""

import os
import subprocess
import sys
from fractions import Fraction as Fr

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrc_kernels as lk
from conftest import EXAMPLE_A, EXAMPLE_B, EXAMPLE_C, EXAMPLE_C_LENGTHS

NAN = float("nan")

# SPEC §8 A and B as one sequence each: the API's unbatched [T, k] form
ROWS_A, ROWS_B = EXAMPLE_A[0], EXAMPLE_B[0]


def assert_score(score, best_f1, threshold, best_m, act_r, support=None):
    """Compare every field with exact fractions: float64 quotients of exact integers round identically."""
    assert score.best_f1.tolist() == [float(Fr(x)) for x in best_f1]
    assert score.threshold.tolist() == threshold
    assert score.best_m.tolist() == [float(Fr(x)) for x in best_m]
    assert score.act_r.tolist() == [float(Fr(x)) for x in act_r]
    if support is not None:
        assert score.support.tolist() == support


# --- SPEC §8 worked examples through srp() -----------------------------------------------------------

def test_example_a_srp_expert_and_layer():
    experts = lk.srp(ROWS_A, 4, 2, level="expert")
    assert_score(experts, ["10/13", "2/3", "2/3", "2/3"], [1, 1, 1, 1], ["8/5", "2", "2", "2"],
                 ["5/14", "3/14", "2/7", "1/7"], [7, 7, 7, 7])
    layer = lk.srp(ROWS_A, 4, 2)
    assert layer.best_f1.ndim == 0
    assert_score(lk.SRPScore(*(f.reshape(1) for f in (layer.best_f1, layer.threshold, layer.best_m,
                                                         layer.act_r, layer.support))),
                 ["7/10"], [1], ["13/7"], ["1/4"], [28])


def test_example_b_expert_thresholds_differ_from_shared_layer_threshold():
    experts = lk.srp(ROWS_B, 4, 3, level="expert")
    assert_score(experts, ["8/13", "2/3", "3/4", "3/4"], [1, 0, 2, 2], ["9/4", "2", "9/7", "9/7"],
                 ["1/3", "1/2", "7/12", "7/12"])
    layer = lk.srp(ROWS_B, 4, 3)
    assert (layer.best_f1.item(), layer.threshold.item(), layer.best_m.item(), layer.act_r.item(),
            layer.support.item()) == (12 / 17, 2, 9 / 8, 0.5, 16)


def test_example_c_minus_one_and_lengths():
    layer = lk.srp(EXAMPLE_C, 4, 2, lengths=EXAMPLE_C_LENGTHS)
    assert (layer.best_f1.item(), layer.threshold.item(), layer.best_m.item(), layer.act_r.item(),
            layer.support.item()) == (3 / 4, 1, 5 / 3, 0.3, 20)
    experts = lk.srp(EXAMPLE_C, 4, 2, level="expert", lengths=EXAMPLE_C_LENGTHS)
    assert_score(experts, ["2/3", "2/3", "2/3", "1"], [1, 1, 0, 1], ["2", "2", "2", "1"],
                 ["1/5", "1/10", "1/2", "2/5"])
    alone = lk.srp(EXAMPLE_C[0], 4, 2, level="expert")
    assert (alone.best_f1[3].item(), alone.threshold[3].item(), alone.best_m[3].item(),
            alone.act_r[3].item()) == (0.0, 0, 0.0, 0.0)


def test_example_c_layer_histograms_and_matches():
    counts = lk.srp_counts(EXAMPLE_C, 4, 2, lengths=EXAMPLE_C_LENGTHS)
    assert counts.dtype == torch.int64 and counts.shape == (2, 4, 3)
    assert counts.sum(dim=(0, 1)).tolist() == [10, 8, 2]
    assert counts.sum(0).tolist() == [[3, 2, 0], [4, 1, 0], [0, 5, 0], [3, 0, 2]]


def test_example_c_bootstrap_with_explicit_weights():
    weights = torch.tensor([[2, 1, 1, 0], [0, 1, 1, 2]])
    score = lk.srp(EXAMPLE_C, 4, 2, lengths=EXAMPLE_C_LENGTHS, weights=weights, confidence=0.5)
    assert score.ci_low.item() == 2 * (3 / 4) - 6 / 7 and score.ci_low.item() == pytest.approx(9 / 14, abs=0)
    assert score.ci_high.item() == 2 * (3 / 4) - 3 / 4


def test_example_c_positionwise():
    score = lk.srp_positionwise(EXAMPLE_C, 4, 2, lengths=EXAMPLE_C_LENGTHS)
    assert_score(score, ["3/4", "4/5", "2/3"], [1, 1, 1], ["5/3", "3/2", "2"], ["3/8", "1/4", "1/4"],
                 [8, 8, 4])


def test_examples_coverage():
    assert lk.segment_coverage(ROWS_A, 4, 2).tolist() == [8, 14, 14, 14]
    assert lk.segment_coverage(ROWS_B, 4, 3).tolist() == [8, 16, 21, 24]
    cov = lk.segment_coverage(EXAMPLE_C, 4, 2, lengths=EXAMPLE_C_LENGTHS)
    assert cov.tolist() == [[3, 5, 6, 6], [4, 6, 6, 6]]
    assert lk.coverage_ratio(cov).tolist() == [7 / 12, 11 / 12, 1.0, 1.0]


@pytest.mark.parametrize("policy, seg_len, expected", [
    ("lru", None, [2, 3, 6, 8]), ("lfu", None, [2, 4, 6, 8]), ("sch", 2, [2, 5, 6, 8]),
    ("belady", None, [2, 5, 7, 8]), ("sch", 1, [2, 3, 6, 8]), ("sch", 8, [2, 4, 7, 8])])
def test_example_a_cache_hits(policy, seg_len, expected):
    assert lk.cache_hits(ROWS_A, 4, policy, seg_len=seg_len).tolist() == expected
    cold = lk.cache_hits(ROWS_A, 4, policy, seg_len=seg_len, free_slot_hits=False)
    assert cold.tolist() == [h - min(m, 4) for m, h in enumerate(expected, start=1)]


def test_example_c_cache_curve_means_per_sequence_rates():
    lru = lk.cache_curve(EXAMPLE_C, 4, "lru", lengths=EXAMPLE_C_LENGTHS)
    assert lru.hits.tolist() == [[2, 3, 5, 5], [2, 5, 5, 5]]
    assert lru.num_references.tolist() == [5, 5] and lru.references == 10
    assert lru.hit_rate.tolist() == [0.4, 0.8, 1.0, 1.0]
    assert lk.cache_curve(EXAMPLE_C, 4, "belady", lengths=EXAMPLE_C_LENGTHS).hit_rate.tolist() == [0.4, 0.9, 1.0, 1.0]


def test_cache_curve_bootstrap_with_explicit_weights():
    weights = torch.tensor([[2, 0, 1, 1], [0, 2, 1, 1]])
    curve = lk.cache_curve(EXAMPLE_C, 4, "lru", lengths=EXAMPLE_C_LENGTHS, weights=weights, confidence=0.5)
    # Replicates at m = 2 are 3/5, 1, 4/5, 4/5 (weighted means of 3/5 and 5/5); lp = 1, up = 3.
    assert curve.ci_low[1].item() == 2 * 0.8 - 1.0
    assert curve.ci_high[1].item() == 2 * 0.8 - 0.8


def test_section6_model_level_stream():
    layer_a = torch.tensor([[0], [1], [0], [1]])
    layer_b = torch.tensor([[1], [1], [0], [0]])
    stream = lk.concat_layers([layer_a, layer_b], 2)
    assert stream.tolist() == [[0, 3], [1, 3], [0, 2], [1, 2]]
    assert lk.cache_hits(stream, 4, "lru").tolist() == [3, 4, 6, 8]
    assert lk.cache_hits(stream, 4, "lru", lookup="sequential").tolist() == [1, 4, 6, 8]


def test_model_level_srp_pools_layers_with_one_threshold():
    gen = torch.Generator().manual_seed(0)
    layers = torch.stack([torch.randperm(8, generator=gen)[:2].repeat(3, 20, 1) for _ in range(3)])
    layers[1, :, ::3] = torch.tensor([5, 6])
    model = lk.srp(layers, 8, 4, level="model")
    pooled = sum(lk.srp_counts(layer, 8, 4).sum(dim=(0, 1)) for layer in layers)
    expected = lk.srp_score(pooled)
    assert model.best_f1.item() == expected.best_f1.item()
    assert model.threshold.item() == expected.threshold.item()
    assert model.support.item() == 3 * 3 * 8 * 17


def test_srp_bootstrap_generator_is_reproducible_and_brackets_estimate_on_iid_data():
    gen = torch.Generator().manual_seed(1)
    topk = torch.stack([torch.randperm(16, generator=gen)[:2] for _ in range(40 * 64)]).view(40, 64, 2)
    first = lk.srp(topk, 16, 8, num_bootstrap=200, generator=torch.Generator().manual_seed(7))
    again = lk.srp(topk, 16, 8, num_bootstrap=200, generator=torch.Generator().manual_seed(7))
    assert first.ci_low.item() == again.ci_low.item() and first.ci_high.item() == again.ci_high.item()
    assert first.ci_low.item() < first.best_f1.item() < first.ci_high.item()


# --- SPEC §9 edge cases --------------------------------------------------------------------------------

def test_no_window_gives_zero_scores_and_nan_density():
    short = torch.tensor([[[0, 1], [1, 2]]])
    counts = lk.srp_counts(short, 4, 3)
    assert counts.shape == (1, 4, 4) and not counts.any()
    score = lk.srp(short, 4, 3, num_bootstrap=20, generator=torch.Generator().manual_seed(0))
    assert (score.best_f1.item(), score.threshold.item(), score.best_m.item(), score.support.item()) == (0, 0, 0, 0)
    assert torch.isnan(score.act_r)
    assert (score.ci_low.item(), score.ci_high.item()) == (0.0, 0.0)
    assert torch.isnan(lk.coverage_ratio(lk.segment_coverage(short, 4, 3))).all()


def test_empty_batch_shapes():
    empty = torch.zeros(0, 5, 2, dtype=torch.int64)
    assert lk.srp_counts(empty, 4, 2).shape == (0, 4, 3)
    assert lk.cache_hits(empty, 4, "lru").shape == (0, 4)
    assert lk.segment_coverage(empty, 4, 2).shape == (0, 4)
    curve = lk.cache_curve(empty, 4, "lru", num_bootstrap=20)
    assert torch.isnan(curve.hit_rate).all() and torch.isnan(curve.ci_low).all()
    assert curve.references == 0
    assert torch.isnan(lk.srp(empty, 4, 2).act_r)
    # SPEC §9: S = 0 is scored as "no window", so every bootstrap replicate is 0 and so is the interval
    score = lk.srp(empty, 4, 2, num_bootstrap=20)
    assert (score.best_f1.item(), score.ci_low.item(), score.ci_high.item()) == (0.0, 0.0, 0.0)
    assert torch.isnan(score.act_r)


@pytest.mark.parametrize("k", [0, 2])
def test_all_minus_one_has_windows_but_no_activation(k):
    topk = torch.full((2, 6, k), -1)
    score = lk.srp(topk, 4, 3)
    assert (score.best_f1.item(), score.threshold.item(), score.best_m.item(), score.act_r.item()) == (0, 0, 0, 0)
    assert score.support.item() == 2 * 4 * 4
    curve = lk.cache_curve(topk, 4, "sch", seg_len=2)
    assert not curve.hits.any() and torch.isnan(curve.hit_rate).all()


def test_k_equals_e_every_count_is_l():
    topk = torch.tensor([[2, 0, 1]]).repeat(7, 1)
    score = lk.srp(topk, 3, 4)
    assert (score.best_f1.item(), score.threshold.item(), score.best_m.item(), score.act_r.item()) == (1, 0, 1, 1)
    for policy, seg_len in (("lru", None), ("lfu", None), ("belady", None), ("sch", 3)):
        assert lk.cache_hits(topk, 3, policy, seg_len=seg_len).tolist() == [7, 14, 21]


def test_single_expert():
    topk = torch.zeros(5, 1, dtype=torch.int64)
    assert lk.srp(topk, 1, 2).best_f1.item() == 1.0
    assert lk.cache_hits(topk, 1, "belady").tolist() == [5]
    assert lk.cache_hits(topk, 1, "belady", free_slot_hits=False).tolist() == [4]


def test_non_contiguous_and_narrow_dtypes_match_contiguous():
    gen = torch.Generator().manual_seed(3)
    base = torch.stack([torch.randperm(12, generator=gen)[:3] for _ in range(4 * 30)]).view(4, 30, 3)
    base[0, 5] = torch.tensor([-1, 4, -1])
    transposed = base.transpose(0, 1).contiguous().transpose(0, 1)
    assert not transposed.is_contiguous()
    for variant in (transposed, base.to(torch.int16), base.to(torch.int8), base.to(torch.int32)):
        assert torch.equal(lk.srp_counts(variant, 12, 5), lk.srp_counts(base, 12, 5))
        assert torch.equal(lk.cache_hits(variant, 12, "sch", seg_len=4), lk.cache_hits(base, 12, "sch", seg_len=4))
    expanded = base[:1].expand(3, -1, -1)
    assert torch.equal(lk.srp_counts(expanded, 12, 5), lk.srp_counts(expanded.contiguous(), 12, 5))


def test_entries_beyond_lengths_are_neither_read_nor_validated():
    topk = torch.tensor([[[0, 1], [1, 2], [99, 99]]])
    assert torch.equal(lk.srp_counts(topk, 4, 1, lengths=torch.tensor([2])), lk.srp_counts(topk[:, :2], 4, 1))


# --- topk_from_logits ----------------------------------------------------------------------------------

def test_topk_from_logits_ties_go_to_lower_id():
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert [lk.topk_from_logits(logits, k).tolist() for k in (1, 2, 3)] == [[1], [1, 2], [1, 2, 0]]
    batch = torch.zeros(2, 3, 5)
    assert lk.topk_from_logits(batch, 2).tolist() == [[[0, 1]] * 3] * 2
    assert lk.topk_from_logits(batch, 2).dtype == torch.int64


# --- invalid input -------------------------------------------------------------------------------------

TOPK = torch.tensor([[[0, 1], [2, 3]]])
BAD_CALLS = [
    ("float-topk", lambda: lk.srp_counts(TOPK.float(), 4, 1), TypeError, "topk: expected a signed integer"),
    ("bool-topk", lambda: lk.srp_counts(TOPK > 0, 4, 1), TypeError, "topk"),
    ("list-topk", lambda: lk.cache_hits([[0, 1]], 4, "lru"), TypeError, "received list"),
    ("rank-1", lambda: lk.srp_counts(torch.tensor([0, 1]), 4, 1), ValueError, "received 1-D"),
    ("rank-4", lambda: lk.srp_counts(TOPK[None], 4, 1), ValueError, "received 4-D"),
    ("id-too-large", lambda: lk.srp_counts(TOPK, 3, 1), ValueError, "received 3 at index (0, 1, 1)"),
    ("id-below-minus-one", lambda: lk.cache_hits(TOPK - 2, 4, "lru"), ValueError, "received -2"),
    ("k-above-e", lambda: lk.srp_counts(TOPK, 1, 1), ValueError, "k <= num_experts = 1"),
    ("duplicate", lambda: lk.cache_hits(torch.tensor([[1, 1]]), 4, "lru"), ValueError, "distinct expert ids"),
    ("duplicate-int32-not-copied", lambda: lk.srp_counts(torch.tensor([[[0, 1], [3, 3]]], dtype=torch.int32), 4, 1),
     ValueError, "received [3, 3] at row (0, 1)"),
    ("id-too-large-int32-not-copied", lambda: lk.cache_hits(TOPK.int(), 3, "lru"), ValueError,
     "received 3 at index (0, 1, 1)"),
    ("duplicate-at-row", lambda: lk.srp_counts(torch.tensor([[[0, 1], [2, 2]]]), 4, 1), ValueError,
     "received [2, 2] at row (0, 1)"),
    ("model-level-id-too-large", lambda: lk.srp(torch.stack([TOPK, TOPK + 1]), 4, 1, level="model"), ValueError,
     "received 4 at index (1, 0, 1, 1)"),
    ("model-level-duplicate", lambda: lk.srp(torch.stack([TOPK, TOPK.flip(-1), TOPK.clamp(max=2)]), 4, 1,
                                              level="model"), ValueError, "received [2, 2] at row (2, 0, 1)"),
    ("seg-len-0", lambda: lk.srp_counts(TOPK, 4, 0), ValueError, "seg_len: expected an int >= 1, received 0"),
    ("seg-lens-empty", lambda: lk.srp(TOPK, 4, []), ValueError,
     "seg_len: expected an int >= 1 or a non-empty sequence of distinct ones, received []"),
    ("seg-lens-repeated", lambda: lk.srp(TOPK, 4, [2, 1, 2]), ValueError, "distinct ones, received [2, 1, 2]"),
    ("seg-lens-entry-0", lambda: lk.srp(TOPK, 4, (1, 0)), ValueError, "seg_len: expected an int >= 1, received 0"),
    ("seg-lens-float", lambda: lk.srp(TOPK, 4, [1, 2.0]), TypeError, "seg_len: expected an int"),
    ("experts-0", lambda: lk.srp_counts(TOPK, 0, 1), ValueError, "num_experts: expected an int >= 1"),
    ("float-experts", lambda: lk.srp_counts(TOPK, 4.0, 1), TypeError, "num_experts: expected an int"),
    ("lengths-shape", lambda: lk.srp_counts(TOPK, 4, 1, lengths=torch.tensor([1, 2])), ValueError,
     "lengths: expected shape [S] = [1], received (2,)"),
    ("lengths-range", lambda: lk.srp_counts(TOPK, 4, 1, lengths=torch.tensor([3])), ValueError,
     "expected values in [0, T] = [0, 2], received 3"),
    ("lengths-float", lambda: lk.srp_counts(TOPK, 4, 1, lengths=torch.tensor([1.0])), TypeError, "lengths"),
    ("nan-logits", lambda: lk.topk_from_logits(torch.tensor([0.0, float("nan")]), 1), ValueError, "NaN"),
    ("k-above-e-logits", lambda: lk.topk_from_logits(torch.zeros(3), 4), ValueError, "k: expected k <= E = 3"),
    ("int-logits", lambda: lk.topk_from_logits(torch.zeros(3, dtype=torch.int64), 1), TypeError, "logits"),
    ("unknown-policy", lambda: lk.cache_hits(TOPK, 4, "fifo"), ValueError, "policy: expected one of"),
    ("sch-without-l", lambda: lk.cache_hits(TOPK, 4, "sch"), ValueError, "seg_len: policy 'sch' needs"),
    ("l-for-lru", lambda: lk.cache_hits(TOPK, 4, "lru", seg_len=2), ValueError, "only policy 'sch'"),
    ("unknown-lookup", lambda: lk.cache_hits(TOPK, 4, "lru", lookup="layer"), ValueError, "lookup"),
    ("unknown-backend", lambda: lk.srp_counts(TOPK, 4, 1, backend="cuda"), ValueError, "backend"),
    ("unknown-level", lambda: lk.srp(TOPK, 4, 1, level="token"), ValueError, "level"),
    ("too-few-replicates", lambda: lk.srp(TOPK, 4, 1, num_bootstrap=19), ValueError,
     "num_bootstrap: expected at least 20"),
    ("too-few-replicates-0.99", lambda: lk.cache_curve(TOPK, 4, "lru", num_bootstrap=99, confidence=0.99),
     ValueError, "at least 100"),
    ("confidence-range", lambda: lk.srp(TOPK, 4, 1, num_bootstrap=50, confidence=1.0), ValueError,
     "confidence: expected a float in (0, 1)"),
    ("float-counts", lambda: lk.srp_score(torch.ones(3)), TypeError, "counts"),
    ("counts-1-bin", lambda: lk.srp_score(torch.ones(1, dtype=torch.int64)), ValueError, "L >= 1"),
    ("weights-shape", lambda: lk.srp(TOPK, 4, 1, weights=torch.ones(2, 20, dtype=torch.int64)), ValueError,
     "weights: expected shape [S, B] with S = 1"),
    ("model-level-rank", lambda: lk.srp(TOPK[0], 4, 1, level="model"), ValueError, "[n_layers, S, T, k]"),
    ("concat-unequal", lambda: lk.concat_layers([TOPK, TOPK[:, :1]], 4), ValueError, "equal shape"),
    ("free-slot-not-bool", lambda: lk.cache_hits(TOPK, 4, "lru", free_slot_hits=1), TypeError, "free_slot_hits"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_names_argument_and_values(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lk.srp_counts(TOPK, 4, 1, backend="triton")


def test_import_is_light():
    code = ("import sys, lrc_kernels, torch; "
            "print('transformers' in sys.modules, 'triton' in sys.modules, 'numba' in sys.modules, "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_INTERPRET": ""})
    assert out.stdout.split() == ["False", "False", "False", "False"]


@st.composite
def _routing_with_mistakes(draw):
    """Small routing tensors whose ids may fall outside [-1, E) or repeat in a row, with random lengths.

    E covers both CPU duplicate checks: bit registers (E <= 128) and the per-expert stamp (E > 128).
    """
    num_experts = draw(st.sampled_from([1, 2, 7, 63, 64, 65, 100, 127, 128, 129, 300]))
    num_slots = draw(st.integers(1, min(num_experts, 8)))
    num_seqs, num_tokens = draw(st.integers(1, 3)), draw(st.integers(0, 5))
    # ids near the edges of the range and near the 64-bit word boundaries, where a bit trick could alias
    pool = sorted({-3, -2, -1, 0, 1, 63, 64, 65, 126, 127, num_experts - 1, num_experts, num_experts + 64} |
                  set(range(min(num_experts, 6))))
    flat = draw(st.lists(st.sampled_from(pool), min_size=num_seqs * num_tokens * num_slots,
                         max_size=num_seqs * num_tokens * num_slots))
    topk = torch.tensor(flat, dtype=torch.int64).view(num_seqs, num_tokens, num_slots)
    lengths = torch.tensor(draw(st.lists(st.integers(0, num_tokens), min_size=num_seqs, max_size=num_seqs)))
    return topk, num_experts, lengths


def _is_valid_routing(topk, num_experts, lengths):
    for s, length in enumerate(lengths.tolist()):
        for row in topk[s, :length].tolist():
            ids = [e for e in row if e != -1]
            if any(not 0 <= e < num_experts for e in ids) or len(set(ids)) != len(ids):
                return False
    return True


@settings(max_examples=400)
@given(case=_routing_with_mistakes(), int32=st.booleans())
def test_cpu_validation_rejects_exactly_the_invalid_routing(case, int32):
    from lrc_kernels._checks import check_topk

    topk, num_experts, lengths = case
    topk = topk.to(torch.int32) if int32 else topk
    for given_lengths in (lengths, None):  # None: every token counts (the int32 input is then not copied)
        full = torch.full_like(lengths, topk.shape[1]) if given_lengths is None else lengths
        if _is_valid_routing(topk, num_experts, full):
            ids, _, _ = check_topk(topk, num_experts, lengths=given_lengths)
            expected = torch.where(torch.arange(topk.shape[1])[:, None] < full[:, None, None], topk, -1)
            assert ids.dtype == torch.int32 and torch.equal(ids, expected.to(torch.int32))
        else:
            with pytest.raises(ValueError, match="topk: expected"):
                check_topk(topk, num_experts, lengths=given_lengths)


@pytest.mark.parametrize("num_experts", [128, 129, 300])
def test_cpu_validation_keeps_ids_64_apart_distinct(num_experts):
    # Ids 64 apart share a bit position in the two-register duplicate check (E <= 128).
    from lrc_kernels._checks import check_topk

    rows = torch.tensor([[[0, 64], [3, 67], [63, 127], [127, 63], [-1, 64]]], dtype=torch.int32)
    ids, _, _ = check_topk(rows, num_experts)
    assert torch.equal(ids, rows)
    with pytest.raises(ValueError, match=r"received \[67, 67\] at row \(0, 1\)"):
        check_topk(torch.tensor([[[0, 64], [67, 67]]]), num_experts)


@pytest.mark.parametrize("topk, message", [
    (torch.tensor([[[0, 1], [2, 5]]]), "received 5 at index (0, 1, 1)"),
    (torch.tensor([[[0, 1], [2, 2]]]), "received [2, 2] at row (0, 1)"),
])
def test_torch_validation_path_gives_the_cpu_path_messages(topk, message):
    # The torch path validates CUDA tensors; it runs on CPU tensors too, so both paths are compared here.
    from lrc_kernels._checks import _normalise_with_torch, check_topk

    lengths = torch.tensor([2])
    with pytest.raises(ValueError) as on_cpu:
        check_topk(topk, 4, lengths=lengths)
    with pytest.raises(ValueError) as with_torch:
        _normalise_with_torch(topk, lengths, 4, "topk")
    assert message in str(on_cpu.value) and str(with_torch.value) == str(on_cpu.value)
