"""Row layouts of recorded forward passes, and the stitching of many passes into one RoutingTrace.

The recorder's hooks only keep tensors (no device synchronisation); everything here runs afterwards, in
``RoutingRecorder.routing()`` / ``lengths()`` (one pass) and ``RoutingRecorder.trace()`` (all passes), where
reading tensor values is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from lrc_kernels.trace import RoutingTrace

if TYPE_CHECKING:  # only named in an annotation (postponed by the __future__ import)
    from .routers import RouterSite


@dataclass
class ForwardInputs:
    """What the recorder needs from one call of the model: batch size, padding masks, position ids.

    ``num_tokens`` (tokens per row of this call) and ``input_ids`` are kept when accumulating: the masks are
    then cut to this call's last ``num_tokens`` columns, so a growing KV-cache mask is not copied every step.
    """

    batch_size: Optional[int]
    masks: dict
    position_ids: dict
    num_tokens: Optional[int] = None
    input_ids: Optional[torch.Tensor] = None


@dataclass
class Layout:
    """Maps a stage's flat token stream ``[B*T]`` onto output rows (see ``RoutingRecorder.routing``)."""

    batch_size: int
    seq_len: int
    valid: Optional[torch.Tensor]         # bool [B, T]; None: every token is valid
    lengths: torch.Tensor                 # int64 [S]
    packed_rows: Optional[torch.Tensor] = None     # int64 [n_valid]: output row of each valid token
    packed_columns: Optional[torch.Tensor] = None  # int64 [n_valid]: its column
    packed_shape: tuple = (0, 0)

    def apply(self, selection: torch.Tensor) -> torch.Tensor:
        tokens = selection.view(self.batch_size, self.seq_len, selection.shape[-1])
        if self.valid is None:
            return tokens
        valid = self.valid.to(tokens.device)
        if self.packed_rows is None:
            return tokens.masked_fill(~valid[..., None], -1)
        out = tokens.new_full((*self.packed_shape, tokens.shape[-1]), -1)
        out[self.packed_rows.to(tokens.device), self.packed_columns.to(tokens.device)] = tokens[valid]
        return out


def forward_layout(forward: ForwardInputs, stage: str, num_tokens: int) -> Layout:
    """The rows of one pass: batch rows, or packed sequences when 2-D position ids restart inside a row."""
    batch_size = forward.batch_size
    if batch_size is None or batch_size == 0 or num_tokens % batch_size:
        raise RuntimeError(f"cannot split the {num_tokens} routed tokens of the {stage} into sequences: the "
                           f"batch size taken from the model inputs is {batch_size}")
    seq_len = num_tokens // batch_size
    mask = forward.masks[stage]
    valid = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != batch_size \
                or mask.shape[1] < seq_len:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention mask of the {stage}: expected a 2-D padding mask [B={batch_size}, "
                             f">= T={seq_len}] (1 = token, 0 = padding), received {shape}")
        # With a KV cache the mask also covers past tokens; its last T columns are this call's tokens.
        valid = mask[:, -seq_len:] != 0
    positions = forward.position_ids[stage]
    if isinstance(positions, torch.Tensor) and positions.ndim == 2 and positions.shape[0] == batch_size \
            and positions.shape[1] >= seq_len and seq_len > 1:
        positions = positions[:, -seq_len:]
        token_valid = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
        first_valid = token_valid & (token_valid.cumsum(dim=1) == 1)
        starts = token_valid & ((positions.to(token_valid.device) == 0) | first_valid)
        if bool((starts & ~first_valid).any()):
            return _packed_layout(batch_size, seq_len, token_valid, starts)
    if valid is None:
        lengths = torch.full((batch_size,), seq_len, dtype=torch.int64)
    else:
        # Valid length of a row = one past its last valid token (trailing padding excluded).
        columns = torch.arange(1, seq_len + 1, device=valid.device)
        lengths = (valid * columns).amax(dim=1).to(torch.int64)
    return Layout(batch_size, seq_len, valid, lengths)


def _packed_layout(batch_size: int, seq_len: int, valid: torch.Tensor, starts: torch.Tensor) -> Layout:
    flat_valid, flat_starts = valid.reshape(-1), starts.reshape(-1)
    sequence = flat_starts.cumsum(dim=0) - 1                  # output row of every token (valid ones)
    rank = flat_valid.cumsum(dim=0) - 1                       # rank among the valid tokens
    start_rank = rank[flat_starts]                            # [S]
    rows = sequence[flat_valid]
    columns = rank[flat_valid] - start_rank[rows]
    lengths = torch.bincount(rows, minlength=start_rank.numel()).to(torch.int64)
    shape = (start_rank.numel(), int(lengths.max()))
    return Layout(batch_size, seq_len, valid, lengths, rows, columns, shape)


@dataclass
class PassRecord:
    """One forward pass of the model: its inputs and, per router, what the hooks captured."""

    forward: ForwardInputs
    captures: dict
    router_calls: dict


