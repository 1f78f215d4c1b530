"""Live capture of MoE routing from a Hugging Face model: :class:`RoutingRecorder`.

Hooks only clone/detach and run device-side tensor ops (no ``.item()``, no ``.cpu()``, no branching on tensor
values), so capture never synchronises with the device. The layout work (padding, packed sequences) runs in
:meth:`RoutingRecorder.routing`, after the forward pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .routers import (EXPERTS_ARGS, INDEX_ARG, ONE_HOT_DISPATCH, ROUTER_LOGITS_TOPK, TOP1_MASK_AND_GATES,
                      RouterSite, find_routers)

try:  # NVTX ranges in the library's own domain; the nvtx package makes them no-ops without a profiler.
    import nvtx as _nvtx

    _NVTX_DOMAIN = _nvtx.get_domain("lrc_kernels")
except ImportError:
    _NVTX_DOMAIN = None


class _NvtxRange:
    """A reusable NVTX push/pop range (event attributes are built once, not per call)."""

    def __init__(self, message: str):
        self._attributes = _NVTX_DOMAIN.get_event_attributes(message=message) if _NVTX_DOMAIN is not None else None

    def __enter__(self):
        if self._attributes is not None:
            _NVTX_DOMAIN.push_range(self._attributes)

    def __exit__(self, *exc_info):
        if self._attributes is not None:
            _NVTX_DOMAIN.pop_range()


def _argument(args: tuple, kwargs: dict, spec: tuple[int, str]) -> torch.Tensor:
    position, keyword = spec
    return args[position] if len(args) > position else kwargs[keyword]


def _read_experts_args(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    indices = _argument(args, kwargs, site.selection_arg).detach()
    if indices.is_floating_point():
        raise RuntimeError(f"{site.name}: expected integer expert ids as argument {site.selection_arg} of "
                           f"{type(site.capture_module).__name__}, received dtype {indices.dtype}")
    indices = indices.reshape(-1, indices.shape[-1])
    if site.order_by_weight or site.zero_weight_is_skip:
        weights = _argument(args, kwargs, site.weight_arg).detach()
        if weights.numel() != indices.numel():
            raise RuntimeError(f"{site.name}: expected routing weights shaped like the ids {tuple(indices.shape)}, "
                               f"received {tuple(weights.shape)}")
        weights = weights.reshape(indices.shape)
        if site.zero_weight_is_skip:
            indices = indices.masked_fill(weights == 0, -1)
        if site.order_by_weight:
            order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
            indices = indices.gather(-1, order)
    return indices.to(torch.int64, copy=True)


def _read_one_hot_dispatch(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    dispatch = _argument(args, kwargs, site.selection_arg).detach()
    dispatch = dispatch.reshape(-1, dispatch.shape[-1]) != 0
    expert = dispatch.to(torch.int32).argmax(dim=-1)
    return torch.where(dispatch.any(dim=-1), expert, -1).to(torch.int64)[:, None]


def _read_top1_mask_and_gates(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    top1 = _argument(args, kwargs, site.selection_arg).detach()
    top1 = top1.reshape(-1, top1.shape[-1]) != 0
    gates = _argument(args, kwargs, site.weight_arg).detach().reshape(top1.shape)
    second = (gates != 0) & ~top1
    first_id = torch.where(top1.any(dim=-1), top1.to(torch.int32).argmax(dim=-1), -1)
    second_id = torch.where(second.any(dim=-1), second.to(torch.int32).argmax(dim=-1), -1)
    return torch.stack([first_id, second_id], dim=-1).to(torch.int64)


def _read_index_arg(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    indices = _argument(args, kwargs, site.selection_arg).detach()
    return indices.reshape(-1, indices.shape[-1]).to(torch.int64, copy=True)


_SELECTION_READERS = {
    EXPERTS_ARGS: _read_experts_args,
    ONE_HOT_DISPATCH: _read_one_hot_dispatch,
    TOP1_MASK_AND_GATES: _read_top1_mask_and_gates,
    INDEX_ARG: _read_index_arg,
}


def _router_logits(site: RouterSite, output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else output[site.logits_index]
    return logits.detach().reshape(-1, logits.shape[-1])


@dataclass
class _ForwardInputs:
    """What the recorder needs from one call of the model: batch size, padding masks, position ids."""

    batch_size: Optional[int]
    masks: dict[str, Optional[torch.Tensor]]
    position_ids: dict[str, Optional[torch.Tensor]]


@dataclass
class _Layout:
    """Maps a stage's flat token stream ``[B*T]`` onto output rows (see ``RoutingRecorder.routing``)."""

    batch_size: int
    seq_len: int
    valid: Optional[torch.Tensor]         # bool [B, T]; None: every token is valid
    lengths: torch.Tensor                 # int64 [S]
    packed_rows: Optional[torch.Tensor] = None     # int64 [n_valid]: output row of each valid token
    packed_columns: Optional[torch.Tensor] = None  # int64 [n_valid]: its column
    packed_shape: tuple[int, int] = (0, 0)

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


