"""Benchmark: SRP count histograms (and segment coverage) against the dense one-hot method.

Three methods per cell: ``dense`` (below), ``api`` (the public ``lrc_kernels.srp_counts`` /
``segment_coverage`` with ``backend=--backend``, input validation included) and ``kernel`` (the backend
module ``lrc_kernels.<backend>.srp`` on already-valid inputs). All must return identical integers.

Each (method, L, S) cell runs in a fresh subprocess so that its memory is measured in isolation:
after imports, input generation and a warm-up call, the process resets its peak RSS (``5`` written to
``/proc/self/clear_refs``, Linux >= 4.0) and reads its current RSS as the baseline; after the first timed
call it reads the peak (``VmHWM``). "Extra" memory is peak - baseline - size of the returned tensor, i.e.
everything the method needed beyond its output. With ``--backend triton`` the inputs live on the GPU and
memory is ``torch.cuda.max_memory_allocated`` relative to the allocation after warm-up.

Trace: ``--trace`` (bench/_common.py; default the sticky-Markov router, rho = 0.9) with a fixed seed, generated
once per S by the parent and loaded by every worker. All sequences have full length and there are no -1 slots.
Before timing, the dense baseline is checked against the CPU kernel on a small trace with -1 slots and random
lengths.

Dense baseline (vectorised torch, no Python loop over sequences or tokens): one-hot int16 ``[T, S, E]``;
window sums of length 1, 2, 4, ... by doubling, combined along the binary digits of L into ``C [W, S, E]``;
histogram by ``scatter_add_`` of ones at ``((s*E + e)*(L+1) + C)``. Its coverage is the descending sort of C
over experts, cumulative sum, summed over windows.

Example:
    python bench/bench_srp.py                      # S = 2048 and S = 128, L in {4, 16, 64, 256}
    python bench/bench_srp.py --sizes 128 --seg-lens 4 16
"""

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from _common import (TRACE_KINDS, Table, full_lengths, make_trace, process_memory_kb, reset_peak_rss,  # noqa: E402
                     sticky_trace)


def dense_window_counts(topk, lengths, num_experts, seg_len):
    """int16 ``[W, S, E]`` window counts for the W = T - L + 1 window starts of the padded length."""
    num_sequences, num_tokens, _ = topk.shape
    token_valid = torch.arange(num_tokens, device=topk.device)[:, None] < lengths[None, :]
    ids = topk.transpose(0, 1).long()
    onehot = torch.zeros((num_tokens, num_sequences, num_experts), dtype=torch.int16, device=topk.device)
    onehot.scatter_add_(2, ids.clamp(min=0), ((ids >= 0) & token_valid[:, :, None]).to(torch.int16))
    num_windows = num_tokens - seg_len + 1
    window_counts = None
    block, block_len, offset = onehot, 1, 0
    while block_len <= seg_len:
        if seg_len & block_len:
            part = block[offset : offset + num_windows]
            window_counts = part.clone() if window_counts is None else window_counts.add_(part)
            offset += block_len
        if 2 * block_len <= seg_len:
            block = block[:-block_len] + block[block_len:]
        block_len *= 2
    return window_counts


def dense_srp_counts(topk, lengths, num_experts, seg_len):
    num_sequences, num_tokens, _ = topk.shape
    num_bins = seg_len + 1
    histograms = torch.zeros(num_sequences * num_experts * num_bins + 1, dtype=torch.int64, device=topk.device)
    if num_tokens >= seg_len:
        window_counts = dense_window_counts(topk, lengths, num_experts, seg_len)
        num_windows = window_counts.shape[0]
        cell = torch.arange(num_sequences * num_experts, device=topk.device).view(num_sequences, num_experts)
        index = cell * num_bins + window_counts
        # windows past a sequence's own length go to one discarded bin at the end
        window_valid = torch.arange(num_windows, device=topk.device)[:, None] <= (lengths - seg_len)[None, :]
        index = torch.where(window_valid[:, :, None], index, histograms.numel() - 1).view(-1)
        histograms.scatter_add_(0, index, torch.ones(1, dtype=torch.int64, device=topk.device).expand(index.numel()))
    return histograms[:-1].view(num_sequences, num_experts, num_bins)


