"""Benchmark: validation of a CPU routing tensor, the two repeated-id checks of lrc_kernels/cpu/validate.py.

``check_topk`` (the validation every public CPU call runs) picks its repeated-id check by E: bit registers and
a popcount per row for E <= 128, a per-expert stamp array above. The same ids (all below 128) are validated
as E = 128 and as E = 129, so both checks read identical input in one run and the ratio compares them alone.

Inputs: the sticky-Markov trace of bench/_common.py (S x T x k, ids of 128 experts), as int32 contiguous full length
(checked without a copy) and as int64 (checked while written to an int32 copy). Times are the minimum of
``--repeats`` calls, after a warm-up call.

    python bench/bench_validate.py
"""

import argparse
import os
import sys


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))

from _common import Table, best_of, sticky_trace  # noqa: E402
from lrc_kernels._checks import check_topk  # noqa: E402
from lrc_kernels.cpu.validate import _REGISTER_CHECK_MAX_EXPERTS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    experts = _REGISTER_CHECK_MAX_EXPERTS
    topk = sticky_trace(args.sequences, args.tokens, experts, args.top_k)
    print(f"trace: sticky-Markov, S={args.sequences}, T={args.tokens}, k={args.top_k}, ids of {experts} experts; "
          f"minimum of {args.repeats} calls; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    table = Table(("input", 28), ("registers (E=128)", 18), ("stamp (E=129)", 14), ("stamp/registers", 16))
    table.print_header()
    for label, ids in (("int32, contiguous (no copy)", topk), ("int64 (int32 copy written)", topk.long())):
        _, registers = best_of(lambda: check_topk(ids, experts), args.repeats, warmup=1)
        _, stamp = best_of(lambda: check_topk(ids, experts + 1), args.repeats, warmup=1)
        table.print_row(label, f"{1e3 * registers:.1f} ms", f"{1e3 * stamp:.1f} ms", f"{stamp / registers:.2f}x")


if __name__ == "__main__":
    main()
