"""Overhead of RoutingRecorder(accumulate=True) per decode step of model.generate() (CPU), and its host syncs.

Model: the tiny Mixtral shipped in lrc_kernels/data/tiny_moe (4 layers, 16 experts, top-2, hidden 128), greedy
generation for a batch of ``--batch-size`` prompts of ``--prompt`` tokens of lrc_kernels/data/sample.txt.

Decode-step time: ``(t(generate N+1 tokens) - t(generate 1 token)) / N``; the difference removes the prefill
and generate()'s set-up, and leaves the N decode forward passes with generate()'s per-token work. The
recorded and plain runs alternate (plain first on even repeats, recorded first on odd ones) so both see the
same machine load; every figure is a median over ``--repeats``. Overhead = recorded step / plain step - 1,
in wall time and in process CPU time. On a busy machine the noise of these medians (a few %) exceeds the
overhead, so the script also prints a component estimate: the CPU time (of this thread, so not inflated by
other jobs) spent inside the recorder's hooks (each wrapped by a timer) per forward pass, against the CPU
time of a plain decode step. ``rec.trace()`` (the stitching,
after the block) is timed apart and also given per decode step.

Host syncs: during one recorded and one plain generate() of the same prompts (greedy, so the same tokens and
the same control flow in generate()), every call of a tensor method that reads values to the host or has a
data-dependent shape (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/``float``/``index``
conversions, ``nonzero``, ``masked_select``, ``unique``) is counted; the recorder adds
``(recorded - plain) / N`` such calls per decode step (goal 0). On a GPU the hook test
``tests/test_hf_recorder.py::test_hooks_never_read_tensor_values`` runs them under CUDA sync-debug mode "error".

    python bench/bench_recorder_decode.py                       # 8 prompts x 64 tokens, 32 new tokens
    python bench/bench_recorder_decode.py --repeats 3 --new-tokens 8   # a quick run
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR, SAMPLE_TEXT  # noqa: E402
from lrc_kernels.hf import RoutingRecorder  # noqa: E402

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
              "masked_select", "unique")


def _load(batch_size: int, prompt: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).eval()
    ids = tokenizer(SAMPLE_TEXT.read_text(), add_special_tokens=False)["input_ids"][:batch_size * prompt]
    return model, torch.tensor(ids).view(batch_size, prompt)


def _generate(model, prompts, new_tokens: int):
    # min_new_tokens keeps every run at exactly new_tokens tokens (no early EOS changes the step count).
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _timed(model, prompts, new_tokens: int, recorded: bool):
    """(wall s, CPU s, trace() wall s or 0) of one generate() call, with or without a recorder."""
    recorder = RoutingRecorder(model, accumulate=True) if recorded else contextlib.nullcontext()
    with torch.no_grad(), recorder:
        wall, cpu = time.perf_counter(), time.process_time()
        _generate(model, prompts, new_tokens)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stitch = 0.0
    if recorded:
        stitch = time.perf_counter()
        recorder.trace()
        stitch = time.perf_counter() - stitch
    return wall, cpu, stitch


@contextlib.contextmanager
def _count_host_reads(counts: dict):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def method(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _host_reads(model, prompts, new_tokens: int, recorded: bool) -> dict:
    recorder = RoutingRecorder(model, accumulate=True) if recorded else contextlib.nullcontext()
    counts: dict = {}
    with torch.no_grad(), recorder, _count_host_reads(counts):
        _generate(model, prompts, new_tokens)
    return counts


def _hook_seconds(model, prompts, new_tokens: int) -> float:
    """CPU time of this thread inside the recorder's hooks during one generate() (each hook wrapped by a timer)."""
    spent = [0.0]

    def timed(hook):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return hook(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - start
        return wrapper

    with torch.no_grad(), RoutingRecorder(model, accumulate=True) as recorder:
        for handle in recorder._handles:
            hooks = getattr(handle, "hooks_dict_ref", lambda: None)()
            if hooks is not None and handle.id in hooks:  # generate()'s wrapper is not a hook: untimed
                hooks[handle.id] = timed(hooks[handle.id])
        _generate(model, prompts, new_tokens)
    return spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: less noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, prompts = _load(args.batch_size, args.prompt)
    steps = args.new_tokens

    for recorded in (False, True):  # warm-up of both kinds
        _timed(model, prompts, steps + 1, recorded)
    samples = {key: [] for key in ("plain", "recorded")}
    stitch = []
    for repeat in range(args.repeats):
        for recorded in ((False, True) if repeat % 2 == 0 else (True, False)):
            long_run = _timed(model, prompts, steps + 1, recorded)
            short_run = _timed(model, prompts, 1, recorded)
            samples["recorded" if recorded else "plain"].append(
                ((long_run[0] - short_run[0]) / steps, (long_run[1] - short_run[1]) / steps))
            if recorded:
                stitch.append(long_run[2])

    def median(key, index):
        return statistics.median(sample[index] for sample in samples[key])

    plain_wall, plain_cpu = median("plain", 0), median("plain", 1)
    recorded_wall, recorded_cpu = median("recorded", 0), median("recorded", 1)
    stitch_per_step = statistics.median(stitch) / steps
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} torch thread(s), shared with other jobs")
    print(f"tiny_moe, batch {args.batch_size} x prompt {args.prompt}, {steps} decode steps, "
          f"median of {args.repeats} alternating repeats")
    print(f"decode step, plain       {plain_wall * 1e3:8.3f} ms wall  {plain_cpu * 1e3:8.3f} ms CPU")
    print(f"decode step, recorded    {recorded_wall * 1e3:8.3f} ms wall  {recorded_cpu * 1e3:8.3f} ms CPU")
    print(f"overhead (wall) {100 * (recorded_wall / plain_wall - 1):+.2f} %   "
          f"(CPU) {100 * (recorded_cpu / plain_cpu - 1):+.2f} %   goal < 5 %")
    hooks = statistics.median(_hook_seconds(model, prompts, steps + 1) for _ in range(5)) / (steps + 1)
    print(f"component estimate: recorder hooks {hooks * 1e3:.3f} ms CPU per forward pass = "
          f"{100 * hooks / plain_cpu:.2f} % of a plain decode step (CPU)")
    print(f"trace() after the block: {statistics.median(stitch) * 1e3:.2f} ms = {stitch_per_step * 1e3:.3f} ms "
          f"per decode step ({100 * stitch_per_step / plain_wall:.2f} % of a plain step)")

    with _count_host_reads({}) as probe:  # the counter sees what it must see
        bool(torch.ones(1)), torch.ones(2).tolist(), torch.ones(2).nonzero()
    assert probe == {"__bool__": 1, "tolist": 1, "nonzero": 1}, probe
    plain_reads = _host_reads(model, prompts, steps + 1, False)
    recorded_reads = _host_reads(model, prompts, steps + 1, True)
    added = {name: recorded_reads.get(name, 0) - plain_reads.get(name, 0) for name in HOST_READS}
    total = sum(added.values())
    print(f"host reads per generate(): plain {sum(plain_reads.values())}, recorded {sum(recorded_reads.values())}; "
          f"added by the recorder: {total} = {total / (steps + 1):.3f} per forward pass (goal 0)"
          + ("" if total == 0 else f" {added}"))
    if total != 0:
        raise SystemExit("the recorder read tensor values during generation")


if __name__ == "__main__":
    main()
