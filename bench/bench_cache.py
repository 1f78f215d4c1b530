"""Benchmark: cache hits at every cache size (SCH, LRU, LFU, Belady) against plain-Python baselines.

Methods, all with token lookup and free-slot hits (the defaults):

- ``fast``: the public ``lrc_kernels.cache_hits(..., backend=--backend)`` on all S sequences, input
  validation included, after a warm-up call (numba loads or compiles its one signature there).
- ``python 1-pass``: the one-pass priority stack of SPEC section 4 for one sequence in plain Python (lists,
  dicts, tuple keys; ``python_single_pass`` below). It stands for a pure-Python research implementation.
  It runs on the first ``--python-sequences`` sequences and its time is scaled per sequence.
- ``per-size sim``: one cache simulated per size m in plain Python (``python_per_size`` below; next uses
  and look-ahead counts precomputed, so each reference costs O(1) plus an O(m) victim search on a miss).
  It runs on the first sequence for ``--per-size-samples`` evenly spaced sizes (the midpoints of equal
  blocks of the size range); the time for all sizes is the mean per sampled size times the number of sizes.

Both baselines must return exactly the fast path's integers on what they ran (checked every run).
Ratios are per sequence and measured in the same run; each fast timing is the minimum of ``--repeats``.

Trace: sticky-Markov router, fixed seed. Per sequence (and per layer), the E router logits follow an AR(1)
process ``x_t = rho*x_{t-1} + sqrt(1-rho^2)*N(0, 1)`` (rho = 0.9) and token t picks the top-k of ``x_t``.
Model level joins ``--layers`` such layers with ``concat_layers`` (n·E cache slots, n·k references per
token, SPEC section 6).

Example:
    python bench/bench_cache.py                    # S = 64, T = 512, E = 64, k = 8; model level 16 layers
    python bench/bench_cache.py --backend triton   # fast path on the GPU, baselines on the CPU
"""

import argparse
import math
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lrc_kernels.cache import cache_hits  # noqa: E402
from lrc_kernels.routing import concat_layers  # noqa: E402

POLICY_CONFIGS = [("lru", None), ("lfu", None), ("belady", None), ("sch", 4), ("sch", 16), ("sch", 64), ("sch", 256)]


def sticky_trace(num_sequences, num_tokens, num_experts, top_k, rho, seed):
    """int32 ``[S, T, k]`` top-k ids of AR(1) router logits (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_sequences, num_experts, generator=generator)
    topk = torch.empty(num_sequences, num_tokens, top_k, dtype=torch.int32)
    innovation_scale = math.sqrt(1.0 - rho * rho)
    for t in range(num_tokens):
        logits = rho * logits + innovation_scale * torch.randn(num_sequences, num_experts, generator=generator)
        topk[:, t] = logits.topk(top_k, dim=-1).indices.to(torch.int32)
    return topk


def _future_schedule(rows, num_experts):
    """Flat references, each one's next use (or N + 1 + id if none), and per-token id lists."""
    refs = [x for row in rows for x in row]
    upcoming = [len(refs) + 1 + e for e in range(num_experts)]
    next_use = [0] * len(refs)
    for n in range(len(refs) - 1, -1, -1):
        next_use[n] = upcoming[refs[n]]
        upcoming[refs[n]] = n
    return refs, next_use


def python_single_pass(rows, num_experts, policy, seg_len):
    """hits[m-1] for m = 1..E of one sequence: one priority-stack pass in plain Python (SPEC section 4).

    ``rows`` is a list of T lists of valid ids in processing order. Token lookup, free-slot hits.
    """
    _, next_use = _future_schedule(rows, num_experts)
    last_use, frequency, ahead, upcoming = {}, {}, {}, {}
    if policy == "sch":
        for row in rows[:seg_len]:
            for y in row:
                ahead[y] = ahead.get(y, 0) + 1

    def key(y):
        if policy == "lru":
            return (last_use[y],)
        if policy == "lfu":
            return (frequency[y], last_use[y])
        if policy == "belady":
            return (-upcoming[y],)
        return (ahead[y], last_use[y])

    stack = []
    at_depth = [0] * num_experts
    n = 0
    for i, row in enumerate(rows):
        depth_of_new = len(stack)
        for x in row:
            if x in last_use:
                at_depth[stack.index(x)] += 1
            else:
                at_depth[depth_of_new] += 1
                depth_of_new += 1
        for x in row:
            if x in last_use:
                depth = stack.index(x)
            else:
                depth = len(stack)
                stack.append(x)
            if depth > 0:
                carry = stack[0]
                for q in range(1, depth):
                    if key(stack[q]) < key(carry):
                        stack[q], carry = carry, stack[q]
                stack[depth] = carry
            stack[0] = x
            last_use[x] = n
            frequency[x] = frequency.get(x, 0) + 1
            upcoming[x] = next_use[n]
            if policy == "sch":
                ahead[x] -= 1
            n += 1
        if policy == "sch" and i + seg_len < len(rows):
            for y in rows[i + seg_len]:
                ahead[y] = ahead.get(y, 0) + 1
    hits, total = [], 0
    for count in at_depth:
        total += count
        hits.append(total)
    return hits


