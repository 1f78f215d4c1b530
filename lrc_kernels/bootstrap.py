"""Bootstrap over sequences: resampling weights and the basic (pivotal) interval (SPEC §3).

A weight matrix ``[S, B]`` holds, in column b, how often each sequence was drawn in replicate b. Results
that are compared (layers, L, policies) should share one matrix, so that their differences are paired.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._checks import check_allocation, check_confidence, check_int, check_weights


def bootstrap_indices(num_bootstrap: int, confidence: float) -> Tuple[int, int]:
    """Order-statistic indices ``(lp, up)`` of the basic interval for B replicates.

    ``lp = round(B * ((1 - confidence) / 2))`` with Python's half-to-even rounding and ``up = B - lp``.

    Raises:
        ValueError: ``lp < 1``, i.e. too few replicates for the confidence level; the message names the
            minimum B (20 at 0.95, 11 at 0.90, 100 at 0.99).

    Example:
        >>> bootstrap_indices(1000, 0.95)
        (25, 975)
    """
    num_bootstrap = check_int(num_bootstrap, "num_bootstrap", minimum=1)
    confidence = check_confidence(confidence)
    tail = (1.0 - confidence) / 2.0
    lower = round(num_bootstrap * tail)
    if lower < 1:
        minimum = _minimum_replicates(tail)
        raise ValueError(f"num_bootstrap: expected at least {minimum} replicates for confidence {confidence} "
                         f"(round(B * {tail!r}) must be >= 1), received {num_bootstrap}")
    return lower, num_bootstrap - lower


def _minimum_replicates(tail: float) -> int:
    """The smallest B with ``round(B * tail) >= 1``, i.e. ``B * tail > 0.5`` as a float64 product.

    ``0.5 / tail`` gives B to within one; the float products decide the last step either way.
    """
    minimum = max(1, math.floor(0.5 / tail))
    while minimum > 1 and round((minimum - 1) * tail) >= 1:
        minimum -= 1
    while round(minimum * tail) < 1:
        minimum += 1
    return minimum


def check_weights_fit(num_seqs: int, num_bootstrap: int) -> None:
    """Refuse B replicates over S sequences whose weights would not fit in memory (before drawing them, or
    before the work that needs them: the CLI calls it once S is known)."""
    # the draws, the counts and their transposed copy: three int64 [B, S] arrays
    check_allocation((3, num_bootstrap, num_seqs), "num_bootstrap", "bootstrap weights 3 x [B, S]")


def resample_weights(num_seqs: int, num_bootstrap: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Multinomial bootstrap weights: column b counts S draws with replacement from ``0..S-1``.

    Returns:
        int64 ``[S, B]`` with every column summing to S (an ``[0, B]`` tensor when S = 0).

    Example:
        >>> w = resample_weights(5, 100, torch.Generator().manual_seed(0)); w.sum(0).unique().tolist()
        [5]
    """
    num_seqs = check_int(num_seqs, "num_seqs", minimum=0)
    num_bootstrap = check_int(num_bootstrap, "num_bootstrap", minimum=0)
    check_weights_fit(num_seqs, num_bootstrap)
    weights = torch.zeros(num_bootstrap, num_seqs, dtype=torch.int64)
    if num_seqs > 0:
        draws = torch.randint(0, num_seqs, (num_bootstrap, num_seqs), generator=generator)
        weights.scatter_add_(1, draws, torch.ones_like(draws))
    return weights.T.contiguous()


def poisson_weights(num_seqs: int, num_bootstrap: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Poisson(1) weights for streaming bootstrap (SPEC §3 "Streaming"): independent per sequence.

    The total weight of a replicate is random, so this agrees with :func:`resample_weights` only for
    large S, not digit for digit.

    Returns:
        int64 ``[S, B]`` (an ``[0, B]`` tensor when S = 0).

    Example:
        >>> w = poisson_weights(10000, 2, torch.Generator().manual_seed(0)); w.shape, w.dtype
        (torch.Size([10000, 2]), torch.int64)
        >>> round(w.double().mean().item(), 1)                    # Poisson(1): mean 1, std 0.007 here
        1.0
    """
    num_seqs = check_int(num_seqs, "num_seqs", minimum=0)
    num_bootstrap = check_int(num_bootstrap, "num_bootstrap", minimum=0)
    check_allocation((2, num_seqs, num_bootstrap), "num_bootstrap", "Poisson weights 2 x [S, B]")
    rates = torch.ones(num_seqs, num_bootstrap, dtype=torch.float64)
    return torch.poisson(rates, generator=generator).to(torch.int64)


def basic_interval(estimate: torch.Tensor, replicates: torch.Tensor,
                   confidence: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Basic (pivotal) bootstrap interval ``[2·est − r_(up), 2·est − r_(lp)]``, not clipped to [0, 1].

    Args:
        estimate: float ``[...]`` point estimates.
        replicates: float ``[..., B]`` replicate values; a NaN replicate makes that interval NaN.
        confidence: level in (0, 1).

    Returns:
        ``(ci_low, ci_high)``, float64 tensors shaped like ``estimate``.

    Example (SPEC §8 C):
        >>> basic_interval(torch.tensor(0.75, dtype=torch.float64),
        ...                torch.tensor([2/3, 3/4, 3/4, 6/7], dtype=torch.float64), 0.5)[0].item()  # 9/14
        0.6428571428571429
    """
    lower, upper = bootstrap_indices(replicates.shape[-1], confidence)
    estimate = estimate.to(torch.float64)
    replicates = replicates.to(torch.float64)
    ordered = replicates.sort(dim=-1).values
    low = 2.0 * estimate - ordered[..., upper]
    high = 2.0 * estimate - ordered[..., lower]
    undefined = torch.isnan(replicates).any(dim=-1)
    nan = torch.full_like(low, float("nan"))
    return torch.where(undefined, nan, low), torch.where(undefined, nan, high)


def check_bootstrap_options(num_bootstrap, confidence, weights) -> Tuple[int, float]:
    """Validate the bootstrap arguments before any metric work, so a bad B fails fast."""
    num_bootstrap = check_int(num_bootstrap, "num_bootstrap", minimum=0)
    confidence = check_confidence(confidence)
    if num_bootstrap > 0 and weights is None:
        bootstrap_indices(num_bootstrap, confidence)
    return num_bootstrap, confidence


def bootstrap_weights(num_seqs: int, num_bootstrap: int, confidence: float,
                      generator: Optional[torch.Generator] = None,
                      weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The explicit ``weights`` (validated, int64 ``[S, B]``) or freshly drawn multinomial weights."""
    if weights is not None:
        weights = check_weights(weights, num_seqs, num_bootstrap)
    else:
        weights = resample_weights(num_seqs, num_bootstrap, generator)
    bootstrap_indices(weights.shape[1], confidence)
    return weights
