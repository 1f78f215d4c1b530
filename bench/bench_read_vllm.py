"""Benchmark: reading a vLLM JSON-lines dump (``--enable-return-routed-experts``) into a RoutingTrace.

The dump is synthesised in a temporary folder, as vLLM writes it: one response per line, each choice's
``routed_experts`` a base64 string of ``.npy`` bytes ``[prompt + output - 1, layers, k]`` uint8. Two timings of
the same file in the same run:

- baseline: only what any reader must do per line — ``json.loads`` and the base64 decoding of every choice;
- ``lrc_kernels.io.read_trace(path, "vllm")``: the whole reader (JSON, base64, ``.npy`` parsing, the padded
  ``[layers, S, T, k]`` int32 array, the prefill/decode phases, validation of every id).

The goal is a reader limited by JSON and base64 decoding (ratio near 1), not by Python loops per token.
Times are the minimum of ``--repeats`` runs after a warm-up run (the file is in the page cache).

    python bench/bench_read_vllm.py --size-mb 100
"""

import argparse
import base64
import io
import json
import os
import sys
import tempfile

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))

from _common import best_of  # noqa: E402
from lrc_kernels.io import ReadOptions, read_trace  # noqa: E402


def write_dump(path, size_mb, tokens, layers, top_k, experts, seed=0):
    """Responses of ``tokens`` routed tokens each (a quarter prompt) until the file holds ``size_mb`` MB."""
    rng = np.random.default_rng(seed)
    # One block of distinct ids per token, re-used with a random shift per line (generating ids is not timed).
    block = rng.random((tokens, layers, experts)).argsort(-1)[..., :top_k].astype(np.uint8)
    written, lines = 0, 0
    with open(path, "w") as dump:
        while written < size_mb * 1e6:
            ids = ((block + lines) % experts).astype(np.uint8)
            buffer = io.BytesIO()
            np.save(buffer, ids)
            response = {"id": f"cmpl-{lines}", "object": "text_completion", "model": "moe",
                        "choices": [{"index": 0, "text": "", "finish_reason": "length",
                                     "routed_experts": base64.b64encode(buffer.getvalue()).decode()}],
                        "usage": {"prompt_tokens": tokens // 4, "completion_tokens": tokens - tokens // 4 + 1,
                                  "total_tokens": tokens + 1}}
            line = json.dumps(response) + "\n"
            dump.write(line)
            written += len(line)
            lines += 1
    return written, lines


def baseline(path):
    with open(path, "rb") as dump:
        for line in dump:
            for choice in json.loads(line)["choices"]:
                base64.b64decode(choice["routed_experts"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--tokens", type=int, default=2048, help="routed tokens per response")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vllm.jsonl")
        size, lines = write_dump(path, args.size_mb, args.tokens, args.layers, args.top_k, args.experts)
        options = ReadOptions(num_experts=args.experts)
        trace = read_trace(path, "vllm", options)
        assert trace.num_sequences == lines and trace.num_tokens == lines * args.tokens
        _, plain = best_of(lambda: baseline(path), args.repeats, warmup=1)
        _, reader = best_of(lambda: read_trace(path, "vllm", options), args.repeats, warmup=1)
    megabytes = size / 1e6
    print(f"dump: {megabytes:.1f} MB, {lines} responses of {args.tokens} tokens x {args.layers} layers x "
          f"top-{args.top_k} (uint8 .npy, base64); minimum of {args.repeats} runs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'':34s} {'seconds':>8s} {'MB/s':>8s}")
    print(f"{'baseline json.loads + b64decode':34s} {plain:8.3f} {megabytes / plain:8.1f}")
    label = 'read_trace(path, "vllm")'
    print(f"{label:34s} {reader:8.3f} {megabytes / reader:8.1f}")
    print(f"reader / baseline time: {reader / plain:.2f}x")


if __name__ == "__main__":
    main()
