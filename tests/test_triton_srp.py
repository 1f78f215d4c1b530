"""Triton SRP histograms and segment coverage (lrc_kernels/triton/srp.py) against the SPEC and the reference.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be set
before the kernel module is imported; tests/conftest.py sets it). Sizes stay small: the interpreter costs
~0.1 s per token per call.
"""

import random

import pytest
import torch

from conftest import EXAMPLE_A, EXAMPLE_B, EXAMPLE_C, EXAMPLE_C_LENGTHS, TRITON_DEVICE as DEVICE
from conftest import assert_compiles_for_sm90, assert_equal_ints

triton_srp = pytest.importorskip("lrc_kernels.triton.srp")
from reference import ref_segment_coverage, ref_srp_counts  # noqa: E402


def _topk(rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def _lengths(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _random_trace(rng, max_experts=16, max_slots=4, max_sequences=3, max_tokens=24):
    """Random ``[S, T, k]`` trace with distinct valid ids per row, some -1 slots and random lengths."""
    num_experts = rng.randint(1, max_experts)
    num_slots = rng.randint(1, min(num_experts, max_slots))
    num_sequences = rng.randint(1, max_sequences)
    num_tokens = rng.randint(0, max_tokens)
    # a few "hot" experts make repeated ids, hence counts above 1, likely
    hot = rng.randint(1, num_experts)
    rows = []
    for _ in range(num_sequences):
        sequence = []
        for _ in range(num_tokens):
            row = list(dict.fromkeys(rng.sample(range(hot), min(num_slots, hot)) +
                                     rng.sample(range(num_experts), num_slots)))[:num_slots]
            sequence.append([e if rng.random() >= 0.2 else -1 for e in row])
        rows.append(sequence)
    topk = torch.tensor(rows, dtype=torch.int32).reshape(num_sequences, num_tokens, num_slots)
    lengths = [rng.randint(0, num_tokens) if rng.random() < 0.5 else num_tokens for _ in range(num_sequences)]
    seg_len = rng.randint(1, num_tokens + 3)
    return topk.to(DEVICE), _lengths(lengths), num_experts, seg_len


def _assert_matches_reference(topk, lengths, num_experts, seg_len):
    hist = triton_srp.srp_counts(topk, lengths, num_experts, seg_len)
    coverage = triton_srp.segment_coverage(topk, lengths, num_experts, seg_len)
    assert hist.dtype == torch.int64 and coverage.dtype == torch.int64
    assert hist.device == topk.device and coverage.device == topk.device
    cpu_topk, cpu_lengths = topk.cpu(), lengths.cpu()
    assert_equal_ints(hist, ref_srp_counts(cpu_topk, cpu_lengths, num_experts, seg_len), "srp_counts")
    assert_equal_ints(coverage, ref_segment_coverage(cpu_topk, cpu_lengths, num_experts, seg_len),
                      "segment_coverage")


def test_example_a():
    """SPEC §8 Example A, L = 2: per-expert H and cov = [8, 14, 14, 14]."""
    topk = EXAMPLE_A.to(DEVICE, torch.int32)
    hist = triton_srp.srp_counts(topk, _lengths([8]), 4, 2)
    assert hist.cpu().tolist() == [[[3, 3, 1], [4, 3, 0], [3, 4, 0], [5, 2, 0]]]
    assert triton_srp.segment_coverage(topk, _lengths([8]), 4, 2).cpu().tolist() == [[8, 14, 14, 14]]


def test_example_b():
    """SPEC §8 Example B, L = 3: per-expert H and cov = [8, 16, 21, 24]."""
    topk = EXAMPLE_B.to(DEVICE, torch.int32)
    hist = triton_srp.srp_counts(topk, _lengths([6]), 4, 3)
    assert hist.cpu().tolist() == [[[1, 2, 1, 0], [0, 2, 2, 0], [0, 1, 3, 0], [0, 1, 3, 0]]]
    assert triton_srp.segment_coverage(topk, _lengths([6]), 4, 3).cpu().tolist() == [[8, 16, 21, 24]]


def test_example_c_minus_one_and_lengths():
    """SPEC §8 Example C, L = 2: expert H pooled over sequences, and per-sequence cov."""
    topk = EXAMPLE_C.to(DEVICE, torch.int32)
    lengths = EXAMPLE_C_LENGTHS.to(DEVICE)
    hist = triton_srp.srp_counts(topk, lengths, 4, 2)
    assert hist.sum(0).cpu().tolist() == [[3, 2, 0], [4, 1, 0], [0, 5, 0], [3, 0, 2]]
    assert hist[0, 3].cpu().tolist() == [3, 0, 0]
    assert triton_srp.segment_coverage(topk, lengths, 4, 2).cpu().tolist() == [[3, 5, 6, 6], [4, 6, 6, 6]]


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_match_reference(seed):
    _assert_matches_reference(*_random_trace(random.Random(seed)))


@pytest.mark.parametrize("seed", range(3))
def test_random_traces_with_tiny_blocks(seed, monkeypatch):
    """Tiny register budgets force several expert chunks, slot chunks and sequence blocks per launch."""
    monkeypatch.setattr(triton_srp, "_MAX_SRP_EXPERT_LANES", 4)
    monkeypatch.setattr(triton_srp, "_MAX_STATE_LANES", 8)
    monkeypatch.setattr(triton_srp, "_MAX_ONE_HOT_LANES", 16)
    _assert_matches_reference(*_random_trace(random.Random(100 + seed), max_experts=10, max_slots=6,
                                             max_sequences=5, max_tokens=12))


def test_no_sequences():
    topk = torch.zeros((0, 5, 2), dtype=torch.int32, device=DEVICE)
    lengths = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert triton_srp.srp_counts(topk, lengths, 3, 2).shape == (0, 3, 3)
    assert triton_srp.segment_coverage(topk, lengths, 3, 2).shape == (0, 3)


def test_sequences_shorter_than_window_give_zeros():
    """SPEC §9: T_s < L gives an all-zero histogram, c = 0 included; a longer neighbour is unaffected."""
    topk = _topk([[[0, 1], [1, 2], [2, 0]], [[0, 1], [1, 2], [2, 0]], [[0, 1], [1, 2], [2, 0]]])
    lengths = _lengths([3, 1, 0])
    hist = triton_srp.srp_counts(topk, lengths, 3, 2)
    # sequence 0 windows count (1,2,1) and (1,1,2)
    assert hist[0].cpu().tolist() == [[0, 2, 0], [0, 1, 1], [0, 1, 1]]
    assert not hist[1:].any()
    coverage = triton_srp.segment_coverage(topk, lengths, 3, 2)
    assert coverage.cpu().tolist() == [[4, 6, 8], [0, 0, 0], [0, 0, 0]]
    assert not triton_srp.srp_counts(topk, lengths, 3, 4).any()


def test_zero_slots():
    """k = 0: every window counts 0, so H[s, e, 0] = W_s and coverage is 0."""
    topk = torch.zeros((2, 5, 0), dtype=torch.int32, device=DEVICE)
    lengths = _lengths([5, 2])
    hist = triton_srp.srp_counts(topk, lengths, 3, 3)
    assert hist[:, :, 0].cpu().tolist() == [[3, 3, 3], [0, 0, 0]]
    assert not hist[:, :, 1:].any()
    assert not triton_srp.segment_coverage(topk, lengths, 3, 3).any()


def test_every_expert_every_token():
    """k = E without -1 (SPEC §9): every count is L, and the m largest sum to m·L per window."""
    num_experts, num_tokens, seg_len = 5, 9, 4
    rows = [[(t + j) % num_experts for j in range(num_experts)] for t in range(num_tokens)]
    topk = _topk([rows])
    num_windows = num_tokens - seg_len + 1
    hist = triton_srp.srp_counts(topk, _lengths([num_tokens]), num_experts, seg_len)
    expected = torch.zeros((1, num_experts, seg_len + 1), dtype=torch.int64)
    expected[:, :, seg_len] = num_windows
    assert torch.equal(hist.cpu(), expected)
    coverage = triton_srp.segment_coverage(topk, _lengths([num_tokens]), num_experts, seg_len)
    assert coverage.cpu().tolist() == [[m * seg_len * num_windows for m in range(1, num_experts + 1)]]


def test_many_experts_match_reference():
    """E above one SRP expert chunk (256 lanes) and a non-power-of-two coverage width."""
    rng = random.Random(7)
    num_experts, num_tokens = 300, 12
    # ids on both sides of the chunk boundary, plus one -1 slot every third token
    rows = [rng.sample([0, 1, 255, 256, 299], 3) for _ in range(num_tokens)]
    for row in rows[::3]:
        row[1] = -1
    rows = [rows]
    _assert_matches_reference(_topk(rows), _lengths([num_tokens]), num_experts, 3)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lrc_kernels.triton import srp

common = {"topk_ptr": "*i32", "lengths_ptr": "*i64", "num_sequences": "i32", "max_tokens": "i32",
          "num_slots": "i32", "num_experts": "i32", "seg_len": "i32", "row_stride": "i32", "expert_stride": "i32",
          "BLOCK_S": "constexpr", "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"}
kernels = [(srp._srp_counts_kernel, {**common, "counts_ptr": "*i64"}),
           (srp._segment_coverage_kernel, {**common, "coverage_ptr": "*i64"})]
# the block shapes the launchers pick at layer level (E = 128, k = 8) and at the largest coverage E
for kernel, signature in kernels:
    signature = {name: signature[name] for name in kernel.arg_names}
    for sizes, num_warps in [({"BLOCK_S": 8, "BLOCK_E": 128, "BLOCK_K": 4}, 8),
                             ({"BLOCK_S": 1, "BLOCK_E": 1024, "BLOCK_K": 4}, 8)]:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=sizes),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects; compile both SRP kernels ahead of time for an
    H100/H200 (sm_90) with Triton's bundled ptxas, no GPU needed."""
    assert_compiles_for_sm90(_COMPILE_FOR_SM90)