def dense_segment_coverage(topk, lengths, num_experts, seg_len):
    num_sequences, num_tokens, _ = topk.shape
    coverage = torch.zeros((num_sequences, num_experts), dtype=torch.int64, device=topk.device)
    if num_tokens >= seg_len:
        window_counts = dense_window_counts(topk, lengths, num_experts, seg_len)
        num_windows = window_counts.shape[0]
        window_valid = torch.arange(num_windows, device=topk.device)[:, None] <= (lengths - seg_len)[None, :]
        top_counts = window_counts.sort(dim=-1, descending=True).values.cumsum(-1, dtype=torch.int64)
        coverage += (top_counts * window_valid[:, :, None]).sum(0)
    return coverage


def library_method(metric, entry, backend):
    """The path under test: ``entry="api"`` is the public ``lrc_kernels.<metric>`` (validation included),
    ``entry="kernel"`` the backend module called directly on already-valid inputs."""
    if entry == "api":
        import lrc_kernels

        public = getattr(lrc_kernels, metric)
        return lambda topk, lengths, num_experts, seg_len: public(
            topk, num_experts, seg_len, lengths=lengths, backend=backend
        )
    return getattr(importlib.import_module(f"lrc_kernels.{backend}.srp"), metric)


def public_api_available(metric):
    try:
        import lrc_kernels
    except ImportError:
        return False
    return hasattr(lrc_kernels, metric)


def worker(cell):
    """Runs one (method, metric, S, L) cell and prints a JSON line with time and memory."""
    device = "cuda" if cell["backend"] == "triton" else "cpu"
    if cell["method"] == "dense":
        method = dense_srp_counts if cell["metric"] == "srp_counts" else dense_segment_coverage
    else:
        method = library_method(cell["metric"], cell["method"], cell["backend"])
    topk, lengths = (tensor.to(device) for tensor in torch.load(cell["trace_path"]))
    warmup_topk = sticky_trace(2, cell["seg_len"] + 3, cell["E"], cell["k"], rho=cell["rho"], seed=1).to(device)
    warmup_lengths = full_lengths(warmup_topk)
    start = time.perf_counter()
    method(warmup_topk, warmup_lengths, cell["E"], cell["seg_len"])
    first_call_s = time.perf_counter() - start

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_bytes = torch.cuda.memory_allocated()
    else:
        baseline_bytes = reset_peak_rss()
    times = []
    for repeat in range(cell["repeats"]):
        start = time.perf_counter()
        result = method(topk, lengths, cell["E"], cell["seg_len"])
        synchronize()
        times.append(time.perf_counter() - start)
        if repeat == 0:
            peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else process_memory_kb("VmHWM") * 1024
            output_bytes = result.numel() * result.element_size()
            extra_bytes = peak_bytes - baseline_bytes - output_bytes
            checksum = int((result.double() * torch.arange(1, result.shape[-1] + 1, device=device)).sum())
        del result
    print(json.dumps({"time_s": min(times), "first_call_s": first_call_s, "extra_bytes": extra_bytes,
                      "output_bytes": output_bytes, "checksum": checksum}))


def run_cell(cell, env=None):
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cell)],
        capture_output=True, text=True, env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker failed for {cell}:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def numba_compile_seconds():
    """Cold compile (empty numba cache) and cached-load times of the CPU kernels, each in a fresh process."""
    probe = (
        "import time, torch; t = time.perf_counter(); "
        "from lrc_kernels.cpu.srp import srp_counts, segment_coverage; "
        "x = torch.tensor([[[0, 1], [2, -1], [1, 3], [0, 2]]], dtype=torch.int32); n = torch.tensor([4]); "
        "srp_counts(x, n, 4, 2); segment_coverage(x, n, 4, 2); print(time.perf_counter() - t)"
    )

    def timed(env):
        output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        if output.returncode != 0:
            raise RuntimeError(output.stderr)
        return float(output.stdout.strip())

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = timed({**os.environ, "NUMBA_CACHE_DIR": cache_dir})
        cached = timed({**os.environ, "NUMBA_CACHE_DIR": cache_dir})
    return cold, cached


