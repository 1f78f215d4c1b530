"""GPU check: every Triton kernel against the CPU path, then timing at paper scale.

Part 1 (correctness): on fresh random traces (sticky AR(1) routers, some -1 slots, random lengths) the
Triton results must equal the CPU backend's integers exactly:

- ``lrc_kernels.triton.srp.srp_counts`` and ``segment_coverage`` vs ``lrc_kernels.cpu.srp`` at several L;
- ``lrc_kernels.triton.cache.cache_hits`` vs ``lrc_kernels.cpu.cache.cache_hits`` for LRU, LFU, Belady and
  SCH (several L), with and without free-slot hits, token and sequential lookup, through both the
  register-stack and the chunked global-memory kernel, at layer level and on model-level streams.

Part 2 (timing, CUDA only): the paper's scale, ``--layers`` x ``--experts`` experts, top-``--top-k``,
``--sequences`` x ``--tokens``. Layer level runs all layers' sequences in one call (n*S sequences of E
experts); model level joins the layers into one stream per sequence (n*E cache slots, n*k references per
token, SPEC section 6). Cache hits: LRU, LFU, Belady, SCH at L in {4, 16, 64, 256}, token lookup with free
slots. SRP: window-count histograms at the same L, one call per layer (pooled over sequences at once, which
is all that layer- and model-level SRP need). Each timing is one call after a warm-up call on a small slice
(Triton compiles there) and includes Belady's next-use pass; the goal for the whole table is < 60 s on one
H200.

Part 3 (CUDA only): bench/bench_paper_scale.py at the same sizes with ``--backend triton``: the whole
``lrc_kernels.analyze`` report stage by stage (CPU-side scoring included), each metric checked against the
public calls.

With ``--small``, and always when CUDA is absent, only part 1 runs, at small sizes, under
``TRITON_INTERPRET=1`` on the CPU.

Example:
    python bench/gpu_check.py --small          # interpreter, a minute or two on a laptop
    python bench/gpu_check.py                  # on a CUDA machine: correctness, then the timing table
"""

import argparse
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from _common import best_of, sticky_trace  # noqa: E402
from lrc_kernels.routing import join_layers  # noqa: E402

POLICY_CONFIGS = [("lru", None), ("lfu", None), ("belady", None), ("sch", 4), ("sch", 16), ("sch", 64),
                  ("sch", 256)]
SEG_LENS = (4, 16, 64, 256)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="correctness only, small sizes, Triton interpreter")
    parser.add_argument("--seed", type=int, default=None, help="trace seed (default: from the clock, printed)")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--skip-model-level", action="store_true", help="time layer level only")
    return parser.parse_args()


def random_lengths(generator, num_sequences, num_tokens, device):
    lengths = torch.randint(0, num_tokens + 1, (num_sequences,), generator=generator, device=device)
    keep_full = torch.rand(num_sequences, generator=generator, device=device) < 0.5
    return torch.where(keep_full, torch.full_like(lengths, num_tokens), lengths)


class Checker:
    def __init__(self):
        self.checks = 0
        self.failures = []

    def equal(self, name, got, expected):
        self.checks += 1
        if not torch.equal(got.cpu(), expected.cpu()):
            self.failures.append(name)
            print(f"  MISMATCH {name}", flush=True)


