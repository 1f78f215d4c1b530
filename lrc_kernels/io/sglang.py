"""SGLang's routed experts (``--enable-return-routed-experts``, request field ``return_routed_experts``).

JSON lines of ``/generate`` responses (a line may also hold the list a batch request returns); each response
is one sequence: ``meta_info.routed_experts`` is base64 of raw int32 bytes in C order with no shape,
``[prompt + completion - 1, num_layers, top_k]`` (``--num-layers``/``--top-k`` or ``--model-config`` give
the shape); ``meta_info.prompt_tokens`` splits prefill from decode. OpenAI-compatible responses carry the
same string in ``choices[i].sglext.routed_experts`` (or ``sgl_ext``, or the response-level ``sglext`` for a
single choice) with ``usage.prompt_tokens``.
"""

from __future__ import annotations

import pathlib

import numpy as np

from ._common import ReadOptions, Sequences, TraceReadError, assemble, base64_bytes, int_field, json_lines

_EXTENSION_KEYS = ("sglext", "sgl_ext")


def _shape(options: ReadOptions, source: str):
    if options.num_layers is None or options.top_k is None:
        raise TraceReadError(f"{source}: SGLang's routed_experts are raw int32 bytes without a shape: pass "
                             "--num-layers and --top-k (or --model-config config.json)")
    return options.num_layers, options.top_k


def _raw_rows(value, where: str, num_layers: int, top_k: int, prompt_tokens: int) -> np.ndarray:
    if value is None:
        raise TraceReadError(f"{where} is null: start the server with --enable-return-routed-experts and set "
                             "return_routed_experts in the request")
    raw = base64_bytes(value, where)
    per_token = 4 * num_layers * top_k
    if len(raw) % per_token:
        raise TraceReadError(f"{where}: {len(raw)} bytes do not divide into int32 [tokens, {num_layers}, {top_k}] "
                             f"rows of {per_token} bytes (check --num-layers/--top-k)")
    rows = np.frombuffer(raw, dtype="<i4").reshape(-1, num_layers, top_k)
    if rows.shape[0] < prompt_tokens:
        raise TraceReadError(f"{where}: {rows.shape[0]} tokens, fewer than the {prompt_tokens} prompt tokens")
    return rows


def _located(response: dict, where: str):
    """``(routed_experts value, its field name, prompt_tokens)`` for each sequence of one response."""
    meta = response.get("meta_info")
    if isinstance(meta, dict):
        prompt_tokens = int_field(meta, "prompt_tokens", f"{where}: meta_info")
        if "routed_experts" not in meta:
            raise TraceReadError(f"{where}: meta_info: missing field 'routed_experts'")
        return [(meta["routed_experts"], f"{where}: meta_info.routed_experts", prompt_tokens)]
    choices = response.get("choices")
    if not isinstance(choices, list):
        raise TraceReadError(f"{where}: neither 'meta_info' (/generate) nor 'choices' (OpenAI-compatible)")
    usage = response.get("usage")
    if not isinstance(usage, dict):
        raise TraceReadError(f"{where}: missing field 'usage' (its prompt_tokens splits prefill from decode)")
    prompt_tokens = int_field(usage, "prompt_tokens", f"{where}: usage")
    found = []
    for index, choice in enumerate(choices):
        for key in _EXTENSION_KEYS:
            extension = choice.get(key) if isinstance(choice, dict) else None
            if isinstance(extension, dict) and "routed_experts" in extension:
                found.append((extension["routed_experts"], f"{where}: choices[{index}].{key}.routed_experts",
                              prompt_tokens))
                break
        else:
            extension = next((response[key] for key in _EXTENSION_KEYS if isinstance(response.get(key), dict)), None)
            if extension is None or "routed_experts" not in extension or len(choices) != 1:
                raise TraceReadError(f"{where}: choices[{index}]: missing field 'sglext.routed_experts'")
            found.append((extension["routed_experts"], f"{where}: sglext.routed_experts", prompt_tokens))
    return found


def read(path: pathlib.Path, options: ReadOptions):
    """The :class:`~lrc_kernels.RoutingTrace` of every response (or choice) of ``path``."""
    num_layers, top_k = _shape(options, str(path))
    rows, prompt_lengths = [], []
    for line, record in json_lines(path, lists=True, on_bytes=options.on_bytes):
        responses = record if isinstance(record, list) else [record]
        for item, response in enumerate(responses):
            where = f"{path}:{line}" + (f": [{item}]" if isinstance(record, list) else "")
            for value, field, prompt_tokens in _located(response, where):
                rows.append(_raw_rows(value, field, num_layers, top_k, prompt_tokens))
                prompt_lengths.append(prompt_tokens)
    return assemble(Sequences(rows, prompt_lengths), list(range(num_layers)), options, str(path),
                    meta={"format": "sglang"})
