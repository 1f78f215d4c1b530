"""lrc_kernels.analyze: the report equals the library calls it is made of, and statistics add exactly."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import lrc_kernels as lk
from conftest import generate_trace, random_lengths
from lrc_kernels import RoutingTrace, analyze, collect_statistics
from lrc_kernels.analyze import report

E, K, S, T, LAYERS = 6, 2, 7, 30, 3
SEG_LENS, B, SEED = (3, 8), 40, 5


def _trace(with_phase=False):
    topk = torch.stack([generate_trace(kind, S, T, K, E, drop_prob=0.1, seed=layer)
                        for layer, kind in enumerate(("sticky", "zipf", "uniform"))])
    lengths = random_lengths(S, T, seed=1)
    lengths[0], lengths[1] = 0, T  # a sequence without tokens (no window, no reference) and a full one
    phase = None
    if with_phase:  # a prompt of 4 + s tokens, then generated tokens
        phase = (torch.arange(T)[None, :] >= 4 + torch.arange(S)[:, None]).to(torch.uint8)
    return RoutingTrace(topk, lengths, num_experts=E, phase=phase, meta={"model": "random"})


def _same(a, b):
    """Equality that treats NaN as equal to NaN (dicts and lists of floats)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def _expected_stream(topk, num_experts, lengths, weights, model_layers=None):
    """One stream's report from the public calls: srp, cache_curve, segment_coverage, coverage_ratio."""
    srp_input, srp_experts, level = (topk, num_experts, "layer") if model_layers is None else model_layers
    expected = {"srp": {}, "cache": {}, "coverage": {}}
    for seg_len in SEG_LENS:
        score = lk.srp(srp_input, srp_experts, seg_len, level=level, lengths=lengths, weights=weights)
        expected["srp"][str(seg_len)] = score.to_dict()
    curves = {f"sch@{seg_len}": lk.cache_curve(topk, num_experts, "sch", seg_len=seg_len, lengths=lengths,
                                                weights=weights) for seg_len in SEG_LENS}
    curves.update({policy: lk.cache_curve(topk, num_experts, policy, lengths=lengths, weights=weights)
                   for policy in ("lru", "lfu", "belady")})
    for key, curve in curves.items():
        expected["cache"][key] = {"hit_rate": curve.hit_rate.tolist(), "ci_low": curve.ci_low.tolist(),
                                  "ci_high": curve.ci_high.tolist(), "hits": curve.hits.sum(0).tolist(),
                                  "references": curve.references}
    for seg_len in SEG_LENS:
        counts = lk.segment_coverage(topk, num_experts, seg_len, lengths=lengths)
        expected["coverage"][str(seg_len)] = lk.coverage_ratio(counts).tolist()
    return expected


def test_analyze_equals_the_library_calls():
    trace = _trace()
    results = analyze(trace, seg_lens=SEG_LENS, num_bootstrap=B, seed=SEED)
    weights = lk.resample_weights(S, B, torch.Generator().manual_seed(SEED))
    for index, entry in enumerate(results["layers"]):
        assert (entry["layer"], entry["name"]) == (index, f"layer{index}")
        expected = _expected_stream(trace.layer(index), E, trace.lengths, weights)
        assert _same({key: entry[key] for key in expected}, expected)
    stream = lk.concat_layers(trace.topk, E)
    expected = _expected_stream(stream, LAYERS * E, trace.lengths, weights, model_layers=(trace.topk, E, "model"))
    assert _same(results["model"], expected)
    meta = results["meta"]
    assert meta["model"] == "random" and meta["phase"] == "all" and "phases" not in results
    assert (meta["num_sequences"], meta["seq_len"], meta["num_tokens"]) == (S, T, int(trace.lengths.sum()))
    inside = (torch.arange(T) < trace.lengths[:, None])[None, ..., None]
    assert meta["references"] == int(((trace.topk >= 0) & inside).sum())
    assert (meta["num_bootstrap"], meta["seed"], meta["seg_lens"]) == (B, SEED, list(SEG_LENS))


def test_statistics_of_parts_add_up_to_one_pass():
    """Files or ranks holding consecutive sequences: the sum of their statistics reports the same numbers."""
    trace = _trace(with_phase=True)
    whole = analyze(trace, seg_lens=SEG_LENS, num_bootstrap=B, seed=SEED)
    parts = []
    for start, stop in ((0, 2), (2, 3), (3, S)):
        width = max(int(trace.lengths[start:stop].max()), 1)  # each file only as long as its longest row
        part = RoutingTrace(trace.topk[:, start:stop, :width], trace.lengths[start:stop], num_experts=E,
                            phase=trace.phase[start:stop, :width], meta=trace.meta)
        parts.append(collect_statistics(part, seg_lens=SEG_LENS))
    summed = parts[0] + parts[1] + parts[2]
    assert summed.num_sequences == S and summed.max_tokens == whole["meta"]["seq_len"]
    assert _same(report(summed, num_bootstrap=B, seed=SEED), whole)