@dataclass
class GenerateRecord:
    """One ``model.generate()`` call: the prompt width, the EOS ids, its passes and the returned ids."""

    prompt_columns: int               # tokens per row of the prompt given to generate()
    output_prompt_columns: int        # of those, columns repeated at the start of the output (0: inputs_embeds)
    eos_ids: object                   # int, list of ints, tensor (read only in trace()) or None
    passes: list = field(default_factory=list)
    sequences: Optional[torch.Tensor] = None


_REORDERED = ("model.generate() reordered or rewrote its rows (beam search, assisted or speculative decoding); "
              "RoutingRecorder(accumulate=True) supports greedy and sampled generation only")


def _pad_slots(topk: torch.Tensor, num_slots: int) -> torch.Tensor:
    return torch.nn.functional.pad(topk, (0, num_slots - topk.shape[-1]), value=-1)


def _forward_rows(record: PassRecord, sites, selection: Callable):
    """``({site: [S, T, k]}, lengths [S], phase [S, T])`` of one plain forward pass (all prompt tokens)."""
    rows, lengths = {}, None
    for site in sites:
        selected = selection(site, record)
        if selected is not None:
            layout = forward_layout(record.forward, site.stage, selected.shape[0])
            rows[site.name], lengths = layout.apply(selected).cpu(), layout.lengths.cpu()
    width = max((value.shape[1] for value in rows.values()), default=0)
    return rows, lengths, torch.zeros(len(lengths), width, dtype=torch.uint8)


def _generate_rows(record: GenerateRecord, sites, selection: Callable):
    """``({site: [B, T, k]}, lengths [B], phase [B, T])`` of one generate() call (see RoutingRecorder.trace)."""
    passes, sequences = record.passes, record.sequences
    widths = [p.forward.num_tokens for p in passes]
    prompt_passes = next((n for n in range(len(passes) + 1) if sum(widths[:n]) == record.prompt_columns), None)
    batch_size = passes[0].forward.batch_size if passes else None
    if sequences is None or prompt_passes is None or batch_size != sequences.shape[0] \
            or any(width != 1 for width in widths[prompt_passes:]):
        raise ValueError(_REORDERED)
    generated = sequences[:, record.output_prompt_columns:].cpu()                     # [B, G]
    decode = passes[prompt_passes:]
    if len(decode) != max(generated.shape[1] - 1, 0):
        raise ValueError(_REORDERED)
    for step, p in enumerate(decode):  # each step forwards the token sampled by the previous one
        fed = p.forward.input_ids
        if fed is not None and not torch.equal(fed.cpu().view(-1), generated[:, step]):
            raise ValueError(_REORDERED)
    prompt_valid = torch.cat([torch.ones(batch_size, p.forward.num_tokens, dtype=torch.bool)
                              if p.forward.masks["decoder"] is None else p.forward.masks["decoder"].cpu() != 0
                              for p in passes[:prompt_passes]], dim=1)
    # A row ends at its first EOS: that token and what generate() feeds a finished row are not forwarded by it.
    eos_ids = torch.as_tensor([] if record.eos_ids is None else record.eos_ids).flatten().cpu()
    is_eos = torch.isin(generated, eos_ids.to(generated.dtype))
    num_generated = torch.where(is_eos.any(1), is_eos.to(torch.int8).argmax(1) + 1, generated.shape[1])
    prompt_lengths = prompt_valid.sum(1)
    lengths = prompt_lengths + (num_generated - 1).clamp_min(0)
    keep = torch.cat([prompt_valid, torch.arange(len(decode)) < (num_generated - 1)[:, None]], dim=1)
    row_index, token_index = keep.nonzero(as_tuple=True)
    column = (keep.cumsum(1) - 1)[row_index, token_index]
    width = int(lengths.max()) if batch_size else 0
    rows = {}
    for site in sites:
        selected = [selection(site, p) for p in passes]
        if selected[0] is None:
            continue
        tokens = torch.cat([s.view(batch_size, -1, s.shape[-1]) for s in selected], dim=1).cpu()
        out = torch.full((batch_size, width, tokens.shape[-1]), -1, dtype=torch.int64)
        out[row_index, column] = tokens[row_index, token_index]
        rows[site.name] = out
    phase = (torch.arange(width) >= prompt_lengths[:, None]).to(torch.uint8)
    return rows, lengths, phase


