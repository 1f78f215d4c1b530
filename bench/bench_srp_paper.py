"""Benchmark: layer-level SRP with bootstrap CIs and srp_counts against the paper's method (issue 16's table).

Workload: S = 2048 sequences x T = 512 tokens, top-8 of E = 64 experts, L = 4, 16, 64, 256 together, B = 200.

- ``paper``: bench/paper_method.py, written from the issue's description: one int16 ``[T, S, E]`` mask doubled
  in place (every L from the same running mask, one pass), a histogram at each L, ``counts @ weights`` for
  the replicates, then the same scoring as ours (``srp_score``, ``basic_interval``). For the srp row its
  histogram is pooled over experts (``[S, L+1]``, the cheapest form that layer-level SRP needs); for the
  srp_counts row it is the per-expert ``[S, E, L+1]`` that srp_counts returns.
- ``ours``: one ``lrc_kernels.srp(topk, E, [4, 16, 64, 256], level="layer", weights=W)`` call (input
  validated once, one CPU sweep for all L whose kernel pools over experts as it goes), and
  ``lrc_kernels.srp_counts`` for each L.

Both get the same trace and the same weight matrix W; best_f1 and both CI bounds (srp) and every histogram
(srp_counts) must be equal, checked in the same run. Times are wall time, best of ``--repeats`` calls of each
method, the two methods' calls alternating, CPU kernels on ``--threads`` threads, torch (both methods) on
``--torch-threads``. Before timing, freed memory is kept in the process heap (glibc ``mallopt``) and 1 GiB is
touched once, so neither method pays the VM's first-touch cost (~2 ms/MiB) inside a timed call.

Memory: a fresh subprocess (default allocator) runs ours once for warm-up, resets its peak RSS (``5`` to
``/proc/self/clear_refs``), runs all four L, and reports peak RSS minus the RSS before the call.

Example:
    python bench/bench_srp_paper.py --traces sticky uniform zipf --repeats 3
    python bench/bench_srp_paper.py --sequences 256 --repeats 1      # a quick run
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import lrc_kernels  # noqa: E402
import paper_method  # noqa: E402
from _common import best_of_alternating, make_trace, process_memory_kb, reset_peak_rss  # noqa: E402
from lrc_kernels.bootstrap import basic_interval  # noqa: E402


def keep_freed_memory_and_pretouch(num_bytes: int = 1 << 30) -> None:
    """Freed blocks stay in the heap (no munmap, no trim), then touch ``num_bytes`` once."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 62)
    torch.ones(num_bytes // 8, dtype=torch.int64).sum()


def paper_srp(topk, num_experts, seg_lens, weights, confidence):
    results = {}
    for seg_len, per_sequence in paper_method.layer_histograms(topk, num_experts, seg_lens).items():
        estimate = lrc_kernels.srp_score(per_sequence.sum(0)).best_f1
        replicates = lrc_kernels.srp_score(paper_method.bootstrap_replicates(per_sequence, weights)).best_f1
        low, high = basic_interval(estimate, replicates, confidence)
        results[seg_len] = (estimate, low, high)
    return results


def our_srp(topk, num_experts, seg_lens, weights, confidence):
    scores = lrc_kernels.srp(topk, num_experts, list(seg_lens), level="layer", weights=weights,
                             confidence=confidence, backend="cpu")
    return {seg_len: (score.best_f1, score.ci_low, score.ci_high) for seg_len, score in scores.items()}


def our_counts(topk, num_experts, seg_lens):
    return {seg_len: lrc_kernels.srp_counts(topk, num_experts, seg_len, backend="cpu") for seg_len in seg_lens}


def memory_worker(args):
    """Peak RSS beyond the state before the call, of ours on all L (fresh process, default allocator)."""
    topk = make_trace(args.trace, args.sequences, args.tokens, args.experts, args.top_k, seed=args.seed)
    weights = lrc_kernels.resample_weights(args.sequences, args.bootstrap, torch.Generator().manual_seed(0))
    our_srp(topk, args.experts, args.seg_lens, weights, args.confidence)
    before_kb = reset_peak_rss() // 1024
    our_srp(topk, args.experts, args.seg_lens, weights, args.confidence)
    print(json.dumps({"extra_mib": (process_memory_kb("VmHWM") - before_kb) / 1024}))


def measure_memory(args, trace):
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", "--trace", trace,
               "--threads", str(args.threads), "--torch-threads", str(args.torch_threads)]
    for name in ("sequences", "tokens", "experts", "top_k", "bootstrap", "seed"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--seg-lens", *map(str, args.seg_lens)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["extra_mib"]


def bench_trace(args, trace):
    topk = make_trace(trace, args.sequences, args.tokens, args.experts, args.top_k, seed=args.seed)
    weights = lrc_kernels.resample_weights(args.sequences, args.bootstrap, torch.Generator().manual_seed(0))
    extra_mib = measure_memory(args, trace)
    (ours, ours_s), (paper, paper_s) = best_of_alternating(
        [lambda: our_srp(topk, args.experts, args.seg_lens, weights, args.confidence),
         lambda: paper_srp(topk, args.experts, args.seg_lens, weights, args.confidence)], args.repeats, warmup=1)
    for seg_len in args.seg_lens:
        assert all(torch.equal(a, b) for a, b in zip(ours[seg_len], paper[seg_len])), (trace, seg_len)
    (counts, counts_s), (paper_counts, paper_counts_s) = best_of_alternating(
        [lambda: our_counts(topk, args.experts, args.seg_lens),
         lambda: paper_method.expert_histograms(topk, args.experts, args.seg_lens)], args.repeats, warmup=1)
    for seg_len in args.seg_lens:
        assert torch.equal(counts[seg_len], paper_counts[seg_len]), (trace, seg_len)
    print(f"{trace:<8} {'srp, B=' + str(args.bootstrap):<14} {paper_s:>9.3f}s {ours_s:>9.3f}s "
          f"{paper_s / ours_s:>8.1f}x {extra_mib:>10.1f}   equal", flush=True)
    print(f"{trace:<8} {'srp_counts':<14} {paper_counts_s:>9.3f}s {counts_s:>9.3f}s "
          f"{paper_counts_s / counts_s:>8.1f}x {'':>10}   equal", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["sticky", "uniform", "zipf"])
    parser.add_argument("--trace", default="sticky", help=argparse.SUPPRESS)
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seg-lens", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=lrc_kernels.get_num_threads(),
                        help="CPU kernel threads (default: the cores this process may use)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for both methods (default 1: on a shared machine torch's "
                             "OpenMP pool stalls small operations by orders of magnitude)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lrc_kernels.set_num_threads(args.threads)
    torch.set_num_threads(args.torch_threads)
    if args.memory_worker:
        memory_worker(args)
        return
    keep_freed_memory_and_pretouch()
    print(f"S = {args.sequences}, T = {args.tokens}, E = {args.experts}, k = {args.top_k}, L = {args.seg_lens} "
          f"together, B = {args.bootstrap}; {args.threads} CPU kernel thread(s), torch {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()}")
    print(f"{'trace':<8} {'workload':<14} {'paper':>10} {'ours':>10} {'ratio':>9} {'ours MiB':>10}   exact")
    start = time.perf_counter()
    for trace in args.traces:
        bench_trace(args, trace)
    print(f"load average {os.getloadavg()}; {time.perf_counter() - start:.0f}s wall")


if __name__ == "__main__":
    main()
