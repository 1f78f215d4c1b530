"""Shared pieces of the bench scripts: routing-trace generators, a best-of-N timer and a table printer.

Traces are int32 ``[S, T, k]`` top-k expert ids without -1 (unless ``drop`` > 0), full length:

- ``sticky``: per sequence the E router logits follow an AR(1) process ``x_t = rho*x_{t-1} +
  sqrt(1-rho^2)*N(0, 1)`` and token t picks the top-k of ``x_t``, so consecutive tokens share most experts,
  as real routers do (rho = 0.9 by default);
- ``uniform``: fresh logits every token (the sticky process with rho = 0), no locality;
- ``zipf``: k distinct experts per token drawn without replacement with popularity ``1 / rank**exponent``,
  skewed but without temporal locality.

Scripts import it as ``from _common import ...`` (each puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

TRACE_KINDS = ("sticky", "uniform", "zipf")


def sticky_trace(num_sequences: int, num_tokens: int, num_experts: int, top_k: int, *, rho: float = 0.9,
                 seed: int = 0, generator: Optional[torch.Generator] = None, drop: float = 0.0,
                 device="cpu") -> torch.Tensor:
    """int32 ``[S, T, k]`` top-k ids of AR(1) router logits; each slot becomes -1 with probability ``drop``.

    ``generator`` (on ``device``) continues a caller's random stream; otherwise one seeded with ``seed``.
    """
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(num_sequences, num_experts, generator=generator, device=device)
    topk = torch.empty(num_sequences, num_tokens, top_k, dtype=torch.int32, device=device)
    innovation_scale = math.sqrt(1.0 - rho * rho)
    for t in range(num_tokens):
        logits = rho * logits + innovation_scale * torch.randn(num_sequences, num_experts, generator=generator,
                                                               device=device)
        topk[:, t] = logits.topk(top_k, dim=-1).indices.to(torch.int32)
    if drop > 0:
        dropped = torch.rand(topk.shape, generator=generator, device=device) < drop
        topk = torch.where(dropped, torch.full_like(topk, -1), topk)
    return topk.contiguous()


def uniform_trace(num_sequences: int, num_tokens: int, num_experts: int, top_k: int, *, seed: int = 0,
                  **options) -> torch.Tensor:
    """int32 ``[S, T, k]``: every token's k experts uniformly at random (:func:`sticky_trace` with rho = 0)."""
    return sticky_trace(num_sequences, num_tokens, num_experts, top_k, rho=0.0, seed=seed, **options)


def zipf_trace(num_sequences: int, num_tokens: int, num_experts: int, top_k: int, *, exponent: float = 1.2,
               seed: int = 0, device="cpu") -> torch.Tensor:
    """int32 ``[S, T, k]``: k distinct experts per token, popularity ``1 / rank**exponent`` (random ranks)."""
    generator = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** exponent
    ranked = torch.randperm(num_experts, generator=generator)
    draws = torch.multinomial(popularity.expand(num_sequences * num_tokens, -1), top_k, replacement=False,
                              generator=generator)
    topk = ranked[draws].view(num_sequences, num_tokens, top_k)
    return topk.to(device=device, dtype=torch.int32).contiguous()


def make_trace(kind: str, num_sequences: int, num_tokens: int, num_experts: int, top_k: int, *,
               rho: float = 0.9, seed: int = 0) -> torch.Tensor:
    """The ``kind`` trace (one of :data:`TRACE_KINDS`) on the CPU; ``rho`` only shapes ``sticky``."""
    if kind == "sticky":
        return sticky_trace(num_sequences, num_tokens, num_experts, top_k, rho=rho, seed=seed)
    if kind == "uniform":
        return uniform_trace(num_sequences, num_tokens, num_experts, top_k, seed=seed)
    if kind == "zipf":
        return zipf_trace(num_sequences, num_tokens, num_experts, top_k, seed=seed)
    raise ValueError(f"kind: expected one of {TRACE_KINDS}, received {kind!r}")


def full_lengths(topk: torch.Tensor) -> torch.Tensor:
    """int64 ``[S]`` lengths, every sequence full (T), on the trace's device."""
    return torch.full((topk.shape[0],), topk.shape[1], dtype=torch.int64, device=topk.device)


def reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0, ``/proc/self/clear_refs``); -> RSS bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return process_memory_kb("VmRSS") * 1024


def process_memory_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB: ``VmRSS`` (current) or ``VmHWM`` (peak since the reset)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def best_of(run: Callable[[], object], repeats: int, *, warmup: int = 0,
            clock: Callable[[], float] = time.perf_counter, cuda: bool = False) -> Tuple[object, float]:
    """``(last result, fastest seconds)`` of ``repeats`` calls of ``run()`` after ``warmup`` untimed calls.

    The minimum is the figure least disturbed by other jobs on a shared machine. ``cuda=True`` synchronises
    the device around each call, so a GPU time includes the kernels it launched.
    """
    for _ in range(warmup):
        run()
    best, result = math.inf, None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        result = run()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return result, best


def best_of_alternating(runs: Sequence[Callable[[], object]], repeats: int, *, warmup: int = 0,
                        clock: Callable[[], float] = time.perf_counter) -> List[Tuple[object, float]]:
    """:func:`best_of` for several methods whose calls alternate (one call of each per round).

    Each method's fastest call then comes from the same minutes as the others', so a ratio between them moves
    less with the load of a shared machine than when each method's calls run as one block.
    """
    for _ in range(warmup):
        for run in runs:
            run()
    best, results = [math.inf] * len(runs), [None] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = clock()
            results[index] = run()
            best[index] = min(best[index], clock() - start)
    return list(zip(results, best))


class Table:
    """Fixed-width rows printed as they are measured; the first column is aligned by ``first`` (``"<"``
    left, ``">"`` right), the others right.

    Example:
        >>> table = Table(("policy", 9), ("api", 9)); table.print_header(); table.print_row("lru", "1.2ms")
        policy          api
        lru           1.2ms
    """

    def __init__(self, *columns: Tuple[str, int], first: str = "<"):
        self.widths = [width for _, width in columns]
        self.titles = [title for title, _ in columns]
        self.first = first

    def format_row(self, cells: Sequence[object]) -> str:
        if len(cells) > len(self.widths):
            raise ValueError(f"cells: expected at most {len(self.widths)}, received {len(cells)}")
        return " ".join(f"{cell!s:{self.first if column == 0 else '>'}{width}}"
                        for column, (cell, width) in enumerate(zip(cells, self.widths)))

    def print_header(self) -> None:
        print(self.format_row(self.titles))

    def print_row(self, *cells: object, suffix: str = "") -> None:
        print(self.format_row(cells) + suffix, flush=True)
