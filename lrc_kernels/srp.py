"""SRP — Segment Routing best Performance — and static segment coverage (SPEC §2, §3, §5, §7).

The data path: ``topk [S, T, k]`` -> per-sequence count histograms ``H [S, E, L+1]`` (a backend kernel;
``[S, L+1]`` pooled over experts inside the kernel for layer and model level) -> pooled histograms (sums,
with bootstrap weights) -> scores. Histograms are additive sufficient
statistics: pool them over experts, sequences, layers or datasets by summing, then score once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from . import dispatch
from ._checks import check_allocation, check_choice, check_int, check_int_tensor, check_topk, stack_layers
from .bootstrap import basic_interval, bootstrap_weights, check_bootstrap_options

LEVELS = ("expert", "layer", "model")
# model level: most bytes of per-(layer, sequence) pooled histograms alive at once
_MODEL_GROUP_BYTES = 16 << 20


@dataclass(frozen=True)
class SRPScore:
    """Scores of pooled SRP histograms; every field has the shape of the pooled cells (``counts.shape[:-1]``).

    Attributes:
        best_f1: float64, F1 of the best threshold predictor.
        threshold: int64, the smallest θ reaching ``best_f1``.
        best_m: float64, expert slots the best predictor loads per slot actually used (0 without activations).
        act_r: float64, activation density ``acts / preds(0)``; NaN iff ``support == 0``.
        support: int64, pooled (window, expert) pairs; 0 flags "no window".
        ci_low, ci_high: float64 basic-bootstrap bounds of ``best_f1`` (``None`` without bootstrap).

    Example (SPEC §8 A, as :func:`srp_score`):
        >>> srp_score(torch.tensor([15, 12, 1])).to_dict()  # doctest: +NORMALIZE_WHITESPACE
        {'best_f1': 0.7, 'threshold': 1, 'best_m': 1.8571428571428572, 'act_r': 0.25, 'support': 28,
         'ci_low': None, 'ci_high': None}
    """

    best_f1: torch.Tensor
    threshold: torch.Tensor
    best_m: torch.Tensor
    act_r: torch.Tensor
    support: torch.Tensor
    ci_low: Optional[torch.Tensor] = None
    ci_high: Optional[torch.Tensor] = None

    def to_dict(self) -> dict:
        """Plain Python values (lists or scalars; NaN stays float NaN), ``None`` for absent CIs.

        Example:
            >>> srp_score(torch.tensor([[15, 12, 1], [0, 0, 0]])).to_dict()["support"]    # two cells
            [28, 0]
        """
        return {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).tolist())
                for f in fields(self)}


POOLS = (None, "experts")


def srp_counts(topk: torch.Tensor, num_experts: int, seg_len: int, *, lengths: Optional[torch.Tensor] = None,
               pool: Optional[str] = None, backend: str = "auto") -> torch.Tensor:
    """Window count histograms: ``counts[s, e, c]`` = complete windows of sequence s where e is used c times.

    Args:
        topk: int ``[S, T, k]`` expert ids (``-1`` = no expert), or ``[T, k]`` for one sequence.
        num_experts: E, ids lie in ``[0, E)``.
        seg_len: window length L >= 1.
        lengths: optional int ``[S]``, valid prefix length of each sequence (default T).
        pool: ``None`` (one histogram per expert) or ``"experts"``: the kernel sums the experts' histograms as
            it goes, so the ``[S, E, L+1]`` tensor is never built (what layer- and model-level SRP need).
        backend: ``"auto"`` (Triton for CUDA tensors, CPU path otherwise), ``"cpu"`` or ``"triton"``.

    Returns:
        int64 ``[S, E, L+1]`` (``[E, L+1]`` for 2-D ``topk``); ``counts[s].sum(-1) == max(T_s - L + 1, 0)``.
        With ``pool="experts"``: int64 ``[S, L+1]`` (``[L+1]``), equal to ``counts.sum(-2)``.

    Example (SPEC §8 A):
        >>> topk = torch.tensor([[0], [0], [1], [2], [0], [3], [2], [1]])
        >>> srp_counts(topk, 4, 2)[0].tolist(), srp_counts(topk, 4, 2, pool="experts").tolist()
        ([3, 3, 1], [15, 12, 1])
    """
    check_choice(pool, "pool", POOLS)
    dispatch.check_backend(backend)
    ids, lengths, unbatched = check_topk(topk, num_experts, lengths=lengths)
    seg_len = check_int(seg_len, "seg_len", minimum=1)
    shape = (ids.shape[0], num_experts, seg_len + 1) if pool is None else (ids.shape[0], seg_len + 1)
    check_allocation(shape, "seg_len", "histograms [S, E, L+1]" if pool is None else "histograms [S, L+1]")
    if pool is None:
        counts = dispatch.run("srp_counts", backend, ids, lengths, num_experts, seg_len)
    else:
        counts, = dispatch.run("srp_pooled_counts", backend, ids, lengths, num_experts, (seg_len,))
    return counts[0] if unbatched else counts


def segment_coverage(topk: torch.Tensor, num_experts: int, seg_len: int, *,
                     lengths: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Static segment coverage counts (SPEC §5): entry m-1 sums, over windows, the m largest expert counts.

    Args:
        topk: int ``[S, T, k]`` (or ``[T, k]``), ``-1`` = no expert.
        num_experts, seg_len, lengths, backend: as in :func:`srp_counts`. The Triton kernel keeps a sorted
            count vector per sequence in registers, so it takes E <= 4096; above that ``"auto"`` runs the
            CPU path on CUDA inputs (the result returns to the input's device) and ``"triton"`` raises.

    Returns:
        int64 ``[S, E]`` (``[E]`` for 2-D input); ``cov[s, E-1]`` = activations inside windows.
        :func:`coverage_ratio` turns it into the coverage curve.

    Example (SPEC §8 A):
        >>> segment_coverage(torch.tensor([[0], [0], [1], [2], [0], [3], [2], [1]]), 4, 2).tolist()
        [8, 14, 14, 14]
    """
    dispatch.check_backend(backend)
    ids, lengths, unbatched = check_topk(topk, num_experts, lengths=lengths)
    seg_len = check_int(seg_len, "seg_len", minimum=1)
    coverage = coverage_counts(ids, lengths, num_experts, seg_len, backend)
    return coverage[0] if unbatched else coverage


