"""Train the tiny Mixtral-style MoE language model shipped as ``lrc_kernels/data/tiny_moe``.

The corpus is the docstrings of the CPython standard library of the interpreter that runs this script
(PSF License; see ``lrc_kernels/data/README.md``). Modules are split by a hash of their path: about one
in twenty goes to the held-out sample text ``lrc_kernels/data/sample.txt`` that the demo analyses, the
rest trains the byte-level BPE tokenizer and the model.

Everything is seeded and runs on one CPU thread with deterministic algorithms, so the same Python
standard library and the same torch/tokenizers/transformers versions give the same weights (1200 steps
took 767 s on a shared 2-core machine). The corpus digest and all settings are written to
``training.json`` next to the weights.

Usage::

    python scripts/train_tiny_moe.py    # writes lrc_kernels/data/{tiny_moe/, sample.txt, PYTHON-LICENSE.txt}
    python scripts/train_tiny_moe.py --steps 20 --out /tmp/tiny --sample /tmp/tiny/sample.txt  # smoke run
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import pathlib
import platform
import shutil
import sys
import sysconfig
import time

import torch

DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "lrc_kernels" / "data"
# Directories of the standard library that hold tests, demos, vendored wheels or generated data.
SKIPPED_DIRS = {
    "test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "ensurepip",
    "turtledemo", "tkinter", "pydoc_data",
}
MIN_DOCSTRING_CHARS = 40
HELD_OUT_ONE_IN = 20
SAMPLE_MAX_CHARS = 60_000
EOS = "<|endoftext|>"


def standard_library_docstrings() -> list[tuple[str, list[str]]]:
    """(module path relative to the stdlib root, its docstrings in ``ast.walk`` order), sorted by path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith("config-") for part in relative.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docstrings = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_DOCSTRING_CHARS:
                    docstrings.append(text)
        if docstrings:
            modules.append((relative.as_posix(), docstrings))
    return modules


def is_held_out(module_path: str) -> bool:
    digest = hashlib.sha256(module_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELD_OUT_ONE_IN == 0


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_config(vocab_size: int, args: argparse.Namespace):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden_size // 4,
        num_local_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_loss_coef,
        output_router_logits=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _display_path(path: pathlib.Path) -> str:
    """The path relative to the repository when inside it, so the record names no local directory."""
    resolved = path.resolve()
    root = DATA_DIR.parent.parent
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DATA_DIR / "tiny_moe")
    parser.add_argument("--sample", type=pathlib.Path, default=DATA_DIR / "sample.txt")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    modules = standard_library_docstrings()
    train_texts = [d for path, docs in modules if not is_held_out(path) for d in docs]
    held_out_texts = [d for path, docs in modules if is_held_out(path) for d in docs]
    corpus_digest = hashlib.sha256("\0".join(d for _, docs in modules for d in docs).encode()).hexdigest()

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    stream = []
    for encoding in tokenizer.encode_batch(train_texts):
        stream.extend(encoding.ids)
        stream.append(eos_id)
    tokens = torch.tensor(stream, dtype=torch.int64)
    num_windows = (tokens.numel() - 1) // args.seq_len
    windows = tokens[: num_windows * args.seq_len].view(num_windows, args.seq_len)
    print(f"{len(modules)} modules, {len(train_texts)} training docstrings, {tokens.numel()} tokens, "
          f"{num_windows} windows of {args.seq_len}", file=sys.stderr)

    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast

    config = build_config(tokenizer.get_vocab_size(), args)
    model = MixtralForCausalLM(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"{num_parameters} parameters", file=sys.stderr)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(args.steps // 20, 1)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(args.steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    order_generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(num_windows, generator=order_generator)
    cursor = 0
    model.train()
    log = []
    for step in range(args.steps):
        if cursor + args.batch_size > num_windows:
            order = torch.randperm(num_windows, generator=order_generator)
            cursor = 0
        batch = windows[order[cursor: cursor + args.batch_size]]
        cursor += args.batch_size
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == args.steps - 1:
            language_loss = (output.loss - args.aux_loss_coef * output.aux_loss).item()
            log.append({"step": step, "lm_loss": round(language_loss, 4), "aux_loss": round(output.aux_loss.item(), 4)})
            print(f"step {step:5d}  lm loss {language_loss:.4f}  aux {output.aux_loss.item():.4f}  "
                  f"{time.perf_counter() - started:7.1f} s", file=sys.stderr)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    fast_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=config.max_position_embeddings,
    )
    fast_tokenizer.save_pretrained(args.out)

    sample = ""
    for text in held_out_texts:
        if len(sample) + len(text) + 2 > SAMPLE_MAX_CHARS:
            break
        sample += text + "\n\n"
    args.sample.parent.mkdir(parents=True, exist_ok=True)
    args.sample.write_text(sample, encoding="utf-8")
    # The PSF License Agreement must accompany any redistributed part of Python (its clause 2).
    python_license = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    shutil.copyfile(python_license, args.sample.parent / "PYTHON-LICENSE.txt")

    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "corpus": "docstrings of the CPython standard library (ast.get_docstring, >= 40 characters)",
        "corpus_sha256": corpus_digest,
        "modules": len(modules),
        "held_out_modules": sorted(path for path, _ in modules if is_held_out(path)),
        "training_tokens": int(tokens.numel()),
        "parameters": num_parameters,
        "arguments": {k: (_display_path(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
        "log": log,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"done in {record['wall_seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
