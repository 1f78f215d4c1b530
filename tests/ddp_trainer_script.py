"""One rank of the two-process HF Trainer test (tests/test_distributed.py runs it under torchrun, gloo, CPU).

Trains the tiny Mixtral with LRCCallback for 4 steps, logging every 2, and saves to OUT/rank{r}.pt the
Trainer's log history and the routing this rank's witness saw (one entry per training forward)."""

import sys

import torch
from transformers import Trainer, TrainingArguments

from hf_models import build_tiny_model
from lrc_kernels.hf import LRCCallback
from test_callbacks import BATCH, MONITOR_ARGS, _PaddedTokens, _RouterWitness


def main(out_dir):
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    model = build_tiny_model("mixtral").train()
    witness = _RouterWitness(model)
    args = TrainingArguments(output_dir=out_dir, max_steps=4, logging_steps=2, per_device_train_batch_size=BATCH // 2,
                             report_to="none", use_cpu=True, ddp_backend="gloo", save_strategy="no", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_PaddedTokens())
    LRCCallback(**MONITOR_ARGS).install(trainer)
    trainer.train()
    witness.remove()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2 and torch.distributed.get_backend() == "gloo"
    torch.save({"log_history": trainer.state.log_history, "batches": witness.batches}, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