def check_dense_baseline(args):
    """The baseline must be exact too: compare it with the CPU kernel on a small trace with -1 and lengths."""
    from lrc_kernels.cpu import srp as cpu_srp

    generator = torch.Generator().manual_seed(args.seed)
    topk = sticky_trace(16, 40, args.experts, args.top_k, rho=args.rho, seed=args.seed)
    topk[torch.rand(topk.shape, generator=generator) < 0.2] = -1
    lengths = torch.randint(0, 41, (16,), generator=generator)
    for seg_len in (1, 3, 16, 40, 41):
        for dense, kernel in ((dense_srp_counts, cpu_srp.srp_counts),
                              (dense_segment_coverage, cpu_srp.segment_coverage)):
            expected = kernel(topk, lengths, args.experts, seg_len)
            if not torch.equal(dense(topk, lengths, args.experts, seg_len), expected):
                raise RuntimeError(f"{dense.__name__} disagrees with {kernel.__name__} at L={seg_len}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "triton"], default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 128], help="numbers of sequences S")
    parser.add_argument("--seg-lens", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--metrics", nargs="+", choices=["srp_counts", "segment_coverage"],
                        default=["srp_counts", "segment_coverage"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--trace", choices=TRACE_KINDS, default="sticky")
    parser.add_argument("--rho", type=float, default=0.9, help="stickiness of --trace sticky")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell; the minimum is reported")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    check_dense_baseline(args)
    entries = (["api"] if public_api_available(args.metrics[0]) else []) + ["kernel"]
    trace = f"sticky-Markov AR(1) logits rho={args.rho}" if args.trace == "sticky" else args.trace
    print(f"trace: {trace}, seed={args.seed}, T={args.tokens}, "
          f"E={args.experts}, k={args.top_k}, full lengths, no -1; backend={args.backend}; "
          f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, repeats={args.repeats} (min)")
    print("api = public lrc_kernels entry point (validation included); kernel = backend module called directly; "
          "extra MiB = peak RSS beyond baseline and output "
          "(negative: pages of the output that were never touched)")
    if args.backend == "cpu":
        cold, cached = numba_compile_seconds()
        print(f"numba: cold compile of both kernels {cold:.2f} s, load from cache {cached:.2f} s "
              f"(fresh process, imports included; excluded from the timings below)")
    mib = 1024 * 1024
    columns = ["dense"] + entries
    trace_dir = tempfile.TemporaryDirectory()
    trace_paths = {}
    for num_sequences in args.sizes:
        trace_paths[num_sequences] = os.path.join(trace_dir.name, f"trace_S{num_sequences}.pt")
        topk = make_trace(args.trace, num_sequences, args.tokens, args.experts, args.top_k, rho=args.rho,
                          seed=args.seed)
        torch.save((topk, full_lengths(topk)), trace_paths[num_sequences])
    for metric in args.metrics:
        for num_sequences in args.sizes:
            print(f"\n{metric}, S={num_sequences}")
            table = Table(("L", 5), *((f"{name} s", 9) for name in columns), *((f"x {name}", 9) for name in entries),
                          *((f"{name} MiB", 11) for name in columns), *((f"mem {name}", 11) for name in entries),
                          ("out MiB", 8), first=">")
            table.print_header()
            total_time = dict.fromkeys(columns, 0.0)
            max_extra = dict.fromkeys(columns, -math.inf)
            for seg_len in args.seg_lens:
                cell = {"metric": metric, "S": num_sequences, "T": args.tokens, "E": args.experts, "k": args.top_k,
                        "seg_len": seg_len, "rho": args.rho, "seed": args.seed, "repeats": args.repeats,
                        "backend": args.backend, "trace_path": trace_paths[num_sequences]}
                results = {name: run_cell({**cell, "method": name}) for name in columns}
                checksums = {name: result["checksum"] for name, result in results.items()}
                if len(set(checksums.values())) != 1:
                    raise RuntimeError(f"results differ at {cell}: {checksums}")
                for name, result in results.items():
                    total_time[name] += result["time_s"]
                    max_extra[name] = max(max_extra[name], result["extra_bytes"])
                table.print_row(*_cells(seg_len, {n: r["time_s"] for n, r in results.items()},
                                        {n: r["extra_bytes"] for n, r in results.items()}, entries, mib),
                                f"{results['kernel']['output_bytes'] / mib:.1f}")
            table.print_row(*_cells("all", total_time, max_extra, entries, mib),
                            suffix="   (times summed; memory: max over L)")
    trace_dir.cleanup()


def _cells(label, times, extra, entries, mib):
    return [label, *(f"{times[name]:.4f}" for name in times),
            *(f"{times['dense'] / times[name]:.1f}x" for name in entries),
            *(f"{extra[name] / mib:.1f}" for name in extra),
            *(_ratio(extra[name], extra["dense"]) for name in entries)]


def _ratio(ours, dense):
    return f"1/{dense / ours:.0f}" if ours > 0 else "<=0"


if __name__ == "__main__":
    main()
