"""Monitor routing consistency in a plain PyTorch training loop.

Fine-tunes the tiny MoE shipped with lrc_kernels (4 layers, 16 experts, top-2) for a few steps on CPU and
prints the monitor's summary: model-level SRP per window length L, and hit rates of expert caches of 1x, 2x
and 4x the working set for each policy, with their means over layers.

    python examples/train_loop_monitor.py --steps 6 --log-every 3
    python examples/train_loop_monitor.py --tensorboard runs/lrc   # also write the summaries to TensorBoard
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrc_kernels.hf import RoutingMonitor, RoutingRecorder

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "lrc_kernels" / "data"


def token_batches(tokenizer, batch_size: int, seq_len: int):
    """Endless batches of ``int64 [batch_size, seq_len]`` consecutive token windows of the sample text."""
    tokens = torch.tensor(tokenizer((DATA_DIR / "sample.txt").read_text(), verbose=False)["input_ids"])
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    generator = torch.Generator().manual_seed(0)
    while True:
        for order in torch.randperm(len(windows), generator=generator).split(batch_size):
            if len(order) == batch_size:
                yield windows[order]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--log-every", type=int, default=3, help="print (and reset) the monitor every n steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="SRP@L needs sequences of >= L tokens")
    parser.add_argument("--tensorboard", metavar="DIR", help="also write the summaries to a TensorBoard log dir")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model_dir = DATA_DIR / "tiny_moe"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard)

    summary = {}
    batches = token_batches(tokenizer, args.batch_size, args.seq_len)
    with RoutingRecorder(model) as recorder:
        monitor = RoutingMonitor.from_recorder(recorder)
        for step in range(1, args.steps + 1):
            input_ids = next(batches)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            # Full-length rows, so no lengths are needed; with padding pass recorder.lengths() too.
            monitor.update(recorder.routing())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % args.log_every == 0 or step == args.steps:
                summary = monitor.summary() if writer is None else monitor.log_to(writer, step)
                print(f"step {step}: loss {loss.item():.3f}")
                for key, value in summary.items():
                    print(f"  {key:32s} {value:.4f}")
                monitor.reset()
    if writer is not None:
        writer.close()
    return summary


if __name__ == "__main__":
    main()