def check_correctness(args, device, small):
    """Part 1. Returns the number of failed comparisons."""
    from lrc_kernels.cpu import cache as cpu_cache
    from lrc_kernels.cpu import srp as cpu_srp
    from lrc_kernels.triton import MAX_COVERAGE_EXPERTS
    from lrc_kernels.triton import cache as triton_cache
    from lrc_kernels.triton import srp as triton_srp

    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    print(f"part 1: correctness against the CPU path (seed {seed}, "
          f"{'Triton interpreter' if small else device})", flush=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    checker = Checker()

    if small:
        # (label, S, T, E, k, layers joined, stack variants); n layers of E experts -> n*E cache slots
        layer_cases = [("layer", 3, 8, 12, 3, 1, ("registers", "chunked")),
                       ("model", 2, 6, 6, 2, 3, ("registers", "chunked")),
                       ("wide", 1, 5, 300, 2, 1, ("chunked",))]
        srp_seg_lens = (1, 3, 8)
        cache_seg_lens = (1, 3)
        chunk = 4
    else:
        layer_cases = [("layer-E8", 64, 128, 8, 2, 1, ("registers",)),
                       ("layer-E64", 64, 128, 64, 6, 1, ("registers", "chunked")),
                       ("layer-E128", 64, 256, 128, 8, 1, ("registers", "chunked")),
                       ("layer-E256", 32, 128, 256, 8, 1, ("registers", "chunked")),
                       ("model-8x64", 16, 64, 64, 8, 8, ("chunked",)),
                       ("model-48x128", 4, 32, 128, 8, 48, ("chunked",))]
        srp_seg_lens = (1, 4, 16, 64)
        cache_seg_lens = (1, 4, 16, 64)
        chunk = None

    for label, num_sequences, num_tokens, num_experts, top_k, num_layers, stacks in layer_cases:
        layers = torch.stack([sticky_trace(num_sequences, num_tokens, num_experts, top_k, generator=generator,
                                           drop=0.1, device=device) for _ in range(num_layers)])
        topk = layers[0] if num_layers == 1 else join_layers(layers, num_experts)
        slots = num_layers * num_experts
        lengths = random_lengths(generator, num_sequences, num_tokens, device)
        cpu_topk, cpu_lengths = topk.cpu(), lengths.cpu()
        print(f"  {label}: S={num_sequences} T={num_tokens} E={slots} k={topk.shape[2]}", flush=True)

        if num_layers == 1:
            for seg_len, pooled_cpu, pooled_triton in zip(
                    srp_seg_lens, cpu_srp.srp_pooled_counts(cpu_topk, cpu_lengths, slots, srp_seg_lens),
                    triton_srp.srp_pooled_counts(topk, lengths, slots, srp_seg_lens)):
                checker.equal(f"{label} srp_pooled_counts L={seg_len}", pooled_triton, pooled_cpu)
            for seg_len in srp_seg_lens:
                checker.equal(f"{label} srp_counts L={seg_len}",
                              triton_srp.srp_counts(topk, lengths, slots, seg_len),
                              cpu_srp.srp_counts(cpu_topk, cpu_lengths, slots, seg_len))
                if slots <= MAX_COVERAGE_EXPERTS:
                    checker.equal(f"{label} segment_coverage L={seg_len}",
                                  triton_srp.segment_coverage(topk, lengths, slots, seg_len),
                                  cpu_srp.segment_coverage(cpu_topk, cpu_lengths, slots, seg_len))

        configs = [("lru", None), ("lfu", None), ("belady", None)] + [("sch", L) for L in cache_seg_lens]
        for policy, seg_len in configs:
            for free_slot_hits in (True, False):
                for lookup in ("token", "sequential"):
                    expected = cpu_cache.cache_hits(cpu_topk, cpu_lengths, slots, policy, seg_len, free_slot_hits,
                                                    lookup)
                    for stack in stacks:
                        got = triton_cache.cache_hits(topk, lengths, slots, policy, seg_len, free_slot_hits,
                                                      lookup, stack=stack, chunk=chunk)
                        checker.equal(f"{label} cache_hits {policy}{seg_len or ''} "
                                      f"{'free' if free_slot_hits else 'cold'} {lookup} {stack}", got, expected)

    print(f"part 1: {checker.checks - len(checker.failures)}/{checker.checks} comparisons equal", flush=True)
    return len(checker.failures)


def time_paper_scale(args, device):
    """Part 2: prints one row per (metric, level, configuration) and the total."""
    from lrc_kernels.triton import cache as triton_cache
    from lrc_kernels.triton import srp as triton_srp

    n, num_experts, top_k = args.layers, args.experts, args.top_k
    num_sequences, num_tokens = args.sequences, args.tokens
    print(f"\npart 2: timing, {n} layers x {num_experts} experts, top-{top_k}, {num_sequences} sequences x "
          f"{num_tokens} tokens on {torch.cuda.get_device_name()}", flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    layers = torch.stack([sticky_trace(num_sequences, num_tokens, num_experts, top_k, generator=generator,
                                       device=device) for _ in range(n)])
    layer_level = layers.reshape(n * num_sequences, num_tokens, top_k).contiguous()
    streams = {"layer": (layer_level, num_experts)}
    if not args.skip_model_level:
        streams["model"] = (join_layers(layers, num_experts), n * num_experts)
    del layers

    rows = []
    print(f"{'metric':<12}{'level':<7}{'config':<10}{'seconds':>9}{'refs/s':>12}", flush=True)

    def report(metric, level, config, seconds, references):
        rows.append(seconds)
        print(f"{metric:<12}{level:<7}{config:<10}{seconds:>9.3f}{references / seconds:>12.3e}", flush=True)

    for level, (topk, slots) in streams.items():
        lengths = torch.full((topk.shape[0],), num_tokens, dtype=torch.int64, device=device)
        references = int((topk >= 0).sum())
        warm_slice = slice(0, min(4, topk.shape[0]))
        for policy, seg_len in POLICY_CONFIGS:
            def run(selection=slice(None)):
                return triton_cache.cache_hits(topk[selection].contiguous(), lengths[selection], slots, policy,
                                               seg_len, True, "token")
            run(warm_slice)
            hits, seconds = best_of(run, 1, cuda=True)
            assert hits.shape == (topk.shape[0], slots)
            report("cache_hits", level, f"{policy}{seg_len or ''}", seconds, references)
            del hits

    layer_topk = streams["layer"][0].reshape(n, num_sequences, num_tokens, top_k)
    lengths = torch.full((num_sequences,), num_tokens, dtype=torch.int64, device=device)
    references = int((layer_topk >= 0).sum())
    for seg_len in SEG_LENS:
        triton_srp.srp_counts(layer_topk[0, :4].contiguous(), lengths[:4], num_experts, seg_len)

        def run():
            # pooled over experts in the kernel, per sequence: [n, S, L+1], what layer and model level need
            return torch.stack([triton_srp.srp_pooled_counts(layer_topk[q], lengths, num_experts, (seg_len,))[0]
                                for q in range(n)])
        pooled, seconds = best_of(run, 1, cuda=True)
        windows = n * num_sequences * max(num_tokens - seg_len + 1, 0)
        assert int(pooled.sum()) == windows * num_experts
        report("srp_pooled", "layer", f"L={seg_len}", seconds, references)

    total = sum(rows)
    print(f"total {total:.1f} s (goal < 60 s)", flush=True)


def analyze_paper_scale(args):
    """Part 3: bench/bench_paper_scale.py (the whole lrc_kernels.analyze report, stage by stage, checked against
    the public calls and the paper's SRP method) with the Triton backend."""
    import bench_paper_scale

    print("\npart 3: lrc_kernels.analyze at paper scale, backend triton", flush=True)
    bench_paper_scale.run(argparse.Namespace(
        layers=args.layers, experts=args.experts, top_k=args.top_k, sequences=args.sequences, tokens=args.tokens,
        fraction=1, seg_lens=list(SEG_LENS), bootstrap=200, trace="sticky", seed=0, backend="triton",
        threads=None, torch_threads=torch.get_num_threads(), breakdown_sequences=64, skip_paper=True))


def main():
    args = parse_args()
    small = args.small or not torch.cuda.is_available()
    if small:
        # must precede the first import of triton
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cpu" if small else "cuda"
    failures = check_correctness(args, device, small)
    if failures:
        print(f"FAILED: {failures} comparisons differ", flush=True)
        sys.exit(1)
    if not small:
        time_paper_scale(args, device)
        analyze_paper_scale(args)


if __name__ == "__main__":
    main()
