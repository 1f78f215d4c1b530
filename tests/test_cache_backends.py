"""Cache hit counts: every backend equals the one-cache-per-size reference exactly, and obeys SPEC §4.

The reference (tests/reference.py) simulates one cache per size m with the SPEC §4 protocol; the backends
use the stack algorithm. Property tests compare them exactly (``assert_equal_ints`` names the first differing
index) over all four policies and both options. The Triton backend runs in the interpreter on CPU CI (~30 ms per reference), so its traces are
shorter and its examples fewer.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrc_kernels
from lrc_kernels import dispatch
from lrc_kernels._checks import check_topk
from conftest import (
    BACKENDS,
    EXAMPLE_A,
    EXAMPLE_B,
    EXAMPLE_C,
    EXAMPLE_C_LENGTHS,
    LAYOUTS,
    TraceCase,
    assert_equal_ints,
    backend_device,
    call_backend,
    generate_trace,
    relayout,
    relayout_lengths,
    routing_traces,
)
from reference import ref_cache_hits, ref_concat_layers

POLICIES = ("lru", "lfu", "belady", "sch")
LOOKUPS = ("token", "sequential")


def cache_cases(**sizes):
    """``(trace, policy, free_slot_hits, lookup)``; SCH uses the trace's L (1..T+5) as its look-ahead."""
    return st.tuples(routing_traces(**sizes), st.sampled_from(POLICIES), st.booleans(), st.sampled_from(LOOKUPS))


def library_hits(trace, policy, free_slot_hits=True, lookup="token", backend="cpu"):
    topk, lengths, num_experts, seg_len = trace
    return call_backend(lrc_kernels.cache_hits, topk, num_experts, policy, lengths=lengths, backend=backend,
                        seg_len=seg_len if policy == "sch" else None, free_slot_hits=free_slot_hits, lookup=lookup)


def check_against_reference(case, backend):
    trace, policy, free_slot_hits, lookup = case
    topk, lengths, num_experts, seg_len = trace
    expected = ref_cache_hits(topk, lengths, num_experts, policy, seg_len if policy == "sch" else None,
                              free_slot_hits, lookup)
    hits = library_hits(trace, policy, free_slot_hits, lookup, backend)
    assert hits.dtype == torch.int64
    assert_equal_ints(hits, expected)


def references_and_distinct(topk, lengths):
    """``(N_s, D_s)`` per sequence: valid references and distinct experts inside each length."""
    counts = []
    for s, rows in enumerate(topk.tolist()):
        valid_length = len(rows) if lengths is None else int(lengths[s])
        ids = [e for row in rows[:valid_length] for e in row if e != -1]
        counts.append((len(ids), len(set(ids))))
    return counts


@settings(max_examples=80, deadline=None)
@given(cache_cases(max_e=64, max_k=8, max_t=200, max_s=2))
def test_cache_hits_cpu(case):
    check_against_reference(case, "cpu")


@settings(max_examples=20, deadline=None)
@given(cache_cases(max_e=64, max_k=4, max_t=40, max_s=3))
def test_cache_hits_triton(case):
    check_against_reference(case, "triton")


# distinct (policy, seg_len) pairs, as a caller with several caches of one stream passes them
CACHE_SETS = st.lists(st.sampled_from([("lru", None), ("lfu", None), ("belady", None), ("sch", 1), ("sch", 3),
                                       ("sch", 40)]), min_size=1, max_size=5, unique=True)


def check_caches_of_one_stream(trace, caches, free_slot_hits, lookup, backend):
    """``dispatch.run_caches`` on one validated stream gives each cache's reference hits, in the given order."""
    topk, lengths, num_experts, _ = trace
    device = backend_device(backend)
    ids, ids_lengths, _ = check_topk(topk.to(device), num_experts,
                                     lengths=None if lengths is None else lengths.to(device))
    several = dispatch.run_caches(backend, ids, ids_lengths, num_experts, caches, free_slot_hits, lookup)
    assert len(several) == len(caches)
    for (policy, seg_len), hits in zip(caches, several):
        assert hits.dtype == torch.int64 and hits.device.type == device.type
        assert_equal_ints(hits.cpu(), ref_cache_hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits,
                                                     lookup))


@settings(max_examples=40, deadline=None)
@given(routing_traces(max_e=64, max_k=8, max_t=120, max_s=3), CACHE_SETS, st.booleans(), st.sampled_from(LOOKUPS))
def test_caches_of_one_stream_in_one_call_cpu(trace, caches, free_slot_hits, lookup):
    check_caches_of_one_stream(trace, caches, free_slot_hits, lookup, "cpu")


