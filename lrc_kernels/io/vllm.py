"""vLLM's routed experts (``vllm serve ... --enable-return-routed-experts``), see docs/formats.md.

Layouts read:

- JSON lines, one completion / chat-completion response per line. Every ``choices[i]`` is one sequence:
  ``choices[i].routed_experts`` is the base64 string of ``.npy`` bytes of shape
  ``[prompt + output - 1, num_layers, top_k]`` (uint8 / uint16 / int32); ``usage.prompt_tokens`` splits
  prefill (phase 0) from decode (phase 1).
- vLLM 0.21: the response-level ``prompt_routed_experts`` ``[prompt_len, layers, top_k]`` plus
  ``choices[i].routed_experts`` ``[gen_len, layers, top_k]`` as nested lists; ``-1`` (prefix-cached
  positions) is kept as "no expert".
- ``.npy`` (one ``CompletionOutput.routed_experts`` array ``[T, layers, k]``) or ``.npz`` (one array per
  request, in archive order); these carry no prompt length, hence no phases.

The layer axis may count every hidden layer, dense ones filled with 0: keep the MoE layers with ``--layers``.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np

from ._common import (ReadOptions, Sequences, TraceReadError, assemble, base64_bytes, check_rows, int_field,
                      json_lines, routing_rows)


def _npy_rows(value, where: str, num_layers, top_k) -> np.ndarray:
    raw = base64_bytes(value, where)
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise TraceReadError(f"{where}: not .npy bytes after base64 decoding ({str(error).splitlines()[0]})")
    return check_rows(array, where, num_layers=num_layers, top_k=top_k)


def _choice_rows(value, where: str, num_layers, top_k) -> np.ndarray:
    if value is None:
        raise TraceReadError(f"{where} is null: start the server with --enable-return-routed-experts "
                             "(and ask for it in the request)")
    if isinstance(value, str):
        return _npy_rows(value, where, num_layers, top_k)
    return routing_rows(value, where, num_layers=num_layers, top_k=top_k)


def read_jsonl(path: pathlib.Path, options: ReadOptions):
    """The :class:`~lrc_kernels.RoutingTrace` of every choice of every response line of ``path``."""
    rows, prompt_lengths = [], []
    num_layers = top_k = None
    for line, response in json_lines(path, on_bytes=options.on_bytes):
        where = f"{path}:{line}"
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TraceReadError(f"{where}: missing field 'choices' (a list with one entry per completion)")
        usage = response.get("usage")
        if not isinstance(usage, dict):
            raise TraceReadError(f"{where}: missing field 'usage' (its prompt_tokens splits prefill from decode)")
        prompt_tokens = int_field(usage, "prompt_tokens", f"{where}: usage")
        prompt = None
        if response.get("prompt_routed_experts") is not None:  # vLLM 0.21: the prompt's rows apart
            prompt = routing_rows(response["prompt_routed_experts"], f"{where}: prompt_routed_experts",
                                  num_layers=num_layers, top_k=top_k)
            if prompt.shape[0] != prompt_tokens:
                raise TraceReadError(f"{where}: prompt_routed_experts has {prompt.shape[0]} tokens but "
                                     f"usage.prompt_tokens is {prompt_tokens}")
            num_layers, top_k = prompt.shape[1], prompt.shape[2]
        for index, choice in enumerate(choices):
            field = f"{where}: choices[{index}].routed_experts"
            if not isinstance(choice, dict) or "routed_experts" not in choice:
                raise TraceReadError(f"{where}: choices[{index}]: missing field 'routed_experts'")
            choice_rows = _choice_rows(choice["routed_experts"], field, num_layers, top_k)
            if choice_rows.shape[0]:
                num_layers, top_k = choice_rows.shape[1], choice_rows.shape[2]
            if prompt is not None:
                choice_rows = np.concatenate([prompt, choice_rows])
            elif choice_rows.shape[0] < prompt_tokens:
                raise TraceReadError(f"{field}: {choice_rows.shape[0]} tokens, fewer than usage.prompt_tokens "
                                     f"{prompt_tokens}")
            rows.append(choice_rows)
            prompt_lengths.append(prompt_tokens)
    rows = [row if row.shape[0] else np.zeros((0, num_layers, top_k), np.int32) for row in rows]
    return assemble(Sequences(rows, prompt_lengths), list(range(num_layers or 0)), options, str(path),
                    meta={"format": "vllm"})


def read_arrays(path: pathlib.Path, options: ReadOptions):
    """``.npy``: one sequence ``[T, layers, k]``; ``.npz``: one sequence per array."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise TraceReadError(f"{path}: cannot read as {path.suffix[1:]}: {str(error).splitlines()[0]}")
    if isinstance(loaded, np.ndarray):
        arrays = [(f"{path}", loaded)]
    else:
        with loaded:
            arrays = [(f"{path}: array '{name}'", loaded[name]) for name in loaded.files]
    rows = []
    num_layers = top_k = None
    for where, array in arrays:
        rows.append(check_rows(array, where, num_layers=num_layers, top_k=top_k))
        num_layers, top_k = array.shape[1], array.shape[2]
    return assemble(Sequences(rows), list(range(num_layers or 0)), options, str(path), meta={"format": "vllm"})


def read(path: pathlib.Path, options: ReadOptions):
    if path.suffix.lower() in (".npy", ".npz"):
        return read_arrays(path, options)
    return read_jsonl(path, options)
