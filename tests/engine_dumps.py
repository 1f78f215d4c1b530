"""Write random routing exactly as vLLM, SGLang and Megatron-Core dump it (the layouts of docs/formats.md).

Every writer takes per-sequence routing ``rows[s]`` ``[T_s, n_layers, k]`` (what the engine computed) and
returns nothing; the tests read the files back and compare with ``rows``.
"""

import base64
import io
import json

import numpy as np
import torch


def random_rows(rng, lengths, num_layers, top_k, num_experts, *, dense_layers=()):
    """Distinct ids per token: the first k of a random permutation of E; ``dense_layers`` filled with 0."""
    rows = []
    for length in lengths:
        ids = rng.random((length, num_layers, num_experts)).argsort(-1)[..., :top_k]
        ids[:, list(dense_layers)] = 0
        rows.append(ids.astype(np.int64))
    return rows


def npy_base64(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def write_vllm(path, requests, dtype=np.uint8):
    """``requests``: list of (prompt_tokens, [rows of each choice]); current vLLM (base64 .npy per choice)."""
    with open(path, "w") as log:
        for number, (prompt_tokens, choices) in enumerate(requests):
            response = {
                "id": f"cmpl-{number}", "object": "text_completion", "model": "moe",
                "choices": [{"index": i, "text": "...", "finish_reason": "length",
                             "routed_experts": npy_base64(rows.astype(dtype))} for i, rows in enumerate(choices)],
                "usage": {"prompt_tokens": prompt_tokens,
                          "completion_tokens": max(len(rows) for rows in choices) - prompt_tokens + 1,
                          "total_tokens": 0},
            }
            log.write(json.dumps(response) + "\n")


def write_vllm_021(path, requests):
    """vLLM 0.21: response-level ``prompt_routed_experts`` and per-choice generated rows, nested lists."""
    with open(path, "w") as log:
        for number, (prompt_tokens, choices) in enumerate(requests):
            prompt = choices[0][:prompt_tokens]
            response = {
                "id": f"chatcmpl-{number}", "object": "chat.completion",
                "prompt_routed_experts": prompt.tolist(),
                "choices": [{"index": i, "message": {"role": "assistant", "content": "..."},
                             "routed_experts": rows[prompt_tokens:].tolist()} for i, rows in enumerate(choices)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": 0},
            }
            log.write(json.dumps(response) + "\n")


def write_sglang(path, requests, *, openai=False):
    """``requests``: list of (prompt_tokens, rows); ``/generate`` responses (or OpenAI-compatible ones)."""
    with open(path, "w") as log:
        for number, (prompt_tokens, rows) in enumerate(requests):
            encoded = base64.b64encode(np.ascontiguousarray(rows, dtype="<i4").tobytes()).decode()
            if openai:
                response = {"id": f"chatcmpl-{number}", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "..."},
                     "sglext": {"routed_experts": encoded}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": 0}}
            else:
                response = {"text": "...", "meta_info": {
                    "id": f"req-{number}", "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(rows) - prompt_tokens + 1, "routed_experts": encoded}}
            log.write(json.dumps(response) + "\n")


def write_megatron(path, steps, layer_numbers, top_k, *, mtp=False):
    """``steps``: list of [B, s, layers, k] arrays (one micro-batch each; two in one step = accumulation)."""
    with open(path, "w") as log:
        for step, batches in enumerate(steps):
            for batch in batches:
                B, s = batch.shape[:2]
                for index, layer in enumerate(layer_numbers):
                    # [s, b] order: token t = s_idx * B + b.
                    indices = batch[:, :, index].transpose(1, 0, 2).reshape(s * B, top_k)
                    record = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                              "rank": 0, "num_tokens": s * B, "topk": top_k, "top_indices": indices.tolist()}
                    log.write(json.dumps(record) + "\n")
                if mtp:
                    log.write(json.dumps({"step": step, "stage": "pre_dispatch", "block": "mtp", "mtp_idx": 0,
                                          "layer": 1, "rank": 0, "num_tokens": 1, "topk": top_k,
                                          "top_indices": [[0] * top_k]}) + "\n")


def write_sglang_dump(path, passes, physical_to_logical):
    """``passes``: list of (forward_mode, positions, extend_seq_lens or None, ids [tokens, layers, k] physical).

    Saved as the recorder's ``per_token`` mode does: ``topk_ids_of_layer`` int32 ``[layers, tokens, 8]``
    padded with -1, plus ``last_physical_to_logical_map``."""
    records = []
    for number, (mode, positions, extend_seq_lens, ids) in enumerate(passes):
        padded = torch.full((ids.shape[1], ids.shape[0], 8), -1, dtype=torch.int32)
        padded[:, :, : ids.shape[2]] = torch.from_numpy(ids.transpose(1, 0, 2).astype(np.int32))
        records.append({"forward_pass_id": number, "rank": 0, "gatherer_key": "primary",
                        "input_ids": [1] * len(positions), "positions": list(positions),
                        "extend_seq_lens": extend_seq_lens, "forward_mode": mode,
                        "topk_ids_of_layer": padded, "misc_objects": []})
    payload = {"records": records}
    if physical_to_logical is not None:
        payload["last_physical_to_logical_map"] = torch.as_tensor(physical_to_logical)
    torch.save(payload, path)