_FORWARD_INPUT_NAMES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels",
                        "attention_mask", "decoder_attention_mask", "position_ids")


class RoutingRecorder:
    """Record which experts every MoE router of a Hugging Face model selects, one forward pass at a time.

    Use as a context manager; hooks exist only inside the ``with`` block (removed on exit, also after an
    exception), and a recorder is single-use::

        with RoutingRecorder(model) as rec:
            model(input_ids=ids, attention_mask=mask)
            topk = rec.routing()          # {router name: int64 [B, T, k]}

    Args:
        model: a transformers (5.x) MoE model; see :func:`lrc_kernels.hf.find_routers` for the families.
        capture: ``"selected"`` (default) records the expert ids the experts actually received, with ``-1``
            for capacity-dropped and "skip" slots (SPEC §1: prefer captured selections). ``"logits_topk"``
            re-derives top-k from each router's logits (descending logit, the lower id first on ties), for
            comparison with logit-based methods; routers without per-expert logits (Doge, DeepSeek-V4 hash
            layers) are then not recorded.

    Only calls of ``model`` itself count as forward passes: router calls outside one (e.g. activation
    recomputation during backward, or an encoder run on its own) are ignored. Works under ``no_grad`` and in
    training, on any device; recorded tensors are detached copies on the router's device.
    """

    def __init__(self, model: nn.Module, *, capture: str = "selected"):
        if capture not in ("selected", "logits_topk"):
            raise ValueError(f"capture: expected 'selected' or 'logits_topk', received {capture!r}")
        sites = find_routers(model)
        if capture == "logits_topk":
            sites = [site for site in sites if site.logits_index is not None]
            if not sites:
                raise ValueError(f"capture: 'logits_topk' needs routers with per-expert logits; "
                                 f"{type(model).__name__} has none")
        self._model = model
        self._capture = capture
        self._sites = sites
        self._is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._forward_signature = inspect.signature(model.forward)
        self._var_keyword = next((p.name for p in self._forward_signature.parameters.values()
                                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._state = "new"
        self._handles: list = []
        self._in_forward = False
        self._forward: Optional[_ForwardInputs] = None
        self._captures: dict[str, list] = {}
        self._router_calls: dict[str, int] = {}
        # routing() and lengths() of one forward pass share its layouts (packed sequences cost a few scans)
        self._last_results: Optional[dict[str, tuple[torch.Tensor, _Layout]]] = None

    @property
    def sites(self) -> list[RouterSite]:
        """The routers this recorder records, in module order."""
        return list(self._sites)

    def __enter__(self) -> "RoutingRecorder":
        if self._state != "new":
            raise RuntimeError("RoutingRecorder is single-use: it was already entered; create a new recorder")
        self._state = "recording"
        try:
            self._handles.append(self._model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._handles.append(self._model.register_forward_hook(self._on_model_return, always_call=True))
            for site in self._sites:
                self._handles.extend(self._register_site(site))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        self._close()
        return False

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = "closed"
        self._in_forward = False
        self._forward = None
        self._captures = {}
        self._router_calls = {}
        self._last_results = None

    def _check_recording(self, what: str) -> None:
        if self._state != "recording":
            when = "before entering" if self._state == "new" else "after exiting"
            raise RuntimeError(f"RoutingRecorder.{what}() called {when} its `with` block; call it inside the block")

    def _register_site(self, site: RouterSite) -> tuple:
        label = _NvtxRange(f"capture {site.name}")
        captures_logits = self._capture == "logits_topk"
        if captures_logits or site.kind == ROUTER_LOGITS_TOPK:
            def on_router_return(module, args, kwargs, output):
                if self._in_forward:
                    with label:
                        logits = _router_logits(site, output)
                        if captures_logits:
                            # Stable descending sort = descending logit, lower id first on ties (SPEC §1).
                            order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
                            ids = order[:, :site.top_k]
                            # An id past the routed experts is a "skip" class (Zaya) -> -1.
                            ids = ids.masked_fill(ids >= site.num_experts, -1)
                            record = (ids, torch.isnan(logits).any())
                        else:
                            record = (torch.topk(logits, site.top_k, dim=-1).indices.to(torch.int64), None)
                    self._captures.setdefault(site.name, []).append(record)

            return (site.router.register_forward_hook(on_router_return, with_kwargs=True),)

        reader = _SELECTION_READERS[site.kind]

        def on_capture_call(module, args, kwargs):
            if self._in_forward:
                with label:
                    record = (reader(site, args, kwargs), None)
                self._captures.setdefault(site.name, []).append(record)

        def on_router_call(module, args):
            # Counted so that a router whose experts never ran (a fused kernel replaced the block) is an error.
            if self._in_forward:
                self._router_calls[site.name] = self._router_calls.get(site.name, 0) + 1

        return (site.capture_module.register_forward_pre_hook(on_capture_call, with_kwargs=True),
                site.router.register_forward_pre_hook(on_router_call))

    def _on_model_call(self, module, args, kwargs) -> None:
        try:
            bound = dict(self._forward_signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            bound = dict(kwargs)
        bound.update(bound.pop(self._var_keyword, None) or {})
        inputs = {name: bound.get(name) for name in _FORWARD_INPUT_NAMES}
        batch_size = next((value.shape[0] for value in inputs.values() if isinstance(value, torch.Tensor)
                           and value.ndim >= 1), None)

        def copy(value):
            return value.detach().clone() if isinstance(value, torch.Tensor) else value

        if self._is_encoder_decoder:
            masks = {"encoder": copy(inputs["attention_mask"]), "decoder": copy(inputs["decoder_attention_mask"])}
            position_ids = {"encoder": None, "decoder": None}
        else:
            masks = {"encoder": None, "decoder": copy(inputs["attention_mask"])}
            position_ids = {"encoder": None, "decoder": copy(inputs["position_ids"])}
        self._forward = _ForwardInputs(batch_size, masks, position_ids)
        self._captures = {}
        self._router_calls = {}
        self._last_results = None
        self._in_forward = True

    def _on_model_return(self, module, args, output) -> None:
        self._in_forward = False

    def _layout(self, stage: str, num_tokens: int) -> _Layout:
        batch_size = self._forward.batch_size
        if batch_size is None or batch_size == 0 or num_tokens % batch_size:
            raise RuntimeError(f"cannot split the {num_tokens} routed tokens of the {stage} into sequences: the "
                               f"batch size taken from the model inputs is {batch_size}")
        seq_len = num_tokens // batch_size
        mask = self._forward.masks[stage]
        valid = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != batch_size \
                    or mask.shape[1] < seq_len:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"attention mask of the {stage}: expected a 2-D padding mask [B={batch_size}, "
                                 f">= T={seq_len}] (1 = token, 0 = padding), received {shape}")
            # With a KV cache the mask also covers past tokens; its last T columns are this call's tokens.
            valid = mask[:, -seq_len:] != 0
        positions = self._forward.position_ids[stage]
        if isinstance(positions, torch.Tensor) and positions.ndim == 2 and positions.shape[0] == batch_size \
                and positions.shape[1] >= seq_len and seq_len > 1:
            positions = positions[:, -seq_len:]
            token_valid = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
            first_valid = token_valid & (token_valid.cumsum(dim=1) == 1)
            starts = token_valid & ((positions.to(token_valid.device) == 0) | first_valid)
            if bool((starts & ~first_valid).any()):
                return self._packed_layout(batch_size, seq_len, token_valid, starts)
        if valid is None:
            lengths = torch.full((batch_size,), seq_len, dtype=torch.int64)
        else:
            # Valid length of a row = one past its last valid token (trailing padding excluded).
            columns = torch.arange(1, seq_len + 1, device=valid.device)
            lengths = (valid * columns).amax(dim=1).to(torch.int64)
        return _Layout(batch_size, seq_len, valid, lengths)

    @staticmethod
    def _packed_layout(batch_size: int, seq_len: int, valid: torch.Tensor, starts: torch.Tensor) -> _Layout:
        flat_valid, flat_starts = valid.reshape(-1), starts.reshape(-1)
        sequence = flat_starts.cumsum(dim=0) - 1                  # output row of every token (valid ones)
        rank = flat_valid.cumsum(dim=0) - 1                       # rank among the valid tokens
        start_rank = rank[flat_starts]                            # [S]
        rows = sequence[flat_valid]
        columns = rank[flat_valid] - start_rank[rows]
        lengths = torch.bincount(rows, minlength=start_rank.numel()).to(torch.int64)
        shape = (start_rank.numel(), int(lengths.max()))
        return _Layout(batch_size, seq_len, valid, lengths, rows, columns, shape)

    def _results(self, what: str) -> dict[str, tuple[torch.Tensor, _Layout]]:
        self._check_recording(what)
        if self._forward is None:
            raise RuntimeError(f"RoutingRecorder.{what}(): no forward pass of the model was recorded yet")
        if self._last_results is not None:
            return self._last_results
        layouts: dict[tuple[str, int], _Layout] = {}
        results = {}
        for site in self._sites:
            records = self._captures.get(site.name)
            if not records:
                if self._router_calls.get(site.name):
                    raise RuntimeError(
                        f"{site.name}: the router ran but {type(site.capture_module).__name__} was never called, "
                        f"so its selection was not captured (a fused MoE kernel, e.g. from the `kernels` hub, "
                        f"probably replaced the block's forward; load the model without it)")
                continue  # the router did not run in the last forward (e.g. encoder given as encoder_outputs)
            if len(records) > 1:
                raise RuntimeError(f"{site.name}: the router ran {len(records)} times in one forward pass "
                                   f"(a weight-shared or looped layer); capture supports one call per router")
            selection, has_nan = records[0]
            if has_nan is not None and bool(has_nan):
                raise ValueError(f"{site.name}: router logits contain NaN; top-k from logits is undefined")
            key = (site.stage, selection.shape[0])
            if key not in layouts:
                layouts[key] = self._layout(*key)
            results[site.name] = (selection, layouts[key])
        if not self._in_forward:  # a pass still running may add routers
            self._last_results = results
        return results

    def routing(self) -> dict[str, torch.Tensor]:
        """The routing of the last forward pass of the model.

        Returns:
            ``{site.name: int64 [S, T, k]}`` for every router that ran in that pass (``rec.sites`` order),
            on the router's device. ``-1`` marks "no expert": a padding token (``attention_mask`` == 0 for
            decoder and encoder-only stacks, ``decoder_attention_mask`` for a seq2seq decoder; with a KV cache
            the mask's last T columns), a capacity-dropped slot, or a skip choice.

            Layout: row s, column t is token t of batch row s (S = B), unless the call passed 2-D
            ``position_ids`` that restart at 0 inside a row (packed sequences). Then every packed sequence is
            its own row: a sequence starts at a row's first non-padding token and at every later non-padding
            token with position id 0; rows follow batch order, then order inside the batch row; each row
            holds its sequence's non-padding tokens from column 0, followed by ``-1`` up to the longest
            sequence (T). :meth:`lengths` gives each row's length.

        Raises:
            RuntimeError: called outside the ``with`` block, before any forward pass, or when a router ran
                more than once in the pass.
            ValueError: a non-2-D attention mask; NaN router logits under ``capture="logits_topk"``.
        """
        with _NvtxRange("routing layout"):
            return {name: layout.apply(selection) for name, (selection, layout) in self._results("routing").items()}

    def lengths(self) -> dict[str, torch.Tensor]:
        """Valid length of every row of :meth:`routing`: ``{site.name: int64 [S]}`` (SPEC §1 ``lengths``).

        A row's length is one past its last non-padding token, so trailing padding is excluded while
        left padding stays as ``-1`` tokens; packed sequences have no padding inside their length.
        """
        return {name: layout.lengths for name, (_, layout) in self._results("lengths").items()}


__all__ = ["RoutingRecorder"]
