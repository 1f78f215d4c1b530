"""Benchmark: cache hits at every cache size (SCH, LRU, LFU, Belady) against plain-Python baselines.

Methods, all with token lookup and free-slot hits (the defaults):

- ``api``: the public ``lrc_kernels.cache_hits(..., backend=--backend)`` on all S sequences, input
  validation included, after a warm-up call (numba loads or compiles its kernels there). This is the fast path
  that the ratios are about.
- ``kernel``: the backend function (``lrc_kernels.<backend>.cache.cache_hits``) on the same, already valid
  input, so ``api - kernel`` is the cost of validation and dispatch.
- ``python 1-pass``: the one-pass priority stack of SPEC section 4 for one sequence in plain Python (lists,
  dicts, tuple keys; ``python_single_pass`` below). It stands for a pure-Python research implementation.
  It runs on the first ``--python-sequences`` sequences (``--model-python-sequences`` at model level, where one
  sequence takes seconds) and its time is scaled per sequence.
- ``per-size sim``: one cache simulated per size m in plain Python (``python_per_size`` below; next uses
  and look-ahead counts precomputed, so each reference costs O(1) plus an O(m) victim search on a miss).
  It runs on the first sequence for ``--per-size-samples`` evenly spaced sizes (the midpoints of equal
  blocks of the size range); the time for all sizes is the mean per sampled size times the number of sizes.

Both baselines and the kernel must return exactly the API's integers on what they ran (checked every run).
Ratios are per sequence and measured in the same run; each api and kernel timing is the minimum of
``--repeats``. With ``--backend cpu`` every time is the process's CPU time (``time.process_time``): all
methods are single-threaded, and on a machine shared with other jobs CPU time leaves out the time slices the
scheduler gives to them, so the ratios move less with the load (the GPU path uses wall time). The goals
(>= 200x at layer level, >= 100x at model level, api against the plain-Python one-pass loop) are checked at
the end of each level.

Trace: ``--trace`` (bench/_common.py), fixed seed; by default the sticky-Markov router: per sequence (and per
layer), the E router logits follow an AR(1) process ``x_t = rho*x_{t-1} + sqrt(1-rho^2)*N(0, 1)`` (rho = 0.9)
and token t picks the top-k of ``x_t``.
Model level joins ``--layers`` such layers with ``concat_layers`` (n·E cache slots, n·k references per
token, SPEC section 6).

Example:
    python bench/bench_cache.py                    # S = 64, T = 512, E = 64, k = 8; model level 16 layers
    python bench/bench_cache.py --backend triton   # fast path on the GPU, baselines on the CPU
"""

import argparse
import importlib
import os
import platform
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import lrc_kernels  # noqa: E402
from _common import TRACE_KINDS, Table, best_of, make_trace  # noqa: E402

POLICY_CONFIGS = [("lru", None), ("lfu", None), ("belady", None), ("sch", 4), ("sch", 16), ("sch", 64), ("sch", 256)]
SPEED_GOALS = {"layer level": 200, "model level": 100}  # api over python 1-pass, per sequence


def _future_schedule(rows, num_experts):
    """Flat references, each one's next use (or N + 1 + id if none), and per-token id lists."""
    refs = [x for row in rows for x in row]
    upcoming = [len(refs) + 1 + e for e in range(num_experts)]
    next_use = [0] * len(refs)
    for n in range(len(refs) - 1, -1, -1):
        next_use[n] = upcoming[refs[n]]
        upcoming[refs[n]] = n
    return refs, next_use


def _bookkeeping(rows, num_experts, policy, seg_len):
    """Each reference's next use, the empty per-expert records both baselines update inline (last use,
    frequency, SCH look-ahead count, next use), and the eviction key over them (SPEC section 4 table)."""
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

    return next_use, last_use, frequency, ahead, upcoming, key


def python_single_pass(rows, num_experts, policy, seg_len):
    """hits[m-1] for m = 1..E of one sequence: one priority-stack pass in plain Python (SPEC section 4).

    ``rows`` is a list of T lists of valid ids in processing order. Token lookup, free-slot hits.
    """
    next_use, last_use, frequency, ahead, upcoming, key = _bookkeeping(rows, num_experts, policy, seg_len)

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
    next_use, last_use, frequency, ahead, upcoming, key = _bookkeeping(rows, num_experts, policy, seg_len)

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


def other_stack_kernel(topk, lengths, num_experts, policy, seg_len, hits, args, clock, kernel_seconds):
    """Time the CPU stack kernel that ``SCAN_MAX_SLOTS`` does not pick here (the walk at layer level, the
    branch-free scan at model level) on the same input; its hits must be equal."""
    from lrc_kernels.cpu import cache as cpu_cache

    picked_scan = num_experts <= cpu_cache.SCAN_MAX_SLOTS
    threshold = cpu_cache.SCAN_MAX_SLOTS
    cpu_cache.SCAN_MAX_SLOTS = 0 if picked_scan else num_experts
    try:
        other_hits, other_seconds = best_of(
            lambda: cpu_cache.cache_hits(topk, lengths, num_experts, policy, seg_len, True, "token"), args.repeats,
            clock=clock)
    finally:
        cpu_cache.SCAN_MAX_SLOTS = threshold
    assert torch.equal(other_hits, hits), (policy, seg_len)
    return (f"; {'walk' if picked_scan else 'scan'} {other_seconds / topk.shape[0] * 1e3:.3f}ms "
            f"({other_seconds / kernel_seconds:.2f}x the kernel)")


