"""The shared trace generators produce valid routing input (SPEC §1) in every regime."""

import pytest
import torch
from hypothesis import given, settings

from conftest import TRACE_KINDS, TraceCase, generate_trace, routing_traces


def assert_valid_trace(topk, lengths, num_experts):
    assert topk.dtype == torch.int64 and topk.ndim == 3
    assert bool(((topk >= -1) & (topk < num_experts)).all())
    for row in topk.reshape(-1, topk.shape[-1]).tolist():
        valid = [e for e in row if e != -1]
        assert len(valid) == len(set(valid)), row
    if lengths is not None:
        assert lengths.shape == (topk.shape[0],)
        assert bool(((lengths >= 0) & (lengths <= topk.shape[1])).all())


@settings(max_examples=60)
@given(routing_traces(max_e=12, max_k=6, max_t=30, max_s=3))
def test_routing_traces_are_valid(trace):
    topk, lengths, num_experts, seg_len = trace
    assert_valid_trace(topk, lengths, num_experts)
    assert topk.shape[-1] <= num_experts
    assert 1 <= seg_len <= topk.shape[1] + 5


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_generate_trace_kinds(kind):
    topk = generate_trace(kind, 3, 50, 4, 9, drop_prob=0.25, seed=7)
    assert topk.shape == (3, 50, 4)
    assert_valid_trace(topk, None, 9)
    assert bool((topk == -1).any()) and bool((topk >= 0).any())


def test_constant_and_sticky_have_the_locality_they_claim():
    constant = generate_trace("constant", 1, 20, 3, 10, seed=1)
    assert torch.equal(constant, constant[:, :1].expand_as(constant))
    # p = 0.99 keeps a slot's expert in about 99% of slide steps; p = 0.5 in at most about 55%.
    sticky = generate_trace("sticky", 1, 400, 2, 16, param=0.99, seed=2)
    loose = generate_trace("sticky", 1, 400, 2, 16, param=0.5, seed=2)
    assert (sticky[0, 1:] == sticky[0, :-1]).float().mean() > 0.95
    assert (loose[0, 1:] == loose[0, :-1]).float().mean() < 0.65


def test_trace_case_ids_and_determinism():
    case = TraceCase("sticky", 64, 8, 100, 16, 0.9)
    assert str(case) == "E64-k8-T100-L16-sticky0.9-S2"
    first, second = case.build(), case.build()
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    assert_valid_trace(first[0], first[1], 64)
