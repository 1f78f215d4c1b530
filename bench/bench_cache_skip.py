"""Benchmark: the model-level cache walk with and without its block skips (lrc_kernels/cpu/cache_stack.py).

Model-level streams (``--layers`` layers of ``--experts`` experts joined by ``concat_layers``, n·E cache
slots, n·k references per token) are deeper than ``SCAN_MAX_SLOTS``, so LFU, Belady and SCH run the
branching walk ``_stack_depth_hits``. Both columns call that kernel on the same stream: ``no skip`` with
blocks larger than the stack (the walk visits every position down to x), ``skip`` with the library's
``LOG_SKIP_BLOCK`` (blocks whose key bound is not below the carry are passed over). Their integers must be
equal (checked); times are process CPU time, one thread, best of ``--repeats``.

Example:
    python bench/bench_cache_skip.py                          # 16 x 64 and 48 x 128, three traces
    python bench/bench_cache_skip.py --shapes 16x64 --traces sticky --repeats 1
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import lrc_kernels  # noqa: E402
from _common import TRACE_KINDS, best_of, make_trace  # noqa: E402
from lrc_kernels.cpu import cache as cpu_cache  # noqa: E402
from lrc_kernels.cpu import cache_stack  # noqa: E402

STACK_POLICIES = [("lfu", None), ("belady", None), ("sch", 4), ("sch", 16), ("sch", 64), ("sch", 256)]
NO_SKIP = 62  # a block of 2^62 positions never fits in a stack, so no block is ever passed over


def walk_hits(stream, slots, policy, seg_len, log_block):
    lengths = np.full(stream.shape[0], stream.shape[1], np.int64)
    hits = np.zeros((stream.shape[0], slots), np.int64)
    look_ahead = min(seg_len, stream.shape[1] + 1) if policy == "sch" else 0
    cache_stack._stack_depth_hits(stream, lengths, hits, slots, cpu_cache._STACK_POLICY_CODES[policy], look_ahead,
                                  True, False, log_block)
    return hits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["16x64", "48x128"], help="LAYERSxEXPERTS")
    parser.add_argument("--traces", nargs="+", choices=TRACE_KINDS, default=list(TRACE_KINDS))
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"per-sequence CPU time, {args.sequences} sequences x {args.tokens} tokens, top-{args.top_k}, skip "
          f"blocks of {1 << cpu_cache.LOG_SKIP_BLOCK}; load average {os.getloadavg()}")
    print(f"{'shape':<8} {'trace':<8} {'policy':<9} {'no skip ms':>11} {'skip ms':>9} {'ratio':>7}")
    walk_hits(np.zeros((1, 2, 2), np.int32), 300, "lfu", None, NO_SKIP)  # compile or load the kernel
    for shape in args.shapes:
        num_layers, num_experts = map(int, shape.split("x"))
        for trace in args.traces:
            layers = torch.stack([make_trace(trace, args.sequences, args.tokens, num_experts, args.top_k,
                                             seed=layer) for layer in range(num_layers)])
            stream = lrc_kernels.concat_layers(layers, num_experts).to(torch.int32).contiguous().numpy()
            slots = num_layers * num_experts
            for policy, seg_len in STACK_POLICIES:
                plain, plain_s = best_of(lambda: walk_hits(stream, slots, policy, seg_len, NO_SKIP), args.repeats,
                                         clock=time.process_time)
                skipped, skip_s = best_of(lambda: walk_hits(stream, slots, policy, seg_len,
                                                            cpu_cache.LOG_SKIP_BLOCK), args.repeats,
                                          clock=time.process_time)
                assert (plain == skipped).all(), (shape, trace, policy, seg_len)
                label = policy if seg_len is None else f"sch({seg_len})"
                print(f"{shape:<8} {trace:<8} {label:<9} {plain_s / args.sequences * 1e3:>11.2f} "
                      f"{skip_s / args.sequences * 1e3:>9.2f} {plain_s / skip_s:>6.2f}x", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
