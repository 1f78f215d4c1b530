"""Edge cases of the CPU backend lrc_kernels.cpu.srp, called directly with contract inputs
(docs/architecture.md, "Backend contract": int32 contiguous ``[S, T, k]``, int64 ``[S]`` lengths). Random
traces are covered by test_srp_backends.py; here every expected value follows from SPEC §8 or §9 or from the
window count W_s = max(T_s - L + 1, 0).
"""

import pytest
import torch

from conftest import EXAMPLE_A, EXAMPLE_B, EXAMPLE_C, EXAMPLE_C_LENGTHS, assert_equal_ints, generate_trace
from lrc_kernels.cpu.srp import segment_coverage, srp_counts
from reference import ref_segment_coverage, ref_srp_counts


def contract_inputs(topk, lengths=None):
    topk = topk.to(torch.int32).contiguous()
    if lengths is None:
        lengths = torch.full((topk.shape[0],), topk.shape[1], dtype=torch.int64)
    return topk, lengths.to(torch.int64).contiguous()


def test_spec_example_a():
    topk, lengths = contract_inputs(EXAMPLE_A)
    assert srp_counts(topk, lengths, 4, 2)[0].tolist() == [[3, 3, 1], [4, 3, 0], [3, 4, 0], [5, 2, 0]]
    assert segment_coverage(topk, lengths, 4, 2).tolist() == [[8, 14, 14, 14]]


def test_spec_example_b():
    topk, lengths = contract_inputs(EXAMPLE_B)
    assert srp_counts(topk, lengths, 4, 3)[0].tolist() == [[1, 2, 1, 0], [0, 2, 2, 0], [0, 1, 3, 0], [0, 1, 3, 0]]
    assert segment_coverage(topk, lengths, 4, 3).tolist() == [[8, 16, 21, 24]]


def test_spec_example_c_minus_one_and_lengths():
    topk, lengths = contract_inputs(EXAMPLE_C, EXAMPLE_C_LENGTHS)
    assert srp_counts(topk, lengths, 4, 2).sum(0).tolist() == [[3, 2, 0], [4, 1, 0], [0, 5, 0], [3, 0, 2]]
    assert segment_coverage(topk, lengths, 4, 2).tolist() == [[3, 5, 6, 6], [4, 6, 6, 6]]


@pytest.mark.parametrize("seg_len", [6, 7, 12])
def test_sequences_shorter_than_window_are_all_zero(seg_len):
    topk, _ = contract_inputs(generate_trace("uniform", 3, 6, 2, 5, seed=seg_len))
    lengths = torch.tensor([6, 0, 3], dtype=torch.int64)
    counts = srp_counts(topk, lengths, 5, seg_len)
    coverage = segment_coverage(topk, lengths, 5, seg_len)
    windows = max(6 - seg_len + 1, 0)  # only sequence 0 can hold a window
    assert torch.equal(counts.sum(-1), torch.tensor([[windows] * 5, [0] * 5, [0] * 5]))
    assert not counts[1:].any() and not coverage[1:].any()


def test_empty_batch_and_empty_rows():
    empty, no_lengths = contract_inputs(torch.zeros((0, 5, 2), dtype=torch.int32))
    assert srp_counts(empty, no_lengths, 3, 2).shape == (0, 3, 3)
    assert segment_coverage(empty, no_lengths, 3, 2).shape == (0, 3)
    no_slots, lengths = contract_inputs(torch.zeros((2, 5, 0), dtype=torch.int32))
    counts = srp_counts(no_slots, lengths, 3, 2)
    assert torch.equal(counts[..., 0], torch.full((2, 3), 4)) and not counts[..., 1:].any()
    assert not segment_coverage(no_slots, lengths, 3, 2).any()


def test_all_minus_one_windows_count_zero():
    topk, lengths = contract_inputs(torch.full((2, 9, 3), -1), torch.tensor([9, 4]))
    counts = srp_counts(topk, lengths, 6, 4)
    assert torch.equal(counts[..., 0], torch.tensor([[6] * 6, [1] * 6])) and not counts[..., 1:].any()
    assert not segment_coverage(topk, lengths, 6, 4).any()


@pytest.mark.parametrize("num_experts", [1, 5])
def test_every_expert_in_every_row(num_experts):
    # k = E, no -1: every window counts L for every expert, so the m largest counts sum to m·L (SPEC §9).
    rows = torch.stack([torch.randperm(num_experts, generator=torch.Generator().manual_seed(t)) for t in range(11)])
    topk, lengths = contract_inputs(rows.expand(2, -1, -1), torch.tensor([11, 7]))
    seg_len = 3
    windows = torch.tensor([9, 5])
    counts = srp_counts(topk, lengths, num_experts, seg_len)
    assert torch.equal(counts[..., seg_len], windows[:, None].expand(2, num_experts))
    assert not counts[..., :seg_len].any()
    sizes = torch.arange(1, num_experts + 1)
    assert torch.equal(segment_coverage(topk, lengths, num_experts, seg_len), windows[:, None] * sizes * seg_len)


@pytest.mark.parametrize("seg_len", [1, 2, 5, 29, 30, 31])
def test_single_expert_with_gaps_matches_reference(seg_len):
    topk, lengths = contract_inputs(generate_trace("uniform", 3, 30, 1, 1, drop_prob=0.4, seed=seg_len),
                                    torch.tensor([30, 17, 1]))
    assert_equal_ints(srp_counts(topk, lengths, 1, seg_len), ref_srp_counts(topk, lengths, 1, seg_len))
    assert_equal_ints(segment_coverage(topk, lengths, 1, seg_len), ref_segment_coverage(topk, lengths, 1, seg_len))


def test_repeated_experts_across_the_slide():
    # An expert leaving and re-entering at the same slide must not disturb the credited window counts.
    topk, lengths = contract_inputs(generate_trace("cyclic", 2, 60, 3, 7, param=4, drop_prob=0.1, seed=3))
    for seg_len in (1, 4, 8, 13):
        assert_equal_ints(srp_counts(topk, lengths, 7, seg_len), ref_srp_counts(topk, lengths, 7, seg_len))
        assert_equal_ints(segment_coverage(topk, lengths, 7, seg_len),
                           ref_segment_coverage(topk, lengths, 7, seg_len))
