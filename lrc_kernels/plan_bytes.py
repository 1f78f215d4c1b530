"""Bytes and time of a cache plan: expert size from a model config, budgets in GiB, transfer-bound ceilings.

The time figure is a **transfer-bound ceiling**, not a latency model: it assumes every miss loads one whole
expert over a host-to-device link of the given bandwidth and that nothing else (compute, overlap, PCIe
latency, batching) costs time. A real decode rate is at most this.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Optional

import torch

from ._checks import check_int
from .plan import split_hits

GIB = 1 << 30
DEFAULT_BANDWIDTH_GBS = 25.0

DTYPE_BYTES = {"float64": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
               "float8_e4m3fn": 1, "float8_e5m2": 1}

# model_type -> the config field with the routed experts' intermediate size, and whether the expert has
# biases. Every family here has a gated MLP expert: gate and up (intermediate x hidden each, GPT-OSS stores
# them as one 2·intermediate x hidden matrix) and down (hidden x intermediate), so 3·hidden·intermediate
# weights; GPT-OSS adds a bias of 2·intermediate and one of hidden. Shared experts are not routed, not counted.
EXPERT_FAMILIES = {
    "mixtral": ("intermediate_size", False),
    "phimoe": ("intermediate_size", False),
    "olmoe": ("intermediate_size", False),
    "qwen2_moe": ("moe_intermediate_size", False),
    "qwen3_moe": ("moe_intermediate_size", False),
    "deepseek_v2": ("moe_intermediate_size", False),
    "deepseek_v3": ("moe_intermediate_size", False),
    "gpt_oss": ("intermediate_size", True),
}


@dataclass(frozen=True)
class ExpertSize:
    """One routed expert: ``parameters``, ``bytes`` as stored, and ``rule``, the derivation in words.

    Example:
        >>> expert_size({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        ...              "dtype": "bfloat16"}).rule
        'mixtral: 3 x 4096 x 14336 weights at 2 B (bfloat16)'
    """

    parameters: int
    bytes: int
    rule: str


def _load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        path = pathlib.Path(config)
        path = path / "config.json" if path.is_dir() else path
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"config: cannot read a JSON model config from {path}: {error}") from None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config: expected a config.json path, a mapping or a transformers config, "
                    f"received {type(config).__name__}")


def _positive_field(config: dict, field: str, model_type: str) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config: a {model_type!r} config needs a positive integer {field!r} for the expert "
                         f"size, received {value!r}")
    return value


def _weight_bytes(shapes: list[tuple[int, int]], quantization: Optional[dict], dtype_bytes: int,
                  dtype_name: str) -> tuple[int, str]:
    """Bytes of the expert's weight matrices ``(out, in)`` as stored: plain dtype, MXFP4 or block-scaled FP8."""
    elements = sum(rows * cols for rows, cols in shapes)
    method = None if quantization is None else quantization.get("quant_method")
    if method is None:
        return elements * dtype_bytes, f"{dtype_bytes} B ({dtype_name})"
    if method == "mxfp4":  # 4-bit values plus one 1-byte scale per 32 consecutive inputs
        scales = sum(rows * math.ceil(cols / 32) for rows, cols in shapes)
        return elements // 2 + elements % 2 + scales, "MXFP4 (0.5 B + a 1 B scale per 32)"
    if method == "fp8":  # 1-byte values plus one float32 scale per weight block (per matrix without blocks)
        block_rows, block_cols = quantization.get("weight_block_size") or (None, None)
        if block_rows is None:
            return elements + 4 * len(shapes), "FP8 (1 B + a 4 B scale per matrix)"
        scales = sum(math.ceil(rows / block_rows) * math.ceil(cols / block_cols) for rows, cols in shapes)
        return elements + 4 * scales, f"FP8 (1 B + a 4 B scale per {block_rows} x {block_cols} block)"
    raise ValueError(f"config: quantization_config.quant_method {method!r} has no byte rule here "
                     "(known: none, 'mxfp4', 'fp8'); give the expert size in bytes instead (--expert-bytes)")


def expert_size(config, *, dtype_bytes: Optional[int] = None) -> ExpertSize:
    """Parameters and bytes of one routed expert from a model config (``config.json``).

    Families (``model_type``): Mixtral, PhiMoE, OLMoE (``intermediate_size``), Qwen2-MoE, Qwen3-MoE,
    DeepSeek-V2/V3 (``moe_intermediate_size``), GPT-OSS (``intermediate_size``, with biases). An expert has
    ``3 · hidden_size · intermediate`` weights (+ ``2·intermediate + hidden`` biases for GPT-OSS). Bytes use
    the config's ``dtype``/``torch_dtype``, or its ``quantization_config`` (MXFP4, block-scaled FP8) for the
    weight matrices, as the checkpoint stores them.

    Args:
        config: a ``config.json`` path or model directory, a dict of it, or a ``transformers`` config.
        dtype_bytes: bytes per parameter for every parameter, overriding the config's dtype and quantisation.

    Returns:
        :class:`ExpertSize`.

    Example:
        >>> size = expert_size({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        ...                     "dtype": "bfloat16"})
        >>> size.parameters, size.bytes
        (176160768, 352321536)
    """
    config = _load_config(config)
    model_type = config.get("model_type")
    if model_type not in EXPERT_FAMILIES:
        raise ValueError(f"config: model_type {model_type!r} has no known routed-expert size (known: "
                         f"{', '.join(sorted(EXPERT_FAMILIES))}); give the expert size in bytes instead "
                         "(--expert-bytes)")
    field, has_biases = EXPERT_FAMILIES[model_type]
    hidden = _positive_field(config, "hidden_size", model_type)
    intermediate = _positive_field(config, field, model_type)
    shapes = [(2 * intermediate, hidden), (hidden, intermediate)]
    biases = 2 * intermediate + hidden if has_biases else 0
    parameters = 3 * hidden * intermediate + biases
    quantization = config.get("quantization_config")
    if dtype_bytes is not None:
        per_parameter = check_int(dtype_bytes, "dtype_bytes", minimum=1)
        quantization, dtype_name = None, "given"
    else:
        dtype_name = config.get("dtype") or config.get("torch_dtype")
        if dtype_name not in DTYPE_BYTES:
            raise ValueError(f"config: expected a 'dtype' or 'torch_dtype' in {sorted(DTYPE_BYTES)}, received "
                             f"{dtype_name!r}; pass dtype_bytes or give the expert size in bytes (--expert-bytes)")
        per_parameter = DTYPE_BYTES[dtype_name]
    weight_bytes, weight_rule = _weight_bytes(shapes, quantization, per_parameter, dtype_name)
    total = weight_bytes + biases * per_parameter
    rule = (f"{model_type}: 3 x {hidden} x {intermediate} weights at {weight_rule}"
            + (f" + {biases} biases at {per_parameter} B ({dtype_name})" if biases else ""))
    return ExpertSize(parameters=parameters, bytes=total, rule=rule)


