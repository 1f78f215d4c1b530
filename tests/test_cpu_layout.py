"""The model-level stream's two formulations (SPEC §6): the CPU loop and the torch one, against the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import generate_trace
from lrc_kernels.cpu.layout import join_layers as join_on_cpu
from lrc_kernels.routing import join_layers, join_layers_with_torch
from reference import ref_concat_layers


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 4), num_experts=st.integers(1, 9), num_slots=st.integers(1, 3),
       num_tokens=st.integers(0, 12), num_sequences=st.integers(1, 3), drop_prob=st.sampled_from([0.0, 0.3]),
       dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**31))
def test_join_layers_matches_reference(num_layers, num_experts, num_slots, num_tokens, num_sequences, drop_prob,
                                       dtype, seed):
    num_slots = min(num_slots, num_experts)
    ids = torch.stack([generate_trace("uniform", num_sequences, num_tokens, num_slots, num_experts,
                                      drop_prob=drop_prob, seed=seed + q) for q in range(num_layers)]).to(dtype)
    expected = ref_concat_layers(ids, num_experts)
    for join in (join_on_cpu, join_layers_with_torch, join_layers):
        stream = join(ids, num_experts)
        assert stream.dtype == dtype and stream.is_contiguous()
        assert torch.equal(stream.long(), expected), join.__name__


@pytest.mark.parametrize("join", [join_on_cpu, join_layers_with_torch])
def test_join_layers_reads_strided_ids(join):
    ids = generate_trace("sticky", 2, 6, 2, 5, drop_prob=0.2, seed=3)
    layers = torch.stack([ids, ids.flip(1)]).transpose(2, 3).contiguous().transpose(2, 3)  # strided tokens
    assert not layers.is_contiguous()
    assert torch.equal(join(layers, 5).long(), ref_concat_layers(layers.contiguous(), 5))