@settings(max_examples=6, deadline=None)
@given(routing_traces(max_e=16, max_k=3, max_t=24, max_s=2), CACHE_SETS, st.booleans(), st.sampled_from(LOOKUPS))
def test_caches_of_one_stream_in_one_call_triton(trace, caches, free_slot_hits, lookup):
    check_caches_of_one_stream(trace, caches, free_slot_hits, lookup, "triton")


def test_caches_split_between_backends_come_back_in_order(monkeypatch):
    """Where the backend differs per cache, each backend runs its caches in one call and the order holds."""
    monkeypatch.setattr(dispatch, "choose_backend", lambda op, backend, topk, num_experts, policy=None:
                        dispatch.BackendChoice("triton" if policy in ("lru", "belady") else "cpu"))
    calls = []
    real_call = dispatch._call
    monkeypatch.setattr(dispatch, "_call", lambda chosen, op, *args: calls.append((chosen, op, args[-3])) or
                        real_call(chosen, op, *args))
    trace = (EXAMPLE_B, None, 4, None)
    caches = [("sch", 2), ("lru", None), ("lfu", None), ("belady", None)]
    check_caches_of_one_stream(trace, caches, True, "token", "cpu")
    assert calls == [("cpu", "cache_hits_many", [("sch", 2), ("lfu", None)]),
                     ("triton", "cache_hits_many", [("lru", None), ("belady", None)])]


CPU_TRACE_CASES = [
    TraceCase("sticky", 64, 8, 200, 16, 0.9),
    TraceCase("zipf", 64, 8, 150, 4, 1.2, drop_prob=0.2, with_lengths=True),
    TraceCase("phased", 32, 4, 120, 8, 12),
    TraceCase("cyclic", 16, 4, 100, 3, 9),
]
TRITON_TRACE_CASES = [
    TraceCase("sticky", 64, 8, 16, 4, 0.9, drop_prob=0.2, with_lengths=True),
    TraceCase("zipf", 16, 4, 24, 6, 1.2, num_sequences=3),
]
NAMED_CASES = [
    pytest.param(backend, case, policy, lookup, id=f"{backend}-{case}-{policy}-{lookup}")
    for backend, cases in (("cpu", CPU_TRACE_CASES), ("triton", TRITON_TRACE_CASES))
    for case in cases for policy in POLICIES for lookup in LOOKUPS
]


@pytest.mark.slow
@pytest.mark.parametrize("backend, case, policy, lookup", NAMED_CASES)
def test_named_traces(backend, case, policy, lookup):
    check_against_reference((case.build(), policy, True, lookup), backend)


# --------------------------------------------------------------------------------------- SPEC examples

SPEC_EXAMPLES = [  # (example, topk, lengths, policy, seg_len, free_slot_hits, lookup, hits); SPEC §8 tables
    ("A", EXAMPLE_A, None, "lru", None, True, "token", [[2, 3, 6, 8]]),
    ("A", EXAMPLE_A, None, "lfu", None, False, "token", [[1, 2, 3, 4]]),
    ("A", EXAMPLE_A, None, "sch", 2, True, "sequential", [[2, 5, 6, 8]]),
    ("A", EXAMPLE_A, None, "sch", 8, True, "token", [[2, 4, 7, 8]]),
    ("A", EXAMPLE_A, None, "belady", None, False, "token", [[1, 3, 4, 4]]),
    ("B", EXAMPLE_B, None, "lru", None, True, "sequential", [[1, 2, 9, 12]]),
    ("B", EXAMPLE_B, None, "lfu", None, True, "sequential", [[1, 2, 8, 12]]),
    ("B", EXAMPLE_B, None, "belady", None, True, "token", [[1, 6, 10, 12]]),
    ("B", EXAMPLE_B, None, "sch", 2, True, "token", [[1, 7, 10, 12]]),
    ("B", EXAMPLE_B, None, "sch", 2, False, "token", [[0, 5, 7, 8]]),
    ("B", EXAMPLE_B, None, "sch", 2, True, "sequential", [[1, 5, 10, 12]]),
    ("C", EXAMPLE_C, EXAMPLE_C_LENGTHS, "sch", 2, True, "token", [[2, 3, 5, 5], [2, 5, 5, 5]]),
    ("C", EXAMPLE_C, EXAMPLE_C_LENGTHS, "sch", 3, True, "token", [[2, 4, 5, 5], [2, 5, 5, 5]]),
    ("C", EXAMPLE_C, EXAMPLE_C_LENGTHS, "belady", None, True, "token", [[2, 4, 5, 5], [2, 5, 5, 5]]),
    ("C", EXAMPLE_C, EXAMPLE_C_LENGTHS, "lru", None, False, "token", [[1, 1, 2, 2], [1, 3, 3, 3]]),
    ("C", EXAMPLE_C, None, "lru", None, True, "token", [[2, 3, 5, 5], [2, 5, 6, 7]]),
]


