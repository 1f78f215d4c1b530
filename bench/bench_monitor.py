"""Overhead of live routing monitoring on training steps of a tiny MoE (CPU).

Model: the tiny Mixtral shipped in lrc_kernels/data/tiny_moe (4 layers, 16 experts, top-2, hidden 128),
trained with AdamW on batches of 8 x 256 tokens of lrc_kernels/data/sample.txt.

Plain and monitored training steps alternate (plain first on even pairs, monitored first on odd ones),
after warm-up steps of both kinds, so both see the same machine load:

- plain: forward, backward, optimizer step;
- monitored: the same with ``monitor.update(recorder.routing(), lengths)`` after the forward, and every
  ``--log-every`` monitored steps ``monitor.summary()`` + ``monitor.reset()`` (what the Trainer callback does
  at each log). The recorder is entered before and left after each monitored step (in a real run it stays
  open), so its hook registration is charged to the monitor. The monitor has default settings unless options
  say otherwise.

Overhead = (median monitored step + median log / log_every) / median plain step - 1, in wall time (the goal)
and in process CPU time (all threads). The paired line takes the median over pairs of (monitored + median log
/ log_every) / plain - 1 for the two steps of each pair, which run back to back, and (update + median log /
log_every) / plain for the update of that pair's monitored step, each with a 95 % percentile-bootstrap
interval over the pairs. Medians of single steps resist the load spikes of a shared machine
better than block totals, but on a busy machine their noise (several %) can exceed the overhead, so the
script also prints a component estimate: (median update + median log / log_every) / median plain step.

    python bench/bench_monitor.py                 # default monitor, 60 steps of each kind
    python bench/bench_monitor.py --policies sch@16 lru lfu belady   # SCH at one look-ahead only
    python bench/bench_monitor.py --breakdown   # also: where update's time goes, outside training
    python bench/bench_monitor.py --hidden-size 512   # the same MoE layout with wider layers
    python bench/bench_monitor.py --every-n-batches 4   # sampling: update on one monitored step in 4

``--every-n-batches N`` runs ``update`` on monitored steps 0, N, 2N, ... only, as ``RoutingTap(every_n_batches=N)``
does; the recorder is entered on every monitored step. Each overhead then compares groups of N adjacent steps
(their mean step), so each group holds one update, and the update's share is divided by N; the step medians
and the CPU line's medians stay those of single steps. For an even N the plain/monitored order also
alternates over the groups' sampled pairs, so the updates do not all run second.

``--hidden-size H`` builds the shipped model's configuration with hidden and expert sizes H (random weights):
the same 4 layers, 16 experts and top-2, so the monitor does the same work per step while the step costs
more. It shows how the overhead scales with the model; the default model is the one the goal is about.

``--breakdown`` records one batch and times, outside any training step, ``monitor.update`` and each piece of
work it does for the default layout (one validation of the stacked layers; the SRP histograms of every L, one
call; joining the layers into the model-level stream, also in the torch formulation for comparison; each cache
pass at layer level and on the model-level stream, alone and all of a stream's caches in the one call that
``update`` makes), each the median of 30 calls.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import random
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "examples")]  # the checkout's lrc_kernels, the example's batches
from lrc_kernels import dispatch  # noqa: E402
from lrc_kernels._checks import check_topk  # noqa: E402
from lrc_kernels.hf import RoutingMonitor, RoutingRecorder  # noqa: E402
from lrc_kernels.routing import join_layers, join_layers_with_torch  # noqa: E402
from train_loop_monitor import DATA_DIR, token_batches  # noqa: E402  (the example's batches of sample.txt)


class Bench:
    def __init__(self, args):
        torch.manual_seed(0)
        model_dir = DATA_DIR / "tiny_moe"
        if args.hidden_size is None:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir).train()
        else:
            config = AutoConfig.from_pretrained(model_dir)
            config.hidden_size = config.intermediate_size = args.hidden_size
            config.head_dim = args.hidden_size // config.num_attention_heads
            self.model = AutoModelForCausalLM.from_config(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.batches = token_batches(AutoTokenizer.from_pretrained(model_dir), args.batch_size, args.seq_len)
        self.log_every = args.log_every
        self.every_n_batches = args.every_n_batches
        self.monitor_kwargs = {key: value for key, value in (("seg_lens", args.seg_lens), ("policies", args.policies))
                               if value is not None}
        self.monitor = None
        self.monitored_steps = 0
        self.update_seconds, self.log_seconds = [], []

    def _train_step(self, input_ids, recorder=None) -> None:
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        if recorder is not None and self.monitored_steps % self.every_n_batches == 0:
            start = time.perf_counter()
            self.monitor.update(recorder.routing(), next(iter(recorder.lengths().values())))
            self.update_seconds.append(time.perf_counter() - start)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def plain_step(self) -> tuple:
        input_ids = next(self.batches)
        start, cpu_start = time.perf_counter(), time.process_time()
        self._train_step(input_ids)
        return time.perf_counter() - start, time.process_time() - cpu_start

    def monitored_step(self) -> tuple:
        """(wall, process CPU) seconds of one monitored step, without the periodic log (in log_seconds)."""
        input_ids = next(self.batches)
        start, cpu_start = time.perf_counter(), time.process_time()
        with RoutingRecorder(self.model) as recorder:
            if self.monitor is None:
                self.monitor = RoutingMonitor.from_recorder(recorder, **self.monitor_kwargs)
            self._train_step(input_ids, recorder)
        elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        self.monitored_steps += 1
        if self.monitored_steps % self.log_every == 0:
            start = time.perf_counter()
            summary = self.monitor.summary()
            self.monitor.reset()
            self.log_seconds.append(time.perf_counter() - start)
            assert summary and all(0.0 <= value <= 1.0 for value in summary.values())
        return elapsed


def paired_median(ratios, resamples=2000, seed=0) -> tuple:
    """(median, low, high): the median of per-pair ratios and a 95 % percentile-bootstrap interval over pairs.

    A plain and a monitored step of one pair run back to back, so a drift of the machine's speed over the run
    (up to 1.6x within minutes on the 2-vCPU VM, bench/RESULTS.md) cancels in their ratio.
    """
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def median_ms(run, calls=30) -> float:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


def print_breakdown(bench: Bench) -> None:
    """Times of ``monitor.update`` and of its pieces on one recorded batch (layers of equal E and k)."""
    monitor = bench.monitor
    input_ids = next(bench.batches)
    with RoutingRecorder(bench.model) as recorder, torch.no_grad():
        bench.model(input_ids=input_ids)
        routing, lengths = recorder.routing(), next(iter(recorder.lengths().values()))
    layers = [routing[name] for name in monitor.layer_names]
    num_layers, num_experts = len(layers), monitor.num_experts[0]
    stacked = torch.cat(layers)
    ids, stacked_lengths, _ = check_topk(stacked, num_experts, lengths=lengths.repeat(num_layers))
    stream = join_layers(ids.view(num_layers, *layers[0].shape), num_experts)

    def cache_ms(topk, topk_lengths, slots, policy, seg_len):
        return median_ms(lambda: dispatch.run("cache_hits", monitor.backend, topk, topk_lengths, slots,
                                              policy, seg_len, monitor.free_slot_hits, monitor.lookup))

    print(f"breakdown on one batch, outside training (median of 30 calls, ms): update "
          f"{median_ms(lambda: monitor.update(routing, lengths)):.2f}; validation of the {num_layers} stacked "
          f"layers {median_ms(lambda: check_topk(stacked, num_experts, lengths=lengths.repeat(num_layers))):.2f}")
    srp_ms = median_ms(lambda: dispatch.run("srp_pooled_counts", monitor.backend, ids, stacked_lengths, num_experts,
                                            monitor.seg_lens))
    print(f"  SRP histograms, L = {', '.join(map(str, monitor.seg_lens))} in one call: {srp_ms:.2f}")
    layer_ids = ids.view(num_layers, *layers[0].shape)
    print(f"  joining the model-level stream: {median_ms(lambda: join_layers(layer_ids, num_experts)):.3f} "
          f"(torch formulation {median_ms(lambda: join_layers_with_torch(layer_ids, num_experts)):.3f})")
    for name, policy, seg_len in monitor._cache_specs:
        layer_ms = cache_ms(ids, stacked_lengths, num_experts, policy, seg_len)
        model_ms = cache_ms(stream, lengths, num_layers * num_experts, policy, seg_len)
        print(f"  cache {name:8s} layer level {layer_ms:.2f}, model level ({num_layers * num_experts} slots) "
              f"{model_ms:.2f}")
    caches = [(policy, seg_len) for _, policy, seg_len in monitor._cache_specs]

    def caches_ms(topk, topk_lengths, slots):
        return median_ms(lambda: dispatch.run_caches(monitor.backend, topk, topk_lengths, slots, caches,
                                                     monitor.free_slot_hits, monitor.lookup))

    print(f"  all {len(caches)} caches in one call (as update runs them): layer level "
          f"{caches_ms(ids, stacked_lengths, num_experts):.2f}, model level "
          f"{caches_ms(stream, lengths, num_layers * num_experts):.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each kind first")
    parser.add_argument("--log-every", type=int, default=10, help="monitored steps per monitor log")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seg-lens", type=int, nargs="+", help="RoutingMonitor seg_lens (default: its own)")
    parser.add_argument("--policies", nargs="+", help="RoutingMonitor policies, e.g. sch@16 lru (default: its own)")
    parser.add_argument("--every-n-batches", type=int, default=1,
                        help="sampling: monitor.update on one monitored step in N (RoutingTap's every_n_batches)")
    parser.add_argument("--breakdown", action="store_true", help="also time update's pieces on one batch")
    parser.add_argument("--hidden-size", type=int, help="hidden and expert size of a wider model (random weights) "
                                                        "instead of the shipped one")
    args = parser.parse_args(argv)
    if args.steps < args.log_every:
        parser.error(f"--steps ({args.steps}) must be at least --log-every ({args.log_every}) to time a log")
    if not 1 <= args.every_n_batches <= args.log_every:
        parser.error(f"--every-n-batches ({args.every_n_batches}) must be in [1, --log-every = {args.log_every}], "
                     f"so that every log window holds an update")
    if args.steps % args.every_n_batches:
        parser.error(f"--steps ({args.steps}) must be a multiple of --every-n-batches ({args.every_n_batches}), "
                     f"so that every step belongs to a group")
    torch.set_num_threads(args.threads)

    bench = Bench(args)
    for _ in range(args.warmup):
        bench.plain_step(), bench.monitored_step()
    bench.update_seconds.clear(), bench.log_seconds.clear()
    bench.monitored_steps = 0
    plain, monitored = [], []
    every = args.every_n_batches
    for pair in range(args.steps):
        # The order alternates over pairs and, for an even N, also over the groups' sampled pairs (pair g·N).
        if (pair + (pair // every if every % 2 == 0 else 0)) % 2 == 0:
            plain.append(bench.plain_step())
            monitored.append(bench.monitored_step())
        else:
            monitored.append(bench.monitored_step())
            plain.append(bench.plain_step())

    plain_cpu = [cpu for _, cpu in plain]
    monitored_cpu = [cpu for _, cpu in monitored]
    plain = [wall for wall, _ in plain]
    monitored = [wall for wall, _ in monitored]
    plain_median, monitored_median = statistics.median(plain), statistics.median(monitored)
    # With sampling, each group of N adjacent pairs holds one update: overheads compare the groups' mean
    # steps (for N = 1, single steps).
    def group_means(values):
        return [sum(values[g:g + every]) / every for g in range(0, len(values) - every + 1, every)]

    plain_groups, monitored_groups = group_means(plain), group_means(monitored)
    log_median = statistics.median(bench.log_seconds)
    log_share = log_median / args.log_every
    overhead = (statistics.median(monitored_groups) + log_share) / statistics.median(plain_groups) - 1
    component = (statistics.median(bench.update_seconds) / every + log_share) / plain_median
    cpu_overhead = ((statistics.median(group_means(monitored_cpu)) + log_share)
                    / statistics.median(group_means(plain_cpu)) - 1)
    monitor = bench.monitor
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    config = bench.model.config
    print(f"model: {config.num_hidden_layers} layers, {config.num_local_experts} experts, top-"
          f"{config.num_experts_per_tok}, hidden {config.hidden_size}, "
          f"{sum(p.numel() for p in bench.model.parameters()) / 1e6:.1f} M parameters")
    print(f"monitor: seg_lens={monitor.seg_lens}, caches={monitor.cache_names}, "
          f"model_level={monitor.model_level}, num_bootstrap={monitor.num_bootstrap}"
          + (f"; update on one monitored step in {every} (sampling)" if every > 1 else ""))
    print(f"{args.steps} steps of each kind, {args.batch_size} x {args.seq_len} tokens, a log every "
          f"{args.log_every} monitored steps")
    print(f"plain step      median {1e3 * plain_median:8.2f} ms  (quartiles "
          f"{' '.join(f'{1e3 * q:.1f}' for q in statistics.quantiles(plain, n=4))})")
    print(f"monitored step  median {1e3 * monitored_median:8.2f} ms  (quartiles "
          f"{' '.join(f'{1e3 * q:.1f}' for q in statistics.quantiles(monitored, n=4))})")
    print(f"  of which monitor.update  median {1e3 * statistics.median(bench.update_seconds):.2f} ms"
          + (f" on the {len(bench.update_seconds)} sampled steps" if every > 1 else ""))
    print(f"log (summary + reset)      median {1e3 * log_median:.2f} ms, every {args.log_every} steps")
    print(f"process CPU time per step: plain median {1e3 * statistics.median(plain_cpu):.2f} ms, monitored "
          f"{1e3 * statistics.median(monitored_cpu):.2f} ms -> CPU overhead {100 * cpu_overhead:+.2f} %")
    goal = "" if every > 1 else f"  (goal <= 3 %: {'met' if overhead <= 0.03 else 'missed'})"  # the default's goal
    print(f"overhead (wall) {100 * overhead:+.2f} %{goal}")
    print(f"component estimate (median update{f' / {every}' if every > 1 else ''} + median log / log_every) / "
          f"median plain step: {100 * component:+.2f} %")
    paired_wall = paired_median([(m + log_share) / p - 1 for p, m in zip(plain_groups, monitored_groups)])
    paired_update = paired_median([(u / every + log_share) / p for p, u in zip(plain_groups, bench.update_seconds)])
    pairs = (f"the {len(plain)} adjacent (plain, monitored) steps" if every == 1 else
             f"the {len(plain_groups)} groups of {every} adjacent (plain, monitored) pairs")
    print("paired over %s, median and 95 %% bootstrap interval: wall %+.2f %% [%+.2f, %+.2f], update%s + log / "
          "plain step %+.2f %% [%+.2f, %+.2f]" % (pairs, *(100 * x for x in paired_wall),
                                                  f" / {every}" if every > 1 else "",
                                                  *(100 * x for x in paired_update)))
    if args.breakdown:
        print_breakdown(bench)


if __name__ == "__main__":
    main()
