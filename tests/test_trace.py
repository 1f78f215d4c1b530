"""RoutingTrace: validation naming the field, select/concat against plain loops, bit-for-bit save/load."""

import json
import os
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import generate_trace
from lrc_kernels import RoutingTrace
from lrc_kernels._meta import merged_meta


@st.composite
def traces(draw):
    """A random trace: 1-3 layers, -1 slots, random lengths with garbage beyond them, optional phases."""
    num_layers = draw(st.integers(1, 3), label="layers")
    num_experts = draw(st.integers(1, 8), label="E")
    num_slots = draw(st.integers(0, min(3, num_experts)), label="k")
    num_seqs = draw(st.integers(0, 3), label="S")
    num_tokens = draw(st.integers(0, 12), label="T")
    seed = draw(st.integers(0, 2**16), label="seed")
    topk = torch.stack([generate_trace("uniform", num_seqs, num_tokens, num_slots, num_experts, drop_prob=0.3,
                                       seed=seed + layer) for layer in range(num_layers)])
    lengths = torch.tensor(draw(st.lists(st.integers(0, num_tokens), min_size=num_seqs, max_size=num_seqs)),
                           dtype=torch.int64)
    beyond = torch.arange(num_tokens) >= lengths[:, None]
    topk = topk.masked_fill(beyond[None, :, :, None], 30000)     # never read: must not be rejected
    dtype = draw(st.sampled_from([torch.int16, torch.int32, torch.int64]), label="dtype")
    phase = None
    if draw(st.booleans(), label="has_phase"):
        generator = torch.Generator().manual_seed(seed)
        phase = torch.randint(0, 2, (num_seqs, num_tokens), generator=generator, dtype=torch.uint8)
    return RoutingTrace(topk.to(dtype), lengths, num_experts=num_experts, phase=phase,
                        layer_names=[f"model.layers.{i}.mlp.gate" for i in range(num_layers)],
                        meta={"model": "random", "seed": seed, "tags": ["a", 1.5, None]})


def assert_same_trace(a: RoutingTrace, b: RoutingTrace) -> None:
    assert a.topk.dtype == b.topk.dtype and torch.equal(a.topk, b.topk)
    assert torch.equal(a.lengths, b.lengths)
    assert (a.phase is None) == (b.phase is None)
    if a.phase is not None:
        assert a.phase.dtype == b.phase.dtype == torch.uint8 and torch.equal(a.phase, b.phase)
    assert (a.num_experts, a.layer_names, a.meta) == (b.num_experts, b.layer_names, b.meta)


@given(traces())
def test_save_load_round_trip_is_bit_for_bit(tmp_path_factory, trace):
    path = tmp_path_factory.mktemp("trace") / "routing.safetensors"
    trace.save(path)
    assert RoutingTrace.is_trace_file(path) and RoutingTrace.read_meta(path) == trace.meta
    assert_same_trace(RoutingTrace.load(path), trace)
    assert [p.name for p in path.parent.iterdir()] == ["routing.safetensors"]


def plain_select(trace: RoutingTrace, wanted: int):
    """Per-sequence lists of token rows of the wanted phase, by a loop over tokens."""
    rows = []
    for s in range(trace.num_sequences):
        rows.append([trace.topk[:, s, t].tolist() for t in range(int(trace.lengths[s]))
                     if int(trace.phase[s, t]) == wanted])
    return rows


@given(traces())
def test_select_keeps_each_phase_in_order(trace):
    if trace.phase is None:
        with pytest.raises(ValueError, match="phase: 'decode' needs a trace with per-token phases"):
            trace.select("decode")
        return
    assert trace.select("all") is trace
    for name, wanted in (("prefill", 0), ("decode", 1)):
        selected = trace.select(name)
        expected = plain_select(trace, wanted)
        assert selected.lengths.tolist() == [len(rows) for rows in expected]
        assert selected.max_tokens == max((len(rows) for rows in expected), default=0)
        for s, rows in enumerate(expected):
            assert [selected.topk[:, s, t].tolist() for t in range(len(rows))] == rows
            assert bool((selected.topk[:, s, len(rows):] == -1).all())
        assert bool((selected.phase == wanted).all()) and selected.meta["phase"] == name


def test_select_example():
    topk = torch.tensor([[[[0], [1], [2], [-1]], [[2], [2], [0], [1]]]])
    phase = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.uint8)
    trace = RoutingTrace(topk, torch.tensor([3, 3]), num_experts=3, phase=phase)
    decode = trace.select("decode")
    assert decode.lengths.tolist() == [2, 0] and decode.layer(0).tolist() == [[[1], [2]], [[-1], [-1]]]
    prefill = trace.select("prefill")
    assert prefill.lengths.tolist() == [1, 3] and prefill.layer(0).tolist() == [[[0], [-1], [-1]], [[2], [2], [0]]]