def coverage_counts(ids: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int,
                    backend: str) -> torch.Tensor:
    """:func:`segment_coverage` of routing that ``check_topk`` already validated: int64 ``[S, E]``.

    Trusted internal of :func:`segment_coverage` and :func:`lrc_kernels.analyze` (inputs are not validated
    again).
    """
    if seg_len > ids.shape[-2]:  # no sequence has a window; the kernels would size tables by L for nothing
        return torch.zeros(ids.shape[0], num_experts, dtype=torch.int64, device=ids.device)
    return dispatch.run("segment_coverage", backend, ids, lengths, num_experts, seg_len)


def coverage_ratio(coverage: torch.Tensor) -> torch.Tensor:
    """Coverage curve ``Σ cov[..., m-1] / Σ cov[..., E-1]`` pooled over every leading dimension.

    Args:
        coverage: int ``[..., E]`` from :func:`segment_coverage`.

    Returns:
        float64 ``[E]``; all NaN when there is no activation inside any window (SPEC §9).

    Example (SPEC §8 A, :func:`segment_coverage`'s example: each window's top expert holds 8 of 14 activations):
        >>> coverage_ratio(torch.tensor([8, 14, 14, 14])).tolist()
        [0.5714285714285714, 1.0, 1.0, 1.0]
    """
    check_int_tensor(coverage, "coverage")
    if coverage.ndim < 1:
        raise ValueError("coverage: expected shape [..., E], received a 0-D tensor")
    if bool((coverage < 0).any()):
        raise ValueError("coverage: expected non-negative coverage counts, received a negative entry")
    pooled = coverage.reshape(-1, coverage.shape[-1]).sum(0).to(torch.float64)
    total = pooled[-1] if pooled.numel() else torch.tensor(0.0, dtype=torch.float64)
    return pooled / total if total > 0 else torch.full_like(pooled, float("nan"))