def python_per_size(rows, num_experts, cache_size, policy, seg_len):
    """Hits of ONE cache of ``cache_size`` experts on one sequence (SPEC section 4 protocol, plain Python)."""
    refs, next_use = _future_schedule(rows, num_experts)
    last_use, frequency, ahead, upcoming = {}, {}, {}, {}
    if policy == "sch":
        for row in rows[:seg_len]:
            for y in row:
                ahead[y] = ahead.get(y, 0) + 1

    def key(y):
        if policy == "lru":
            return (last_use[y],)
        if policy == "lfu":
            return (frequency[y], last_use[y])
        if policy == "belady":
            return (-upcoming[y],)
        return (ahead[y], last_use[y])

    cache = set()
    hits = 0
    n = 0
    for i, row in enumerate(rows):
        free_slots = cache_size - len(last_use)
        for x in row:
            if x in cache:
                hits += 1
            elif x not in last_use:
                hits += free_slots > 0
                free_slots -= 1
        for x in row:
            if x not in cache:
                if len(cache) == cache_size:
                    cache.remove(min(cache, key=key))
                cache.add(x)
            last_use[x] = n
            frequency[x] = frequency.get(x, 0) + 1
            upcoming[x] = next_use[n]
            if policy == "sch":
                ahead[x] -= 1
            n += 1
        if policy == "sch" and i + seg_len < len(rows):
            for y in rows[i + seg_len]:
                ahead[y] = ahead.get(y, 0) + 1
    return hits


def sequence_rows(topk, s):
    return [[x for x in row if x >= 0] for row in topk[s].tolist()]


def time_fast(topk, num_experts, policy, seg_len, backend, repeats, device):
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        hits = cache_hits(topk, num_experts, policy, seg_len=seg_len, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return hits.cpu(), best


def bench_level(name, topk, num_experts, args, device):
    num_sequences, num_tokens, num_slots = topk.shape
    print(f"\n{name}: S = {num_sequences}, T = {num_tokens}, {num_slots} references per token, "
          f"{num_experts} cache slots; per-sequence times")
    print(f"{'policy':<9} {'fast':>10} {'python 1-pass':>14} {'ratio':>8} {'per-size sim':>13} {'ratio':>8}")
    topk_device = topk.to(device)
    block = num_experts / args.per_size_samples
    sampled_sizes = sorted({max(1, min(num_experts, int((j + 0.5) * block))) for j in range(args.per_size_samples)})
    for policy, seg_len in POLICY_CONFIGS:
        hits, fast_seconds = time_fast(topk_device, num_experts, policy, seg_len, args.backend, args.repeats, device)
        fast_per_sequence = fast_seconds / num_sequences

        start = time.perf_counter()
        for s in range(args.python_sequences):
            single_pass = python_single_pass(sequence_rows(topk, s), num_experts, policy, seg_len)
            assert single_pass == hits[s].tolist(), (name, policy, seg_len, s)
        single_pass_per_sequence = (time.perf_counter() - start) / args.python_sequences

        rows = sequence_rows(topk, 0)
        start = time.perf_counter()
        for size in sampled_sizes:
            assert python_per_size(rows, num_experts, size, policy, seg_len) == hits[0, size - 1].item()
        per_size_per_sequence = (time.perf_counter() - start) / len(sampled_sizes) * num_experts

        label = policy if seg_len is None else f"sch({seg_len})"
        print(f"{label:<9} {fast_per_sequence * 1e3:>8.3f}ms {single_pass_per_sequence * 1e3:>12.1f}ms "
              f"{single_pass_per_sequence / fast_per_sequence:>7.0f}x {per_size_per_sequence:>12.2f}s "
              f"{per_size_per_sequence / fast_per_sequence:>7.0f}x")
    print(f"python 1-pass timed on {args.python_sequences} sequence(s); per-size sim on sequence 0 at "
          f"m in {sampled_sizes}, scaled to all {num_experts} sizes")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "triton"], default="cpu")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16, help="layers of the model-level stream (0 = skip)")
    parser.add_argument("--rho", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python-sequences", type=int, default=2)
    parser.add_argument("--per-size-samples", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if args.backend == "triton" else "cpu")

    start = time.perf_counter()
    warm_up = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=device)
    for policy, seg_len in POLICY_CONFIGS[:4]:
        cache_hits(warm_up, 4, policy, seg_len=seg_len, backend=args.backend)
    print(f"backend {args.backend}: first calls (numba cache load or compile) {time.perf_counter() - start:.2f}s")

    layer = sticky_trace(args.sequences, args.tokens, args.experts, args.top_k, args.rho, args.seed)
    bench_level("layer level", layer, args.experts, args, device)
    if args.layers > 0:
        layers = sticky_trace(args.layers * args.sequences, args.tokens, args.experts, args.top_k, args.rho,
                              args.seed + 1).reshape(args.layers, args.sequences, args.tokens, args.top_k)
        model = concat_layers(layers, args.experts).to(torch.int32).contiguous()
        bench_level("model level", model, args.layers * args.experts, args, device)


if __name__ == "__main__":
    main()