def test_concat_pads_and_merges_meta():
    a = RoutingTrace(torch.tensor([[[[0], [1]]]]), num_experts=2, meta={"model": "m", "source": "a"},
                     phase=torch.tensor([[0, 1]], dtype=torch.uint8))
    b = RoutingTrace(torch.tensor([[[[1], [0], [1]], [[0], [0], [0]]]]), torch.tensor([3, 1]), num_experts=2,
                     meta={"model": "m", "source": "b"}, phase=torch.zeros(2, 3, dtype=torch.uint8))
    both = RoutingTrace.concat([a, b])
    assert both.layer(0).tolist() == [[[0], [1], [-1]], [[1], [0], [1]], [[0], [0], [0]]]
    assert both.lengths.tolist() == [2, 3, 1]
    assert both.phase.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert both.meta == {"model": "m", "parts": [a.meta, b.meta]}
    # a concatenation stands for its parts, and equal metas are listed once: concat is associative on meta
    assert RoutingTrace.concat([both, a]).meta == RoutingTrace.concat([a, b, a]).meta == both.meta
    assert RoutingTrace.concat([a, a]).meta == a.meta
    no_phase = RoutingTrace(torch.tensor([[[[1]]]]), num_experts=2)
    assert RoutingTrace.concat([a, no_phase]).phase is None
    with pytest.raises(ValueError, match=r"traces\[1\].experts_per_layer: expected \(2,\)"):
        RoutingTrace.concat([a, RoutingTrace(torch.tensor([[[[1]]]]), num_experts=3)])
    with pytest.raises(TypeError, match="traces: expected a non-empty sequence"):
        RoutingTrace.concat([])


def test_properties_layer_access_and_per_layer_experts():
    topk = torch.tensor([[[[0, 1], [1, 0]]], [[[5, 2], [3, 4]]]])
    trace = RoutingTrace(topk, num_experts=(2, 6), layer_names=["a", "b"])
    assert (trace.n_layers, trace.num_sequences, trace.max_tokens, trace.top_k) == (2, 1, 2, 2)
    assert trace.experts_per_layer == (2, 6) and trace.experts(1) == 6 and trace.num_tokens == 2
    assert torch.equal(trace.layer(1), topk[1])
    assert trace.to("cpu").experts_per_layer == (2, 6)
    with pytest.raises(ValueError, match=r"RoutingTrace.topk\[1\]: expected expert ids in \[-1, 5\)"):
        RoutingTrace(topk, num_experts=(2, 5))
    with pytest.raises(ValueError, match=r"RoutingTrace.topk: expected .* received 5 at index \(1, 0, 0, 0\)"):
        RoutingTrace(topk, num_experts=2)


@pytest.mark.parametrize("fields, error, message", [
    (dict(topk=torch.zeros(2, 3, 1, dtype=torch.long)), ValueError, "RoutingTrace.topk: expected a 4-D tensor"),
    (dict(topk=torch.zeros(1, 2, 3, 1)), TypeError, "RoutingTrace.topk: expected a signed integer dtype"),
    (dict(num_experts=0), ValueError, r"RoutingTrace.num_experts: expected an int >= 1, received 0"),
    (dict(num_experts=[4, 4]), ValueError, r"RoutingTrace.num_experts: expected an int or 1 ints"),
    (dict(lengths=torch.tensor([1])), ValueError, r"RoutingTrace.lengths: expected shape \[S\] = \[2\]"),
    (dict(lengths=torch.tensor([1, 4])), ValueError, r"RoutingTrace.lengths: expected values in \[0, T\]"),
    (dict(topk=torch.full((1, 2, 3, 1), 4)), ValueError, r"RoutingTrace.topk: expected expert ids in \[-1, 4\)"),
    (dict(layer_names=["a", "b"]), ValueError, "RoutingTrace.layer_names: expected 1 names"),
    (dict(layer_names="a"), TypeError, "RoutingTrace.layer_names: expected a list of str"),
    (dict(phase=torch.zeros(2, 3)), TypeError, "RoutingTrace.phase: expected a torch.uint8 tensor"),
    (dict(phase=torch.zeros(2, 2, dtype=torch.uint8)), ValueError, r"RoutingTrace.phase: expected shape \[S, T\]"),
    (dict(phase=torch.full((2, 3), 2, dtype=torch.uint8)), ValueError, r"received 2 at index \(0, 0\)"),
    (dict(meta={"x": float("nan")}), TypeError, "RoutingTrace.meta: expected a dict of JSON values"),
    (dict(meta=[1]), TypeError, "RoutingTrace.meta: expected a dict of JSON values, received list"),
])
def test_bad_fields_name_the_field(fields, error, message):
    values = dict(topk=torch.zeros(1, 2, 3, 1, dtype=torch.long), num_experts=4)
    values.update(fields)
    with pytest.raises(error, match=message):
        RoutingTrace(**values)


