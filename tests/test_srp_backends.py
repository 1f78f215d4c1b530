"""SRP histograms, segment coverage and their scores: every backend equals the naive reference exactly.

Property tests draw routing traces (conftest.routing_traces) and compare ``lrc_kernels.srp_counts`` and
``lrc_kernels.segment_coverage`` with tests/reference.py exactly (``assert_equal_ints`` names the first
differing index). The Triton backend runs in the interpreter on CPU CI, so its examples are smaller and fewer.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrc_kernels
from lrc_kernels import dispatch
from lrc_kernels._checks import check_topk
from conftest import (
    EXAMPLE_A,
    EXAMPLE_B,
    EXAMPLE_C,
    EXAMPLE_C_LENGTHS,
    LAYOUTS,
    TraceCase,
    assert_equal_ints,
    backend_device,
    call_backend,
    relayout,
    relayout_lengths,
    routing_traces,
)
from reference import ref_positionwise_hists, ref_segment_coverage, ref_srp_counts, ref_srp_score

CPU_TRACES = routing_traces(max_e=128, max_k=8, max_t=300, max_s=3)
TRITON_TRACES = routing_traces(max_e=128, max_k=8, max_t=48, max_s=3)

CPU_TRACE_CASES = [
    TraceCase("sticky", 64, 8, 100, 16, 0.9),
    TraceCase("sticky", 64, 8, 100, 4, 0.99, drop_prob=0.2, with_lengths=True),
    TraceCase("zipf", 128, 8, 300, 64, 1.2, num_sequences=3),
    TraceCase("uniform", 32, 4, 80, 1, with_lengths=True),
    TraceCase("phased", 16, 2, 90, 8, 10, drop_prob=0.5),
    TraceCase("cyclic", 12, 3, 70, 70, 5),
    TraceCase("constant", 8, 8, 40, 41),
    TraceCase("sticky", 1, 1, 30, 3, 0.5, with_lengths=True),
    TraceCase("zipf", 64, 8, 300, 256, 1.2, drop_prob=0.2),
]
# The interpreter costs ~25 ms per token, so the Triton cases are shorter.
TRITON_TRACE_CASES = [
    TraceCase("sticky", 64, 8, 40, 16, 0.9, drop_prob=0.2, with_lengths=True),
    TraceCase("zipf", 128, 8, 32, 8, 1.2),
    TraceCase("cyclic", 12, 3, 30, 30, 5),
    TraceCase("sticky", 1, 1, 20, 3, 0.5, with_lengths=True),
    TraceCase("sticky", 8, 2, 270, 256, 0.9, num_sequences=1),  # the paper's largest L
]
NAMED_CASES = ([pytest.param("cpu", case, id=f"cpu-{case}") for case in CPU_TRACE_CASES]
               + [pytest.param("triton", case, id=f"triton-{case}") for case in TRITON_TRACE_CASES])


def check_srp_counts(trace, backend):
    topk, lengths, num_experts, seg_len = trace
    expected = ref_srp_counts(topk, lengths, num_experts, seg_len)
    counts = call_backend(lrc_kernels.srp_counts, topk, num_experts, seg_len, lengths=lengths, backend=backend)
    assert counts.dtype == torch.int64
    assert_equal_ints(counts, expected)
    pooled = call_backend(lrc_kernels.srp_counts, topk, num_experts, seg_len, lengths=lengths, pool="experts",
                          backend=backend)
    assert pooled.dtype == torch.int64
    assert_equal_ints(pooled, expected.sum(1))


def check_pooled_counts_of_several_lengths(trace, seg_lens, backend):
    # one sweep for every L: lengths that some sequences are shorter than end their windows mid-sweep
    topk, lengths, num_experts, _ = trace
    device = backend_device(backend)
    ids, valid_lengths, _ = check_topk(topk.to(device), num_experts,
                                       lengths=None if lengths is None else lengths.to(device))
    counts = dispatch.run("srp_pooled_counts", backend, ids, valid_lengths, num_experts, tuple(seg_lens))
    assert len(counts) == len(seg_lens)
    for seg_len, pooled in zip(seg_lens, counts):
        assert_equal_ints(pooled.cpu(), ref_srp_counts(topk, lengths, num_experts, seg_len).sum(1))


def check_segment_coverage(trace, backend):
    topk, lengths, num_experts, seg_len = trace
    expected = ref_segment_coverage(topk, lengths, num_experts, seg_len)
    coverage = call_backend(lrc_kernels.segment_coverage, topk, num_experts, seg_len, lengths=lengths,
                            backend=backend)
    assert coverage.dtype == torch.int64
    assert_equal_ints(coverage, expected)


@settings(max_examples=60, deadline=None)
@given(CPU_TRACES)
def test_srp_counts_cpu(trace):
    check_srp_counts(trace, "cpu")


@settings(max_examples=15, deadline=None)
@given(TRITON_TRACES)
def test_srp_counts_triton(trace):
    check_srp_counts(trace, "triton")


SEVERAL_LENGTHS = st.lists(st.integers(1, 40), min_size=1, max_size=4, unique=True)


@settings(max_examples=60, deadline=None)
@given(CPU_TRACES, SEVERAL_LENGTHS)
def test_pooled_counts_of_several_lengths_cpu(trace, seg_lens):
    check_pooled_counts_of_several_lengths(trace, seg_lens, "cpu")


@settings(max_examples=5, deadline=None)
@given(TRITON_TRACES, SEVERAL_LENGTHS)
def test_pooled_counts_of_several_lengths_triton(trace, seg_lens):
    check_pooled_counts_of_several_lengths(trace, seg_lens, "triton")


@pytest.mark.parametrize("level", ["expert", "layer", "model"])
def test_srp_of_several_lengths_equals_one_call_per_length(level):
    generator = torch.Generator().manual_seed(5)
    num_seqs, num_tokens, num_experts = 5, 30, 8
    topk = torch.rand(3, num_seqs, num_tokens, num_experts, generator=generator).argsort(-1)[..., :2]
    topk = topk if level == "model" else topk[0]
    lengths = torch.tensor([30, 12, 3, 0, 25])
    weights = lrc_kernels.resample_weights(num_seqs, 20, generator)
    seg_lens = [16, 1, 4, 26]  # 26: only the first sequence has a window
    together = lrc_kernels.srp(topk, num_experts, seg_lens, level=level, lengths=lengths, weights=weights)
    assert list(together) == seg_lens
    for seg_len in seg_lens:
        alone = lrc_kernels.srp(topk, num_experts, seg_len, level=level, lengths=lengths, weights=weights)
        for name in ("best_f1", "threshold", "best_m", "act_r", "support", "ci_low", "ci_high"):
            assert torch.equal(getattr(together[seg_len], name), getattr(alone, name)), (seg_len, name)


@settings(max_examples=60, deadline=None)
@given(CPU_TRACES)
def test_segment_coverage_cpu(trace):
    check_segment_coverage(trace, "cpu")


@settings(max_examples=15, deadline=None)
@given(TRITON_TRACES)
def test_segment_coverage_triton(trace):
    check_segment_coverage(trace, "triton")


@pytest.mark.parametrize("backend, case", NAMED_CASES)
def test_named_traces(backend, case):
    trace = case.build()
    check_srp_counts(trace, backend)
    check_segment_coverage(trace, backend)


@pytest.mark.parametrize("topk, lengths, seg_len, layer_hist, coverage", [
    (EXAMPLE_A, None, 2, [15, 12, 1], [[8, 14, 14, 14]]),
    (EXAMPLE_B, None, 3, [1, 6, 9, 0], [[8, 16, 21, 24]]),
    (EXAMPLE_C, EXAMPLE_C_LENGTHS, 2, [10, 8, 2], [[3, 5, 6, 6], [4, 6, 6, 6]]),
], ids=["A", "B", "C"])
def test_spec_examples(topk, lengths, seg_len, layer_hist, coverage, backend):
    counts = call_backend(lrc_kernels.srp_counts, topk, 4, seg_len, lengths=lengths, backend=backend)
    assert counts.sum(dim=(0, 1)).tolist() == layer_hist
    assert call_backend(lrc_kernels.segment_coverage, topk, 4, seg_len, lengths=lengths,
                        backend=backend).tolist() == coverage


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_dtypes(layout, backend):
    topk, lengths, num_experts, seg_len = TraceCase("sticky", 16, 3, 24, 5, 0.9, num_sequences=3, drop_prob=0.2,
                                                    with_lengths=True).build()
    view = relayout(topk.to(backend_device(backend)), layout)
    view_lengths = relayout_lengths(lengths.to(view.device), view.shape[0])
    for function, reference in [(lrc_kernels.srp_counts, ref_srp_counts),
                                (lrc_kernels.segment_coverage, ref_segment_coverage)]:
        result = call_backend(function, view, num_experts, seg_len, lengths=view_lengths, backend=backend)
        contiguous = call_backend(function, view.contiguous().long(), num_experts, seg_len,
                                  lengths=view_lengths.contiguous().long(), backend=backend)
        assert_equal_ints(result, contiguous)
        assert_equal_ints(result, reference(view.cpu(), view_lengths.cpu(), num_experts, seg_len))


def test_single_sequence_input(backend):
    topk, _, num_experts, seg_len = TraceCase("zipf", 10, 3, 30, 4, 1.2, num_sequences=1, drop_prob=0.2).build()
    counts = call_backend(lrc_kernels.srp_counts, topk[0], num_experts, seg_len, backend=backend)
    assert_equal_ints(counts, ref_srp_counts(topk, None, num_experts, seg_len)[0])
    coverage = call_backend(lrc_kernels.segment_coverage, topk[0], num_experts, seg_len, backend=backend)
    assert_equal_ints(coverage, ref_segment_coverage(topk, None, num_experts, seg_len)[0])


@pytest.mark.parametrize("shape", [(0, 5, 2), (2, 0, 2), (2, 5, 0), (3, 4, 2)], ids=str)
def test_degenerate_shapes(shape, backend):
    """No sequence, no token, no slot (k = 0) and T < L (SPEC §9)."""
    topk = torch.arange(math.prod(shape)).remainder(2).reshape(shape)
    topk[..., 1:] += 2  # slot 0 holds 0 or 1, slot 1 holds 2 or 3: no duplicate in a row
    for seg_len in (1, 3, 7):
        check_srp_counts((topk, None, 4, seg_len), backend)
        check_segment_coverage((topk, None, 4, seg_len), backend)


@pytest.mark.parametrize("fill", [-1, None], ids=["all-minus-one", "k-equals-e"])
def test_all_dropped_and_full_rows(fill, backend):
    """All ``-1`` (windows without activations) and k = E (every count is L), SPEC §9."""
    num_experts = 5
    if fill is None:
        topk = torch.stack([torch.randperm(num_experts, generator=torch.Generator().manual_seed(t))
                            for t in range(12)]).reshape(1, 12, num_experts)
    else:
        topk = torch.full((2, 12, 3), fill)
    for seg_len in (1, 4, 12):
        check_srp_counts((topk, None, num_experts, seg_len), backend)
        check_segment_coverage((topk, None, num_experts, seg_len), backend)


# ---------------------------------------------------------------------------------------------- scores

def assert_score_is_reference(score, cell, hist):
    """Field ``cell`` of a flattened :class:`SRPScore` equals the exact reference score of ``hist``."""
    expected = ref_srp_score(hist)
    assert score.threshold.reshape(-1)[cell].item() == expected["threshold"]
    assert score.support.reshape(-1)[cell].item() == expected["support"]
    # float64 quotients of exact integers are correctly rounded, so they equal float(Fraction) exactly.
    assert score.best_f1.reshape(-1)[cell].item() == float(expected["best_f1"])
    assert score.best_m.reshape(-1)[cell].item() == float(expected["best_m"])
    act_r = score.act_r.reshape(-1)[cell].item()
    if expected["act_r"] is None:
        assert math.isnan(act_r)
    else:
        assert act_r == float(expected["act_r"])


SMALL_OR_LARGE_COUNTS = st.integers(0, 3) | st.integers(0, 10**6)  # small values make F1 ties likely


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 19).flatmap(lambda seg_len: st.lists(
    st.lists(SMALL_OR_LARGE_COUNTS, min_size=seg_len + 1, max_size=seg_len + 1), min_size=1, max_size=3)))
def test_srp_score_matches_reference(hists):
    score = lrc_kernels.srp_score(torch.tensor(hists))
    assert score.threshold.shape == (len(hists),)
    for cell, hist in enumerate(hists):
        assert_score_is_reference(score, cell, hist)


@settings(max_examples=40, deadline=None)
@given(routing_traces(max_e=16, max_k=4, max_t=40, max_s=4), st.sampled_from(["layer", "expert"]))
def test_srp_positionwise_matches_reference(trace, level):
    topk, lengths, num_experts, seg_len = trace
    hists = ref_positionwise_hists(topk, lengths, num_experts, seg_len)
    if level == "layer":
        hists = hists.sum(1)
    score = lrc_kernels.srp_positionwise(topk, num_experts, seg_len, level=level, lengths=lengths)
    assert score.support.shape == hists.shape[:-1]
    for cell, hist in enumerate(hists.reshape(-1, seg_len + 1)):
        assert_score_is_reference(score, cell, hist)
