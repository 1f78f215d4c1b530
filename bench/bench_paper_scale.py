"""Benchmark: the whole analysis at the paper's scale, through ``lrc_kernels.analyze``, stage by stage.

Workload (defaults): 48 layers x 128 experts, top-8, 2048 sequences x 512 tokens, no subsampling: SRP at
L = 4, 16, 64, 256 with B = 200 bootstrap replicates, SCH at the same L, LRU, LFU and Belady, segment
coverage, per layer and at model level (the layers joined into one stream of 48·128 cache slots).
``--fraction F`` runs the first S/F sequences and projects each stage to S by multiplying by F (every
stage's cost is linear in the sequences); the printed table says which.

Stages, each timed (wall clock):

1. ``trace``: ``RoutingTrace`` construction (validation of every id).
2. ``layers``: ``lrc_kernels.analyze.collect_statistics`` up to its last layer (per layer: pooled SRP
   histograms at every L, 7 cache curves, coverage), from its progress callback.
3. ``model level``: the rest of ``collect_statistics`` (``concat_layers``, 7 cache curves and coverage on
   the model stream).
4. ``report``: ``lrc_kernels.analyze.report`` (one [S, B] weight matrix, every score and CI).

Then a breakdown by metric with the public calls, each compared exactly with what analyze computed:
pooled SRP on every layer (all L), each cache policy on layer 0, each policy on the model stream of the
first ``--breakdown-sequences`` sequences (its time scaled to S). And the paper's SRP method
(bench/paper_method.py: one int16 [T, S, E] mask doubled in place per layer, a histogram at each L,
``counts @ weights``) on every layer, compared exactly with analyze's per-layer and model-level SRP (best_f1
and both CI bounds, same weight matrix), its time against ours (the SRP histograms of the breakdown plus
their scoring).

CPU kernels run on ``--threads`` threads; torch on ``--torch-threads`` (default 1: on a shared machine
torch's OpenMP pool stalls small operations). Before timing, freed memory is kept in the heap and 1 GiB is
touched once (the VM's first touch of fresh memory costs ~2 ms/MiB). ``--backend triton`` runs the same on
a CUDA device (bench/gpu_check.py calls it so).

Example:
    python bench/bench_paper_scale.py --fraction 16          # 128 sequences, projected to 2048
    python bench/bench_paper_scale.py                        # the full run (long on 2 CPU cores)
"""

import argparse
import os
import sys
import time
from typing import NamedTuple

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import lrc_kernels  # noqa: E402
import paper_method  # noqa: E402
from _common import make_trace  # noqa: E402
from bench_srp_paper import keep_freed_memory_and_pretouch  # noqa: E402
from lrc_kernels.analyze import analyze, collect_statistics, report  # noqa: E402
from lrc_kernels.bootstrap import basic_interval  # noqa: E402
from lrc_kernels.srp import score_sequences  # noqa: E402

POLICIES = ("sch", "lru", "lfu", "belady")


def build_trace(args, device):
    """``[n_layers, S, T, k]`` int32: each layer its own trace of ``--trace`` kind (seed = layer)."""
    layers = [make_trace(args.trace, args.sequences // args.fraction, args.tokens, args.experts, args.top_k,
                         seed=args.seed + layer) for layer in range(args.layers)]
    return torch.stack(layers).to(device)


def cache_keys(seg_lens):
    return [(f"sch@{seg_len}", "sch", seg_len) for seg_len in seg_lens] + [(p, p, None) for p in POLICIES[1:]]


class Instant(NamedTuple):
    """Wall clock and process CPU time (all threads); differences are durations."""

    wall: float
    cpu: float

    def __sub__(self, other):
        return Instant(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other):
        return Instant(self.wall + other.wall, self.cpu + other.cpu)