def spec_example_id(example, topk, lengths, policy, seg_len, free_slot_hits, lookup, hits):
    lengths_note = "" if lengths is not None or example != "C" else "-ignoring-lengths"
    return f"{example}-{policy}{seg_len or ''}-{lookup}{'' if free_slot_hits else '-cold'}{lengths_note}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("example, topk, lengths, policy, seg_len, free_slot_hits, lookup, expected",
                         [pytest.param(*row, id=spec_example_id(*row)) for row in SPEC_EXAMPLES])
def test_spec_examples(example, topk, lengths, policy, seg_len, free_slot_hits, lookup, expected, backend):
    hits = call_backend(lrc_kernels.cache_hits, topk, 4, policy, seg_len=seg_len, lengths=lengths,
                        free_slot_hits=free_slot_hits, lookup=lookup, backend=backend)
    assert hits.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk, lengths", [(EXAMPLE_A, None), (EXAMPLE_B, None), (EXAMPLE_C, EXAMPLE_C_LENGTHS)],
                         ids=["A", "B", "C"])
def test_spec_example_tables(topk, lengths, backend):
    """Every policy and option on Examples A-C equals the reference, which test_reference.py pins to SPEC §8."""
    for policy, seg_len in [("lru", None), ("lfu", None), ("belady", None), ("sch", 1), ("sch", 2), ("sch", 8)]:
        for free_slot_hits in (True, False):
            for lookup in LOOKUPS:
                hits = call_backend(lrc_kernels.cache_hits, topk, 4, policy, seg_len=seg_len, lengths=lengths,
                                    free_slot_hits=free_slot_hits, lookup=lookup, backend=backend)
                expected = ref_cache_hits(topk, lengths, 4, policy, seg_len, free_slot_hits, lookup)
                assert_equal_ints(hits, expected, f"{policy} L={seg_len} free_slot_hits={free_slot_hits} {lookup}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lookup, expected", [("token", [3, 4, 6, 8]), ("sequential", [1, 4, 6, 8])])
def test_model_level_stream(lookup, expected, backend):
    """SPEC §6: two layers, E = 2, k = 1, joined into one stream with 4 cache slots."""
    layers = torch.tensor([[[[0], [1], [0], [1]]], [[[1], [1], [0], [0]]]])
    stream = lrc_kernels.concat_layers(layers, 2)
    assert torch.equal(stream.long(), ref_concat_layers(layers, 2))
    assert call_backend(lrc_kernels.cache_hits, stream, 4, "lru", lookup=lookup, backend=backend).tolist() == [expected]


# ------------------------------------------------------------------------------------ SPEC §4 invariants

def check_invariants(trace, backend):
    """Every SPEC §4 invariant on one trace, for all policies and both options."""
    topk, lengths, num_experts, seg_len = trace
    hits = {(policy, free, lookup): library_hits(trace, policy, free, lookup, backend)
            for policy in POLICIES for free in (True, False) for lookup in LOOKUPS}
    sizes = torch.arange(1, num_experts + 1)
    for s, (num_refs, num_distinct) in enumerate(references_and_distinct(topk, lengths)):
        for (policy, free, lookup), table in hits.items():
            row = table[s]
            assert bool((row.diff() >= 0).all()), f"{policy} {lookup} free={free}: hits decrease in m: {row}"
            assert int(row[-1]) == (num_refs if free else num_refs - num_distinct)
            if free:
                assert bool((row[max(num_distinct, 1) - 1:] == num_refs).all()), f"{policy} {lookup}: m >= D_s"
                cold = hits[(policy, False, lookup)][s]
                assert torch.equal(cold, row - sizes.clamp(max=num_distinct)), f"{policy} {lookup} cold"
                assert bool((hits[(policy, True, "sequential")][s] <= hits[(policy, True, "token")][s]).all())
        for free in (True, False):
            for lookup in LOOKUPS:
                first = {int(hits[(policy, free, lookup)][s, 0]) for policy in POLICIES}
                assert len(first) == 1, f"m = 1 differs between policies ({lookup}, free={free}): {first}"
            belady = hits[("belady", free, "sequential")][s]
            for policy in ("lru", "lfu", "sch"):
                other = hits[(policy, free, "sequential")][s]
                assert bool((belady >= other).all()), f"sequential Belady {belady} < {policy} {other}"
    if topk.shape[-1] == 1:
        for policy in POLICIES:
            assert torch.equal(hits[(policy, True, "token")], hits[(policy, True, "sequential")])