def test_phase_beyond_lengths_is_not_checked():
    phase = torch.tensor([[0, 1, 7]], dtype=torch.uint8)
    RoutingTrace(torch.zeros(1, 1, 3, 1, dtype=torch.long), torch.tensor([2]), num_experts=1, phase=phase)


def write_safetensors(path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def test_load_rejects_files_that_are_not_traces(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a tensor file")
    with pytest.raises(ValueError, match="notes.safetensors: not a RoutingTrace file"):
        RoutingTrace.load(text)
    assert not RoutingTrace.is_trace_file(text)
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, {"topk": torch.zeros(1, 1, 1, 1, dtype=torch.long)}, {})
    assert not RoutingTrace.is_trace_file(plain) and RoutingTrace.read_meta(plain) is None
    with pytest.raises(ValueError, match="plain.safetensors: not a RoutingTrace file"):
        RoutingTrace.load(plain)
    with pytest.raises(ValueError, match="missing.safetensors: cannot read"):
        RoutingTrace.load(tmp_path / "missing.safetensors")


def header(**changes):
    fields = {"format_version": 1, "num_experts": 4, "layer_names": ["l0"], "meta": {}}
    fields.update(changes)
    return {"lrc_kernels.trace": json.dumps({k: v for k, v in fields.items() if v is not None})}


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"lengths": torch.tensor([1])}, header(), "field 'topk': missing"),
    ({"topk": torch.zeros(1, 1, 1, 1, dtype=torch.long)}, header(), "field 'lengths': missing"),
    ({"topk": torch.zeros(1, 1, 1, 1, dtype=torch.long), "lengths": torch.tensor([1])}, header(num_experts=None),
     "field 'num_experts': missing"),
    ({"topk": torch.zeros(1, 1, 1, 1, dtype=torch.long), "lengths": torch.tensor([1])}, header(format_version=9),
     "field 'format_version': expected 1, received 9"),
    ({"topk": torch.zeros(1, 1, 1, 1, dtype=torch.long), "lengths": torch.tensor([2])}, header(),
     r"RoutingTrace.lengths: expected values in \[0, T\]"),
    ({"topk": torch.zeros(1, 1, 1, 1), "lengths": torch.tensor([1])}, header(),
     "RoutingTrace.topk: expected a signed integer dtype"),
    ({"topk": torch.zeros(1, 1, 1, 1, dtype=torch.long), "lengths": torch.tensor([1])},
     {"lrc_kernels.trace": "{not json"}, "field 'lrc_kernels.trace': not valid JSON"),
])
def test_load_names_the_bad_field(tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, tensors, metadata)
    with pytest.raises(ValueError, match=message) as caught:
        RoutingTrace.load(path)
    assert str(caught.value).startswith(str(path))


def test_load_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "routing.safetensors"
    RoutingTrace(torch.arange(2).repeat(1, 4, 64, 1), num_experts=4).save(path)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8 + size + 10])
    with pytest.raises(ValueError, match="routing.safetensors: cannot read the trace's tensors"):
        RoutingTrace.load(path)


def test_failed_save_leaves_no_file(tmp_path):
    trace = RoutingTrace(torch.zeros(1, 1, 2, 1, dtype=torch.long), num_experts=1)
    with pytest.raises(FileNotFoundError):
        trace.save(tmp_path / "no-such-folder" / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_file_gets_the_umask_mode_not_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        RoutingTrace(torch.zeros(1, 1, 2, 1, dtype=torch.long), num_experts=1).save(tmp_path / "t.safetensors")
    finally:
        os.umask(mask)
    assert oct((tmp_path / "t.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_repr_summarises():
    trace = RoutingTrace(torch.zeros(2, 3, 4, 1, dtype=torch.long), torch.tensor([4, 1, 0]), num_experts=8,
                         phase=torch.zeros(3, 4, dtype=torch.uint8))
    assert repr(trace) == ("RoutingTrace(2 layers x 3 sequences x 4 tokens, top-1 of 8 experts, 5 valid tokens, "
                           "with phases)")


def test_merged_meta_keeps_what_a_merge_changed_in_its_parts():
    """The phase select() adds to a concatenation's meta survives a later merge (the parts get it)."""
    a, b = {"source": "a"}, {"source": "b"}
    decode = {**merged_meta([a, b]), "phase": "decode"}
    assert merged_meta([decode, {"source": "c", "phase": "decode"}]) == {
        "phase": "decode", "parts": [{"source": "a", "phase": "decode"}, {"source": "b", "phase": "decode"},
                                     {"source": "c", "phase": "decode"}]}
    assert merged_meta([]) == {} and merged_meta([{"parts": "not a merge"}] * 2) == {"parts": "not a merge"}