def stitch(groups: list, sites, selection: Callable, meta: dict) -> RoutingTrace:
    """One RoutingTrace from recorded groups (a PassRecord per plain forward, a GenerateRecord per generate)."""
    parts = [(_generate_rows if isinstance(group, GenerateRecord) else _forward_rows)(group, sites, selection)
             for group in groups]
    names = [site.name for site in sites if any(site.name in rows for rows, _, _ in parts)]
    for rows, _, _ in parts:
        if set(rows) != set(names):
            missing = sorted(set(names) - set(rows))
            raise RuntimeError(f"routers {missing} did not run in every forward pass of the block; a trace needs "
                               f"every layer for every token")
    experts = {site.name: site.num_experts for site in sites}
    num_slots = max(site.top_k for site in sites if site.name in names)
    per_layer = [experts[name] for name in names]
    num_experts = per_layer[0] if len(set(per_layer)) == 1 else per_layer
    traces = []
    for rows, lengths, phase in parts:
        topk = torch.stack([_pad_slots(rows[name], num_slots) for name in names])
        traces.append(RoutingTrace(topk, lengths, num_experts=num_experts, layer_names=names, phase=phase,
                                   meta=meta))
    return traces[0] if len(traces) == 1 else RoutingTrace.concat(traces)


def validated_selection(site: RouterSite, record: PassRecord) -> Optional[torch.Tensor]:
    """The validated int64 ``[N, k]`` selection of ``site`` in one pass, or None if that router did not run."""
    records = record.captures.get(site.name)
    if not records:
        if record.router_calls.get(site.name):
            raise RuntimeError(
                f"{site.name}: the router ran but {type(site.capture_module).__name__} was never called, "
                f"so its selection was not captured (a fused MoE kernel, e.g. from the `kernels` hub, "
                f"probably replaced the block's forward; load the model without it)")
        return None
    if len(records) > 1:
        raise RuntimeError(f"{site.name}: the router ran {len(records)} times in one forward pass "
                           f"(a weight-shared or looped layer); capture supports one call per router")
    selection, has_nan = records[0]
    if callable(selection):  # a reader that left its per-token work for after the pass
        selection = selection()
    if has_nan is not None and bool(has_nan):
        raise ValueError(f"{site.name}: router logits contain NaN; top-k from logits is undefined")
    return selection


def accumulated_inputs(inputs: dict, batch_size: Optional[int]) -> ForwardInputs:
    """A decoder-only call's inputs, cut to this call's tokens (a KV-cache mask grows every step) and copied."""
    tokens = inputs["input_ids"] if isinstance(inputs["input_ids"], torch.Tensor) else inputs["inputs_embeds"]
    num_tokens = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.ndim >= 2 else None

    def this_call(value):
        if not isinstance(value, torch.Tensor):
            return value
        if num_tokens is not None and value.ndim == 2:
            value = value[:, -num_tokens:]
        return value.detach().clone()

    ids = inputs["input_ids"]
    return ForwardInputs(batch_size, {"encoder": None, "decoder": this_call(inputs["attention_mask"])},
                         {"encoder": None, "decoder": this_call(inputs["position_ids"])}, num_tokens,
                         ids.detach().clone() if isinstance(ids, torch.Tensor) else None)


def begin_generate(model, args: tuple, kwargs: dict) -> GenerateRecord:
    """Describe a generate() call before it runs; refuse the modes that reorder rows or the KV cache."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name, default=None):
        return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, default)

    if (setting("num_beams", 1) or 1) > 1 or kwargs.get("assistant_model") is not None \
            or setting("prompt_lookup_num_tokens") is not None:
        raise ValueError(_REORDERED)
    prompt = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids", kwargs.get("inputs"))
    embeds = kwargs.get("inputs_embeds")
    if isinstance(prompt, torch.Tensor):
        prompt_columns = output_columns = prompt.shape[-1]
    elif isinstance(embeds, torch.Tensor):
        prompt_columns, output_columns = embeds.shape[1], 0
    else:
        raise ValueError("model.generate() without input_ids or inputs_embeds: RoutingRecorder(accumulate=True) "
                         "needs the prompt tensor to tell prompt from generated tokens")
    return GenerateRecord(prompt_columns, output_columns, setting("eos_token_id"))


class GenerateWrapper:
    """Wraps ``model.generate`` for the block (removed like a hook handle) to delimit and describe its calls."""

    def __init__(self, recorder):
        model = recorder._model
        self._model, self._had_own = model, "generate" in model.__dict__
        original = model.generate

        def generate(*args, **kwargs):
            if recorder._generate is not None or recorder._state != "recording":
                return original(*args, **kwargs)
            recorder._generate = begin_generate(model, args, kwargs)
            try:
                output = original(*args, **kwargs)
            except BaseException as error:
                recorder._fail(f"model.generate() raised {type(error).__name__}")
                raise
            finally:
                record, recorder._generate = recorder._generate, None
            record.sequences = output if isinstance(output, torch.Tensor) else output.sequences
            recorder._groups.append(record)
            return output

        self._original = model.__dict__.get("generate")
        model.generate = generate

    def remove(self) -> None:
        if self._had_own:
            self._model.generate = self._original
        else:
            del self._model.generate


__all__ = ["ForwardInputs", "GenerateRecord", "GenerateWrapper", "Layout", "PassRecord", "accumulated_inputs",
           "begin_generate", "forward_layout", "stitch", "validated_selection"]
