"""Live capture of MoE routing from a Hugging Face model: :class:`RoutingRecorder`.

Hooks only clone/detach and run device-side tensor ops (no ``.item()``, no ``.cpu()``, no branching on tensor
values), so capture never synchronises with the device. The layout work (padding, packed sequences) runs in
:meth:`RoutingRecorder.routing`, after the forward pass; stitching the passes of a whole block (including
``model.generate()`` calls) into one :class:`~lrc_kernels.RoutingTrace` runs in :meth:`RoutingRecorder.trace`
(:mod:`lrc_kernels.hf.stitch`).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from lrc_kernels._nvtx import NvtxRange
from lrc_kernels.trace import RoutingTrace

from .routers import ROUTER_LOGITS_TOPK, RouterSite, find_routers
from .selection import SELECTION_READERS
from .stitch import (ForwardInputs, GenerateRecord, GenerateWrapper, Layout, PassRecord, accumulated_inputs,
                     forward_layout, stitch, validated_selection)


def _router_logits(site: RouterSite, output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else output[site.logits_index]
    return logits.detach().reshape(-1, logits.shape[-1])


_FORWARD_INPUT_NAMES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels",
                        "attention_mask", "decoder_attention_mask", "position_ids")


class RoutingRecorder:
    """Record which experts every MoE router of a Hugging Face model selects: the last forward pass, or all.

    Use as a context manager; hooks exist only inside the ``with`` block (removed on exit, also after an
    exception), and a recorder is single-use. :meth:`routing` and :meth:`lengths` give the last forward pass,
    inside the block and after it::

        with RoutingRecorder(model) as rec:
            model(input_ids=ids, attention_mask=mask)
            topk = rec.routing()          # {router name: int64 [B, T, k]}

    With ``accumulate=True`` the recorder also keeps every pass, and :meth:`trace` stitches them, including
    ``model.generate()`` calls, into one :class:`lrc_kernels.RoutingTrace`::

        with RoutingRecorder(model, accumulate=True) as rec:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32)
        trace = rec.trace()               # [n_layers, B, prompt + generated - 1, k], phases 0/1

    Args:
        model: a transformers (5.x) MoE model; see :func:`lrc_kernels.hf.find_routers` for the families.
        capture: ``"selected"`` (default) records the expert ids the experts actually received, with ``-1``
            for capacity-dropped and "skip" slots (SPEC §1: prefer captured selections). ``"logits_topk"``
            re-derives top-k from each router's logits (descending logit, the lower id first on ties), for
            comparison with logit-based methods; routers without per-expert logits (Doge, DeepSeek-V4 hash
            layers) are then not recorded.
        accumulate: keep every forward pass of the block for :meth:`trace` (decoder-only models).

    Only calls of ``model`` itself count as forward passes: router calls outside one (e.g. activation
    recomputation during backward, or an encoder run on its own) are ignored. Works under ``no_grad`` and in
    training, on any device; recorded tensors are detached copies on the router's device.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR            # the bundled tiny MoE
        >>> model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)
        >>> with RoutingRecorder(model, accumulate=True) as rec:
        ...     _ = model(input_ids=torch.tensor([[1, 2, 3]]))
        >>> rec.trace().topk.shape                                          # [n_layers, S, T, k]
        torch.Size([4, 1, 3, 2])
    """

    def __init__(self, model: nn.Module, *, capture: str = "selected", accumulate: bool = False):
        if capture not in ("selected", "logits_topk"):
            raise ValueError(f"capture: expected 'selected' or 'logits_topk', received {capture!r}")
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate: expected a bool, received {type(accumulate).__name__}")
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
        if accumulate and self._is_encoder_decoder:
            raise ValueError(f"accumulate: RoutingRecorder(accumulate=True) records decoder-only models; "
                             f"{type(model).__name__} is an encoder-decoder model (generate() runs its encoder "
                             f"outside the model call)")
        self._accumulate = accumulate
        # Accumulated: one PassRecord per plain forward, one GenerateRecord per generate() call, in order.
        self._groups: list = []
        self._generate: Optional[GenerateRecord] = None  # the generate() call running now
        self._failure: Optional[str] = None               # why trace() cannot be trusted
        self._last_failed = False
        self._forward_signature = inspect.signature(model.forward)
        self._var_keyword = next((p.name for p in self._forward_signature.parameters.values()
                                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._state = "new"
        self._handles: list = []
        self._in_forward = False
        self._forward: Optional[ForwardInputs] = None
        self._captures: dict[str, list] = {}
        self._router_calls: dict[str, int] = {}
        self._other_modality: dict[str, torch.Tensor] = {}  # Ernie-4.5-VL's token types of the last pass
        # routing() and lengths() of one forward pass share its layouts (packed sequences cost a few scans)
        self._last_results: Optional[dict[str, tuple[torch.Tensor, Layout]]] = None

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
            if self._accumulate:
                self._handles.append(GenerateWrapper(self))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        if exc_type is not None:
            self._fail(f"its `with` block ended with {exc_type.__name__}")
        self._close()
        return False

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = "closed"
        self._in_forward = False
        self._generate = None

    def _fail(self, reason: str) -> None:
        self._failure = self._failure or reason
        self._last_failed = True

    def _check_recording(self, what: str) -> None:
        if self._state == "new":
            raise RuntimeError(f"RoutingRecorder.{what}() called before entering its `with` block")
        if self._last_failed:
            raise RuntimeError(f"RoutingRecorder.{what}(): {self._failure}, so the recorded routing is "
                               f"incomplete; record again with a new recorder")

    def _register_site(self, site: RouterSite) -> tuple:
        label = NvtxRange(f"capture {site.name}")
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

        reader = SELECTION_READERS[site.kind]

        def on_capture_call(module, args, kwargs):
            if self._in_forward:
                with label:
                    record = (reader(site, args, kwargs), None)
                self._captures.setdefault(site.name, []).append(record)

        def on_router_call(module, args):
            # Counted so that a router whose experts never ran (a fused kernel replaced the block) is an error.
            if self._in_forward:
                self._router_calls[site.name] = self._router_calls.get(site.name, 0) + 1
                position = site.other_modality_arg
                if position is not None and len(args) > position and isinstance(args[position], torch.Tensor):
                    self._other_modality[site.name] = args[position].detach()  # checked after the pass

        return (site.capture_module.register_forward_pre_hook(on_capture_call, with_kwargs=True),
                site.router.register_forward_pre_hook(on_router_call))

    def _on_model_call(self, module, args, kwargs) -> None:
        if not args:  # generate() and most callers pass keywords only: no signature binding per step
            bound = dict(kwargs)
        else:
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

        if self._accumulate:  # decoder-only (checked in __init__)
            self._forward = accumulated_inputs(inputs, batch_size)
        elif self._is_encoder_decoder:
            masks = {"encoder": copy(inputs["attention_mask"]), "decoder": copy(inputs["decoder_attention_mask"])}
            self._forward = ForwardInputs(batch_size, masks, {"encoder": None, "decoder": None})
        else:
            masks = {"encoder": None, "decoder": copy(inputs["attention_mask"])}
            self._forward = ForwardInputs(batch_size, masks, {"encoder": None, "decoder": copy(inputs["position_ids"])})
        self._captures = {}
        self._router_calls = {}
        self._other_modality = {}
        self._last_results = None
        self._last_failed = False
        self._in_forward = True

    def _on_model_return(self, module, args, output) -> None:
        self._in_forward = False
        if output is None:  # always-called hook after the forward raised
            self._fail("a forward pass of the model raised an exception")
        elif self._accumulate:
            record = PassRecord(self._forward, self._captures, self._router_calls)
            (self._generate.passes if self._generate is not None else self._groups).append(record)

    def _results(self, what: str) -> dict[str, tuple[torch.Tensor, Layout]]:
        self._check_recording(what)
        if self._forward is None:
            raise RuntimeError(f"RoutingRecorder.{what}(): no forward pass of the model was recorded yet")
        if self._last_results is not None:
            return self._last_results
        layouts: dict[tuple[str, int], Layout] = {}
        results = {}
        for site in self._sites:
            token_types = self._other_modality.get(site.name)
            if token_types is not None and bool(token_types.any()):
                raise ValueError(f"{site.name}: this forward pass has image/video tokens (nonzero token types "
                                 f"passed to {type(site.router).__name__}), which its vision experts process; "
                                 f"the capture covers text-only forward passes")
            selection = validated_selection(site, PassRecord(self._forward, self._captures, self._router_calls))
            if selection is None:
                continue  # the router did not run in the last forward (e.g. encoder given as encoder_outputs)
            key = (site.stage, selection.shape[0])
            if key not in layouts:
                layouts[key] = forward_layout(self._forward, *key)
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
        with NvtxRange("routing layout"):
            return {name: layout.apply(selection) for name, (selection, layout) in self._results("routing").items()}

    def lengths(self) -> dict[str, torch.Tensor]:
        """Valid length of every row of :meth:`routing`: ``{site.name: int64 [S]}`` (SPEC §1 ``lengths``).

        A row's length is one past its last non-padding token, so trailing padding is excluded while
        left padding stays as ``-1`` tokens; packed sequences have no padding inside their length.
        """
        return {name: layout.lengths for name, (_, layout) in self._results("lengths").items()}


    def trace(self) -> RoutingTrace:
        """Every token the model processed in the block so far, as one :class:`lrc_kernels.RoutingTrace` (CPU).

        Needs ``accumulate=True``. Rows follow the order of the calls: each plain forward pass adds its rows as
        :meth:`routing` lays them out (phase 0); each ``model.generate()`` call adds one row per sequence it
        generated: the prompt tokens without padding from column 0 (phase 0), then each generated token the
        model forwarded while the sequence was unfinished (phase 1), ``-1`` after its length. The length is
        prompt + generated − 1: the last sampled token is never forwarded, and a row that sampled an EOS
        (``eos_token_id`` of the call or of the generation config) ends before it; the tokens generate() keeps
        feeding a finished row are not part of it. Layers are the routers in ``rec.sites`` order, named by
        their modules; k is the largest top-k (``-1`` pads the others).

        Raises:
            RuntimeError: before the block, without ``accumulate=True``, with nothing recorded, or after an
                exception inside the block (in a forward pass, in generate(), or ending the block).
            ValueError: generate() reordered its rows or fed more than one token per step (beam search,
                assisted or speculative decoding).
        """
        if not self._accumulate:
            raise RuntimeError("RoutingRecorder.trace() needs RoutingRecorder(model, accumulate=True)")
        self._check_recording("trace")
        if self._failure is not None:
            raise RuntimeError(f"RoutingRecorder.trace(): {self._failure}, so the recorded routing is "
                               f"incomplete; record again with a new recorder")
        if not self._groups:
            raise RuntimeError("RoutingRecorder.trace(): no forward pass of the model was recorded yet")
        config = getattr(self._model, "config", None)
        meta = {"source": "lrc_kernels.hf.RoutingRecorder", "model": type(self._model).__name__,
                "model_type": str(getattr(config, "model_type", "")), "capture": self._capture}
        with NvtxRange("stitch trace"):
            return stitch(self._groups, self._sites, validated_selection, meta)


__all__ = ["RoutingRecorder"]
