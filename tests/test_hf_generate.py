"""RoutingRecorder(accumulate=True): the trace of model.generate() and of several calls in one block.

The expected rows are rebuilt here from an independent per-step capture: every experts module's ``forward``
is wrapped (``test_hf_recorder._instrument``) and records the ids it received, call by call. This file then
assembles the rows by its own rules, with plain Python loops: step 0 (the prompt) keeps row s's tokens where
its attention mask is 1; decode step j (j >= 1) feeds the j-th generated token, which belongs to row s iff
none of its first j generated tokens is an EOS.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import hf_models  # noqa: E402
from test_hf_recorder import UNSORTED_TOPK, _instrument, _site_key, cached_model  # noqa: E402

from lrc_kernels import RoutingTrace  # noqa: E402
from lrc_kernels.hf import RoutingRecorder  # noqa: E402

GENERATE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
PROMPT, NEW_TOKENS = 6, 5
# Left padding, three prompt lengths (6, 4, 5).
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def _prompt():
    ids = torch.randint(3, hf_models.VOCAB, MASK.shape, generator=torch.Generator().manual_seed(4))
    return ids.masked_fill(MASK == 0, 0)


def _generate(model, do_sample, **kwargs):
    if do_sample:
        torch.manual_seed(11)
    return model.generate(input_ids=_prompt(), attention_mask=MASK, max_new_tokens=NEW_TOKENS,
                          do_sample=do_sample, pad_token_id=0, **kwargs)


def _early_eos(model, do_sample):
    """An EOS id that row 1 samples as its 2nd token and no other row samples in its first 4 tokens."""
    with torch.no_grad():
        generated = _generate(model, do_sample, eos_token_id=None)[:, PROMPT:]
    token = int(generated[1, 1])
    assert token not in generated[[0, 2], :4].flatten().tolist(), "pick another seed: EOS would end other rows"
    return token


def _expected_rows(family, records, sites, sequences, eos_id):
    """{site: [rows as lists of [k] lists]} and the phase of every token, by this file's rules."""
    names = [name for name, _, _ in records[:len(sites)]]
    generated = sequences[:, PROMPT:].tolist()
    rows = {site.name: [[] for _ in range(MASK.shape[0])] for site in sites}
    phases = [[] for _ in range(MASK.shape[0])]
    for step in range(len(records) // len(sites)):
        for name, ids, weights in records[step * len(sites):(step + 1) * len(sites)]:
            if family in UNSORTED_TOPK:  # slots in descending routing weight (the recorder's documented order)
                ids = ids.gather(-1, torch.sort(weights, dim=-1, descending=True, stable=True).indices)
            site = next(s for s in sites if _site_key(s.name, names) == name)
            tokens = ids.view(MASK.shape[0], -1, ids.shape[-1])
            for row in range(MASK.shape[0]):
                if step == 0:
                    kept = [t for t in range(PROMPT) if MASK[row, t] == 1]
                else:
                    kept = [0] if eos_id not in generated[row][:step] else []
                rows[site.name][row] += [tokens[row, t].tolist() for t in kept]
                if site is sites[0]:
                    phases[row] += [int(step > 0)] * len(kept)
    return rows, phases


def _assert_trace_equals(trace, rows, phases, first_row=0):
    for layer, name in enumerate(trace.layer_names):
        for row, expected in enumerate(rows[name]):
            s = first_row + row
            assert int(trace.lengths[s]) == len(expected)
            assert trace.layer(layer)[s, :len(expected)].tolist() == expected
            assert bool((trace.layer(layer)[s, len(expected):] == -1).all())
            assert trace.phase[s, :len(expected)].tolist() == phases[row]


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_generate_rows_equal_a_per_step_capture(family, do_sample):
    model = cached_model(family)
    eos_id = _early_eos(model, do_sample)
    records, restore = _instrument(family, model)
    try:
        with torch.no_grad(), RoutingRecorder(model, accumulate=True) as rec:
            sequences = _generate(model, do_sample, eos_token_id=eos_id)
    finally:
        restore()
    trace = rec.trace()
    assert isinstance(trace, RoutingTrace) and trace.layer_names == [site.name for site in rec.sites]
    assert trace.experts_per_layer == tuple(site.num_experts for site in rec.sites)
    rows, phases = _expected_rows(family, records, rec.sites, sequences, eos_id)
    _assert_trace_equals(trace, rows, phases)
    # Row 1 stopped at its EOS (its 2nd token): prompt 4 + 2 generated - 1; the others ran on.
    assert trace.lengths[1] == 4 + 1 and trace.lengths[0] == PROMPT + NEW_TOKENS - 1
    assert trace.meta["model_type"] == model.config.model_type


def test_several_calls_add_rows_and_routing_keeps_the_last_pass():
    model = cached_model("mixtral")
    records, restore = _instrument("mixtral", model)
    try:
        with torch.no_grad(), RoutingRecorder(model, accumulate=True) as rec:
            first = _generate(model, False)
            model(input_ids=_prompt(), attention_mask=MASK)
            second = _generate(model, True)
            inside = rec.trace()
    finally:
        restore()
    trace, n = rec.trace(), len(rec.sites)
    assert trace.num_sequences == 9 and torch.equal(trace.topk, inside.topk)
    steps = NEW_TOKENS  # prompt + NEW_TOKENS - 1 decode steps per generate() call
    no_eos = -1
    rows_a, phases_a = _expected_rows("mixtral", records[:steps * n], rec.sites, first, no_eos)
    _assert_trace_equals(trace, rows_a, phases_a)
    forward = records[steps * n:(steps + 1) * n]
    for layer, (name, ids, _) in enumerate(forward):
        expected = ids.view(3, PROMPT, -1).masked_fill(MASK[..., None] == 0, -1)
        assert torch.equal(trace.layer(layer)[3:6, :PROMPT], expected)
    assert trace.lengths[3:6].tolist() == [PROMPT] * 3 and not bool(trace.phase[3:6].any())
    rows_b, phases_b = _expected_rows("mixtral", records[(steps + 1) * n:], rec.sites, second, no_eos)
    _assert_trace_equals(trace, rows_b, phases_b, first_row=6)
    # routing() is the last forward pass (one decode step of the second call), also after the block.
    last = rec.routing()
    for site, (_, ids, _) in zip(rec.sites, records[-n:]):
        assert torch.equal(last[site.name], ids.view(3, 1, -1))
        assert rec.lengths()[site.name].tolist() == [1, 1, 1]
    # Each decode pass keeps its own mask column only: memory grows with tokens, not with steps x width.
    assert all(p.forward.masks["decoder"].shape == (3, 1) for p in rec._groups[0].passes[1:])


def test_reordering_generation_is_refused():
    model = cached_model("olmoe")
    with torch.no_grad(), RoutingRecorder(model, accumulate=True) as rec:
        with pytest.raises(ValueError, match="beam search"):
            _generate(model, False, num_beams=2)
        _generate(model, False)
        rec._groups[0].sequences = rec._groups[0].sequences.flip(0)  # rows no longer match what was fed
        with pytest.raises(ValueError, match="reordered or rewrote its rows"):
            rec.trace()


def test_recorder_used_after_an_exception_names_it():
    model = cached_model("qwen3_moe")
    inputs = dict(input_ids=_prompt(), attention_mask=MASK)
    with torch.no_grad(), RoutingRecorder(model, accumulate=True) as rec:
        model(**inputs)
        with pytest.raises(IndexError):
            model(input_ids=_prompt() + hf_models.VOCAB)  # ids past the embedding: the forward raises
        for call in (rec.trace, rec.routing):
            with pytest.raises(RuntimeError, match="a forward pass of the model raised an exception"):
                call()
        model(**inputs)
        assert rec.routing()  # a later good pass serves routing() again; the trace stays refused
        with pytest.raises(RuntimeError, match="incomplete"):
            rec.trace()
    with pytest.raises(KeyError):
        with torch.no_grad(), RoutingRecorder(model, accumulate=True) as second:
            model(**inputs)
            raise KeyError("stop")
    with pytest.raises(RuntimeError, match="ended with KeyError"):
        second.trace()


def test_accumulate_arguments_and_states():
    model = cached_model("mixtral")
    with pytest.raises(TypeError, match="accumulate: expected a bool"):
        RoutingRecorder(model, accumulate=1)
    with pytest.raises(ValueError, match="accumulate: .*encoder-decoder"):
        RoutingRecorder(cached_model("switch_transformers"), accumulate=True)
    with RoutingRecorder(model) as plain, torch.no_grad():
        model(input_ids=_prompt())
    with pytest.raises(RuntimeError, match="accumulate=True"):
        plain.trace()
    empty = RoutingRecorder(model, accumulate=True)
    with pytest.raises(RuntimeError, match="before entering"):
        empty.trace()
    with empty:
        with pytest.raises(RuntimeError, match="no forward pass"):
            empty.trace()
    assert "generate" not in model.__dict__  # the generate() wrapper is gone with the block
