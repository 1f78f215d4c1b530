"""Backend choice (lrc_kernels/dispatch.py): each backend's supports(), auto's fallback, explicit refusals."""

import logging
from types import SimpleNamespace

import pytest
import torch

import lrc_kernels as lk
from lrc_kernels import dispatch
from lrc_kernels import triton as triton_backend
from lrc_kernels.triton import MAX_COVERAGE_EXPERTS, cache_key_bits


def _routing_on(device, num_tokens=4, num_slots=1):
    """Stands in for a validated routing tensor: the backends decide on its device and shape only."""
    return SimpleNamespace(device=torch.device(device), shape=(1, num_tokens, num_slots))


def test_auto_runs_the_cpu_loops_on_cpu_tensors_even_under_the_interpreter():
    assert dispatch.choose_backend("srp_counts", "auto", torch.zeros(1, 4, 1, dtype=torch.int32), 4) == ("cpu", ())


def test_auto_prefers_triton_for_cuda_tensors():
    assert dispatch.choose_backend("cache_hits", "auto", _routing_on("cuda"), 8, "lru").backend == "triton"


def test_coverage_above_the_register_limit_falls_back_to_cpu_with_the_reason(caplog):
    with caplog.at_level(logging.DEBUG, logger="lrc_kernels.dispatch"):
        choice = dispatch.choose_backend("segment_coverage", "auto", _routing_on("cuda"), MAX_COVERAGE_EXPERTS + 1)
    assert choice.backend == "cpu"
    [(declined, reason)] = choice.declined
    assert declined == "triton" and f"at most {MAX_COVERAGE_EXPERTS} experts" in reason
    assert reason in caplog.text
    assert dispatch.choose_backend("segment_coverage", "auto", _routing_on("cuda"),
                                   MAX_COVERAGE_EXPERTS).backend == "triton"


def test_explicit_triton_beyond_its_limit_raises_the_reason():
    """The public call refuses before any kernel runs (under the interpreter on CPU tensors)."""
    topk = torch.zeros(1, 2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"backend: 'triton' runs segment_coverage for at most "
                                         rf"{MAX_COVERAGE_EXPERTS} experts.*received num_experts = 4097"):
        lk.segment_coverage(topk, MAX_COVERAGE_EXPERTS + 1, 1, backend="triton")


def test_cache_keys_beyond_62_bits_fall_back_to_cpu():
    # lfu/sch keys need 2*log2(B) + log2(E_PAD) <= 62 bits with B > T*k + E: 2*13 + 7 fits, 2*27 + 13 does not
    assert cache_key_bits(4096, 128, "sch") == 13
    assert cache_key_bits(1 << 26, 8192, "lfu") is None
    assert cache_key_bits(1 << 26, 8192, "lru") == 27  # lru keys need log2(B) + 1 + log2(E_PAD) bits
    wide = _routing_on("cuda", num_tokens=1 << 23, num_slots=8)
    choice = dispatch.choose_backend("cache_hits", "auto", wide, 8192, "lfu")
    assert choice.backend == "cpu" and "62-bit keys" in choice.declined[0][1]
    assert dispatch.choose_backend("cache_hits", "auto", wide, 8192, "lru").backend == "triton"
    with pytest.raises(ValueError, match="backend: 'triton' cannot pack T\\*k = 67108864 references"):
        dispatch.choose_backend("cache_hits", "triton", wide, 8192, "lfu")


def test_cpu_cache_loops_refuse_2_to_the_31_slots_per_sequence():
    huge = _routing_on("cpu", num_tokens=1 << 28, num_slots=8)
    with pytest.raises(ValueError, match=r"backend: 'cpu' needs T\*k < 2\^31 slots per sequence"):
        dispatch.choose_backend("cache_hits", "cpu", huge, 64, "lru")
    with pytest.raises(ValueError, match="no backend can run cache_hits"):
        dispatch.choose_backend("cache_hits", "auto", huge, 64, "lru")
    assert dispatch.choose_backend("srp_counts", "cpu", huge, 64).backend == "cpu"


def test_without_the_triton_package_auto_falls_back_and_explicit_triton_says_why(monkeypatch):
    monkeypatch.setattr(triton_backend, "_triton_installed", lambda: False)
    choice = dispatch.choose_backend("srp_counts", "auto", _routing_on("cuda"), 8)
    assert choice.backend == "cpu" and "`triton` package" in choice.declined[0][1]
    with pytest.raises(ValueError, match="needs the `triton` package"):
        dispatch.choose_backend("srp_counts", "triton", _routing_on("cuda"), 8)


def test_an_unknown_backend_is_rejected_before_validation():
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'cpu', 'triton'\), received 'gpu'"):
        lk.srp("not a tensor", 4, 2, backend="gpu")
