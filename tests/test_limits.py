"""Arguments that imply wrong numbers, overflow or unbounded work are refused up front, naming the argument.

Each case is a reproducer from issue 13: before the fix it returned a wrong number, hung, or asked for
gigabytes; now it gives the exact answer or a ``ValueError``/``TypeError`` naming the argument.
"""

import time

import pytest
import torch

import lrc_kernels as lk
from lrc_kernels._checks import MAX_EXPERTS
from lrc_kernels.bootstrap import bootstrap_indices
from lrc_kernels.srp import weighted_sum

TOPK = torch.tensor([[[0, 1], [2, 3], [1, 0], [3, 2]]] * 3)  # [3, 4, 2], E = 4
HUGE = 10 ** 12  # far beyond any machine's memory once multiplied by S·E·8 bytes

REFUSED = [
    # exactness: int64 products of the score, weights whose float64 sums would round or wrap
    ("score-overflow", lambda: lk.srp_score(torch.tensor([0, 0, 0, 0, 2 ** 61])), ValueError, "counts: expected 2"),
    ("zero-weight-column-srp", lambda: lk.srp(TOPK, 4, 2, weights=torch.zeros(3, 20, dtype=torch.int64)),
     ValueError, "weights: expected every replicate"),
    ("zero-weight-column-cache", lambda: lk.cache_curve(TOPK, 4, "lru", weights=torch.zeros(3, 20, dtype=torch.int64)),
     ValueError, "weights: expected every replicate"),
    ("weights-2^50", lambda: lk.srp(TOPK, 4, 2, weights=torch.full((3, 20), 2 ** 50)), ValueError,
     "weights: expected column total x largest count below 2^53"),
    ("weights-2^51", lambda: lk.srp(TOPK, 4, 2, weights=torch.full((3, 20), 2 ** 51)), ValueError,
     "weights: expected column totals below 2^52"),
    ("weights-2^51-cache", lambda: lk.cache_curve(TOPK, 4, "lru", weights=torch.full((3, 20), 2 ** 51)), ValueError,
     "weights: expected column totals below 2^52"),
    ("negative-coverage", lambda: lk.coverage_ratio(torch.tensor([-1, 2])), ValueError, "coverage: expected non-negative"),
    ("0-d-coverage", lambda: lk.coverage_ratio(torch.tensor(3)), ValueError, "coverage: expected shape [..., E]"),
    # ints beyond int64 and beyond the expert-table bound
    ("experts-2^31", lambda: lk.srp(TOPK, 2 ** 31, 2), ValueError, f"num_experts: expected an int <= {MAX_EXPERTS}"),
    ("experts-2^63", lambda: lk.cache_hits(TOPK, 2 ** 63, "lru"), ValueError, "num_experts: expected an int <="),
    ("experts-2^64", lambda: lk.segment_coverage(TOPK, 2 ** 64, 2), ValueError, "num_experts: expected an int <="),
    ("seg-len-2^64", lambda: lk.cache_hits(TOPK, 4, "sch", seg_len=2 ** 64), ValueError,
     "seg_len: expected an int <= 9223372036854775807"),
    ("bootstrap-2^64", lambda: lk.srp(TOPK, 4, 2, num_bootstrap=2 ** 64), ValueError, "num_bootstrap: expected an int <="),
    ("5000-digit-int", lambda: lk.srp(TOPK, 4, 10 ** 5000), ValueError, "received an int of 16610 bits"),
    # memory the arguments imply
    ("seg-len-histograms", lambda: lk.srp_counts(TOPK, 4, HUGE), ValueError, "seg_len: histograms [S, E, L+1]"),
    ("seg-len-srp", lambda: lk.srp(TOPK, 4, HUGE, level="expert"), ValueError, "seg_len: per-sequence histograms [S, E, L+1]"),
    ("seg-len-model", lambda: lk.srp(TOPK[None], 4, HUGE, level="model"), ValueError, "seg_len: per-sequence"),
    ("bootstrap-weights", lambda: lk.resample_weights(1000, HUGE), ValueError, "num_bootstrap: bootstrap weights"),
    ("poisson-weights", lambda: lk.poisson_weights(1000, HUGE), ValueError, "num_bootstrap: Poisson weights"),
    ("srp-bootstrap", lambda: lk.srp(TOPK, 4, 2, num_bootstrap=HUGE), ValueError, "num_bootstrap:"),
    # inputs that are not plain routing tensors
    ("meta-topk", lambda: lk.srp(TOPK.to("meta"), 4, 2), TypeError, "topk: expected a tensor with data"),
    ("sparse-topk", lambda: lk.cache_hits(TOPK.to_sparse(), 4, "lru"), TypeError, "topk: expected a dense"),
    ("meta-lengths", lambda: lk.srp(TOPK, 4, 2, lengths=torch.tensor([4, 4, 4], device="meta")), TypeError,
     "lengths: expected a tensor with data"),
    ("empty-list-model", lambda: lk.srp([], 4, 2, level="model"), ValueError, "topk: expected at least one layer"),
    ("unequal-list-model", lambda: lk.srp([TOPK, TOPK[:, :2]], 4, 2, level="model"), ValueError, "equal shape"),
    ("unequal-list-positionwise", lambda: lk.srp_positionwise([TOPK, TOPK[:1]], 4, 2, level="model"), ValueError,
     "equal shape"),
    ("non-tensor-in-list", lambda: lk.concat_layers([TOPK, [[0]]], 4), TypeError, "topk_layers[1]: expected"),
    ("empty-list-concat", lambda: lk.concat_layers([], 4), ValueError, "topk_layers: expected at least one layer"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_the_argument_named(call, error, message):
    started = time.perf_counter()
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert time.perf_counter() - started < 5.0  # refused before any heavy work


def test_weighted_sum_is_exact_up_to_its_bound():
    """Just below 2^53 the float64 product equals the int64 one; at 2^53 it is refused, not rounded."""
    per_sequence = torch.tensor([[3, 1], [2, 0]], dtype=torch.int64)
    below = torch.tensor([[2 ** 50 - 1], [2 ** 50 + 7]], dtype=torch.int64)  # total x 3 < 2^53
    expected = [[3 * (2 ** 50 - 1) + 2 * (2 ** 50 + 7), 2 ** 50 - 1]]
    assert weighted_sum(below, per_sequence).tolist() == expected
    with pytest.raises(ValueError, match="weights: expected column total x largest count below 2"):
        weighted_sum(torch.tensor([[2 ** 51], [2 ** 51]]), per_sequence)


def test_large_weights_give_the_same_interval_as_scaled_small_ones():
    """Scaling every weight by 2^30 keeps every replicate's F1 (a ratio), so the CI is unchanged, exactly."""
    weights = lk.resample_weights(3, 40, torch.Generator().manual_seed(1))
    small = lk.srp(TOPK, 4, 2, weights=weights)
    large = lk.srp(TOPK, 4, 2, weights=weights * 2 ** 30)
    assert (small.ci_low.item(), small.ci_high.item()) == (large.ci_low.item(), large.ci_high.item())


def test_score_just_below_the_overflow_bound_is_exact():
    """2·L·windows = 2^61 < 2^62: scored, with the F1 of a lone count-L bin (1.0)."""
    score = lk.srp_score(torch.tensor([0, 0, 0, 0, 2 ** 58]))  # L = 4
    assert score.best_f1.item() == 1.0 and score.support.item() == 2 ** 58


@pytest.mark.parametrize("confidence, minimum", [(0.95, 20), (0.90, 11), (0.99, 100), (0.5, 3),
                                                 (0.999999999, 1000000029)])
def test_bootstrap_minimum_is_closed_form(confidence, minimum):
    """The named minimum B is the smallest with round(B·tail) >= 1, found instantly (was a 100 s search)."""
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"expected at least {minimum} replicates"):
        bootstrap_indices(minimum - 1, confidence)
    assert time.perf_counter() - started < 0.5
    assert bootstrap_indices(minimum, confidence)[0] == 1


def test_coverage_beyond_every_sequence_is_zero_without_l_sized_tables():
    """L > T: no window anywhere, so coverage counts are zero (and the ratio NaN) for any L, even 10^12."""
    coverage = lk.segment_coverage(TOPK, 4, HUGE)
    assert coverage.tolist() == [[0, 0, 0, 0]] * 3
    assert torch.isnan(lk.coverage_ratio(coverage)).all()


def test_concat_layers_neither_reads_nor_checks_beyond_lengths():
    garbage = TOPK.clone()
    garbage[1, 2:] = 99  # beyond lengths[1] = 2: out of range, and not read
    lengths = torch.tensor([4, 2, 4])
    stream = lk.concat_layers(torch.stack([garbage, garbage]), 4, lengths=lengths)
    assert stream[1, 2:].eq(-1).all()
    assert torch.equal(stream[0], lk.concat_layers(torch.stack([TOPK, TOPK]), 4)[0])


# --- files: one line naming the file and the line, never an allocation the file implies ------------------

JSONL_HAZARDS = {  # name: (file content, line named, reason)
    "pos-10^10": ('{"seq": 0, "pos": 10000000000, "experts": [1]}\n', 1, "'pos' 10000000000: the routing array"),
    "pos-10^12-on-line-2": ('{"seq": 0, "pos": 0, "experts": [1]}\n{"seq": 0, "pos": 1000000000000, "experts": [1]}\n',
                            2, "'pos' 1000000000000"),
    "deep-nesting": ('{"seq": 0, "pos": 0, "experts": ' + "[" * 100000 + "]" * 100000 + "}\n", 1, "nested too deeply"),
    "invalid-utf8": (b'{"seq": "\xff\xfe", "pos": 0, "experts": [1]}\n', 1, "not UTF-8 (byte 0xff"),
    "5000-digits": ('{"seq": 0, "pos": ' + "9" * 5000 + ', "experts": [1]}\n', 1, "an integer of more than 4300 digits"),
    "nested-experts": ('{"seq": 0, "pos": 0, "experts": ' + "[" * 500 + "]" * 500 + "}\n", 1,
                       "'experts' must be a list of integers, found [[[...]]]"),
}


@pytest.mark.parametrize("fmt", ["auto", "jsonl"])
@pytest.mark.parametrize("name", list(JSONL_HAZARDS))
def test_jsonl_hazards_name_file_and_line(tmp_path, name, fmt):
    from lrc_kernels.io import ReadOptions, TraceReadError, read_trace

    text, line, reason = JSONL_HAZARDS[name]
    path = tmp_path / "routing.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.perf_counter()
    with pytest.raises(TraceReadError) as info:
        read_trace(path, fmt, ReadOptions(num_experts=4))
    message = str(info.value)
    assert reason in message
    assert f"{path}:{line}:" in message or (fmt == "auto" and f"{path}: " in message and f"line {line} " in message)
    assert "\n" not in message and len(message) < 300
    assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize("name, write, message", [
    ("text-as-npz", lambda p: p.write_text("hello\n"), "not an .npz archive"),
    ("text-as-pt", lambda p: p.write_text("hello\n"), "not a torch.save file"),
    ("pickled-object-pt", lambda p: torch.save({"topk": torch.zeros(1, 2, 1, dtype=torch.int64), "f": time.time}, p),
     "holds pickled Python objects other than tensors"),
])
def test_tensor_files_say_what_they_are_not(tmp_path, name, write, message):
    from lrc_kernels.io import ReadOptions, TraceReadError, read_trace

    path = tmp_path / ("routing.npz" if "npz" in name else "routing.pt")
    write(path)
    with pytest.raises(TraceReadError, match=message) as info:
        read_trace(path, options=ReadOptions(num_experts=4))
    assert "allow_pickle" not in str(info.value) and "weights_only" not in str(info.value)
