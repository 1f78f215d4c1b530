"""CPU cache backend cases that test_cache_backends.py does not reach: a deep model-level stack and the size guard.

The property tests there draw at most 64 cache slots. At model level the stack holds ``n·E`` slots, and LRU takes
its depth from a count over all of them while the other policies walk the stack, so a few hundred slots are
checked here against the one-cache-per-size reference (a short trace keeps the reference fast).
"""

import pytest
import torch

import lrc_kernels
from conftest import generate_trace, random_lengths
from lrc_kernels.cpu import cache as cpu_cache
from reference import ref_cache_hits, ref_concat_layers

NUM_LAYERS, NUM_EXPERTS, NUM_SLOTS, NUM_TOKENS, NUM_SEQUENCES = 6, 48, 3, 40, 3


@pytest.fixture(scope="module")
def model_stream():
    """``(stream [S, T, n·k], lengths [S])``: sticky layers with dropped slots, joined layer-major."""
    layers = torch.stack([generate_trace("sticky", NUM_SEQUENCES, NUM_TOKENS, NUM_SLOTS, NUM_EXPERTS,
                                         drop_prob=0.1, seed=layer) for layer in range(NUM_LAYERS)])
    return ref_concat_layers(layers, NUM_EXPERTS), random_lengths(NUM_SEQUENCES, NUM_TOKENS, seed=4)


@pytest.mark.parametrize("lookup", ["token", "sequential"])
@pytest.mark.parametrize("free_slot_hits", [True, False], ids=["free", "cold"])
@pytest.mark.parametrize("policy, seg_len", [("lru", None), ("lfu", None), ("belady", None), ("sch", 1), ("sch", 3),
                                             ("sch", 20)], ids=["lru", "lfu", "belady", "sch1", "sch3", "sch20"])
def test_model_level_stack_matches_reference(model_stream, policy, seg_len, free_slot_hits, lookup):
    stream, lengths = model_stream
    num_slots = NUM_LAYERS * NUM_EXPERTS
    hits = lrc_kernels.cache_hits(stream, num_slots, policy, seg_len=seg_len, lengths=lengths,
                                  free_slot_hits=free_slot_hits, lookup=lookup, backend="cpu")
    expected = ref_cache_hits(stream, lengths, num_slots, policy, seg_len, free_slot_hits, lookup)
    assert torch.equal(hits, expected)


def test_slot_count_guard_names_the_limit():
    """T·k >= 2^31 slots per sequence would overflow the packed pair keys; a stride-0 view allocates nothing."""
    topk = torch.zeros(1, 1, 1, dtype=torch.int32).expand(1, 1 << 28, 8)
    lengths = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"T·k < 2\^31 .* T·k = 2147483648"):
        cpu_cache.cache_hits(topk, lengths, 8, "lfu", None, True, "token")