def _check_positive_float(value, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, received {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, received {value}")
    return float(value)


def slots_for_gib(cache_gib: float, expert_bytes: int) -> int:
    """Whole experts that fit in ``cache_gib`` GiB (2^30 bytes): ``floor(cache_gib · 2^30 / expert_bytes)``.

    Example:
        >>> slots_for_gib(24, 352321536)
        73
    """
    cache_gib = _check_positive_float(cache_gib, "cache_gib", allow_zero=True)
    expert_bytes = check_int(expert_bytes, "expert_bytes", minimum=1)
    return int(Fraction(cache_gib) * GIB // expert_bytes)


@dataclass(frozen=True)
class SplitCost:
    """What one split of the cache costs on the traced workload.

    Attributes:
        sizes: slots per layer. slots: their sum. hits, references: totals over layers.
        hit_rate: ``hits / references`` (pooled over all references; NaN without references).
        misses_per_token: ``(references - hits) / tokens``, over all layers (NaN without tokens).
        bytes_per_token: ``misses_per_token · expert_bytes`` (None without an expert size).
        tokens_per_s_ceiling: ``bandwidth_gbs · 1e9 / bytes_per_token``, the transfer-bound decode-rate ceiling
            (None without an expert size, misses or tokens). Not a latency model.

    Example (:func:`split_cost`'s, without an expert size):
        >>> split_cost(torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]]), torch.tensor([1, 3]), 20, 10)
        ... # doctest: +NORMALIZE_WHITESPACE
        SplitCost(sizes=[1, 3], slots=4, hits=13, references=20, hit_rate=0.65, misses_per_token=0.7,
                  bytes_per_token=None, tokens_per_s_ceiling=None)
    """

    sizes: list
    slots: int
    hits: int
    references: int
    hit_rate: float
    misses_per_token: float
    bytes_per_token: Optional[float]
    tokens_per_s_ceiling: Optional[float]


def split_cost(hits, sizes: torch.Tensor, references: int, tokens: int, *, expert_bytes: Optional[int] = None,
               bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS) -> SplitCost:
    """Hit rate, misses and bytes per token and the transfer-bound decode-rate ceiling of a split.

    Args:
        hits: int ``[n_layers, E]`` or a list of 1-D tensors, as in :func:`lrc_kernels.allocate_cache`.
        sizes: int ``[n_layers]``, the split (e.g. from ``allocate_cache``).
        references: total references over all layers (Σ of the layers' ``CacheCurve.references``).
        tokens: tokens of the workload (each runs every layer once).
        expert_bytes: bytes of one expert (``expert_size(config).bytes``); None = no bytes or time figures.
        bandwidth_gbs: host-to-device bandwidth in GB/s (10^9 bytes per second).

    Returns:
        :class:`SplitCost`.

    Example:
        >>> cost = split_cost(torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]]), torch.tensor([1, 3]), 20, 10,
        ...                   expert_bytes=1000, bandwidth_gbs=1.0)
        >>> cost.hit_rate, cost.misses_per_token, cost.bytes_per_token, cost.tokens_per_s_ceiling
        (0.65, 0.7, 700.0, 1428571.4285714286)
    """
    total_hits = split_hits(hits, sizes)
    references = check_int(references, "references", minimum=0)
    if references < total_hits:
        raise ValueError(f"references: expected at least the split's {total_hits} hits, received {references}")
    tokens = check_int(tokens, "tokens", minimum=0)
    bandwidth_gbs = _check_positive_float(bandwidth_gbs, "bandwidth_gbs")
    misses_per_token = (references - total_hits) / tokens if tokens else math.nan
    bytes_per_token = ceiling = None
    if expert_bytes is not None:
        bytes_per_token = misses_per_token * check_int(expert_bytes, "expert_bytes", minimum=1)
        ceiling = bandwidth_gbs * 1e9 / bytes_per_token if bytes_per_token > 0 else None
    return SplitCost(sizes=sizes.tolist(), slots=int(sizes.sum()), hits=total_hits, references=references,
                     hit_rate=total_hits / references if references else math.nan,
                     misses_per_token=misses_per_token, bytes_per_token=bytes_per_token,
                     tokens_per_s_ceiling=ceiling)
