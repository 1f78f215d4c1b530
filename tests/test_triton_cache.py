"""Triton cache hit counts (lrc_kernels/triton/cache.py) against the SPEC examples and the reference.

Both kernels are checked: the register-stack kernel and the chunked global-memory kernel (forced with
``stack="chunked"`` and tiny chunks, so a push-down spans several chunks and carries its running minimum).
Without CUDA they run under the Triton interpreter on CPU tensors; sizes stay small because the interpreter
pays ~0.3 ms per stack lane per reference for the prefix-min scan.
"""

import random

import pytest
import torch

from conftest import EXAMPLE_A, EXAMPLE_B, EXAMPLE_C, TRITON_DEVICE as DEVICE, assert_compiles_for_sm90

triton_cache = pytest.importorskip("lrc_kernels.triton.cache")
from reference import ref_cache_hits  # noqa: E402

STACKS = [pytest.param({"stack": "registers"}, id="registers"),
          pytest.param({"stack": "chunked", "chunk": 2}, id="chunked2")]
OPTIONS = [(free, lookup) for free in (True, False) for lookup in ("token", "sequential")]


def _topk(rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def _lengths(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def _hits(topk, lengths, num_experts, policy, seg_len=None, free_slot_hits=True, lookup="token", **stack):
    hits = triton_cache.cache_hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits, lookup, **stack)
    assert hits.dtype == torch.int64 and hits.device == topk.device
    return hits.cpu().tolist()


# (trace, lengths, policy, seg_len, free_slot_hits, lookup, hits) straight from the SPEC tables
SPEC_CASES = [
    # §8 Example A (k = 1: token and sequential lookup agree)
    ("A", [8], "lru", None, True, "token", [[2, 3, 6, 8]]),
    ("A", [8], "lru", None, False, "sequential", [[1, 1, 3, 4]]),
    ("A", [8], "lfu", None, True, "token", [[2, 4, 6, 8]]),
    ("A", [8], "lfu", None, False, "token", [[1, 2, 3, 4]]),
    ("A", [8], "sch", 2, True, "sequential", [[2, 5, 6, 8]]),
    ("A", [8], "sch", 2, False, "token", [[1, 3, 3, 4]]),
    ("A", [8], "sch", 1, True, "token", [[2, 3, 6, 8]]),
    ("A", [8], "sch", 8, True, "token", [[2, 4, 7, 8]]),
    ("A", [8], "belady", None, True, "token", [[2, 5, 7, 8]]),
    ("A", [8], "belady", None, False, "token", [[1, 3, 4, 4]]),
    # §8 Example B
    ("B", [6], "lru", None, True, "token", [[1, 6, 9, 12]]),
    ("B", [6], "lru", None, True, "sequential", [[1, 2, 9, 12]]),
    ("B", [6], "lru", None, False, "token", [[0, 4, 6, 8]]),
    ("B", [6], "lfu", None, True, "token", [[1, 5, 9, 12]]),
    ("B", [6], "lfu", None, True, "sequential", [[1, 2, 8, 12]]),
    ("B", [6], "lfu", None, False, "token", [[0, 3, 6, 8]]),
    ("B", [6], "belady", None, True, "token", [[1, 6, 10, 12]]),
    ("B", [6], "belady", None, True, "sequential", [[1, 6, 10, 12]]),
    ("B", [6], "belady", None, False, "token", [[0, 4, 7, 8]]),
    ("B", [6], "sch", 2, True, "token", [[1, 7, 10, 12]]),
    ("B", [6], "sch", 2, True, "sequential", [[1, 5, 10, 12]]),
    ("B", [6], "sch", 2, False, "token", [[0, 5, 7, 8]]),
    # §8 Example C: -1 slots, an empty token inside the SCH look-ahead, a row past the length
    ("C", [4, 3], "lru", None, True, "token", [[2, 3, 5, 5], [2, 5, 5, 5]]),
    ("C", [4, 3], "lfu", None, True, "token", [[2, 3, 5, 5], [2, 5, 5, 5]]),
    ("C", [4, 3], "sch", 2, True, "token", [[2, 3, 5, 5], [2, 5, 5, 5]]),
    ("C", [4, 3], "sch", 3, True, "token", [[2, 4, 5, 5], [2, 5, 5, 5]]),
    ("C", [4, 3], "belady", None, True, "token", [[2, 4, 5, 5], [2, 5, 5, 5]]),
    ("C", [4, 3], "lru", None, False, "token", [[1, 1, 2, 2], [1, 3, 3, 3]]),
    # §6 model-level stream of E = 2, k = 1 layers A = 0,1,0,1 and B = 1,1,0,0
    ("model", [4], "lru", None, True, "token", [[3, 4, 6, 8]]),
    ("model", [4], "lru", None, True, "sequential", [[1, 4, 6, 8]]),
]
TRACES = {"A": EXAMPLE_A.tolist(), "B": EXAMPLE_B.tolist(), "C": EXAMPLE_C.tolist(), "model": [[[0, 3], [1, 3], [0, 2], [1, 2]]]}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("case", SPEC_CASES,
                         ids=[f"{c[0]}-{c[2]}{c[3] or ''}-{'free' if c[4] else 'cold'}-{c[5]}" for c in SPEC_CASES])
def test_spec_examples(case, stack):
    trace, lengths, policy, seg_len, free_slot_hits, lookup, expected = case
    assert _hits(_topk(TRACES[trace]), _lengths(lengths), 4, policy, seg_len, free_slot_hits, lookup,
                 **stack) == expected


def _random_trace(rng, num_experts, max_slots=4, max_sequences=3, max_tokens=6):
    """Random sticky ``[S, T, k]`` trace: distinct valid ids per row, some -1 slots, random lengths."""
    num_slots = rng.randint(1, min(num_experts, max_slots))
    num_sequences = rng.randint(1, max_sequences)
    num_tokens = rng.randint(1, max_tokens)
    hot = rng.randint(1, num_experts)
    rows = [[[e if rng.random() >= 0.2 else -1
              for e in list(dict.fromkeys(rng.sample(range(hot), min(num_slots, hot)) +
                                          rng.sample(range(num_experts), num_slots)))[:num_slots]]
             for _ in range(num_tokens)] for _ in range(num_sequences)]
    lengths = [rng.randint(0, num_tokens) if rng.random() < 0.4 else num_tokens for _ in range(num_sequences)]
    return _topk(rows), _lengths(lengths)


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("policy", ["lru", "lfu", "sch", "belady"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_traces_match_reference(seed, policy, stack):
    rng = random.Random(f"{seed}-{policy}")
    num_experts = rng.choice([1, 3, 5, 8, 13])
    topk, lengths = _random_trace(rng, num_experts)
    seg_len = rng.randint(1, topk.shape[1] + 2) if policy == "sch" else None
    for free_slot_hits, lookup in OPTIONS:
        expected = ref_cache_hits(topk.cpu(), lengths.cpu(), num_experts, policy, seg_len, free_slot_hits, lookup)
        assert _hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits, lookup, **stack) == \
            expected.tolist(), (free_slot_hits, lookup)


@pytest.mark.parametrize("policy", ["lru", "lfu", "sch", "belady"])
def test_chunked_stack_beyond_register_lanes(policy):
    """E = 300 (E_PAD = 512 > REGISTER_STACK_MAX_LANES): stack="auto" picks the chunked kernel, ids up to
    299 fill the 9 id bits of a packed slot, and 4-lane chunks make push-downs cross chunks."""
    rng = random.Random(policy)
    topk, lengths = _random_trace(rng, 300, max_slots=3, max_sequences=1, max_tokens=5)
    seg_len = 2 if policy == "sch" else None
    for free_slot_hits, lookup in OPTIONS:
        expected = ref_cache_hits(topk.cpu(), lengths.cpu(), 300, policy, seg_len, free_slot_hits, lookup)
        assert _hits(topk, lengths, 300, policy, seg_len, free_slot_hits, lookup, chunk=4) == expected.tolist()


@pytest.mark.parametrize("stack", STACKS)
def test_empty_shapes(stack):
    for shape in [(0, 3, 2), (2, 0, 2), (2, 3, 0)]:
        topk = torch.zeros(shape, dtype=torch.int32, device=DEVICE)
        hits = triton_cache.cache_hits(topk, _lengths([shape[1]] * shape[0]), 5, "lru", None, True, "token",
                                       **stack)
        assert hits.shape == (shape[0], 5) and hits.dtype == torch.int64 and not hits.any()


@pytest.mark.parametrize("stack", STACKS)
def test_section9_edge_cases(stack):
    # k = E without -1: hits(m) = m * T_s under token lookup, for every policy (SPEC §4 invariants)
    full = _topk([[[2, 0, 1], [1, 2, 0], [0, 1, 2]]])
    for policy, seg_len in [("lru", None), ("lfu", None), ("sch", 2), ("belady", None)]:
        assert _hits(full, _lengths([3]), 3, policy, seg_len, **stack) == [[3, 6, 9]]
    # E = 1: hits(1) = N_s, or N_s - 1 cold; all -1 or length 0: no reference, no hit
    single = _topk([[[0], [-1], [0], [0]], [[-1], [-1], [-1], [-1]], [[0], [0], [0], [0]]])
    assert _hits(single, _lengths([4, 4, 0]), 1, "belady", **stack) == [[3], [0], [0]]
    assert _hits(single, _lengths([4, 4, 0]), 1, "lfu", None, False, "sequential", **stack) == [[2], [0], [0]]


def test_next_use_times_example_c():
    """Sequence 0 of SPEC Example C has references 0:0 1:1 2:2 3:0 4:2 (N = 5), sequence 1 (length 3) has
    0:3 1:2 2:3 3:2 4:3; a last use gets N + 1 + id."""
    next_use = triton_cache.next_use_times(_topk(EXAMPLE_C.tolist()), _lengths([4, 3]), 4).cpu()
    assert next_use[0, 0].tolist() == [3, 6 + 1]
    assert next_use[0, 1, 1].item() == 4 and next_use[0, 3].tolist() == [6 + 0, 6 + 2]
    assert next_use[1, 0].tolist() == [2, 3] and next_use[1, 1, 0].item() == 4
    assert next_use[1, 2].tolist() == [6 + 2, 6 + 3]


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lrc_kernels.triton import cache

common = {"topk_ptr": "*i32", "lengths_ptr": "*i64", "next_use_ptr": "*i64", "at_depth_ptr": "*i64",
          "max_tokens": "i32", "num_slots": "i32", "num_experts": "i32", "seg_len": "i32", "log_b": "i32",
          "POLICY": "constexpr", "TOKEN_LOOKUP": "constexpr", "FREE_SLOT_HITS": "constexpr",
          "K_PAD": "constexpr", "E_PAD": "constexpr", "LOG_E_PAD": "constexpr"}
kernels = [
    (cache._cache_depth_register_kernel, {**common, "num_sequences": "i32", "BLOCK_S": "constexpr"},
     {"BLOCK_S": 1, "K_PAD": 8, "E_PAD": 128, "LOG_E_PAD": 7}, 1),
    (cache._cache_depth_chunked_kernel, {**common, "stack_ptr": "*i64", "slot_of_ptr": "*i32",
                                         "lookahead_ptr": "*i64", "CHUNK": "constexpr"},
     {"K_PAD": 512, "E_PAD": 8192, "LOG_E_PAD": 13, "CHUNK": 1024}, 8),
]
for kernel, signature, sizes, num_warps in kernels:
    signature = {name: signature[name] for name in kernel.arg_names}
    for policy, token_lookup in [(2, True), (1, False), (3, True)]:
        constexprs = {"POLICY": policy, "TOKEN_LOOKUP": token_lookup, "FREE_SLOT_HITS": False, **sizes}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (non-constexpr globals, loop-carried values
    changing type); compile both kernels ahead of time for an H100/H200 (sm_90) with Triton's bundled
    ptxas, no GPU needed."""
    assert_compiles_for_sm90(_COMPILE_FOR_SM90)


@pytest.mark.parametrize("launcher", ["_at_depth_register", "_at_depth_chunked"])
def test_wide_keys_near_62_bits(launcher):
    """Any B = 2**log_b above every time works; the widest B the key check allows puts packed values near
    2^62, where a 32-bit intermediate anywhere in the key arithmetic would overflow."""
    topk, lengths = _topk(EXAMPLE_B.tolist()), _lengths([6])
    log_e_pad = 2
    for policy, seg_len, expected in [("lfu", None, [1, 5, 9, 12]), ("sch", 2, [1, 7, 10, 12]),
                                      ("belady", None, [1, 6, 10, 12]), ("lru", None, [1, 6, 9, 12])]:
        log_b = (62 - log_e_pad) // 2 if policy in ("lfu", "sch") else 62 - log_e_pad - 1
        next_use = triton_cache.next_use_times(topk, lengths, 4) if policy == "belady" else topk
        at_depth = getattr(triton_cache, launcher)(topk, lengths, next_use, 4, policy, seg_len, True, True, log_b, 4)
        assert at_depth.cumsum(1).cpu().tolist() == [expected], policy
