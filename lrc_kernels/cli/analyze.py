"""Run a local Hugging Face MoE model over a text and record the experts every token is routed to."""

from __future__ import annotations

import pathlib
from typing import Optional

import torch

from lrc_kernels.trace import RoutingTrace

from .errors import UsageError, require
from .progress import progress_bar

DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL_DIR = DATA_DIR / "tiny_moe"
SAMPLE_TEXT = DATA_DIR / "sample.txt"


def resolve_model_dir(model: str) -> pathlib.Path:
    """``"default"`` is the tiny MoE shipped in ``lrc_kernels/data``; anything else is a local directory."""
    if model == "default":
        return DEFAULT_MODEL_DIR
    path = pathlib.Path(model)
    if not path.is_dir():
        raise UsageError(f"MODEL {model!r} is not a local model directory (the Hugging Face hub is not used; "
                         f"pass 'default' or a directory with config.json)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: no config.json, not a Hugging Face model directory")
    return path


def check_device(device: str) -> torch.device:
    """A torch device that exists on this machine."""
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device!r}: {str(error).splitlines()[0]}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available on this machine")
    return resolved


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(model_dir: pathlib.Path, device: str, *, dtype: str = "fp32", device_map: Optional[str] = None,
               trust_remote_code: bool = False):
    """Model (eval mode) and tokenizer from a local directory, never the network.

    Args:
        device: where the whole model goes, unless ``device_map`` is given.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` weights (the routing of bf16 models can differ from fp32's
            on near ties; measure the dtype you serve).
        device_map: ``"auto"`` shards a model larger than one device over the GPUs and the CPU (accelerate).
        trust_remote_code: run the model's own Python code from its directory (off unless asked for).

    Encoder-decoder models (``config.is_encoder_decoder``) load as sequence-to-sequence models; the others as
    causal LMs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if device_map is None:
        device = check_device(device)
    else:
        require("accelerate", "hf", "--device-map")
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(model_dir, **options)
        auto_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **options)
        model, loading = auto_class.from_pretrained(model_dir, dtype=DTYPES[dtype], device_map=device_map,
                                                    output_loading_info=True, **options)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
        detail = " ".join(str(error).split())
        if "trust_remote_code" in detail and not trust_remote_code:
            raise UsageError(f"{model_dir}: the model needs its own code from the model directory; pass "
                             "--trust-remote-code if you trust it")
        if "ignore_mismatched_sizes" in detail:
            raise UsageError(f"{model_dir}: weights of the checkpoint are of the wrong shape for its config.json "
                             "(the checkpoint does not match its config)")
        raise UsageError(f"{model_dir}: cannot load the model: {detail[:300]}")
    if loading.get("missing_keys") or loading.get("mismatched_keys"):
        # Randomly initialised routers would be measured silently otherwise (warnings are muted above).
        missing = sorted(map(str, loading.get("missing_keys") or loading.get("mismatched_keys")))
        raise UsageError(f"{model_dir}: {len(missing)} weights missing from the checkpoint or of the wrong shape "
                         f"(e.g. {missing[0]}); it does not match its config.json or this transformers version")
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


def input_device(model) -> torch.device:
    """Where the token ids go: the input embedding's device (the first shard under ``--device-map auto``)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device


def check_inputs(model, input_ids: torch.Tensor, seq_len: int, new_tokens: int = 0) -> list[str]:
    """Refuse token ids the model cannot embed; return warnings (a context longer than the model's)."""
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings if embeddings is not None else getattr(model.config, "vocab_size", None)
    largest = int(input_ids.max()) if input_ids.numel() else -1
    if vocab is not None and largest >= vocab:
        raise UsageError(f"the tokenizer gives token id {largest}, but the model embeds only {vocab} ids: the "
                         "tokenizer does not belong to this model")
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len + new_tokens > limit:
        return [f"--seq-len {seq_len}{f' + --generate {new_tokens}' if new_tokens else ''} exceeds the model's "
                f"max_position_embeddings = {limit}: positions beyond it are outside what the model was built for"]
    return []


def check_routers(model) -> None:
    """Fail before any forward pass (and before a progress bar) when there is no router to record."""
    from lrc_kernels.hf.routers import find_routers

    try:
        find_routers(model)
    except ValueError as error:
        raise UsageError(f"{str(error).splitlines()[0]} (lrc-kernels measures Mixture-of-Experts models)")