def srp_score(counts: torch.Tensor) -> SRPScore:
    """Score already-pooled histograms over their last dimension (SPEC §2).

    Args:
        counts: int ``[..., L+1]``, ``counts[..., c]`` = (weighted) windows with count c; pool cells by summing
            before scoring, so the whole group shares one threshold.

    Returns:
        :class:`SRPScore` with fields of shape ``counts.shape[:-1]``.

    Raises:
        TypeError: a float or non-tensor ``counts``.
        ValueError: a last dimension < 2 (L >= 1 needs L+1 >= 2 bins) or negative counts.

    Example (SPEC §8 A, layer):
        >>> s = srp_score(torch.tensor([15, 12, 1])); s.best_f1.item(), s.threshold.item()
        (0.7, 1)
    """
    check_int_tensor(counts, "counts")
    if counts.ndim < 1 or counts.shape[-1] < 2:
        raise ValueError(f"counts: expected shape [..., L+1] with L >= 1, received {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("counts: expected non-negative window counts, received a negative entry")
    return score_histograms(counts.to(torch.int64))


def score_histograms(hist: torch.Tensor) -> SRPScore:
    """:func:`srp_score` of trusted histograms: int64 ``[..., L+1]``, ``L >= 1``, no negative entry.

    Raises:
        ValueError: sums that would overflow int64 (the one check that depends on the values' size).
    """
    seg_len = hist.shape[-1] - 1
    _check_products_fit(hist, seg_len)
    count_values = torch.arange(seg_len + 1, device=hist.device, dtype=torch.int64)
    matches = hist.mul(count_values).flip(-1).cumsum(-1).flip(-1)      # Σ_{c>=θ} c·H[c]
    preds = hist.flip(-1).cumsum(-1).flip(-1) * seg_len                 # L·Σ_{c>=θ} H[c]
    acts = matches[..., :1]
    f1 = 2 * matches.to(torch.float64) / (preds + acts).clamp_min(1).to(torch.float64)
    threshold = f1.argmax(dim=-1, keepdim=True) if f1.numel() else torch.zeros_like(acts)
    best_preds = preds.gather(-1, threshold)
    acts_f = acts.to(torch.float64)
    best_m = torch.where(acts > 0, best_preds.to(torch.float64) / acts_f.clamp_min(1), 0.0)
    support = preds[..., :1] // seg_len
    act_r = torch.where(support > 0, acts_f / preds[..., :1].clamp_min(1).to(torch.float64), float("nan"))
    return SRPScore(best_f1=f1.gather(-1, threshold).squeeze(-1), threshold=threshold.squeeze(-1),
                    best_m=best_m.squeeze(-1), act_r=act_r.squeeze(-1), support=support.squeeze(-1))


def _check_products_fit(hist: torch.Tensor, seg_len: int) -> None:
    """The scores sum ``c·H[c]`` and ``L·H[c]`` in int64; refuse histograms whose sums would wrap.

    ``preds + acts <= 2·L·Σ_c H[c]`` bounds every intermediate. The float64 estimate of ``Σ_c H[c]`` errs by
    far less than the factor-two margin below 2^63.
    """
    if hist.numel() == 0:
        return
    largest_total = float(hist.to(torch.float64).sum(-1).max())
    if 2.0 * seg_len * largest_total >= 2.0 ** 62:
        raise ValueError(f"counts: expected 2·L·(windows of a cell) below 2^62 so that the int64 scores do not "
                         f"overflow, received a cell with {largest_total:.4g} windows at L = {seg_len}")


def _check_routing(topk, num_experts: int, level: str, lengths):
    """Validate ``topk`` for ``level``: -> int32 ``[S, T, k]`` (``[n_layers, S, T, k]`` at model level), lengths."""
    if level == "model":
        ids, lengths, _ = check_topk(stack_layers(topk, "topk"), num_experts, batched_rank=4, lengths=lengths)
    else:
        ids, lengths, _ = check_topk(topk, num_experts, lengths=lengths)
    return ids, lengths


def _check_seg_lens(seg_len) -> Tuple[int, ...]:
    """``seg_len``: an int L >= 1, or a non-empty list, tuple or range of distinct such ints."""
    if not isinstance(seg_len, (list, tuple, range)):
        return (check_int(seg_len, "seg_len", minimum=1),)
    seg_lens = tuple(check_int(value, "seg_len", minimum=1) for value in seg_len)
    if not seg_lens or len(set(seg_lens)) != len(seg_lens):
        raise ValueError(f"seg_len: expected an int >= 1 or a non-empty sequence of distinct ones, "
                         f"received {list(seg_lens)}")
    return seg_lens


def _check_histogram_memory(ids: torch.Tensor, num_experts: int, seg_lens: Tuple[int, ...],
                            level: str) -> None:
    """Refuse per-sequence histograms beyond this machine's memory (``check_allocation``); all L live at once."""
    width = sum(seg_len + 1 for seg_len in seg_lens)
    if level == "expert":
        check_allocation((ids.shape[0], num_experts, width), "seg_len", "per-sequence histograms [S, E, L+1]")
    else:
        check_allocation((ids.shape[-3], width), "seg_len", "per-sequence histograms [S, L+1]")


def pooled_histograms(ids: torch.Tensor, lengths: torch.Tensor, num_experts: int,
                      seg_lens: Sequence[int], backend: str) -> Dict[int, torch.Tensor]:
    """``{L: [S, L+1]}``, the histograms pooled over experts of validated routing ``[S, T, k]``, every L from
    one backend call. Trusted internal of :func:`srp`, :mod:`lrc_kernels.analyze` and
    the monitor (inputs are not validated again, memory is checked by the caller)."""
    return dict(zip(seg_lens, dispatch.run("srp_pooled_counts", backend, ids, lengths, num_experts, tuple(seg_lens))))


def _per_sequence_histograms(ids: torch.Tensor, lengths: torch.Tensor, num_experts: int,
                             seg_lens: Tuple[int, ...], level: str, backend: str) -> Dict[int, torch.Tensor]:
    """``{L: histograms}``, ``[S, E, L+1]`` (expert level) or ``[S, L+1]`` (layer, model), of validated routing."""
    if level == "expert":
        return {seg_len: dispatch.run("srp_counts", backend, ids, lengths, num_experts, seg_len)
                for seg_len in seg_lens}
    if level == "layer":
        return pooled_histograms(ids, lengths, num_experts, seg_lens, backend)
    num_layers, num_seqs = ids.shape[0], ids.shape[1]
    # layers x sequences are independent rows for the kernel; groups of layers bound the [rows, L+1] outputs
    width = sum(seg_len + 1 for seg_len in seg_lens)
    group = max(1, min(num_layers, _MODEL_GROUP_BYTES // max(1, num_seqs * width * 8)))
    pooled = {seg_len: torch.zeros((num_seqs, seg_len + 1), dtype=torch.int64, device=ids.device)
              for seg_len in seg_lens}
    for first in range(0, num_layers, group):
        layers = ids[first:first + group]
        rows = layers.reshape(layers.shape[0] * num_seqs, ids.shape[2], ids.shape[3])
        counts = dispatch.run("srp_pooled_counts", backend, rows, lengths.repeat(layers.shape[0]), num_experts,
                              seg_lens)
        for seg_len, layer_counts in zip(seg_lens, counts):
            pooled[seg_len] += layer_counts.view(layers.shape[0], num_seqs, seg_len + 1).sum(dim=0)
    return pooled


def weighted_sum(weights: torch.Tensor, per_sequence: torch.Tensor) -> torch.Tensor:
    """``out[b, ...] = Σ_s weights[s, b] · per_sequence[s, ...]`` for int64 inputs, exactly.

    A float64 matrix product is exact while every product and partial sum is an integer below 2^53, and
    unlike an int64 product it runs on CUDA as well. Weights whose column total times the largest entry of
    ``per_sequence`` reaches 2^53 are refused (``ValueError`` naming ``weights``) rather than rounded.
    """
    flat = per_sequence.reshape(per_sequence.shape[0], math.prod(per_sequence.shape[1:])).to(torch.float64)
    float_weights = weights.to(device=flat.device, dtype=torch.float64)
    if flat.numel() and weights.numel():
        bound = float(float_weights.sum(0).max()) * float(flat.max())
        if bound >= 2.0 ** 53:
            raise ValueError(f"weights: expected column total x largest count below 2^53 so that the weighted "
                             f"sums are exact, received a bound of {bound:.4g}")
    pooled = float_weights.T @ flat
    return pooled.round().to(torch.int64).view(weights.shape[1], *per_sequence.shape[1:])


def srp(topk: Union[torch.Tensor, Sequence[torch.Tensor]], num_experts: int, seg_len: Union[int, Sequence[int]],
        *, level: str = "layer", lengths: Optional[torch.Tensor] = None, num_bootstrap: int = 0,
        confidence: float = 0.95, generator: Optional[torch.Generator] = None,
        weights: Optional[torch.Tensor] = None, backend: str = "auto") -> Union[SRPScore, Dict[int, SRPScore]]:
    """SRP at expert, layer or model level, optionally with a basic bootstrap CI over sequences.

    Args:
        topk: int ``[S, T, k]`` (``[T, k]``: one sequence) for levels ``"expert"`` and ``"layer"``;
            ``[n_layers, S, T, k]`` (or a list of ``[S, T, k]``) for ``"model"``. ``-1`` = no expert.
        num_experts: E per layer.
        seg_len: window length L >= 1, or a list of distinct ones: the routing is then validated once, the
            layer- and model-level histograms of every L come from one backend call, and every L shares
            one bootstrap weight matrix (SPEC §3, joint resampling).
        level: ``"expert"`` (one score per expert, shape ``[E]``), ``"layer"`` (one score, shape ``[]``) or
            ``"model"`` (all layers pooled, one shared threshold, shape ``[]``).
        lengths: optional int ``[S]`` valid prefix lengths (shared by all layers).
        num_bootstrap: B replicates (0 = no CI); needs ``round(B·(1-confidence)/2) >= 1``.
        confidence: CI level in (0, 1).
        generator: torch.Generator for the resampling weights.
        weights: explicit int ``[S, B]`` weight matrix (shared across calls for paired comparisons).
            Every column must draw at least one sequence and total below 2^52 (``ValueError`` naming ``weights``).
        backend: ``"auto"``, ``"cpu"`` or ``"triton"``.

    Returns:
        :class:`SRPScore`; with bootstrap, ``ci_low``/``ci_high`` bound ``best_f1`` (θ re-optimised per
        replicate). For a list of L, ``{L: SRPScore}`` in its order.

    Example (SPEC §8 B):
        >>> rows = torch.tensor([[0, 1], [2, 0], [3, 2], [1, 3], [2, 1], [3, 0]])
        >>> srp(rows, 4, 3).best_f1.item() == 12 / 17
        True
        >>> {L: score.best_f1.item() for L, score in srp(rows, 4, [1, 3]).items()} == {1: 1.0, 3: 12 / 17}
        True
    """
    check_choice(level, "level", LEVELS)
    dispatch.check_backend(backend)
    seg_lens = _check_seg_lens(seg_len)
    num_bootstrap, confidence = check_bootstrap_options(num_bootstrap, confidence, weights)
    ids, lengths = _check_routing(topk, num_experts, level, lengths)
    _check_histogram_memory(ids, num_experts, seg_lens, level)
    histograms = _per_sequence_histograms(ids, lengths, num_experts, seg_lens, level, backend)
    if num_bootstrap > 0 or weights is not None:
        weights = bootstrap_weights(lengths.shape[0], num_bootstrap, confidence, generator, weights)
    scores = {L: score_sequences(per_sequence, weights, confidence) for L, per_sequence in histograms.items()}
    return scores if isinstance(seg_len, (list, tuple, range)) else scores[seg_lens[0]]


def score_sequences(per_sequence: torch.Tensor, weights: Optional[torch.Tensor] = None,
                    confidence: float = 0.95) -> SRPScore:
    """Score per-sequence histograms pooled over sequences, with the basic bootstrap CI of ``weights``.

    Trusted internal of :func:`srp` and :func:`lrc_kernels.analyze` (inputs are not validated again).

    Args:
        per_sequence: int64 ``[S, ..., L+1]``, one histogram (or one per expert) per sequence.
        weights: int64 ``[S, B]`` bootstrap multiplicities, or ``None`` for no CI.
        confidence: CI level.
    """
    score = score_histograms(per_sequence.sum(0))
    if weights is None:
        return score
    check_allocation((weights.shape[1], *per_sequence.shape[1:]), "num_bootstrap", "replicate histograms [B, ...]")
    replicates = score_histograms(weighted_sum(weights, per_sequence)).best_f1.movedim(0, -1)
    low, high = basic_interval(score.best_f1, replicates, confidence)
    return SRPScore(score.best_f1, score.threshold, score.best_m, score.act_r, score.support, low, high)


def _positionwise_histograms(ids: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int,
                             seqs_per_chunk: int = 64) -> torch.Tensor:
    """``H[p, e, c]`` = sequences whose window starting at p is complete and counts e c times."""
    num_seqs, num_tokens = ids.shape[0], ids.shape[1]
    windows = (lengths - seg_len + 1).clamp_min(0)
    num_positions = int(windows.max()) if num_seqs else 0
    check_allocation((num_positions, num_experts, seg_len + 1), "seg_len", "position-wise histograms [P, E, L+1]")
    hist = torch.zeros(num_positions * num_experts * (seg_len + 1), dtype=torch.int64, device=ids.device)
    if num_positions == 0:
        return hist.view(0, num_experts, seg_len + 1)
    positions = torch.arange(num_positions, device=ids.device)
    experts = torch.arange(num_experts, device=ids.device)
    for start in range(0, num_seqs, seqs_per_chunk):
        chunk = ids[start:start + seqs_per_chunk].to(torch.int64)
        used = torch.zeros(chunk.shape[0], num_tokens + 1, num_experts + 1, dtype=torch.int32, device=ids.device)
        slot_ids = torch.where(chunk >= 0, chunk, num_experts)  # -1 slots land in a discarded column
        used[:, 1:].scatter_add_(2, slot_ids, torch.ones_like(slot_ids, dtype=torch.int32))
        prefix = used[..., :num_experts].cumsum(1)
        window_counts = (prefix[:, seg_len:seg_len + num_positions] - prefix[:, :num_positions]).to(torch.int64)
        complete = positions < windows[start:start + seqs_per_chunk, None]                      # [s, P]
        index = (positions[None, :, None] * num_experts + experts) * (seg_len + 1) + window_counts
        index = index[complete]
        hist.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int64, device=ids.device))
    return hist.view(num_positions, num_experts, seg_len + 1)


def srp_positionwise(topk: Union[torch.Tensor, Sequence[torch.Tensor]], num_experts: int, seg_len: int, *,
                     level: str = "layer", lengths: Optional[torch.Tensor] = None) -> SRPScore:
    """SRP for every window start p separately (SPEC §7); no bootstrap.

    Sequences whose window at p is incomplete (``p >= T_s - L + 1``) drop out of position p. Plot the scores
    against the window centre ``p + L // 2``.

    Args:
        topk, num_experts, seg_len, level, lengths: as in :func:`srp`.

    Returns:
        :class:`SRPScore` with a leading dimension P = max over sequences of ``T_s - L + 1`` (0 if none):
        shape ``[P, E]`` at expert level, ``[P]`` at layer and model level.

    Example (SPEC §8 C):
        >>> topk = torch.tensor([[[0, 1], [-1, 2], [-1, -1], [0, 2]], [[3, 2], [3, -1], [2, 3], [1, 0]]])
        >>> srp_positionwise(topk, 4, 2, lengths=torch.tensor([4, 3])).support.tolist()
        [8, 8, 4]
    """
    check_choice(level, "level", LEVELS)
    seg_len = check_int(seg_len, "seg_len", minimum=1)
    ids, lengths = _check_routing(topk, num_experts, level, lengths)
    if level == "model":
        hists = [_positionwise_histograms(layer, lengths, num_experts, seg_len) for layer in ids]
        return score_histograms(torch.stack(hists).sum(dim=(0, 2)))
    hist = _positionwise_histograms(ids, lengths, num_experts, seg_len)
    return score_histograms(hist if level == "expert" else hist.sum(1))