class Stages:
    """Prints ``name  wall  cpu  projected wall  projected cpu`` rows; projected = measured x fraction x scale."""

    def __init__(self, fraction):
        self.fraction = fraction
        print(f"{'stage':<34} {'wall s':>9} {'cpu s':>9} {'proj. wall':>11} {'proj. cpu':>10}"
              f"   (projected = measured x {fraction} x scale; cpu = process CPU time, all threads)")

    def row(self, name, elapsed, scale=1.0):
        factor = scale * self.fraction
        print(f"{name:<34} {elapsed.wall:>9.3f} {elapsed.cpu:>9.3f} {elapsed.wall * factor:>11.1f} "
              f"{elapsed.cpu * factor:>10.1f}", flush=True)
        return Instant(elapsed.wall * factor, elapsed.cpu * factor)


def synchronized(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Instant(time.perf_counter(), time.process_time())


def run_analysis(args, topk, device, stages):
    start = synchronized(device)
    trace = lrc_kernels.RoutingTrace(topk, num_experts=args.experts)
    total = stages.row("1 trace (validation)", synchronized(device) - start)
    marks = []
    start = synchronized(device)
    statistics = collect_statistics(trace, seg_lens=args.seg_lens, policies=POLICIES, backend=args.backend,
                                    progress=lambda done, _: marks.append(synchronized(device)))
    layers_done = marks[-2]
    total += stages.row(f"2 layers ({args.layers}: srp, 7 caches, cov)", layers_done - start)
    total += stages.row("3 model level (7 caches, coverage)", marks[-1] - layers_done)
    start = synchronized(device)
    results = report(statistics, num_bootstrap=args.bootstrap, seed=args.seed)
    total += stages.row(f"4 report (B = {args.bootstrap})", synchronized(device) - start)
    print(f"{'analyze, all stages':<34} {'':>9} {'':>9} {total.wall:>11.1f} {total.cpu:>10.1f}")
    return statistics, results


def breakdown(args, topk, statistics, device, stages):
    print("\nbreakdown by metric (public calls; equal to analyze's statistics)")
    num_seqs = topk.shape[1]
    start = synchronized(device)
    ours_srp = {seg_len: [lrc_kernels.srp_counts(layer, args.experts, seg_len, pool="experts", backend=args.backend)
                          for layer in topk] for seg_len in args.seg_lens}
    srp_seconds = synchronized(device) - start
    for seg_len, per_layer in ours_srp.items():
        assert all(torch.equal(a, layer.srp[seg_len]) for a, layer in zip(per_layer, statistics.layers)), seg_len
    stages.row(f"srp histograms, {args.layers} layers, all L", srp_seconds)
    for key, policy, look_ahead in cache_keys(args.seg_lens):
        start = synchronized(device)
        hits = lrc_kernels.cache_hits(topk[0], args.experts, policy, seg_len=look_ahead, backend=args.backend)
        seconds = synchronized(device) - start
        assert torch.equal(hits, statistics.layers[0].hits[key]), key
        stages.row(f"{key} layer 0 (x{args.layers} layers)", seconds, args.layers)
    few = min(args.breakdown_sequences, num_seqs)
    stream = lrc_kernels.concat_layers(topk[:, :few], args.experts)
    for key, policy, look_ahead in cache_keys(args.seg_lens):
        start = synchronized(device)
        hits = lrc_kernels.cache_hits(stream, args.layers * args.experts, policy, seg_len=look_ahead,
                                      backend=args.backend)
        seconds = synchronized(device) - start
        assert torch.equal(hits, statistics.model.hits[key][:few]), key
        stages.row(f"{key} model, {few} seqs (x{num_seqs / few:g})", seconds, num_seqs / few)
    return ours_srp, srp_seconds


def paper_comparison(args, topk, ours_srp, srp_seconds, results, stages, device):
    """The paper's SRP method on every layer, checked against analyze's scores; time vs ours."""
    num_seqs = topk.shape[1]
    weights = lrc_kernels.resample_weights(num_seqs, args.bootstrap, torch.Generator().manual_seed(args.seed))
    start = synchronized(device)
    ours_scores = {seg_len: [score_sequences(h, weights, 0.95) for h in per_layer]
                   + [score_sequences(sum(per_layer), weights, 0.95)] for seg_len, per_layer in ours_srp.items()}
    ours_seconds = srp_seconds + (synchronized(device) - start)
    start = synchronized(device)
    paper_hists = [paper_method.layer_histograms(layer.cpu(), args.experts, args.seg_lens) for layer in topk]
    paper_scores = {}
    for seg_len in args.seg_lens:
        per_layer = [hists[seg_len] for hists in paper_hists] + [sum(hists[seg_len] for hists in paper_hists)]
        paper_scores[seg_len] = []
        for per_sequence in per_layer:
            estimate = lrc_kernels.srp_score(per_sequence.sum(0)).best_f1
            replicates = lrc_kernels.srp_score(paper_method.bootstrap_replicates(per_sequence, weights)).best_f1
            paper_scores[seg_len].append((estimate, *basic_interval(estimate, replicates, 0.95)))
    paper_seconds = synchronized(device) - start
    for seg_len in args.seg_lens:
        streams = results["layers"] + [results["model"]]
        for stream, ours, paper in zip(streams, ours_scores[seg_len], paper_scores[seg_len]):
            reported = stream["srp"][str(seg_len)]
            assert (reported["best_f1"], reported["ci_low"], reported["ci_high"]) == tuple(
                value.item() for value in paper), seg_len
            assert (ours.best_f1.item(), ours.ci_low.item()) == (paper[0].item(), paper[1].item()), seg_len
    print(f"\nSRP, {args.layers} layers + model level, all L, B = {args.bootstrap} (scores equal to analyze's):")
    stages.row("paper's method", paper_seconds)
    stages.row("ours (pooled histograms + scores)", ours_seconds)
    print(f"paper / ours: {paper_seconds.wall / ours_seconds.wall:.1f}x wall, "
          f"{paper_seconds.cpu / ours_seconds.cpu:.1f}x cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--fraction", type=int, default=1, help="run S/F sequences, project stage times x F")
    parser.add_argument("--seg-lens", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--trace", default="sticky", choices=["sticky", "uniform", "zipf"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="cpu", choices=["cpu", "triton"])
    parser.add_argument("--threads", type=int, default=lrc_kernels.get_num_threads())
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--breakdown-sequences", type=int, default=4)
    parser.add_argument("--skip-paper", action="store_true", help="no paper's-method comparison")
    args = parser.parse_args()
    run(args)


def run(args):
    lrc_kernels.set_num_threads(args.threads)
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if args.backend == "triton" else "cpu")
    # on CUDA tensors "auto" runs Triton, and the CPU path only where a Triton kernel has a limit (coverage
    # of the model stream above 4096 slots)
    args.backend = "auto" if device.type == "cuda" else "cpu"
    if device.type == "cpu":
        keep_freed_memory_and_pretouch()
    topk = build_trace(args, device)
    print(f"{args.layers} layers x {args.experts} experts, top-{args.top_k}, {topk.shape[1]} of {args.sequences} "
          f"sequences x {args.tokens} tokens ({args.trace}), L = {args.seg_lens}, B = {args.bootstrap}; backend "
          f"{args.backend}, {args.threads} CPU kernel thread(s); load average {os.getloadavg()}")
    warm = topk[:2, :2]
    analyze(lrc_kernels.RoutingTrace(warm, num_experts=args.experts), seg_lens=args.seg_lens,
            num_bootstrap=0, backend=args.backend)
    stages = Stages(args.fraction)
    statistics, results = run_analysis(args, topk, device, stages)
    ours_srp, srp_seconds = breakdown(args, topk, statistics, device, stages)
    if not args.skip_paper:
        paper_comparison(args, topk, ours_srp, srp_seconds, results, stages, device)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