def tokenize_text(tokenizer, text_path: pathlib.Path, seq_len: int, max_tokens: Optional[int]) -> torch.Tensor:
    """The text's tokens cut into ``[S, seq_len]`` chunks (int64); a last partial chunk is dropped."""
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{text_path}: no such file")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{text_path}: cannot read as UTF-8 text: {error}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    num_seqs = len(ids) // seq_len
    if num_seqs == 0:
        raise UsageError(f"{text_path}: {len(ids)} tokens (after --max-tokens), fewer than --seq-len {seq_len}")
    return torch.tensor(ids[: num_seqs * seq_len], dtype=torch.int64).view(num_seqs, seq_len)


def generate_routing(model, input_ids: torch.Tensor, batch_size: int, new_tokens: int, *, pad_token_id: int,
                     progress: bool = True) -> RoutingTrace:
    """Greedy ``model.generate()`` of up to ``new_tokens`` tokens after each chunk of ``input_ids [S, T]``.

    Returns:
        the :meth:`RoutingRecorder.trace` of all batches: one row per chunk, its T prompt tokens (phase 0)
        then the generated tokens the model forwarded (phase 1); a row that samples EOS stops there.
    """
    from lrc_kernels.hf.recorder import RoutingRecorder

    try:
        recorder = RoutingRecorder(model, accumulate=True)
    except ValueError as error:
        raise UsageError(f"--generate: {str(error).split(': ', 1)[-1]}")
    device = input_device(model)
    bar = progress_bar((input_ids.shape[0] + batch_size - 1) // batch_size, "batches", "batch", progress)
    try:
        with torch.no_grad(), recorder:
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=pad_token_id)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return recorder.trace()


def record_routing(model, input_ids: torch.Tensor, batch_size: int, *, stage: Optional[str] = None,
                   progress: bool = True):
    """Run ``model`` over ``input_ids [S, T]`` in batches and stack the recorded top-k of one stack's routers.

    Returns:
        a :class:`lrc_kernels.RoutingTrace` with ``topk`` int64 ``[n_layers, S, T, k]``, layers ordered by
        ``RouterSite.layer`` and named by their router modules.
    """
    from lrc_kernels.hf.recorder import RoutingRecorder

    check_routers(model)
    device = input_device(model)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    per_site: dict = {}
    sites = None
    bar = progress_bar((input_ids.shape[0] + batch_size - 1) // batch_size, "batches", "batch", progress)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                # an encoder-decoder model reads the text on both sides (teacher forcing): both stacks route it
                inputs = {"input_ids": batch, "decoder_input_ids": batch} if encoder_decoder else {"input_ids": batch}
                with RoutingRecorder(model) as recorder:
                    model(**inputs)
                    for name, topk in recorder.routing().items():
                        per_site.setdefault(name, []).append(topk.to("cpu", torch.int64))
                    sites = recorder.sites
                if bar is not None:
                    bar.update(1)
    finally:  # an error's line must not be glued to a half-drawn bar
        if bar is not None:
            bar.close()
    if not sites:
        raise UsageError("the model has no router the recorder recognises (is it a Mixture-of-Experts model?)")
    stages = sorted({str(site.stage) for site in sites})
    if stage is None and len(stages) > 1:
        raise UsageError(f"the routers span the stacks {stages}; choose one with --stage")
    chosen = [site for site in sites if stage is None or str(site.stage) == stage]
    if not chosen:
        raise UsageError(f"--stage {stage!r}: no router in that stack (stacks: {stages})")
    chosen = sorted((site for site in chosen if site.name in per_site), key=lambda site: site.layer)
    layer_topk = [torch.cat(per_site[site.name]) for site in chosen]
    shapes = {(site.num_experts, topk.shape[-1]) for site, topk in zip(chosen, layer_topk)}
    if len(shapes) != 1:
        raise UsageError(f"the layers have different (num_experts, top_k): {sorted(shapes)}; "
                         "a model-level stream needs equal values")
    topk = torch.stack(layer_topk)
    return RoutingTrace(topk, num_experts=chosen[0].num_experts, layer_names=[site.name for site in chosen])