def bench_level(name, topk, num_experts, python_sequences, args, device):
    num_sequences, num_tokens, num_slots = topk.shape
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    python_sequences = min(python_sequences, num_sequences)
    print(f"\n{name}: S = {num_sequences}, T = {num_tokens}, {num_slots} references per token, "
          f"{num_experts} cache slots; per-sequence times, ratios = baseline / api")
    table = Table(("policy", 9), ("api", 9), ("kernel", 9), ("python 1-pass", 14), ("ratio", 7),
                  ("per-size sim", 13), ("ratio", 8))
    print(table.format_row(table.titles) + "   api - kernel per call; the CPU kernel not picked for this depth")
    topk_device = topk.to(device)
    lengths_device = torch.full((num_sequences,), num_tokens, dtype=torch.int64, device=device)
    backend = importlib.import_module(f"lrc_kernels.{args.backend}.cache")
    block = num_experts / args.per_size_samples
    sampled_sizes = sorted({max(1, min(num_experts, int((j + 0.5) * block))) for j in range(args.per_size_samples)})
    ratios = []
    for policy, seg_len in POLICY_CONFIGS:
        on_gpu = device.type == "cuda"
        hits, api_seconds = best_of(
            lambda: lrc_kernels.cache_hits(topk_device, num_experts, policy, seg_len=seg_len, backend=args.backend),
            args.repeats, clock=clock, cuda=on_gpu)
        kernel_hits, kernel_seconds = best_of(
            lambda: backend.cache_hits(topk_device, lengths_device, num_experts, policy, seg_len, True, "token"),
            args.repeats, clock=clock, cuda=on_gpu)
        hits, kernel_hits = hits.cpu(), kernel_hits.cpu()
        assert torch.equal(kernel_hits, hits), (name, policy, seg_len)
        api_per_sequence = api_seconds / num_sequences

        start = clock()
        for s in range(python_sequences):
            single_pass = python_single_pass(sequence_rows(topk, s), num_experts, policy, seg_len)
            assert single_pass == hits[s].tolist(), (name, policy, seg_len, s)
        single_pass_per_sequence = (clock() - start) / python_sequences

        rows = sequence_rows(topk, 0)
        start = clock()
        for size in sampled_sizes:
            assert python_per_size(rows, num_experts, size, policy, seg_len) == hits[0, size - 1].item()
        per_size_per_sequence = (clock() - start) / len(sampled_sizes) * num_experts

        other = ""
        if args.backend == "cpu" and policy != "lru":
            other = other_stack_kernel(topk_device, lengths_device, num_experts, policy, seg_len, hits, args, clock,
                                       kernel_seconds)
        label = policy if seg_len is None else f"sch({seg_len})"
        ratio = single_pass_per_sequence / api_per_sequence
        ratios.append((ratio, label))
        table.print_row(label, f"{api_per_sequence * 1e3:.3f}ms", f"{kernel_seconds / num_sequences * 1e3:.3f}ms",
                        f"{single_pass_per_sequence * 1e3:.1f}ms", f"{ratio:.0f}x", f"{per_size_per_sequence:.2f}s",
                        f"{per_size_per_sequence / api_per_sequence:.0f}x",
                        suffix=f"   {(api_seconds - kernel_seconds) * 1e3:.2f}ms{other}")
    print(f"python 1-pass timed on {python_sequences} sequence(s); per-size sim on sequence 0 at "
          f"m in {sampled_sizes}, scaled to all {num_experts} sizes")
    goal = SPEED_GOALS[name]
    met = sum(ratio >= goal for ratio, _ in ratios)
    lowest, lowest_label = min(ratios)
    print(f"goal api >= {goal}x python 1-pass: met for {met}/{len(ratios)} policies "
          f"(lowest {lowest:.0f}x, {lowest_label})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "triton"], default="cpu")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16, help="layers of the model-level stream (0 = skip)")
    parser.add_argument("--trace", choices=TRACE_KINDS, default="sticky")
    parser.add_argument("--rho", type=float, default=0.9, help="stickiness of --trace sticky")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python-sequences", type=int, default=8)
    parser.add_argument("--model-python-sequences", type=int, default=2)
    parser.add_argument("--per-size-samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU kernel threads (lrc_kernels.set_num_threads); the goals are for one thread, and "
                             "CPU time sums over threads")
    args = parser.parse_args()
    lrc_kernels.set_num_threads(args.threads)
    device = torch.device("cuda" if args.backend == "triton" else "cpu")

    print(f"{platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()}, Python "
          f"{platform.python_version()}, torch {torch.__version__}, lrc_kernels {lrc_kernels.__version__}")
    start = time.perf_counter()
    warm_up = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=device)
    for policy, seg_len in POLICY_CONFIGS[:4]:
        lrc_kernels.cache_hits(warm_up, 4, policy, seg_len=seg_len, backend=args.backend)
    print(f"backend {args.backend}: first calls (numba cache load or compile) {time.perf_counter() - start:.2f}s")
    run_start = time.perf_counter()

    layer = make_trace(args.trace, args.sequences, args.tokens, args.experts, args.top_k, rho=args.rho, seed=args.seed)
    bench_level("layer level", layer, args.experts, args.python_sequences, args, device)
    if args.layers > 0:
        layers = make_trace(args.trace, args.layers * args.sequences, args.tokens, args.experts, args.top_k,
                            rho=args.rho, seed=args.seed + 1).reshape(args.layers, args.sequences, args.tokens,
                                                                      args.top_k)
        model = lrc_kernels.concat_layers(layers, args.experts).to(torch.int32).contiguous()
        bench_level("model level", model, args.layers * args.experts, args.model_python_sequences, args, device)
    print(f"\nload average {os.getloadavg()}; total {time.perf_counter() - run_start:.0f}s wall")


if __name__ == "__main__":
    main()