def test_added_statistics_merge_meta_as_concatenated_traces_do():
    """Files of one workload: the sum keeps what their metas share and lists each file's meta, in any grouping,
    and its report is the one of the concatenated traces, meta included."""
    trace = _trace()
    files = [RoutingTrace(trace.topk[:, start:stop], trace.lengths[start:stop], num_experts=E,
                          meta={"model": "random", "source": f"part{start}.jsonl"})
             for start, stop in ((0, 2), (2, 3), (3, S))]
    parts = [collect_statistics(part, seg_lens=(3,), policies=("lru",)) for part in files]
    left, right = (parts[0] + parts[1]) + parts[2], parts[0] + (parts[1] + parts[2])
    assert left.meta == right.meta == {"model": "random", "parts": [part.meta for part in files]}
    whole = RoutingTrace.concat(files)
    assert _same(report(left, num_bootstrap=B), analyze(whole, seg_lens=(3,), policies=("lru",), num_bootstrap=B))


def _lru_statistics(trace, **options):
    return collect_statistics(trace, **{"seg_lens": (3,), "policies": ("lru",), **options})


@pytest.mark.parametrize("field, other", [
    ("num_experts", lambda t: _lru_statistics(RoutingTrace(t.topk, t.lengths, num_experts=E + 1))),
    ("layer_names", lambda t: _lru_statistics(RoutingTrace(t.topk, t.lengths, num_experts=E,
                                                           layer_names=["a", "b", "c"]))),
    ("top_k", lambda t: _lru_statistics(RoutingTrace(t.topk[..., :1], t.lengths, num_experts=E))),
    ("policies", lambda t: _lru_statistics(t, policies=("lfu",))),
    ("phase", lambda t: _lru_statistics(_trace(with_phase=True), phase="prefill")),
    ("phases", lambda t: _lru_statistics(_trace(with_phase=True))),   # "all" of a trace with phase marks
])
def test_statistics_of_different_models_or_options_do_not_add(field, other):
    trace = _trace()
    with pytest.raises(ValueError, match=rf"^Statistics\.{field}: expected "):
        _lru_statistics(trace) + other(trace)


def test_phases_are_the_selected_tokens_with_the_same_weights():
    trace = _trace(with_phase=True)
    results = analyze(trace, seg_lens=SEG_LENS, num_bootstrap=B, seed=SEED)
    assert sorted(results["phases"]) == ["decode", "prefill"]
    for phase in ("prefill", "decode"):
        alone = analyze(trace, seg_lens=SEG_LENS, num_bootstrap=B, seed=SEED, phase=phase)
        selected = analyze(trace.select(phase), seg_lens=SEG_LENS, num_bootstrap=B, seed=SEED)
        assert _same(results["phases"][phase], {"layers": alone["layers"], "model": alone["model"],
                                                "num_tokens": alone["meta"]["num_tokens"]})
        assert _same(alone["model"], selected["model"]) and alone["meta"]["phase"] == phase
        assert "phases" not in alone and alone["meta"]["num_sequences"] == S


@pytest.mark.parametrize("call, error, match", [
    (lambda t: analyze(t.topk), TypeError, "trace: expected a lrc_kernels.RoutingTrace"),
    (lambda t: analyze(t, seg_lens=(4, 4)), ValueError, "seg_lens: expected a non-empty sequence"),
    (lambda t: analyze(t, seg_lens=(0,)), ValueError, "seg_lens: expected an int >= 1"),
    (lambda t: analyze(t, policies=("fifo",)), ValueError, "policies: expected one of"),
    (lambda t: analyze(t, policies=()), ValueError, "policies: expected a non-empty sequence"),
    (lambda t: analyze(t, phase="generated"), ValueError, "phase: expected one of"),
    (lambda t: analyze(t, phase="decode"), ValueError, "phase"),
    (lambda t: analyze(t, num_bootstrap=5), ValueError, "num_bootstrap"),
    (lambda t: analyze(RoutingTrace(t.topk, num_experts=(6, 6, 7))), ValueError, "same number of experts"),
    (lambda t: report(t), TypeError, "statistics: expected"),
    (lambda t: collect_statistics(t, seg_lens=(3,)) + collect_statistics(t, seg_lens=(4,)), ValueError,
     r"Statistics.seg_lens: expected equal values"),
])
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(_trace())


@pytest.mark.parametrize("confidence, error", [(1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError),
                                               ("0.9", TypeError)])
def test_confidence_is_checked_without_bootstrap(confidence, error, monkeypatch):
    """report and analyze refuse a confidence outside (0, 1) with the message of the other public functions,
    also when num_bootstrap=0 draws no replicate; analyze before the metric work."""
    statistics = collect_statistics(_trace(), seg_lens=(4,), policies=("lru",))
    with pytest.raises(error) as expected:
        lk.bootstrap_indices(20, confidence)
    assert str(expected.value).startswith("confidence: expected a float in (0, 1)")
    with pytest.raises(error) as raised:
        report(statistics, num_bootstrap=0, confidence=confidence)
    assert str(raised.value) == str(expected.value)
    # analyze must fail before the metric work (lrc_kernels.analyze, the attribute, is the function)
    monkeypatch.setattr(sys.modules["lrc_kernels.analyze"], "collect_statistics", None)
    with pytest.raises(error) as raised:
        analyze(_trace(), num_bootstrap=0, confidence=confidence)
    assert str(raised.value) == str(expected.value)