@settings(max_examples=40, deadline=None)
@given(routing_traces(max_e=24, max_k=6, max_t=60, max_s=2))
def test_invariants_cpu(trace):
    check_invariants(trace, "cpu")


@settings(max_examples=5, deadline=None)
@given(routing_traces(max_e=12, max_k=3, max_t=10, max_s=2))
def test_invariants_triton(trace):
    check_invariants(trace, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lookup", LOOKUPS)
@pytest.mark.parametrize("kind", ["uniform", "sticky", "cyclic"])
def test_sch_lookahead_one_is_lru_for_one_slot(kind, lookup, backend):
    """With k = 1 the look-ahead of SCH(1) is empty, so LRU decides every eviction (SPEC §4)."""
    topk = generate_trace(kind, 2, 30, 1, 7, drop_prob=0.2, seed=3)
    trace = (topk, None, 7, 1)
    assert_equal_ints(library_hits(trace, "sch", lookup=lookup, backend=backend),
                       library_hits(trace, "lru", lookup=lookup, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_full_rows_hit_m_per_token(policy, backend):
    """k = E without -1: every cache size m hits m·T_s under token lookup (SPEC §4, §9)."""
    generator = torch.Generator().manual_seed(5)
    topk = torch.stack([torch.randperm(6, generator=generator) for _ in range(2 * 15)]).reshape(2, 15, 6)
    lengths = torch.tensor([15, 9])
    hits = library_hits((topk, lengths, 6, 4), policy, backend=backend)
    assert torch.equal(hits, lengths[:, None] * torch.arange(1, 7))


# ------------------------------------------------------------------------------- layouts and edge cases

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_dtypes(layout, backend):
    topk, lengths, num_experts, seg_len = TraceCase("sticky", 12, 3, 10, 3, 0.9, num_sequences=3, drop_prob=0.2,
                                                    with_lengths=True).build()
    view = relayout(topk.to(backend_device(backend)), layout)
    view_lengths = relayout_lengths(lengths.to(view.device), view.shape[0])
    for policy in ("sch", "belady"):
        hits = library_hits((view, view_lengths, num_experts, seg_len), policy, backend=backend)
        contiguous = library_hits((view.contiguous().long(), view_lengths.contiguous().long(), num_experts,
                                   seg_len), policy, backend=backend)
        assert_equal_ints(hits, contiguous)
        assert_equal_ints(hits, ref_cache_hits(view.cpu(), view_lengths.cpu(), num_experts, policy,
                                                seg_len if policy == "sch" else None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sequence_input(backend):
    topk, _, num_experts, seg_len = TraceCase("zipf", 10, 3, 20, 4, 1.2, num_sequences=1, drop_prob=0.2).build()
    for policy in POLICIES:
        hits = call_backend(lrc_kernels.cache_hits, topk[0], num_experts, policy,
                            seg_len=seg_len if policy == "sch" else None, backend=backend)
        assert_equal_ints(hits, ref_cache_hits(topk, None, num_experts, policy, seg_len)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, lengths", [
    ((0, 5, 2), None), ((2, 0, 2), None), ((2, 5, 0), None), ((2, 6, 2), torch.tensor([0, 6])),
], ids=["no-sequence", "no-token", "k0", "length0"])
def test_degenerate_shapes(shape, lengths, backend):
    """SPEC §9: S = 0, T = 0, k = 0 and an empty sequence give zero hits (and shape [S, E])."""
    topk = torch.arange(shape[0] * shape[1] * shape[2]).remainder(2).reshape(shape)
    topk[..., 1:] += 2  # slot 0 holds 0 or 1, slot 1 holds 2 or 3: no duplicate in a row
    for policy in POLICIES:
        for free in (True, False):
            for lookup in LOOKUPS:
                check_against_reference(((topk, lengths, 4, 3), policy, free, lookup), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_all_minus_one_and_single_expert(policy, backend):
    """All -1 gives no reference; E = 1 hits every repeat (SPEC §9)."""
    empty = (torch.full((2, 6, 3), -1), None, 5, 2)
    assert library_hits(empty, policy, backend=backend).tolist() == [[0] * 5, [0] * 5]
    single = (torch.tensor([[[0], [-1], [0], [0]]]), None, 1, 2)
    assert library_hits(single, policy, backend=backend).tolist() == [[3]]
    assert library_hits(single, policy, free_slot_hits=False, backend=backend).tolist() == [[2]]
